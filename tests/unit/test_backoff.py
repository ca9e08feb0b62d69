"""The one backoff formula (``bigtent/backoff.py``) and the policies that use it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bigtent import backoff
from bigtent.agent.link import RECONNECT_BACKOFF
from bigtent.agent.upload import UPLOAD_BACKOFF
from bigtent.backoff import Backoff


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [(-3, 2.0), (0, 2.0), (1, 4.0), (2, 8.0), (5, 64.0), (6, 100.0), (10_000, 100.0)],
)
def test_delay_grows_and_is_capped(attempt: int, expected: float) -> None:
    assert backoff.delay(attempt, base=2.0, cap=100.0) == expected


@pytest.mark.parametrize(
    ("factor", "attempt", "expected"),
    [(3.0, 0, 1.0), (3.0, 2, 9.0), (1.0, 50, 1.0), (1e6, 64, 50.0)],
)
def test_delay_factor(factor: float, attempt: int, expected: float) -> None:
    assert backoff.delay(attempt, base=1.0, cap=50.0, factor=factor) == expected


@pytest.mark.parametrize(
    ("rand", "expected"), [(0.0, 5.0), (0.5, 7.5), (0.999, pytest.approx(9.995))]
)
def test_jitter_scales_between_its_bounds(rand: float, expected: float) -> None:
    assert backoff.delay(0, base=10.0, cap=10.0, jitter_low=0.5, rand=rand) == expected


@pytest.mark.parametrize(
    ("attempt", "rand", "expected"),
    [
        (0, 0.0, 0.25),
        (0, 1.0, 0.5),
        (1, 1.0, 1.0),
        (3, 0.0, 2.0),
        (10, 1.0, 30.0),
        (500, 0.0, 15.0),
    ],
)
def test_reconnect_backoff(attempt: int, rand: float, expected: float) -> None:
    assert RECONNECT_BACKOFF.delay(attempt, rand) == pytest.approx(expected)
    assert RECONNECT_BACKOFF.delay(attempt, rand) <= RECONNECT_BACKOFF.cap


@pytest.mark.parametrize(
    ("attempt", "rand", "expected"),
    [(0, 0.0, 0.25), (0, 1.0, 0.5), (1, 0.0, 0.5), (3, 1.0, 4.0), (4, 1.0, 8.0), (500, 0.0, 4.0)],
)
def test_upload_backoff(attempt: int, rand: float, expected: float) -> None:
    assert UPLOAD_BACKOFF.delay(attempt, rand) == pytest.approx(expected)
    assert 0 < UPLOAD_BACKOFF.delay(attempt, rand) <= UPLOAD_BACKOFF.cap


policies = st.builds(
    Backoff,
    base=st.floats(0.001, 1000.0),
    cap=st.floats(0.001, 100_000.0),
    factor=st.floats(1.0, 1e6),
    jitter_low=st.floats(0.0, 2.0),
    jitter_high=st.floats(0.0, 2.0),
)
attempts = st.integers(-10, 10_000)
rands = st.floats(0.0, 1.0, exclude_max=True)


@given(policies, attempts, rands)
def test_delay_stays_within_cap_and_jitter(policy: Backoff, attempt: int, rand: float) -> None:
    got = policy.delay(attempt, rand)
    low, high = sorted((policy.jitter_low, policy.jitter_high))
    assert got >= 0
    assert got <= policy.cap * high * (1 + 1e-12)
    assert got >= min(policy.base, policy.cap) * low * (1 - 1e-12)


@given(policies, attempts, rands)
def test_delay_never_shrinks_with_more_attempts(policy: Backoff, attempt: int, rand: float) -> None:
    assert policy.delay(attempt + 1, rand) >= policy.delay(attempt, rand)


@given(policies, attempts)
def test_delay_grows_with_rand_when_jitter_rises(policy: Backoff, attempt: int) -> None:
    rising = Backoff(policy.base, policy.cap, policy.factor, 0.5, 1.0)
    assert rising.delay(attempt, 0.0) <= rising.delay(attempt, 0.5) <= rising.delay(attempt, 0.99)
