"""How a serve command is cut short (``agent/servepool.py``: ``command``), with a fake
connection: no Nix process."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from bigtent.agent.servepool import SERVE_BACKSTOP_SECS, Stopped, command
from bigtent.nix.serve import ServeConnection
from bigtent.nix.store import RealiseStatus

WAIT = 5.0


class FakeConnection:
    """What ``command`` uses of a ``ServeConnection``."""

    def __init__(self) -> None:
        self.sink: Any = None
        self.alive = True
        self.drained = 0
        self.closed = False

    def drain_log(self) -> None:
        self.drained += 1

    def kill(self) -> None:
        self.alive = False

    async def wait_closed(self) -> None:
        self.closed = True


def on_line(line: str) -> None:
    return None


async def test_a_command_that_ends_gives_its_reply_and_its_whole_log() -> None:
    conn = FakeConnection()

    async def reply() -> str:
        assert conn.sink is on_line  # the log goes to the step while the command runs
        return "reply"

    got = await command(
        cast(ServeConnection, conn), reply(), on_line, asyncio.Event(), asyncio.Event()
    )
    assert got == "reply"
    assert conn.drained == 1 and conn.alive and conn.sink is None


@pytest.mark.parametrize(
    ("stop", "status", "error"),
    [
        ("abort", RealiseStatus.ABORTED, "aborted"),
        ("log_limit", RealiseStatus.LOG_LIMIT, "error: the build log exceeded its limit"),
        (
            "backstop",
            RealiseStatus.TIMED_OUT,
            f"error: the build did not end {SERVE_BACKSTOP_SECS} s after its timeout",
        ),
    ],
)
async def test_a_stopped_command_kills_its_process(
    stop: str, status: RealiseStatus, error: str
) -> None:
    conn = FakeConnection()
    abort, log_limit = asyncio.Event(), asyncio.Event()
    started = asyncio.Event()

    async def never() -> None:
        started.set()
        await asyncio.Event().wait()

    running = asyncio.create_task(
        command(
            cast(ServeConnection, conn),
            never(),
            on_line,
            abort,
            log_limit,
            backstop=0.01 if stop == "backstop" else None,
        )
    )
    await asyncio.wait_for(started.wait(), WAIT)
    {"abort": abort, "log_limit": log_limit}.get(stop, asyncio.Event()).set()
    with pytest.raises(Stopped) as stopped:
        await asyncio.wait_for(running, WAIT)
    assert (stopped.value.status, stopped.value.error) == (status, error)
    assert not conn.alive and conn.closed and conn.drained == 0 and conn.sink is None
