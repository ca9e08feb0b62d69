"""Ephemeral limits as pure arithmetic: max_builds, idle from the last assign/completion,
lifetime, the next deadline, and the reservation never passing the cap."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bigtent.agent.limits import (
    Limits,
    LimitState,
    complete,
    drain_reason,
    may_accept,
    next_deadline,
    registered,
    reserve,
    start,
)
from bigtent.config import EphemeralSection


def test_from_section_defaults_idle_to_120() -> None:
    assert Limits.from_section(EphemeralSection()) == Limits(None, 120.0, None)
    assert Limits.from_section(
        EphemeralSection(max_builds=2, max_idle_secs=5, max_lifetime_secs=60)
    ) == Limits(2, 5.0, 60.0)


@pytest.mark.parametrize(
    ("limits", "state", "now", "reason"),
    [
        # Nothing reached.
        (Limits(), LimitState(0, 0), 119.9, None),
        # Idle counts from the last assignment or completion, only while nothing runs.
        (Limits(), LimitState(0, 0), 120, "idle for max_idle_secs (120 s)"),
        (Limits(max_idle_secs=2), LimitState(0, 50, 1, 0), 51.9, None),
        (Limits(max_idle_secs=2), LimitState(0, 50, 1, 0), 52, "idle for max_idle_secs (2 s)"),
        (Limits(max_idle_secs=2), LimitState(0, 50, 1, 1), 5000, None),
        # max_builds: reached once that many were taken, whether or not they still run.
        (Limits(max_builds=2), LimitState(0, 0, 1, 1), 1, None),
        (Limits(max_builds=2), LimitState(0, 0, 2, 2), 1, "reached max_builds (2)"),
        (Limits(max_builds=2), LimitState(0, 0, 2, 0), 1, "reached max_builds (2)"),
        # Lifetime counts from the start, also while steps run.
        (Limits(max_lifetime_secs=3.5), LimitState(10, 13, 1, 1), 13.4, None),
        (
            Limits(max_lifetime_secs=3.5),
            LimitState(10, 13, 1, 1),
            13.5,
            "reached max_lifetime_secs (3.5 s)",
        ),
        # The cap wins over the clock when both hold.
        (
            Limits(max_builds=1, max_lifetime_secs=1),
            LimitState(0, 0, 1, 0),
            500,
            "reached max_builds (1)",
        ),
    ],
)
def test_drain_reason(limits: Limits, state: LimitState, now: float, reason: str | None) -> None:
    assert drain_reason(limits, state, now) == reason
    assert may_accept(limits, state, now) is (reason is None)


@pytest.mark.parametrize(
    ("limits", "state", "deadline"),
    [
        (Limits(), LimitState(0, 10), 130),
        (Limits(max_idle_secs=2), LimitState(0, 10, 1, 1), None),
        (Limits(max_idle_secs=2, max_lifetime_secs=60), LimitState(0, 10, 1, 1), 60),
        (Limits(max_idle_secs=2, max_lifetime_secs=60), LimitState(0, 10, 1, 0), 12),
        (Limits(max_idle_secs=100, max_lifetime_secs=60), LimitState(0, 10, 1, 0), 60),
        (Limits(max_builds=3), LimitState(0, 0, 1, 0), 120),
    ],
)
def test_next_deadline(limits: Limits, state: LimitState, deadline: float | None) -> None:
    assert next_deadline(limits, state, now=11) == deadline


def test_lifecycle_idle_restarts_at_assign_and_completion() -> None:
    limits = Limits(max_builds=2, max_idle_secs=10)
    state = registered(start(0), 5)
    assert next_deadline(limits, state, 5) == 15
    state, refusal = reserve(limits, state, 14)
    assert refusal is None and (state.reserved, state.running) == (1, 1)
    assert drain_reason(limits, state, 1000) is None  # a running step is not idle
    state = complete(state, 100)
    assert (state.running, state.last_active_mono) == (0, 100)
    assert drain_reason(limits, state, 109.9) is None
    assert drain_reason(limits, state, 110) == "idle for max_idle_secs (10 s)"
    state, refusal = reserve(limits, state, 105)
    assert refusal is None
    assert drain_reason(limits, state, 106) == "reached max_builds (2)"
    again, refusal = reserve(limits, state, 106)
    assert again is state and refusal == "reached max_builds (2)"


def test_reserve_refuses_after_lifetime_and_idle() -> None:
    state = start(0)
    assert reserve(Limits(max_lifetime_secs=5), state, 5)[1] == "reached max_lifetime_secs (5 s)"
    assert reserve(Limits(max_idle_secs=5), state, 5)[1] == "idle for max_idle_secs (5 s)"


def test_complete_never_goes_negative() -> None:
    assert complete(start(0), 1).running == 0


@given(
    cap=st.integers(min_value=1, max_value=20),
    events=st.lists(st.sampled_from(["assign", "complete"]), max_size=200),
)
def test_reservations_never_pass_the_cap(cap: int, events: list[str]) -> None:
    limits = Limits(max_builds=cap, max_idle_secs=1e9)
    state = start(0)
    accepted = 0
    for now, event in enumerate(events):
        if event == "assign":
            state, refusal = reserve(limits, state, now)
            accepted += refusal is None
        elif state.running:
            state = complete(state, now)
        assert state.reserved == accepted <= cap
        assert 0 <= state.running <= state.reserved
