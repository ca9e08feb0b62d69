"""The per-file gate: a publish and a collection of the same file name never overlap."""

from __future__ import annotations

import asyncio

from bigtent.runner.retention.gate import FileGate


async def test_holders_of_one_name_take_turns_and_the_gate_empties() -> None:
    gate = FileGate()
    order: list[str] = []
    started = asyncio.Event()

    async def publish() -> None:
        async with gate.hold("nar/a"):
            started.set()
            order.append("publish in")
            await asyncio.sleep(0)
            order.append("publish out")

    async def collect() -> None:
        await started.wait()
        async with gate.hold_all(["nar/b", "nar/a"]):
            order.append("collect")

    await asyncio.gather(publish(), collect())
    assert order == ["publish in", "publish out", "collect"]
    assert len(gate) == 0


async def test_a_cancelled_wait_releases_nothing_it_did_not_take() -> None:
    gate = FileGate()
    async with gate.hold("nar/a"):
        waiter = asyncio.create_task(gate.hold_all(["nar/a", "nar/b"]).__aenter__())
        await asyncio.sleep(0)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        assert len(gate) == 1  # only the holder's lock is left, still held
    assert len(gate) == 0
