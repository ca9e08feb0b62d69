"""Outcome classification and retry backoff (DESIGN §2-3)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bigtent.protocol import Outcome
from bigtent.runner.scheduler.leases import (
    Classification,
    Disposition,
    backoff_secs,
    classify,
    new_lease_id,
    next_retry_at,
)

EXPECTED = {
    Outcome.SUCCESS: Classification(Disposition.SUCCEED, counts_against_venue=False),
    Outcome.BUILD_FAILURE: Classification(Disposition.FAIL, counts_against_venue=False),
    Outcome.TIMED_OUT: Classification(Disposition.FAIL, counts_against_venue=False),
    Outcome.LOG_LIMIT: Classification(Disposition.FAIL, counts_against_venue=False),
    Outcome.ABORTED: Classification(Disposition.REQUEUE, counts_against_venue=False),
    Outcome.PREPARE_FAILURE: Classification(Disposition.RETRY, counts_against_venue=True),
    Outcome.UPLOAD_FAILURE: Classification(Disposition.RETRY, counts_against_venue=True),
    Outcome.AGENT_LOST: Classification(Disposition.RETRY, counts_against_venue=True),
}


def test_table_covers_every_outcome() -> None:
    assert set(EXPECTED) == set(Outcome)


@pytest.mark.parametrize("outcome", list(Outcome))
def test_classify(outcome: Outcome) -> None:
    got = classify(outcome)
    assert got == EXPECTED[outcome]
    # Only infrastructure outcomes are retried and counted against the venue (DESIGN §2).
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
