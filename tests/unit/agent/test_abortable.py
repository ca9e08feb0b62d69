"""Run this unless aborted (``agent/abortable.py``): the one race of work against stops."""

from __future__ import annotations

import asyncio

import pytest

from bigtent.agent.abortable import Interrupted, unless_set

WAIT = 5.0


class Work:
    """Work that ends when told to, and says whether it was cancelled."""

    def __init__(self, value: int = 7) -> None:
        self.value = value
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.cancelled = False

    async def run(self) -> int:
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        return self.value


async def test_work_that_ends_gives_its_result() -> None:
    work = Work()
    work.release.set()
    assert await unless_set(work.run(), asyncio.Event()) == 7


async def test_a_stop_cancels_the_work_and_names_itself() -> None:
    work, abort, limit = Work(), asyncio.Event(), asyncio.Event()
    race = asyncio.create_task(unless_set(work.run(), abort, limit))
    await asyncio.wait_for(work.started.wait(), WAIT)
    limit.set()
    with pytest.raises(Interrupted) as stopped:
        await asyncio.wait_for(race, WAIT)
    assert stopped.value.by is limit
    assert work.cancelled


async def test_a_stop_set_before_the_start_still_lets_finished_work_win() -> None:
    abort = asyncio.Event()
    abort.set()

    async def instant() -> str:
        return "done"

    assert await unless_set(instant(), abort) == "done"


async def test_the_timeout_interrupts_with_no_event() -> None:
    work = Work()
    with pytest.raises(Interrupted) as stopped:
        await unless_set(work.run(), asyncio.Event(), timeout=0.01)
    assert stopped.value.by is None
    assert work.cancelled


async def test_the_work_s_error_passes_through() -> None:
    async def fails() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await unless_set(fails(), asyncio.Event())


async def test_cancelling_the_caller_cancels_the_work() -> None:
    work = Work()
    race = asyncio.create_task(unless_set(work.run(), asyncio.Event()))
    await asyncio.wait_for(work.started.wait(), WAIT)
    race.cancel()
    with pytest.raises(asyncio.CancelledError):
        await race
    assert work.cancelled
