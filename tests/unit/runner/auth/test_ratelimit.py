"""The credential-failure limiter: a sliding window per address, with an injected clock."""

from __future__ import annotations

import pytest

from bigtent.errors import AuthError, Forbidden, TooManyAuthFailures
from bigtent.runner.auth.ratelimit import (
    UNKNOWN_ADDRESS,
    AuthFailureLimiter,
    FailureThrottle,
    address_key,
)

A = "192.0.2.1"
B = "192.0.2.2"


def limiter(
    max_failures: int = 3, window_secs: float = 10.0, max_addresses: int = 100
) -> AuthFailureLimiter:
    return AuthFailureLimiter(max_failures, window_secs, max_addresses)


# (failure times, time asked, allowed, retry after) with 3 failures per 10 s
@pytest.mark.parametrize(
    ("failures", "now", "allowed", "retry_after"),
    [
        ([], 0.0, True, 0.0),
        ([0.0, 1.0], 1.0, True, 0.0),  # below the limit
        ([0.0, 1.0, 2.0], 2.0, False, 8.0),  # a burst reaches it
        ([0.0, 1.0, 2.0], 9.5, False, 0.5),
        ([0.0, 1.0, 2.0], 10.0, True, 0.0),  # the oldest left the window
        ([0.0, 0.0, 0.0, 0.0, 0.0], 5.0, False, 5.0),  # a burst beyond the limit
        ([0.0, 1.0, 2.0, 8.0], 10.0, False, 1.0),  # sliding: the last 3 are 1, 2, 8
        ([0.0, 1.0, 2.0, 8.0], 11.0, True, 0.0),
        ([0.0, 20.0, 40.0], 40.0, True, 0.0),  # spread out: never 3 within 10 s
    ],
)
def test_sliding_window(
    failures: list[float], now: float, allowed: bool, retry_after: float
) -> None:
    lim = limiter()
    for t in failures:
        lim.record_failure(A, t)
    assert lim.allow(A, now) is allowed
    assert lim.retry_after_secs(A, now) == pytest.approx(retry_after)


def test_addresses_are_isolated() -> None:
    lim = limiter()
    for t in (0.0, 1.0, 2.0):
        lim.record_failure(A, t)
    assert not lim.allow(A, 3.0)
    assert lim.allow(B, 3.0)
    lim.record_failure(B, 3.0)
    assert lim.allow(B, 3.0)


def test_idle_addresses_are_forgotten() -> None:
    lim = limiter(window_secs=10.0)
    lim.record_failure(A, 0.0)
    lim.record_failure(B, 5.0)
    assert len(lim) == 2
    lim.record_failure("192.0.2.3", 12.0)  # A's newest failure left the window
    assert len(lim) == 2
    lim.record_failure("192.0.2.3", 30.0)
    assert len(lim) == 1


def test_memory_is_bounded_by_addresses_and_failures() -> None:
    lim = limiter(max_failures=3, window_secs=1000.0, max_addresses=50)
    for i in range(10_000):
        lim.record_failure(f"10.0.{i // 256}.{i % 256}", float(i) / 100)
    assert len(lim) == 50
    for _ in range(1000):
        lim.record_failure(A, 200.0)
    assert len(lim._failures[A]) == 3  # only the last max_failures timestamps
    assert len(lim) == 50


def test_eviction_drops_the_least_recently_failing_address() -> None:
    lim = limiter(max_failures=1, window_secs=1000.0, max_addresses=2)
    lim.record_failure(A, 0.0)
    lim.record_failure(B, 1.0)
    lim.record_failure(A, 2.0)  # A is now the most recent
    lim.record_failure("192.0.2.3", 3.0)
    assert not lim.allow(A, 3.0)
    assert lim.allow(B, 3.0)  # forgotten


@pytest.mark.parametrize(
    ("max_failures", "window_secs", "max_addresses"), [(0, 1.0, 1), (1, 0.0, 1), (1, 1.0, 0)]
)
def test_limits_must_be_positive(max_failures: int, window_secs: float, max_addresses: int) -> None:
    with pytest.raises(ValueError):
        AuthFailureLimiter(max_failures, window_secs, max_addresses)


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),  # the same /64
        ("[2001:db8::1]", "2001:db8::/64"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("testclient", "testclient"),
        (None, UNKNOWN_ADDRESS),
        ("", UNKNOWN_ADDRESS),
    ],
)
def test_address_key(host: str | None, key: str) -> None:
    assert address_key(host) == key


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_throttle_counts_only_credential_failures() -> None:
    clock = FakeClock()
    throttle = FailureThrottle(limiter(max_failures=2, window_secs=60.0), clock)
    throttle.failed(A, Forbidden("wrong role"))
    throttle.failed(A, Forbidden("wrong role"))
    throttle.check(A)  # 403s are no guesses
    throttle.failed(A, AuthError("invalid token"))
    throttle.check(A)
    throttle.failed(A, AuthError("invalid token"))
    with pytest.raises(TooManyAuthFailures) as info:
        throttle.check(A)
    assert info.value.http_status == 429
    assert info.value.retry_after_secs == 60
    clock.now += 59.5
    with pytest.raises(TooManyAuthFailures) as info:
        throttle.check(A)
    assert info.value.retry_after_secs == 1  # rounded up, never 0
    clock.now += 0.5
    throttle.check(A)


def test_throttle_groups_an_ipv6_64() -> None:
    throttle = FailureThrottle(limiter(max_failures=2), FakeClock())
    throttle.failed("2001:db8::1", AuthError("invalid token"))
    throttle.failed("2001:db8::2", AuthError("invalid token"))
    with pytest.raises(TooManyAuthFailures):
        throttle.check("2001:db8::ffff")
    throttle.check("2001:db8:0:1::1")
