"""How long to wait before trying again: capped exponential backoff with jitter (pure).

A retry delay is one ``Backoff`` (or a ``delay`` call): the scheduler's infrastructure retries and
venue backoff (``runner/scheduler/leases.py``), the agent's reconnects (``agent/link.py``)
and its output uploads (``agent/upload.py``), a runner's LISTEN reconnects
(``runner/db/notify.py``) and ``bigtent up``'s agent restarts (``up/children.py``). A delay
is ``base · factor^attempt`` seconds capped at ``cap``, times a jitter factor in
``[jitter_low, jitter_high)`` picked by a random number the caller passes in (``rand`` in
[0, 1)), so that the code stays deterministic under test.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_GROWTH_STEPS = 64
"""Past this many growth steps any sane cap has long been reached; bounding the exponent keeps
``factor ** attempt`` from overflowing however many attempts are configured or counted."""


def delay(
    attempt: int,
    *,
    base: float,
    cap: float,
    factor: float = 2.0,
    jitter_low: float = 1.0,
    jitter_high: float = 1.0,
    rand: float = 0.0,
) -> float:
    """Seconds to wait before retry ``attempt`` (0: the first retry, which waits ``base``).

    ``base · factor^attempt``, capped at ``cap``, times ``jitter_low + (jitter_high -
    jitter_low) · rand``. A negative ``attempt`` counts as 0.
    """
    steps = min(MAX_GROWTH_STEPS, max(0, attempt))
    try:
        grown = base * factor**steps
    except OverflowError:
        grown = cap
    return min(cap, grown) * (jitter_low + (jitter_high - jitter_low) * rand)


@dataclass(frozen=True, slots=True)
class Backoff:
    """One retry policy: its base delay, cap, growth factor and jitter range."""

    base: float
    cap: float
    factor: float = 2.0
    jitter_low: float = 1.0
    jitter_high: float = 1.0

    def delay(self, attempt: int, rand: float = 0.0) -> float:
        """Seconds before retry ``attempt`` (0 first), ``rand`` in [0, 1) picking the jitter."""
        return delay(
            attempt,
            base=self.base,
            cap=self.cap,
            factor=self.factor,
            jitter_low=self.jitter_low,
            jitter_high=self.jitter_high,
            rand=rand,
        )
