"""Rate limiting of credential failures per client address (architecture §6, docs/security.md).

``AuthFailureLimiter`` is the pure decision: a sliding window of the last failures of each
address, fed ``now`` by its caller. ``FailureThrottle`` is the thin shell the HTTP gate and the
agent WebSocket share: it reads the clock, raises ``TooManyAuthFailures`` and logs.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from bigtent.errors import AuthError, Forbidden, TooManyAuthFailures

log = logging.getLogger(__name__)

UNKNOWN_ADDRESS = "?"
"""The key of peers without an address (a Unix socket): they share one window."""


def address_key(host: str | None) -> str:
    """The limiter's key for a peer address: IPv4 as is, IPv6 by its /64 (one host usually
    owns a whole /64, so per-address keys would let it rotate past the limit), an
    IPv4-mapped IPv6 address as its IPv4 address; anything unparsable as is."""
    if not host:
        return UNKNOWN_ADDRESS
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class AuthFailureLimiter:
    """A sliding window per address: an address with ``max_failures`` failures within the
    last ``window_secs`` is not allowed until the oldest of them leaves the window.

    Pure: every method takes ``now`` (monotonic seconds). Memory is bounded: an address keeps
    at most ``max_failures`` timestamps, addresses whose newest failure left the window are
    forgotten, and beyond ``max_addresses`` the least recently failing address is dropped.
    """

    def __init__(self, max_failures: int, window_secs: float, max_addresses: int) -> None:
        if max_failures < 1 or window_secs <= 0 or max_addresses < 1:
            raise ValueError("limits must be positive")
        self.max_failures = max_failures
        self.window_secs = window_secs
        self.max_addresses = max_addresses
        # Ordered by most recent failure, oldest first: idle addresses sit at the front.
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def __len__(self) -> int:
        """How many addresses are remembered."""
        return len(self._failures)

    def allow(self, address: str, now: float) -> bool:
        """Whether an attempt from ``address`` may be checked at all."""
        return self.retry_after_secs(address, now) == 0.0

    def retry_after_secs(self, address: str, now: float) -> float:
        """Seconds until ``address`` is allowed again (0.0: allowed now)."""
        failures = self._failures.get(address)
        if failures is None or len(failures) < self.max_failures:
            return 0.0
        # The deque holds the last max_failures failures: the address is limited while the
        # oldest of them is still inside the window.
        return max(0.0, failures[0] + self.window_secs - now)

    def record_failure(self, address: str, now: float) -> None:
        """Count one credential failure of ``address`` at ``now``."""
        self._forget_idle(now)
        failures = self._failures.get(address)
        if failures is None:
            if len(self._failures) >= self.max_addresses:
                self._failures.popitem(last=False)
            failures = deque(maxlen=self.max_failures)
            self._failures[address] = failures
        else:
            self._failures.move_to_end(address)
        failures.append(now)

    def _forget_idle(self, now: float) -> None:
        # Amortised O(1): each address is popped at most once per insertion.
        while self._failures:
            _, oldest = next(iter(self._failures.items()))
            if oldest[-1] + self.window_secs > now:
                return
            self._failures.popitem(last=False)


@dataclass(eq=False)
class FailureThrottle:
    """The limiter with a clock: ``check`` before looking at a credential, ``failed`` after
    it was rejected. Only missing or invalid credentials (401) count; a valid credential of
    the wrong role (403) is no guess. A limited address is limited for every attempt, even
    one with a good credential: the runner cannot tell the guesser from its neighbour."""

    limiter: AuthFailureLimiter
    clock: Callable[[], float] = field(default=time.monotonic)

    def check(self, host: str | None) -> None:
        """Raise TooManyAuthFailures while ``host``'s address is limited."""
        wait_secs = self.limiter.retry_after_secs(address_key(host), self.clock())
        if wait_secs > 0:
            raise TooManyAuthFailures(
                "too many failed authentication attempts from this address; try again later",
                retry_after_secs=max(1, math.ceil(wait_secs)),
            )

    def failed(self, host: str | None, exc: AuthError) -> None:
        """Count ``exc`` against ``host`` when it is a credential failure."""
        # Only 401s: not a wrong role (403), a limited address (429) or an OIDC issuer whose
        # keys could not be fetched (503), none of which is a guess at a credential.
        if isinstance(exc, Forbidden | TooManyAuthFailures) or exc.http_status != 401:
            return
        key = address_key(host)
        self.limiter.record_failure(key, self.clock())
        if not self.limiter.allow(key, self.clock()):
            log.warning("authentication failures from %s exceed the limit", key)
