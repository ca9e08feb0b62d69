"""Lease ids, outcome classification and retry backoff (DESIGN §2-3). Pure code."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from enum import StrEnum

from bigtent.protocol import LeaseId, Outcome


def new_lease_id() -> LeaseId:
    """An unguessable lease id: it is also the capability to upload the step's outputs."""
    return LeaseId(secrets.token_urlsafe(24))


class Disposition(StrEnum):
    """What the scheduler does with a step after an attempt ended."""

    SUCCEED = "succeed"
    FAIL = "fail"
    """Final: the derivation failed (never the agent's fault, never retried)."""
    RETRY = "retry"
    """Infrastructure trouble: back to the queue with backoff, counted against the venue."""
    REQUEUE = "requeue"
    """The attempt was aborted (cancel or agent shutdown): back to the queue, not counted."""


@dataclass(frozen=True, slots=True)
class Classification:
    disposition: Disposition
    counts_against_venue: bool


def classify(outcome: Outcome) -> Classification:
    """Outcome → policy, in one place (like Hydra's ``updateWithBuildResult``)."""
    match outcome:
        case Outcome.SUCCESS:
            return Classification(Disposition.SUCCEED, False)
        case Outcome.BUILD_FAILURE | Outcome.TIMED_OUT | Outcome.LOG_LIMIT:
            return Classification(Disposition.FAIL, False)
        case Outcome.ABORTED:
            return Classification(Disposition.REQUEUE, False)
        case Outcome.PREPARE_FAILURE | Outcome.UPLOAD_FAILURE | Outcome.AGENT_LOST:
            return Classification(Disposition.RETRY, True)


def next_retry_at(
    attempt: int, now: float, base_secs: float, max_secs: float, jitter: float
) -> float:
    """When an infrastructure retry may run: ``base · 2^(attempt-1)`` capped at ``max``, times
    a jitter factor in [1, 1.25) given by the caller (``jitter`` in [0, 1))."""
    delay = min(max_secs, base_secs * 2.0 ** max(0, attempt - 1))
    return now + delay * (1 + 0.25 * jitter)
