"""Log lines a persistent agent could not send while it had no session (architecture §3: a short
network cut loses no work, and the log is part of the work).

Pure bookkeeping, no I/O: the session ``add``s a ``log`` batch it could not send, and after
reconnecting ``take``s the held step's lines back out, in order, before re-sending its result.
Memory is bounded per step and in total; beyond a bound the oldest lines are dropped and the
next batch out starts with one marker line saying how many were lost.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from bigtent.protocol import MAX_LOG_LINES_PER_BATCH, LeaseId, Log, StepId

STEP_LIMIT_CHARS = 1024 * 1024
"""Unsent log kept per step (characters, plus one per line)."""
TOTAL_LIMIT_CHARS = 8 * 1024 * 1024
"""Unsent log kept for all steps together."""


def lost_marker(count: int) -> str:
    """The line that stands for ``count`` lines dropped from a full backlog."""
    plural = "line" if count == 1 else "lines"
    return f"[bigtent: {count} log {plural} lost while the agent was disconnected]"


def _cost(line: str) -> int:
    return len(line) + 1


@dataclass(slots=True)
class _StepLog:
    lease_id: LeaseId
    lines: deque[str] = field(default_factory=deque)
    chars: int = 0
    lost: int = 0
    """Lines dropped before ``lines[0]`` that no marker has reported yet."""


@dataclass(frozen=True, slots=True)
class Taken:
    """A batch taken out of the backlog: give it back with ``put_back`` if its send failed."""

    step_id: StepId
    lease_id: LeaseId
    lost: int
    lines: tuple[str, ...]

    def message(self) -> Log:
        marker = [lost_marker(self.lost)] if self.lost else []
        return Log(step_id=self.step_id, lease_id=self.lease_id, lines=[*marker, *self.lines])


class LogBacklog:
    """Unsent log lines per held step, oldest first, within ``step_limit`` and ``total_limit``
    characters."""

    def __init__(
        self, step_limit: int = STEP_LIMIT_CHARS, total_limit: int = TOTAL_LIMIT_CHARS
    ) -> None:
        self._step_limit = step_limit
        self._total_limit = total_limit
        self._steps: dict[StepId, _StepLog] = {}
        self._chars = 0

    def __contains__(self, step_id: object) -> bool:
        """A step is in the backlog until all its lines are taken and sent: while it is, new
        batches of it must queue behind (``add``), not be sent ahead."""
        return step_id in self._steps

    @property
    def steps(self) -> list[StepId]:
        return list(self._steps)

    @property
    def chars(self) -> int:
        return self._chars

    def lines(self, step_id: StepId) -> list[str]:
        """What ``step_id`` would send now, the marker included (for tests and logs)."""
        entry = self._steps.get(step_id)
        if entry is None:
            return []
        return ([lost_marker(entry.lost)] if entry.lost else []) + list(entry.lines)

    def add(self, batch: Log) -> None:
        """Queue ``batch`` after the step's earlier lines; drop the oldest beyond the bounds."""
        entry = self._steps.setdefault(batch.step_id, _StepLog(batch.lease_id))
        for line in batch.lines:
            entry.lines.append(line)
            entry.chars += _cost(line)
            self._chars += _cost(line)
        self._trim(entry, self._step_limit)
        self._fit_total()

    def take(self, step_id: StepId, max_lines: int, max_chars: int) -> Taken | None:
        """The step's next batch (at most ``max_lines`` lines and about ``max_chars``
        characters, a pending marker counting as a line), removed from the backlog; None when
        it has nothing left (the step then leaves the backlog)."""
        entry = self._steps.get(step_id)
        if entry is None:
            return None
        if not entry.lines and not entry.lost:
            del self._steps[step_id]
            return None
        limit = max(1, min(max_lines, MAX_LOG_LINES_PER_BATCH) - (1 if entry.lost else 0))
        lines: list[str] = []
        size = 0
        while entry.lines and len(lines) < limit and (not lines or size < max_chars):
            line = entry.lines.popleft()
            lines.append(line)
            size += len(line)
            entry.chars -= _cost(line)
            self._chars -= _cost(line)
        lost, entry.lost = entry.lost, 0
        return Taken(step_id, entry.lease_id, lost, tuple(lines))

    def put_back(self, taken: Taken) -> None:
        """Return a batch whose send failed to the front of its step's backlog."""
        entry = self._steps.setdefault(taken.step_id, _StepLog(taken.lease_id))
        entry.lines.extendleft(reversed(taken.lines))
        entry.lost += taken.lost
        added = sum(map(_cost, taken.lines))
        entry.chars += added
        self._chars += added
        self._trim(entry, self._step_limit)
        self._fit_total()

    def discard(self, step_id: StepId) -> int:
        """Forget a step's lines (its lease is gone); how many there were."""
        entry = self._steps.pop(step_id, None)
        if entry is None:
            return 0
        self._chars -= entry.chars
        return len(entry.lines)

    def _fit_total(self) -> None:
        """Over the total: the largest backlog gives up its oldest lines first."""
        while self._chars > self._total_limit:
            largest = max(self._steps.values(), key=lambda e: e.chars)
            if not largest.lines:
                break
            self._trim(largest, max(0, largest.chars - (self._chars - self._total_limit)))

    def _trim(self, entry: _StepLog, limit: int) -> None:
        """Drop ``entry``'s oldest lines until it holds at most ``limit`` characters."""
        while entry.chars > limit and entry.lines:
            line = entry.lines.popleft()
            entry.chars -= _cost(line)
            self._chars -= _cost(line)
            entry.lost += 1


__all__ = [
    "STEP_LIMIT_CHARS",
    "TOTAL_LIMIT_CHARS",
    "LogBacklog",
    "Taken",
    "lost_marker",
]
