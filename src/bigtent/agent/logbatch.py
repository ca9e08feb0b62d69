"""A step's log lines, sent to the runner in batches (``log`` messages)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from bigtent.protocol import (
    MAX_LOG_LINE_CHARS,
    MAX_LOG_LINES_PER_BATCH,
    LeaseId,
    Log,
    StepId,
)

LOG_FLUSH_SECS = 0.1
"""A log batch is sent at most this long after its first line arrived."""
LOG_BATCH_LINES = 500
"""A log batch is sent as soon as it has this many lines."""
LOG_BATCH_CHARS = 128 * 1024
"""...or this many characters: even fully JSON-escaped (6 bytes a character) a batch stays
under ``MAX_MESSAGE_BYTES``."""
LOG_BACKLOG_LINES = 20 * LOG_BATCH_LINES
"""Unsent lines beyond which the build's log reader waits for the runner (backpressure)."""
SendLog = Callable[[Log], Awaitable[object]]


class LogBatcher:
    """Collects a step's log lines and sends them as ``log`` batches.

    A batch goes out ``LOG_FLUSH_SECS`` after its first line, or at once when it reaches
    ``LOG_BATCH_LINES`` lines or ``LOG_BATCH_CHARS`` characters — never one message per line.
    ``add`` is the realise line sink; ``run`` is the sender, ended by ``close`` after a final
    flush. A failed send drops that batch (the log is best effort; the result is not).
    """

    def __init__(
        self,
        step_id: StepId,
        lease_id: LeaseId,
        send: SendLog,
        *,
        flush_secs: float = LOG_FLUSH_SECS,
        batch_lines: int = LOG_BATCH_LINES,
        batch_chars: int = LOG_BATCH_CHARS,
    ) -> None:
        self._step_id = step_id
        self._lease_id = lease_id
        self._send = send
        self._flush_secs = flush_secs
        self._batch_lines = min(batch_lines, MAX_LOG_LINES_PER_BATCH)
        self._batch_chars = batch_chars
        self._lines: list[str] = []
        self._chars = 0
        self._pending = asyncio.Event()
        self._full = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._closed = False
        self.lines_seen = 0

    def add(self, line: str) -> Awaitable[None] | None:
        """Queue one line; returns an awaitable only when the backlog is too long."""
        if len(line) > MAX_LOG_LINE_CHARS:
            line = line[: MAX_LOG_LINE_CHARS - 3] + "..."
        self._lines.append(line)
        self._chars += len(line)
        self.lines_seen += 1
        self._pending.set()
        self._drained.clear()
        if len(self._lines) >= self._batch_lines or self._chars >= self._batch_chars:
            self._full.set()
        if len(self._lines) >= LOG_BACKLOG_LINES:
            return self._wait_drained()
        return None

    async def _wait_drained(self) -> None:
        await self._drained.wait()

    def close(self) -> None:
        """No more lines: ``run`` sends what is left and returns."""
        self._closed = True
        self._pending.set()
        self._full.set()

    async def run(self) -> None:
        while True:
            await self._pending.wait()
            if not self._full.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._full.wait(), self._flush_secs)
            await self._flush()
            if self._closed and not self._lines:
                return

    async def _flush(self) -> None:
        while self._lines:
            batch: list[str] = []
            size = 0
            for line in self._lines:
                if batch and (len(batch) >= self._batch_lines or size >= self._batch_chars):
                    break
                batch.append(line)
                size += len(line)
            del self._lines[: len(batch)]
            self._chars -= size
            await self._send(Log(step_id=self._step_id, lease_id=self._lease_id, lines=batch))
        self._pending.clear()
        self._full.clear()
        self._drained.set()
