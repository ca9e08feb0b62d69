"""Outcome classification and retry backoff (architecture §2-3)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bigtent.protocol import Outcome
from bigtent.runner.scheduler.leases import (
    Classification,
    Disposition,
    attempt_retry_at,
    backoff_secs,
    classify,
    is_cached_failure,
    new_lease_id,
    next_retry_at,
)
from bigtent.states import StepState

EXPECTED = {
    Outcome.SUCCESS: Classification(Disposition.SUCCEED, counts_against_venue=False),
    Outcome.BUILD_FAILURE: Classification(Disposition.FAIL, counts_against_venue=False),
    Outcome.TIMED_OUT: Classification(Disposition.FAIL, counts_against_venue=False),
    Outcome.LOG_LIMIT: Classification(Disposition.FAIL, counts_against_venue=False),
    Outcome.ABORTED: Classification(Disposition.REQUEUE, counts_against_venue=False),
    Outcome.PREPARE_FAILURE: Classification(Disposition.RETRY, counts_against_venue=True),
    Outcome.UPLOAD_FAILURE: Classification(Disposition.RETRY, counts_against_venue=True),
    Outcome.AGENT_LOST: Classification(Disposition.RETRY, counts_against_venue=True),
    Outcome.UNSUPPORTED: Classification(Disposition.FAIL, counts_against_venue=False),
}


def test_table_covers_every_outcome() -> None:
    assert set(EXPECTED) == set(Outcome)


@pytest.mark.parametrize("outcome", list(Outcome))
def test_classify(outcome: Outcome) -> None:
    got = classify(outcome)
    assert got == EXPECTED[outcome]
    # Only infrastructure outcomes are retried and counted against the venue (architecture §2).
    assert (got.disposition is Disposition.RETRY) == outcome.is_infrastructure
    assert got.counts_against_venue == outcome.is_infrastructure


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [(0, 2.0), (1, 2.0), (2, 4.0), (3, 8.0), (5, 32.0), (8, 100.0), (10_000, 100.0)],
)
def test_backoff_secs_is_exponential_and_capped(attempt: int, expected: float) -> None:
    assert backoff_secs(attempt, base_secs=2.0, max_secs=100.0) == expected


@pytest.mark.parametrize(
    ("attempt", "jitter", "expected"),
    [
        (1, 0.0, 1002.0),
        (2, 0.0, 1004.0),
        (3, 0.0, 1008.0),
        (3, 0.5, 1009.0),
        (7, 0.0, 1100.0),  # capped
        (7, 0.5, 1112.5),  # jitter on top of the cap (docs/configuration.md)
    ],
)
def test_next_retry_at_table(attempt: int, jitter: float, expected: float) -> None:
    got = next_retry_at(attempt, now=1000.0, base_secs=2.0, max_secs=100.0, jitter=jitter)
    assert got == pytest.approx(expected)


@given(
    attempt=st.integers(0, 100_000),
    now=st.floats(0, 2e9),
    base=st.floats(0, 60),
    cap=st.floats(0, 3600),
    jitter=st.floats(0, 1, exclude_max=True),
)
def test_next_retry_at_bounds(
    attempt: int, now: float, base: float, cap: float, jitter: float
) -> None:
    delay = next_retry_at(attempt, now, base, cap, jitter) - now
    full = backoff_secs(attempt, base, cap)
    assert full - 1e-6 <= delay < 1.25 * full + 1e-6
    assert full <= cap
    # Never earlier than the previous attempt's un-jittered delay allows (monotone in attempt).
    assert backoff_secs(attempt + 1, base, cap) >= full


def test_new_lease_ids_are_unguessable_tokens() -> None:
    ids = {new_lease_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{32}", i) for i in ids)


# ---- the failure cache ---------------------------------------------------------------------
NOW = 1_700_000_000.0
DAY = 86400.0


@pytest.mark.parametrize(
    ("outcome", "failed_at", "cached"),
    [
        # Build failures within the TTL are cached: the derivation is not rebuilt.
        (Outcome.BUILD_FAILURE, NOW - 1, True),
        (Outcome.BUILD_FAILURE, NOW - DAY + 1, True),
        (Outcome.TIMED_OUT, NOW - 60, True),
        (Outcome.LOG_LIMIT, NOW - 60, True),
        # Expired: rebuilt.
        (Outcome.BUILD_FAILURE, NOW - DAY, False),
        (Outcome.TIMED_OUT, NOW - 2 * DAY, False),
        # Infrastructure failures (a step failed after its retries ran out) never are.
        (Outcome.PREPARE_FAILURE, NOW - 1, False),
        (Outcome.UPLOAD_FAILURE, NOW - 1, False),
        (Outcome.AGENT_LOST, NOW - 1, False),
        (Outcome.ABORTED, NOW - 1, False),
        (Outcome.SUCCESS, NOW - 1, False),
        # Nor a step no venue could take: one may have connected since.
        (Outcome.UNSUPPORTED, NOW - 1, False),
        # Nothing recorded (never failed, or a restart cleared it), or unknown outcomes.
        (Outcome.BUILD_FAILURE, None, False),
        (None, NOW - 1, False),
        ("no-such-outcome", NOW - 1, False),
    ],
)
def test_is_cached_failure(outcome: str | None, failed_at: float | None, cached: bool) -> None:
    assert is_cached_failure(outcome, failed_at, NOW, DAY) is cached


def test_a_zero_ttl_caches_nothing() -> None:
    assert not is_cached_failure(Outcome.BUILD_FAILURE, NOW, NOW, 0.0)


@pytest.mark.parametrize("outcome", list(Outcome))
def test_only_final_failures_are_cacheable(outcome: Outcome) -> None:
    cacheable = classify(outcome).disposition is Disposition.FAIL
    cacheable = cacheable and outcome is not Outcome.UNSUPPORTED
    assert is_cached_failure(outcome, NOW, NOW, DAY) is cacheable


def test_cached_failure_error_names_when_and_keeps_the_first_error_once() -> None:
    from bigtent.runner.scheduler.leases import cached_failure_error

    first = cached_failure_error("build_failure", NOW, DAY, "builder exited 1")
    assert first == (
        "cached failure: this derivation failed (build_failure) at 2023-11-14T22:13:20+00:00; "
        "it is not rebuilt before 2023-11-15T22:13:20+00:00 unless the build is restarted "
        "(bigtent restart BUILD); first error: builder exited 1"
    )
    assert cached_failure_error("build_failure", NOW, DAY, first) == first
    assert cached_failure_error("timed_out", NOW, DAY, None).endswith("first error: ")


@pytest.mark.parametrize(
    ("state", "not_before", "expected"),
    [
        (StepState.RUNNABLE, 110.0, 110.0),  # backing off: its next try
        (StepState.RUNNABLE, None, 100.0),  # requeued at once
        (StepState.RUNNABLE, 90.0, 100.0),  # a stale delay is no delay
        (StepState.FAILED, 110.0, None),  # final: no more tries
        (StepState.SUCCEEDED, None, None),
        (StepState.CANCELLED, None, None),
        (StepState.BUILDING, None, None),
    ],
)
def test_attempt_retry_at(
    state: StepState, not_before: float | None, expected: float | None
) -> None:
    assert attempt_retry_at(state, not_before, 100.0) == expected
