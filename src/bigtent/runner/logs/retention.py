"""Step log retention (``scheduler.log_retention_days``): logs of steps that finished longer
ago than that are deleted, in batches, on a schedule; asking for one afterwards says the log
expired instead of answering an empty log.

``cutoff`` and ``is_expired`` decide (pure); ``expire_logs`` and ``run_log_retention`` do
the I/O. The files are found by scanning ``STATE/logs`` (a log's last write is its step's
end), so a pass costs the logs retention keeps, never the steps in the database.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

from fastapi.responses import PlainTextResponse, Response

from bigtent.config import SchedulerSection
from bigtent.runner.logs.store import LogStore

log = logging.getLogger(__name__)

DAY_SECS = 86400.0
BATCH = 1000
"""Logs deleted per batch; the event loop runs between batches."""
PASS_LIMIT = 100_000
"""Logs looked at per pass (one scan of the directory); a full pass is followed at once by
another."""


def cutoff(now: float, retention_days: float) -> float | None:
    """Logs last written before this (epoch seconds) are expired; None: keep forever (0)."""
    if retention_days <= 0:
        return None
    return now - retention_days * DAY_SECS


def is_expired(finished_at: float | None, now: float, retention_days: float) -> bool:
    """Whether a step's log is past retention: the step finished before the cutoff."""
    limit = cutoff(now, retention_days)
    return limit is not None and finished_at is not None and finished_at < limit


def expired_text(retention_days: float) -> str:
    """What a request for an expired log gets instead of the log."""
    return (
        f"[bigtent: this step's log expired: logs are kept {retention_days:g} days after "
        "their step finished (scheduler.log_retention_days)]\n"
    )


LOG_EXPIRED_HEADER = "X-Bigtent-Log-Expired"
"""Set on the answer for a log that retention deleted (``scheduler.log_retention_days``)."""


class _Steps(Protocol):
    def step_active(self, step_id: int) -> bool: ...


def log_expired(
    step_id: int,
    finished_at: float | None,
    logs: LogStore,
    scheduler: _Steps,
    config: SchedulerSection,
    now: float | None = None,
) -> bool:
    """Whether retention deleted (or is about to delete) a step's log: the step finished
    before the cutoff, is not running again, and nothing of its log is left."""
    return (
        is_expired(finished_at, time.time() if now is None else now, config.log_retention_days)
        and not scheduler.step_active(step_id)
        and logs.size(step_id) == 0
    )


def expired_response(retention_days: float) -> Response:
    """What ``GET …/steps/ID/log`` answers for an expired log (200, one line, a header)."""
    return PlainTextResponse(expired_text(retention_days), headers={LOG_EXPIRED_HEADER: "true"})


async def expire_logs(
    logs: LogStore,
    before: float,
    active: Callable[[int], bool],
    *,
    batch: int = BATCH,
    limit: int = PASS_LIMIT,
) -> tuple[int, bool]:
    """One pass: delete the logs last written before ``before`` of steps not ``active`` (a
    running step's silent log is old, not finished), at most ``limit``, ``batch`` at a time
    in a worker thread. Returns how many were deleted and whether more may be left."""
    stale = await asyncio.to_thread(logs.stale, before, limit)
    todo = [s for s in stale if not active(s)]
    deleted = 0
    for i in range(0, len(todo), batch):
        chunk = todo[i : i + batch]
        deleted += await asyncio.to_thread(_delete, logs, chunk)
    return deleted, len(stale) >= limit and deleted > 0


def _delete(logs: LogStore, steps: list[int]) -> int:
    return sum(logs.delete(s) for s in steps)


async def run_log_retention(
    logs: LogStore,
    retention_days: float,
    interval_secs: float,
    clock: Callable[[], float],
    active: Callable[[int], bool],
    on_deleted: Callable[[int], None] = lambda n: None,
) -> None:
    """Expire logs every ``interval_secs`` forever (nothing when retention is 0). A failed
    pass is logged and tried again at the next interval."""
    if retention_days <= 0:
        return
    while True:
        limit = cutoff(clock(), retention_days)
        assert limit is not None
        more = False
        try:
            deleted, more = await expire_logs(logs, limit, active)
        except OSError:
            log.exception("expiring step logs failed; trying again in %.0f s", interval_secs)
        else:
            if deleted:
                log.info(
                    "deleted %d step logs older than %g days (scheduler.log_retention_days)",
                    deleted,
                    retention_days,
                )
                on_deleted(deleted)
        await asyncio.sleep(0 if more else interval_secs)
