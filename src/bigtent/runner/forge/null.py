"""Reporters that send nothing: ``NullReporter`` (no forge configured) and
``RecordingReporter`` (tests: keeps every report, and lets a test wait for one)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from bigtent.runner.forge.model import EvalReport


class NullReporter:
    """Used when no forge reporter is configured: reports go nowhere."""

    async def report(self, report: EvalReport) -> None:
        return None


class RecordingReporter:
    """Keeps every report in order; ``wait_for`` waits (bounded) for one that matches."""

    def __init__(self) -> None:
        self.reports: list[EvalReport] = []
        self._changed = asyncio.Condition()

    async def report(self, report: EvalReport) -> None:
        async with self._changed:
            self.reports.append(report)
            self._changed.notify_all()

    async def wait_for(
        self, predicate: Callable[[EvalReport], bool], timeout: float = 30.0
    ) -> EvalReport:
        """The first report (already received or coming) for which ``predicate`` holds;
        TimeoutError after ``timeout`` seconds."""
        async with asyncio.timeout(timeout), self._changed:
            while True:
                for r in self.reports:
                    if predicate(r):
                        return r
                await self._changed.wait()
