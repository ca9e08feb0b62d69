"""Catching up with another runner's change to a step (pure): what the working copy does."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bigtent.runner.scheduler.sync import (
    Seen,
    Settling,
    Stored,
    catch_up,
    settle_waiting,
    waiting_verdict,
)
from bigtent.states import StepState as S

states = st.sampled_from(list(S))
leases = st.sampled_from([None, "L1", "L2"])


@given(seen_state=states, seen_lease=leases, held=st.booleans(), row_state=states, row_lease=leases)
def test_catch_up_properties(
    seen_state: S, seen_lease: str | None, held: bool, row_state: S, row_lease: str | None
) -> None:
    d = catch_up(Seen(seen_state, seen_lease, held), Stored(row_state, row_lease))
    # A slot here is freed exactly when a lease held here is no longer the row's.
    still_ours = row_state.is_leased and row_lease == seen_lease
    assert d.release == (held and seen_state.is_leased and not still_ours)
    # Runnable in the database <=> queued here; never both queued and taken out.
    assert d.queue == (row_state is S.RUNNABLE)
    assert not (d.queue and d.unqueue)
    assert not (d.finished and d.reopened)
    assert d.finished == (row_state.is_final and not seen_state.is_final)
    assert d.reopened == (seen_state.is_final and not row_state.is_final)


@pytest.mark.parametrize(
    ("seen", "stored", "release", "unqueue"),
    [
        # Another runner claimed a step runnable here.
        (Seen(S.RUNNABLE, None, False), Stored(S.ASSIGNED, "L2"), False, True),
        # Another runner cancelled a step an agent here builds: stop it.
        (Seen(S.BUILDING, "L1", True), Stored(S.CANCELLED, None), True, False),
        # Another runner expired the lease and assigned the step again elsewhere.
        (Seen(S.BUILDING, "L1", True), Stored(S.ASSIGNED, "L2"), True, False),
        # The agent moved to another runner, which recorded its acceptance: same lease.
        (Seen(S.ASSIGNED, "L1", True), Stored(S.BUILDING, "L1"), False, False),
        # A lease another runner holds changes there: nothing to stop here.
        (Seen(S.BUILDING, "L1", False), Stored(S.SUCCEEDED, None), False, False),
    ],
)
def test_catch_up_cases(seen: Seen, stored: Stored, release: bool, unqueue: bool) -> None:
    d = catch_up(seen, stored)
    assert (d.release, d.unqueue) == (release, unqueue)


@pytest.mark.parametrize(
    ("deps", "verdict"),
    [
        ([], S.RUNNABLE),
        ([S.SUCCEEDED, S.SUCCEEDED], S.RUNNABLE),
        ([S.SUCCEEDED, S.BUILDING], S.WAITING),
        ([S.WAITING, S.FAILED], S.DEPENDENCY_FAILED),
        ([S.DEPENDENCY_FAILED], S.DEPENDENCY_FAILED),
        ([S.CANCELLED, S.SUCCEEDED], S.DEPENDENCY_FAILED),
    ],
)
def test_waiting_verdict(deps: list[S], verdict: S) -> None:
    assert waiting_verdict(deps) is verdict


def _drv(i: int) -> str:
    return f"/nix/store/{i}.drv"


@pytest.mark.parametrize(
    ("deps", "states", "known", "expected"),
    [
        # Every dependency succeeded (or there are none): runnable.
        (
            {1: [2, 3]},
            {2: S.SUCCEEDED, 3: S.SUCCEEDED},
            {1, 2, 3},
            [Settling(1, S.RUNNABLE, frozenset(), None)],
        ),
        ({1: []}, {}, {1}, [Settling(1, S.RUNNABLE, frozenset(), None)]),
        # Still waiting on the dependencies known here that did not succeed.
        (
            {1: [2, 3, 4]},
            {2: S.SUCCEEDED, 3: S.BUILDING, 4: S.RUNNABLE},
            {1, 2, 3},
            [Settling(1, S.WAITING, frozenset({3}), None)],
        ),
        # A failed dependency fails it; the first failed one (by id) is the reason.
        (
            {1: [4, 3, 2]},
            {2: S.SUCCEEDED, 3: S.CANCELLED, 4: S.FAILED},
            {1},
            [Settling(1, S.DEPENDENCY_FAILED, frozenset(), f"dependency {_drv(3)} failed")],
        ),
        # Each step on its own, in id order.
        (
            {5: [2], 1: [3]},
            {2: S.DEPENDENCY_FAILED, 3: S.SUCCEEDED},
            {1, 5},
            [
                Settling(1, S.RUNNABLE, frozenset(), None),
                Settling(5, S.DEPENDENCY_FAILED, frozenset(), f"dependency {_drv(2)} failed"),
            ],
        ),
    ],
)
def test_settle_waiting(
    deps: dict[int, list[int]], states: dict[int, S], known: set[int], expected: list[Settling]
) -> None:
    got = settle_waiting(deps, {i: (s, _drv(i)) for i, s in states.items()}, known)
    assert got == expected


@given(st.dictionaries(st.integers(0, 20), st.lists(st.integers(21, 40), max_size=4), max_size=6),
       st.lists(st.sampled_from(list(S)), min_size=20, max_size=20))  # fmt: skip
def test_settle_waiting_agrees_with_the_verdict(deps: dict[int, list[int]], pool: list[S]) -> None:
    states = {d: (pool[d - 21], _drv(d)) for d in range(21, 41)}
    got = settle_waiting(deps, states, set(range(41)))
    assert [s.step_id for s in got] == sorted(deps)
    for s in got:
        dep_states = [states[d][0] for d in deps[s.step_id]]
        assert s.state is waiting_verdict(dep_states)
        assert (s.error is not None) == (s.state is S.DEPENDENCY_FAILED)
        assert s.waits_on <= set(deps[s.step_id])
        assert all(states[d][0] is not S.SUCCEEDED for d in s.waits_on)
        if s.state is not S.WAITING:
            assert not s.waits_on
