"""Catching up with another runner's change to a step (pure): what the working copy does."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bigtent.runner.scheduler.sync import Seen, Stored, catch_up, waiting_verdict
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
