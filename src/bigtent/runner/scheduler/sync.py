"""Catching up with other runners on one database (pure): when another runner changed a step,
what this runner's working copy must do about it. No I/O: the dispatcher reads the row and
applies the decision (docs/architecture.md, "Several runners").

The database is the record. A runner's copy of a step is only ever behind it, never ahead:
every transition this runner makes is checked against the row in the same transaction (a
claim only takes a step that is still runnable, a result only counts while its lease is the
row's), so catching up is copying the row, plus the local effects of the copy being wrong.
"""

from __future__ import annotations

from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass

from bigtent.states import StepState


class LostRace(Exception):
    """Another runner changed a row this runner's transition relied on. The transaction is
    rolled back and the working copy read again from the database; the transition is then
    either retried (a new build) or moot (a result for a lease that is no longer current)."""


@dataclass(frozen=True, slots=True)
class Seen:
    """A step as this runner's working copy has it."""

    state: StepState
    lease_id: str | None
    held_here: bool
    """Its lease is held by a venue connected to this runner."""


@dataclass(frozen=True, slots=True)
class Stored:
    """The same step as its row now says."""

    state: StepState
    lease_id: str | None


@dataclass(frozen=True, slots=True)
class CatchUp:
    """What to do besides copying the row."""

    release: bool
    """The lease a local venue holds is over (another runner ended or replaced it): tell
    the venue to stop the step and free its slot."""
    unqueue: bool
    """Take the step out of the runnable index: it is no longer runnable."""
    queue: bool
    """Put the step (back) in the runnable index: it is runnable (perhaps after a claim
    this runner lost, which had already taken it out)."""
    finished: bool
    """It became final: it stops counting as unfinished work of its builds."""
    reopened: bool
    """It was final and is active again (restarted): read its dependencies again."""


def catch_up(seen: Seen, stored: Stored) -> CatchUp:
    """Decide what changes here when a step's row no longer matches the working copy."""
    same_lease = seen.lease_id == stored.lease_id and stored.state.is_leased
    lease_over_here = seen.held_here and seen.state.is_leased and not same_lease
    return CatchUp(
        release=lease_over_here,
        unqueue=seen.state is StepState.RUNNABLE and stored.state is not StepState.RUNNABLE,
        queue=stored.state is StepState.RUNNABLE,
        finished=stored.state.is_final and not seen.state.is_final,
        reopened=seen.state.is_final and not stored.state.is_final,
    )


def waiting_verdict(dep_states: list[StepState]) -> StepState:
    """A waiting step's state given its dependencies' (architecture §1: runnable once every
    dependency succeeded; a failed, dependency-failed or cancelled one fails it)."""
    if any(s in (StepState.FAILED, StepState.DEPENDENCY_FAILED, StepState.CANCELLED)
           for s in dep_states):  # fmt: skip
        return StepState.DEPENDENCY_FAILED
    if all(s is StepState.SUCCEEDED for s in dep_states):
        return StepState.RUNNABLE
    return StepState.WAITING


@dataclass(frozen=True, slots=True)
class Settling:
    """What becomes of a waiting step once its dependencies' rows are read."""

    step_id: int
    state: StepState
    """WAITING (it goes on waiting), RUNNABLE or DEPENDENCY_FAILED."""
    waits_on: frozenset[int]
    """(Still waiting) the dependencies known here that have not succeeded."""
    error: str | None
    """(Dependency-failed) the reason its row records: the first failed dependency."""


def settle_waiting(
    deps: Mapping[int, Sequence[int]],
    states: Mapping[int, tuple[StepState, str]],
    known: Container[int],
) -> list[Settling]:
    """Decide, for each waiting step of ``deps`` (step id -> its dependencies' ids), what
    its dependencies' rows (``states``: id -> (state, .drv path)) make of it; ``known``: the
    steps the working copy has. In step id order."""
    settled: list[Settling] = []
    for sid in sorted(deps):
        verdict = waiting_verdict([states[d][0] for d in deps[sid]])
        waits_on: frozenset[int] = frozenset()
        error = None
        if verdict is StepState.WAITING:
            waits_on = frozenset(
                d for d in deps[sid] if states[d][0] is not StepState.SUCCEEDED and d in known
            )
        elif verdict is StepState.DEPENDENCY_FAILED:
            failed = next(
                d
                for d in sorted(deps[sid])
                if states[d][0].is_final and states[d][0] is not StepState.SUCCEEDED
            )
            error = f"dependency {states[failed][1]} failed"
        settled.append(Settling(sid, verdict, waits_on, error))
    return settled
