"""How long ``follow_build`` waits between looks: the interval, except near the build's end,
where it looks again soon after a change and backs off while nothing changes (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bigtent.apimodels import StepCounts
from bigtent.client.follow import (
    NEAR_END_STEPS,
    QUICK_POLL_SECS,
    poll_delay,
    unfinished_steps,
)


@pytest.mark.parametrize(
    ("unfinished", "changed", "last", "delay"),
    [
        # Far from the end: the interval, whatever changed.
        (NEAR_END_STEPS + 1, True, 0.3, 0.3),
        (50, False, 0.05, 0.3),
        # Near the end: soon after a change, then twice the last wait, up to the interval.
        (NEAR_END_STEPS, True, 0.3, QUICK_POLL_SECS),
        (1, False, QUICK_POLL_SECS, 2 * QUICK_POLL_SECS),
        (1, False, 0.1, 0.2),
        (1, False, 0.2, 0.3),
        (0, False, 0.3, 0.3),
        (0, True, 0.3, QUICK_POLL_SECS),
    ],
)
def test_poll_delay(unfinished: int, changed: bool, last: float, delay: float) -> None:
    assert poll_delay(0.3, unfinished, changed, last) == pytest.approx(delay)


@given(
    interval=st.floats(0, 10),
    unfinished=st.integers(0, 1000),
    changed=st.booleans(),
    last=st.floats(0, 10),
)
def test_poll_delay_never_exceeds_the_interval(
    interval: float, unfinished: int, changed: bool, last: float
) -> None:
    delay = poll_delay(interval, unfinished, changed, last)
    assert 0 <= delay <= interval
    if unfinished > NEAR_END_STEPS:
        assert delay == interval


def test_unfinished_steps_are_waiting_runnable_and_running() -> None:
    counts = StepCounts(
        total=20, waiting=1, runnable=2, running=3, succeeded=10, failed=3, cancelled=1
    )
    assert unfinished_steps(counts) == 6
