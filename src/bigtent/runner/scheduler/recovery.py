"""When the scheduler's reload from the database failed (pure).

After a failed transaction or pass the scheduler throws its working copy away and reloads it
from the database (``Scheduler.recover``). If that reload fails too (the database is gone),
the working copy is empty: nothing would be dispatched while the runner looked healthy. So a
failed reload is remembered as a ``RecoveryFailure``, retried with capped exponential backoff,
reported (``/api/v1/status``, ``/metrics``, the dashboard) and fails ``/healthz`` until a
reload succeeds.
"""

from __future__ import annotations

from dataclasses import dataclass

from bigtent.runner.scheduler.leases import backoff_secs

RECOVERY_BASE_SECS = 0.5
"""The first retry of a failed reload waits this long; each further failure doubles it."""
RECOVERY_MAX_SECS = 30.0
"""...up to this."""
MAX_RECOVERY_ERROR_CHARS = 500
"""The failure's text is kept (and shown) up to this long."""


@dataclass(frozen=True, slots=True)
class RecoveryFailure:
    """Reloading the scheduler's state from the database failed and has not succeeded since."""

    since: float
    """When the first of these consecutive failures happened."""
    failures: int
    """Consecutive failed reloads."""
    error: str
    """The last failure, short."""
    retry_at: float
    """When the next reload is due."""


def describe(exc: BaseException) -> str:
    """A failure's text, bounded: its type and first line."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    out = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return out[:MAX_RECOVERY_ERROR_CHARS]


def failed(
    previous: RecoveryFailure | None,
    error: str,
    now: float,
    base_secs: float = RECOVERY_BASE_SECS,
    max_secs: float = RECOVERY_MAX_SECS,
) -> RecoveryFailure:
    """The state after another failed reload at ``now``: one more failure, the next try after
    the capped backoff, the first failure's time kept."""
    failures = 1 if previous is None else previous.failures + 1
    since = now if previous is None else previous.since
    return RecoveryFailure(
        since=since,
        failures=failures,
        error=error,
        retry_at=now + backoff_secs(failures, base_secs, max_secs),
    )


def due(failure: RecoveryFailure | None, now: float) -> bool:
    """Whether a reload should be tried at ``now``."""
    return failure is not None and now >= failure.retry_at


def problem(failure: RecoveryFailure | None, *, public: bool = False) -> str | None:
    """What to tell clients, or None when the scheduler is sound. ``public``: for readers who
    may hold no credential (a public dashboard): without the database's own error text, which
    may name hosts."""
    if failure is None:
        return None
    attempts = f"{failure.failures} attempt{'s' if failure.failures != 1 else ''} failed"
    last = "" if public else f"; last: {failure.error}"
    return (
        f"the scheduler could not reload its state from the database ({attempts}{last}); "
        "new work is not dispatched until a retry succeeds"
    )
