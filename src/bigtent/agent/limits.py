"""Ephemeral agent limits (architecture §4) as pure deadline arithmetic: no clock, no I/O.

An ephemeral agent stops taking work, finishes what runs, and exits 0 once it has *taken*
``max_builds`` assignments, once nothing has run for ``max_idle_secs``, or once it has lived
``max_lifetime_secs``. The session owns one ``LimitState``, feeds it ``now`` (monotonic
seconds) on every assignment and completion, and asks ``drain_reason`` and ``next_deadline``
what to do and when to look again.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from bigtent.config import EphemeralSection


@dataclass(frozen=True, slots=True)
class Limits:
    """An ephemeral agent's limits; ``None`` means no limit of that kind."""

    max_builds: int | None = None
    max_idle_secs: float = 120.0
    max_lifetime_secs: float | None = None

    @classmethod
    def from_section(cls, section: EphemeralSection) -> Limits:
        return cls(
            max_builds=section.max_builds,
            max_idle_secs=section.max_idle_secs,
            max_lifetime_secs=section.max_lifetime_secs,
        )


@dataclass(frozen=True, slots=True)
class LimitState:
    """What the limits are judged on. Times are monotonic seconds (``*_mono``).

    ``reserved`` counts every assignment the agent accepted, whatever its outcome: it is taken
    before the acceptance is sent and never given back, so the agent never accepts one past
    ``max_builds``. ``last_active_mono`` is the last assignment or completion; the agent is
    idle only while ``running`` is 0.
    """

    started_mono: float
    last_active_mono: float
    reserved: int = 0
    running: int = 0


def start(now: float) -> LimitState:
    """The state of an agent started at ``now``: nothing taken, idle since ``now``."""
    return LimitState(started_mono=now, last_active_mono=now)


def registered(state: LimitState, now: float) -> LimitState:
    """The session is registered: idle time counts from here (no work could come before)."""
    return replace(state, last_active_mono=now)


def drain_reason(limits: Limits, state: LimitState, now: float) -> str | None:
    """Why the agent must drain now (take nothing more, finish, exit 0), or None."""
    if limits.max_builds is not None and state.reserved >= limits.max_builds:
        return f"reached max_builds ({limits.max_builds})"
    if (
        limits.max_lifetime_secs is not None
        and now - state.started_mono >= limits.max_lifetime_secs
    ):
        return f"reached max_lifetime_secs ({limits.max_lifetime_secs:g} s)"
    if state.running == 0 and now - state.last_active_mono >= limits.max_idle_secs:
        return f"idle for max_idle_secs ({limits.max_idle_secs:g} s)"
    return None


def may_accept(limits: Limits, state: LimitState, now: float) -> bool:
    """Whether one more assignment fits within the limits."""
    return drain_reason(limits, state, now) is None


def reserve(limits: Limits, state: LimitState, now: float) -> tuple[LimitState, str | None]:
    """Take one build from the budget: ``(new state, None)``, or ``(state, refusal reason)``.

    The check and the take are one step, so the caller (which must not await between reading
    and storing the state) can never accept more than ``max_builds``.
    """
    reason = drain_reason(limits, state, now)
    if reason is not None:
        return state, reason
    taken = replace(
        state, reserved=state.reserved + 1, running=state.running + 1, last_active_mono=now
    )
    return taken, None


def complete(state: LimitState, now: float) -> LimitState:
    """A reserved build finished (any outcome): its slot is free and idle time restarts."""
    return replace(state, running=max(0, state.running - 1), last_active_mono=now)


def next_deadline(limits: Limits, state: LimitState, now: float) -> float | None:
    """The earliest monotonic time at which ``drain_reason`` may change without an event.

    The lifetime deadline always counts; the idle deadline only while nothing runs (an
    assignment or completion moves it, and the session re-asks then). ``None``: no time-based
    limit applies until the next event. A deadline already passed is returned as is (the
    caller checks ``drain_reason`` first).
    """
    deadlines: list[float] = []
    if limits.max_lifetime_secs is not None:
        deadlines.append(state.started_mono + limits.max_lifetime_secs)
    if state.running == 0:
        deadlines.append(state.last_active_mono + limits.max_idle_secs)
    return min(deadlines) if deadlines else None


__all__ = [
    "LimitState",
    "Limits",
    "complete",
    "drain_reason",
    "may_accept",
    "next_deadline",
    "registered",
    "reserve",
    "start",
]
