"""``GET /builds/{id}?wait=&seen=``: the parameters both request paths validate (pure)."""

from __future__ import annotations

import re

import pytest

from bigtent.apilimits import BUILD_WAIT_MAX_SECS, PROGRESS_TOKEN_MAX_CHARS
from bigtent.errors import InvalidParameter
from bigtent.runner.http.routes.builds import BuildWait, build_wait


def test_no_wait() -> None:
    assert build_wait(None, None) is None


@pytest.mark.parametrize(
    ("wait", "secs"), [("0", 0.0), ("2.5", 2.5), (f"{BUILD_WAIT_MAX_SECS:g}", BUILD_WAIT_MAX_SECS)]
)
def test_a_wait(wait: str, secs: float) -> None:
    assert build_wait(wait, "running.1.0.0.1.0.0.0") == BuildWait(secs, "running.1.0.0.1.0.0.0")


@pytest.mark.parametrize(
    ("wait", "seen", "problem"),
    [
        ("1", None, "wait and seen go together"),
        (None, "queued.1.1.0.0.0.0.0", "wait and seen go together"),
        ("soon", "t", "wait must be a number of seconds from 0 to 10 (got 'soon')"),
        ("-1", "t", "wait must be a number of seconds"),
        ("10.5", "t", "wait must be a number of seconds"),
        ("nan", "t", "wait must be a number of seconds"),
        ("inf", "t", "wait must be a number of seconds"),
        ("1", "", "seen must have 1 to"),
        ("1", "x" * (PROGRESS_TOKEN_MAX_CHARS + 1), "seen must have 1 to"),
    ],
)
def test_bad_values_are_a_422(wait: str | None, seen: str | None, problem: str) -> None:
    with pytest.raises(InvalidParameter, match=re.escape(problem)) as refused:
        build_wait(wait, seen)
    assert refused.value.http_status == 422
