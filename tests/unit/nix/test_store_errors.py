"""Which line of Nix's stderr says what went wrong (``last_error_line``)."""

from __future__ import annotations

import pytest

from bigtent.nix.store import last_error_line

DECLINED = (
    "error: unable to start any build; remote machines may not have all required system features."
)


@pytest.mark.parametrize(
    ("stderr", "line"),
    [
        ("building x\nerror: builder failed\nmore\n", "error: builder failed"),
        ("no error prefix here\nlast line\n", "last line"),
        ("", ""),
        (DECLINED, DECLINED),
        (
            "cannot build on 'ssh://b': error: cannot connect to 'b'\n" + DECLINED,
            "cannot build on 'ssh://b': error: cannot connect to 'b'; " + DECLINED,
        ),
    ],
)
def test_last_error_line(stderr: str, line: str) -> None:
    assert last_error_line(stderr) == line
