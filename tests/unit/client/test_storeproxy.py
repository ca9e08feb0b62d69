"""The store proxy's pure parts: the error Nix shows for a failed farm build, and log lines as
``STDERR_NEXT`` messages."""

from __future__ import annotations

import asyncio
from typing import cast

import pytest

from bigtent.client.storeproxy import ClientSink, failure_message
from bigtent.nix import daemonwire as wire


@pytest.mark.parametrize(
    ("failed", "shown", "absent"),
    [
        ([], ["build 7 failed on the farm"], ["last log lines"]),
        (
            [("/nix/store/a-x.drv", "build_failure: exit 1", "compiling\nerror: boom\n")],
            ["building /nix/store/a-x.drv failed on the farm: build_failure: exit 1",
             "last log lines:\n> compiling\n> error: boom"],
            [],
        ),
        (
            [("/nix/store/a-x.drv", "timed_out", "  \n")],
            ["a-x.drv failed on the farm: timed_out"],
            ["last log lines"],
        ),
        (
            [("/nix/store/a-x.drv", "build_failure", "\n".join(f"l{i}" for i in range(100)))],
            ["> l99", "> l75"],
            ["> l74\n"],
        ),
    ],
)  # fmt: skip
def test_failure_message(
    failed: list[tuple[str, str, str]], shown: list[str], absent: list[str]
) -> None:
    text = failure_message(7, failed)
    for piece in shown:
        assert piece in text
    for piece in absent:
        assert piece not in text


class _Writer:
    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


def test_each_log_line_is_one_message() -> None:
    writer = _Writer()
    sink = ClientSink(cast(asyncio.StreamWriter, writer))
    sink.line("one\ntwo")
    sink.error("it broke")
    expected = [wire.stderr_next(t) for t in ("one\n", "two\n", "bigtent: it broke\n")]
    assert writer.data == b"".join(expected)
