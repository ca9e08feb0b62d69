"""Lease ids, outcome classification and retry backoff (architecture §2-3). Pure code."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import assert_never

from bigtent import backoff
from bigtent.protocol import LeaseId, Outcome
from bigtent.states import StepState


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
        case Outcome.BUILD_FAILURE | Outcome.TIMED_OUT | Outcome.LOG_LIMIT | Outcome.UNSUPPORTED:
            return Classification(Disposition.FAIL, False)
        case Outcome.ABORTED:
            return Classification(Disposition.REQUEUE, False)
        case Outcome.PREPARE_FAILURE | Outcome.UPLOAD_FAILURE | Outcome.AGENT_LOST:
            return Classification(Disposition.RETRY, True)
        case _:
            assert_never(outcome)


def backoff_secs(attempt: int, base_secs: float, max_secs: float) -> float:
    """``base · 2^(attempt-1)`` seconds, capped at ``max_secs`` (attempt 1 waits ``base``)."""
    return backoff.delay(attempt - 1, base=base_secs, cap=max_secs)


def next_retry_at(
    attempt: int, now: float, base_secs: float, max_secs: float, jitter: float
) -> float:
    """When an infrastructure retry may run: the capped delay of ``backoff_secs`` times a
    jitter factor in [1, 1.25) given by the caller (``jitter`` in [0, 1)), so steps that failed
    together do not retry together (docs/configuration.md: "capped, +0-25 % jitter")."""
    return now + backoff.delay(
        attempt - 1, base=base_secs, cap=max_secs, jitter_high=1.25, rand=jitter
    )


def attempt_retry_at(state: StepState, not_before: float | None, now: float) -> float | None:
    """When a step whose attempt just ended will be tried again, for its attempt record: a
    step back in the queue at ``not_before`` (its backoff) or at once; None when its state is
    anything else (final: no more tries)."""
    if state is not StepState.RUNNABLE:
        return None
    return not_before if not_before is not None and not_before > now else now


def is_cached_failure(
    outcome: str | None, failed_at: float | None, now: float, ttl_secs: float
) -> bool:
    """Whether a derivation's last failure still stands, so a new build fails its step at once
    instead of rebuilding it. Only final build failures (``classify`` says FAIL) are
    remembered, each for ``ttl_secs`` from when it failed; infrastructure failures never are,
    nor ``unsupported`` (no venue could take it: one may have connected since).
    ``failed_at`` None: nothing cached (never failed, or cleared by a restart)."""
    if outcome is None or failed_at is None:
        return False
    try:
        kind = Outcome(outcome)
    except ValueError:
        return False
    if kind is Outcome.UNSUPPORTED or classify(kind).disposition is not Disposition.FAIL:
        return False
    return now - failed_at < ttl_secs


_CACHED_MARK = "cached failure: "
_FIRST_ERROR = "; first error: "


def cached_failure_error(outcome: str, failed_at: float, ttl_secs: float, error: str | None) -> str:
    """The error of a step failed from the failure cache: what failed, when, until when it
    stays cached, and the first failure's own error (kept once, however often it is hit)."""
    first = error or ""
    if first.startswith(_CACHED_MARK):
        first = first.partition(_FIRST_ERROR)[2]
    text = (
        f"{_CACHED_MARK}this derivation failed ({outcome}) at {_iso(failed_at)}; it is not "
        f"rebuilt before {_iso(failed_at + ttl_secs)} unless the build is restarted "
        f"(bigtent restart BUILD){_FIRST_ERROR}{first}"
    )
    return text[:8000]


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")
