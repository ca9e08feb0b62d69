"""When a venue is unhealthy and how much work it may take (pure code).

A venue (an agent or an SSH builder) whose consecutive infrastructure failures (outcomes that
``leases.classify`` counts against the venue: ``prepare_failure``, ``upload_failure``,
``agent_lost``) reach ``scheduler.unhealthy_after_failures`` is *unhealthy*. It gets no work
during its backoff (as any venue after an infrastructure failure); once the backoff is over it
is *half-open*: it may run one step at a time. That step's success clears the count (the venue
is healthy again, all its slots open); its failure counts once more and backs the venue off
for longer (``leases.backoff_secs``).
"""

from __future__ import annotations


def is_unhealthy(consecutive_failures: int, threshold: int) -> bool:
    """Whether a venue with this many consecutive infrastructure failures is unhealthy
    (``threshold`` 0: never)."""
    return threshold > 0 and consecutive_failures >= threshold


def allowed_jobs(max_jobs: int, consecutive_failures: int, threshold: int) -> int:
    """How many steps the venue may run at once when it is not backing off: all its slots
    when healthy, one (half-open) when unhealthy."""
    return min(max_jobs, 1) if is_unhealthy(consecutive_failures, threshold) else max_jobs


def shown_error(last_error: str | None, consecutive_failures: int) -> str | None:
    """The error to show with a venue: the last infrastructure failure of its current run of
    failures; None once a success has ended that run."""
    return (last_error or None) if consecutive_failures > 0 else None


def became_unhealthy(consecutive_failures: int, threshold: int) -> bool:
    """Whether the failure that made the count ``consecutive_failures`` crossed the
    threshold (to log the change once)."""
    return threshold > 0 and consecutive_failures == threshold


__all__ = ["allowed_jobs", "became_unhealthy", "is_unhealthy", "shown_error"]
