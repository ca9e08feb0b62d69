"""A step's log lines, batched to the runner (``agent/logbatch.py``)."""

from __future__ import annotations

import asyncio

from bigtent.agent import logbatch
from bigtent.agent.logbatch import LOG_BATCH_CHARS, LogBatcher
from bigtent.protocol import (
    MAX_LOG_LINE_CHARS,
    MAX_LOG_LINES_PER_BATCH,
    MAX_MESSAGE_BYTES,
    LeaseId,
    Log,
    StepId,
    encode,
)

WAIT = 5.0


class Collector:
    def __init__(self) -> None:
        self.batches: list[Log] = []
        self.arrived = asyncio.Event()

    async def send(self, message: Log) -> bool:
        self.batches.append(message)
        self.arrived.set()
        return True


async def test_log_lines_are_batched_not_sent_one_by_one() -> None:
    sink = Collector()
    batcher = LogBatcher(StepId(1), LeaseId("l"), sink.send)
    sender = asyncio.create_task(batcher.run())
    for i in range(1200):
        assert batcher.add(f"line {i}") is None
    batcher.close()
    await asyncio.wait_for(sender, WAIT)
    assert [len(b.lines) for b in sink.batches] == [500, 500, 200]
    assert [line for b in sink.batches for line in b.lines] == [f"line {i}" for i in range(1200)]
    assert all((b.step_id, b.lease_id) == (1, "l") for b in sink.batches)


async def test_log_batch_is_flushed_after_the_interval() -> None:
    sink = Collector()
    batcher = LogBatcher(StepId(1), LeaseId("l"), sink.send, flush_secs=0.01)
    sender = asyncio.create_task(batcher.run())
    try:
        batcher.add("a")
        batcher.add("b")
        await asyncio.wait_for(sink.arrived.wait(), WAIT)
        assert [b.lines for b in sink.batches] == [["a", "b"]]
    finally:
        batcher.close()
        await asyncio.wait_for(sender, WAIT)
    assert len(sink.batches) == 1


async def test_log_batches_respect_protocol_limits() -> None:
    sink = Collector()
    batcher = LogBatcher(StepId(1), LeaseId("l"), sink.send, batch_lines=10_000)
    sender = asyncio.create_task(batcher.run())
    long = "\x01" * (MAX_LOG_LINE_CHARS * 2)  # JSON-escaped 6x
    for _ in range(40):
        batcher.add(long)
    batcher.close()
    await asyncio.wait_for(sender, WAIT)
    assert sum(len(b.lines) for b in sink.batches) == 40
    for batch in sink.batches:
        assert len(batch.lines) <= MAX_LOG_LINES_PER_BATCH
        assert all(len(line) <= MAX_LOG_LINE_CHARS for line in batch.lines)
        assert sum(map(len, batch.lines)) <= LOG_BATCH_CHARS + MAX_LOG_LINE_CHARS
        assert len(encode(batch).encode()) <= MAX_MESSAGE_BYTES


async def test_log_backlog_applies_backpressure() -> None:
    release = asyncio.Event()

    async def slow_send(message: Log) -> bool:
        await release.wait()
        return True

    batcher = LogBatcher(StepId(1), LeaseId("l"), slow_send)
    sender = asyncio.create_task(batcher.run())
    waits = [batcher.add(str(i)) for i in range(logbatch.LOG_BACKLOG_LINES + 1)]
    pending = [w for w in waits if w is not None]
    assert pending, "a long backlog must make the log reader wait"
    release.set()
    await asyncio.wait_for(asyncio.gather(*pending), WAIT)
    batcher.close()
    await asyncio.wait_for(sender, WAIT)
