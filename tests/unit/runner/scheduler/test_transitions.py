"""How a step's attempt ends, decided without a database (scheduler/transitions.py)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bigtent import protocol as p
from bigtent.config import SchedulerSection
from bigtent.runner.scheduler.leases import Disposition
from bigtent.runner.scheduler.matching import Requirement
from bigtent.runner.scheduler.model import MAX_LAST_ERROR_CHARS, ActiveBuild, Venue
from bigtent.runner.scheduler.steps import StepNode
from bigtent.runner.scheduler.sync import LostRace
from bigtent.runner.scheduler.transitions import (
    Admit,
    StoredStep,
    admit_verdict,
    admitted,
    build_ending,
    build_endings,
    cancel,
    end_attempt,
    holds_lease,
    reattach,
    venue_health,
)
from bigtent.states import BuildState, StepState

NOW = 1000.0
CONFIG = SchedulerSection(
    max_infra_attempts=3,
    retry_base_secs=10.0,
    retry_max_secs=100.0,
    agent_backoff_base_secs=5.0,
    agent_backoff_max_secs=60.0,
    refuse_cooldown_secs=2.0,
    unhealthy_after_failures=2,
)


def no_rand() -> float:
    raise AssertionError("no jitter is drawn for this outcome")


def node(sid: int, state: StepState = StepState.WAITING, **kw: object) -> StepNode:
    n = StepNode(sid, f"/nix/store/{sid}.drv", Requirement("x86_64-linux", frozenset()), state, 0.0)
    for k, v in kw.items():
        setattr(n, k, v)
    return n


def venue(**kw: object) -> Venue:
    v = Venue("m1", "agent-1", frozenset({"x86_64-linux"}), frozenset(), frozenset(), 2, 1.0, print)
    for k, val in kw.items():
        setattr(v, k, val)
    return v


def graph() -> dict[int, StepNode]:
    """1 (leased) <- 2 (waiting on 1 only) <- 4; 1 <- 3 (waiting on 1 and 5); 5 runnable."""
    nodes = {
        1: node(1, StepState.BUILDING, lease_id="L", venue="m1", dependents={2, 3}),
        2: node(2, deps={1}, dependents={4}),
        3: node(3, deps={1, 5}),
        4: node(4, deps={2}),
        5: node(5, StepState.RUNNABLE, dependents={3}),
    }
    return nodes


# ---- the step and its row, one row per disposition ------------------------------------------
@pytest.mark.parametrize(
    ("outcome", "attempts", "state", "disposition", "final", "row"),
    [
        (
            p.Outcome.SUCCESS,
            0,
            StepState.SUCCEEDED,
            Disposition.SUCCEED,
            True,
            {"finished_at": NOW},
        ),
        (
            p.Outcome.BUILD_FAILURE,
            0,
            StepState.FAILED,
            Disposition.FAIL,
            True,
            {"finished_at": NOW, "failed_at": NOW},
        ),
        (p.Outcome.TIMED_OUT, 0, StepState.FAILED, Disposition.FAIL, True, {"failed_at": NOW}),
        (p.Outcome.ABORTED, 0, StepState.RUNNABLE, Disposition.REQUEUE, False, {}),
        (
            p.Outcome.AGENT_LOST,
            0,
            StepState.RUNNABLE,
            Disposition.RETRY,
            False,
            {"attempts": 1, "not_before": NOW + 10.0},
        ),
        (
            p.Outcome.UPLOAD_FAILURE,
            2,
            StepState.FAILED,
            Disposition.RETRY,
            True,
            {"attempts": 3, "finished_at": NOW},
        ),
    ],
)
def test_the_step_and_its_row(
    outcome: p.Outcome,
    attempts: int,
    state: StepState,
    disposition: Disposition,
    final: bool,
    row: dict[str, object],
) -> None:
    nodes = graph()
    nodes[1].attempts = attempts
    rand: Callable[[], float] = (
        (lambda: 0.0) if disposition is Disposition.RETRY and not final else no_rand
    )
    end = end_attempt(nodes[1], nodes, venue(), outcome, "oops", None, NOW, CONFIG, rand)
    assert (end.state, end.disposition, end.final) == (state, disposition, final)
    assert end.attempt == attempts + 1
    assert end.row["state"] is state
    assert end.row["lease_id"] is None and end.row["lease_expires_at"] is None
    assert end.row["outcome"] is outcome
    for key, value in row.items():
        assert end.row[key] == value
    assert end.leased
    # Nothing in memory changed: the decision is plain values.
    assert nodes[1].state is StepState.BUILDING and nodes[1].attempts == attempts
    assert nodes[2].deps == {1}


def test_a_retry_that_used_the_last_attempt_says_so() -> None:
    nodes = graph()
    nodes[1].attempts = 2
    end = end_attempt(
        nodes[1], nodes, None, p.Outcome.AGENT_LOST, "gone", None, NOW, CONFIG, no_rand
    )
    assert end.row["error"] == "infrastructure failure after 3 attempts; last: agent_lost: gone"
    assert end.error == "gone"  # the attempt's own record keeps what was said
    assert end.retry_at is None
    assert end.note == "[bigtent: attempt 3: agent_lost: gone]"


def test_a_retry_is_noted_in_the_log_with_the_venue_and_first_line() -> None:
    nodes = graph()
    end = end_attempt(
        nodes[1],
        nodes,
        venue(),
        p.Outcome.PREPARE_FAILURE,
        "\nno space\nmore",
        None,
        NOW,
        CONFIG,
        lambda: 0.5,
    )
    assert end.note == "[bigtent: attempt 1 on agent-1: prepare_failure: no space]"
    assert end.not_before == NOW + 10.0 * 1.125
    assert end.retry_at == end.not_before


def test_only_a_retry_draws_jitter_and_other_outcomes_leave_no_note() -> None:
    nodes = graph()
    for outcome in (p.Outcome.SUCCESS, p.Outcome.BUILD_FAILURE, p.Outcome.ABORTED):
        end = end_attempt(nodes[1], nodes, None, outcome, "", None, NOW, CONFIG, no_rand)
        assert end.note is None


def test_a_result_carries_its_exit_code_and_timings_into_the_row() -> None:
    nodes = graph()
    msg = p.Result(
        step_id=p.StepId(1),
        lease_id=p.LeaseId("L"),
        outcome=p.Outcome.BUILD_FAILURE,
        error="x" * 8100,
        exit_code=1,
        timings=p.Timings(prepare_secs=1.0, build_secs=2.0, upload_secs=3.0),
    )
    end = end_attempt(nodes[1], nodes, None, msg.outcome, msg.error, msg, NOW, CONFIG, no_rand)
    assert end.row["exit_code"] == 1
    assert (end.row["prepare_secs"], end.row["build_secs"], end.row["upload_secs"]) == (1, 2, 3)
    assert len(end.row["error"]) == 8000


def test_a_step_that_never_left_the_queue_held_no_lease() -> None:
    nodes = {1: node(1, StepState.RUNNABLE)}
    end = end_attempt(
        nodes[1], nodes, None, p.Outcome.UNSUPPORTED, "no venue", None, NOW, CONFIG, no_rand
    )
    assert not end.leased and end.state is StepState.FAILED and end.venue is None


# ---- dependents -----------------------------------------------------------------------------
def test_a_success_makes_runnable_only_dependents_waiting_for_nothing_else() -> None:
    nodes = graph()
    end = end_attempt(nodes[1], nodes, None, p.Outcome.SUCCESS, "", None, NOW, CONFIG, no_rand)
    assert end.promote == (2,)  # 3 still waits for 5
    assert end.fail == ()


@pytest.mark.parametrize("outcome", [p.Outcome.BUILD_FAILURE, p.Outcome.LOG_LIMIT])
def test_a_failure_fails_every_pending_dependent_all_the_way_up(outcome: p.Outcome) -> None:
    nodes = graph()
    end = end_attempt(nodes[1], nodes, None, outcome, "", None, NOW, CONFIG, no_rand)
    assert end.fail == (2, 3, 4)
    assert end.promote == ()
    assert end.dependency_error == "dependency /nix/store/1.drv failed"


def test_a_failure_leaves_dependents_that_already_run_alone() -> None:
    nodes = graph()
    nodes[2].state = StepState.ASSIGNED  # started before its edge was known
    end = end_attempt(
        nodes[1], nodes, None, p.Outcome.BUILD_FAILURE, "", None, NOW, CONFIG, no_rand
    )
    assert end.fail == (3, 4)


def test_a_retry_or_requeue_touches_no_dependent() -> None:
    nodes = graph()
    for outcome in (p.Outcome.AGENT_LOST, p.Outcome.ABORTED):
        end = end_attempt(nodes[1], nodes, None, outcome, "", None, NOW, CONFIG, lambda: 0.0)
        assert (end.promote, end.fail) == ((), ())


# ---- the venue ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("outcome", "before", "failures", "backoff", "cooldown", "counts"),
    [
        (p.Outcome.SUCCESS, 3, 0, 0.0, 0.0, (1, 0, 0)),
        (p.Outcome.BUILD_FAILURE, 3, 0, 0.0, 0.0, (0, 1, 0)),
        (p.Outcome.ABORTED, 3, 3, 900.0, NOW + 2.0, (0, 0, 0)),
        (p.Outcome.AGENT_LOST, 0, 1, NOW + 5.0, 0.0, (0, 0, 1)),
        (p.Outcome.UPLOAD_FAILURE, 1, 2, NOW + 10.0, 0.0, (0, 0, 1)),
        (p.Outcome.PREPARE_FAILURE, 10, 11, NOW + 60.0, 0.0, (0, 0, 1)),
    ],
)
def test_the_venue_health_after_an_attempt(
    outcome: p.Outcome,
    before: int,
    failures: int,
    backoff: float,
    cooldown: float,
    counts: tuple[int, int, int],
) -> None:
    v = venue(consecutive_failures=before, backoff_until=900.0)
    health = venue_health(v, outcome, "disk full", NOW, CONFIG)
    assert health.consecutive_failures == failures
    assert health.backoff_until == backoff
    assert health.cooldown_until == cooldown
    assert (health.succeeded, health.failed, health.infra) == counts
    assert v.consecutive_failures == before  # the venue itself is not touched


def test_an_infrastructure_failure_keeps_its_error_and_says_when_the_venue_turns_unhealthy() -> (
    None
):
    first = venue_health(venue(), p.Outcome.AGENT_LOST, "e" * 5000, NOW, CONFIG)
    assert first.last_error == "e" * MAX_LAST_ERROR_CHARS
    assert not first.became_unhealthy
    second = venue_health(venue(consecutive_failures=1), p.Outcome.AGENT_LOST, "x", NOW, CONFIG)
    assert second.became_unhealthy
    third = venue_health(venue(consecutive_failures=2), p.Outcome.AGENT_LOST, "x", NOW, CONFIG)
    assert not third.became_unhealthy  # said once, when it turned
    kept = venue_health(venue(last_error="old"), p.Outcome.SUCCESS, "", NOW, CONFIG)
    assert kept.last_error == "old"


@given(
    failures=st.integers(min_value=0, max_value=200),
    outcome=st.sampled_from(list(p.Outcome)),
)
def test_backoff_never_exceeds_its_cap_and_only_infrastructure_failures_count(
    failures: int, outcome: p.Outcome
) -> None:
    health = venue_health(venue(consecutive_failures=failures), outcome, "", NOW, CONFIG)
    assert health.backoff_until <= NOW + CONFIG.agent_backoff_max_secs
    assert health.consecutive_failures in (0, failures, failures + 1)
    assert (health.consecutive_failures == failures + 1) == bool(health.infra)
    assert health.succeeded + health.failed + health.infra <= 1


@given(
    attempts=st.integers(min_value=0, max_value=10),
    outcome=st.sampled_from(list(p.Outcome)),
    jitter=st.floats(min_value=0.0, max_value=0.999),
)
def test_an_attempt_end_is_consistent(attempts: int, outcome: p.Outcome, jitter: float) -> None:
    nodes = graph()
    nodes[1].attempts = attempts
    end = end_attempt(nodes[1], nodes, venue(), outcome, "e", None, NOW, CONFIG, lambda: jitter)
    assert end.row["state"] is end.state
    assert end.final == end.state.is_final
    assert end.attempts in (attempts, attempts + 1)
    # A step that is not final is runnable again, now or after its backoff; a final one
    # is never tried again.
    assert (end.retry_at is None) == end.final
    if end.retry_at is not None:
        assert end.retry_at >= NOW
    assert not (end.promote and end.fail)
    assert set(end.promote) <= nodes[1].dependents


# ---- builds ---------------------------------------------------------------------------------
def build(bid: int, steps: set[int], roots: dict[str, int | None], unfinished: int) -> ActiveBuild:
    return ActiveBuild(bid, 0, roots, steps, BuildState.RUNNING, unfinished=unfinished)


def members(nodes: dict[int, StepNode], *builds: ActiveBuild) -> None:
    for b in builds:
        for sid in b.steps:
            nodes[sid].builds.add(b.id)


@pytest.mark.parametrize(
    ("finished", "expected"),
    [
        ({1: StepState.SUCCEEDED}, {}),  # 2 still pending
        ({1: StepState.SUCCEEDED, 2: StepState.SUCCEEDED}, {10: BuildState.SUCCEEDED}),
        (
            {1: StepState.FAILED, 2: StepState.DEPENDENCY_FAILED},
            {10: BuildState.FAILED},
        ),
    ],
)
def test_a_build_ends_once_every_member_is_final_with_its_roots_outcome(
    finished: dict[int, StepState], expected: dict[int, BuildState]
) -> None:
    nodes = {1: node(1, StepState.BUILDING), 2: node(2)}
    b = build(10, {1, 2}, {"/nix/store/2.drv": 2, "/nix/store/cached.drv": None}, unfinished=2)
    members(nodes, b)
    assert build_endings({10: b}, nodes, finished) == expected


def test_a_build_being_admitted_does_not_end() -> None:
    nodes = {1: node(1, StepState.BUILDING)}
    b = build(10, {1}, {"/nix/store/1.drv": 1}, unfinished=1)
    members(nodes, b)
    assert build_endings({10: b}, nodes, {1: StepState.SUCCEEDED}, incomplete={10}) == {}
    assert build_endings({10: b}, nodes, {1: StepState.SUCCEEDED}) == {10: BuildState.SUCCEEDED}


def test_a_build_ends_exactly_once() -> None:
    nodes = {1: node(1, StepState.SUCCEEDED)}
    b = build(10, {1}, {"/nix/store/1.drv": 1}, unfinished=0)
    members(nodes, b)
    assert build_ending(b, nodes) is BuildState.SUCCEEDED
    b.state = BuildState.SUCCEEDED
    assert build_ending(b, nodes) is None
    # A step already final in memory is not counted again.
    assert build_endings({10: b}, nodes, {1: StepState.SUCCEEDED}) == {}


def test_a_build_whose_steps_ended_elsewhere_ends_when_looked_at() -> None:
    # A catch-up copied another runner's results: no step becomes final here, but the
    # builds it touched (``also``) are looked at; a build not touched is left alone.
    nodes = {1: node(1, StepState.SUCCEEDED), 2: node(2, StepState.FAILED)}
    done = build(10, {1}, {"/nix/store/1.drv": 1}, unfinished=0)
    failed = build(11, {2}, {"/nix/store/2.drv": 2}, unfinished=0)
    members(nodes, done, failed)
    builds = {10: done, 11: failed}
    assert build_endings(builds, nodes, {}) == {}
    assert build_endings(builds, nodes, {}, also={10}) == {10: BuildState.SUCCEEDED}
    assert build_endings(builds, nodes, {}, also={10, 11, 12}) == {
        10: BuildState.SUCCEEDED,
        11: BuildState.FAILED,
    }
    assert build_endings(builds, nodes, {}, incomplete={10}, also={10}) == {}


def test_a_build_looked_at_counts_its_newly_final_steps() -> None:
    nodes = {1: node(1, StepState.SUCCEEDED), 2: node(2)}
    b = build(10, {1, 2}, {"/nix/store/2.drv": 2}, unfinished=1)
    members(nodes, b)
    assert build_endings({10: b}, nodes, {}, also={10}) == {}
    finished = {2: StepState.DEPENDENCY_FAILED}
    assert build_endings({10: b}, nodes, finished, also={10}) == {10: BuildState.FAILED}


def test_a_shared_step_ends_each_of_its_builds_by_its_own_roots() -> None:
    nodes = {1: node(1, StepState.BUILDING), 2: node(2, StepState.SUCCEEDED)}
    a = build(10, {1}, {"/nix/store/1.drv": 1}, unfinished=1)
    b = build(11, {1, 2}, {"/nix/store/2.drv": 2}, unfinished=1)
    members(nodes, a, b)
    assert build_endings({10: a, 11: b}, nodes, {1: StepState.FAILED}) == {
        10: BuildState.FAILED,
        11: BuildState.SUCCEEDED,
    }


# ---- cancelling a build ---------------------------------------------------------------------
def test_a_cancel_takes_only_unfinished_steps_no_other_build_needs() -> None:
    nodes = {
        1: node(1, StepState.BUILDING, attempts=1),
        2: node(2, StepState.WAITING),
        3: node(3, StepState.SUCCEEDED),
        4: node(4, StepState.RUNNABLE),  # another active build needs it too
        5: node(5, StepState.ASSIGNED),
    }
    mine = build(10, {1, 2, 3, 4, 5}, {"/nix/store/2.drv": 2}, unfinished=4)
    other = build(11, {4}, {"/nix/store/4.drv": 4}, unfinished=1)
    members(nodes, mine, other)
    cancelled = cancel(mine, nodes, {10: mine, 11: other})
    assert cancelled.build_id == 10
    assert cancelled.victims == (1, 2, 5)
    assert cancelled.aborted == {1: 2, 5: 1}  # leased ones end their attempt
    # Once the other build is gone, its step is the cancelled build's alone.
    assert cancel(mine, nodes, {10: mine}).victims == (1, 2, 4, 5)
    assert nodes[1].state is StepState.BUILDING  # decided, not applied


# ---- whose message counts -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("state", "lease", "sent", "counts"),
    [
        (StepState.ASSIGNED, "L", "L", True),
        (StepState.BUILDING, "L", "L", True),
        (StepState.BUILDING, "L2", "L", False),  # a stale lease's result is ignored
        (StepState.RUNNABLE, None, "L", False),  # given back, or expired into a retry
        (StepState.SUCCEEDED, None, "L", False),  # finished: it finishes exactly once
        (StepState.FAILED, "L", "L", False),
    ],
)
def test_only_the_current_lease_counts(
    state: StepState, lease: str | None, sent: str, counts: bool
) -> None:
    assert holds_lease(node(1, state, lease_id=lease), sent) is counts


# ---- a venue reconnects ---------------------------------------------------------------------
def test_a_reconnecting_venue_keeps_what_it_reports_and_loses_the_rest() -> None:
    nodes = {
        1: node(1, StepState.BUILDING, lease_id="A", venue="m1"),
        2: node(2, StepState.ASSIGNED, lease_id="B", venue="m1"),
        3: node(3, StepState.BUILDING, lease_id="C", venue="m1"),
        4: node(4, StepState.BUILDING, lease_id="D", venue="m2"),
        5: node(5, StepState.BUILDING, lease_id="E", venue="m1"),
    }
    leased = list(nodes.values())
    back = reattach(
        "m1",
        [
            (1, "A"),  # kept
            (3, "stale"),  # not its current lease: lost
            (4, "D"),  # another machine's step: not kept, and not m1's to lose
            (9, "X"),  # unknown here
        ],
        nodes,
        leased,
        running={5},  # already held here (a builder attached again)
    )
    assert back.kept == (1,)
    assert back.lost == (2, 3)
    assert nodes[2].lease_id == "B"  # decided, not applied


@given(st.sets(st.integers(min_value=1, max_value=6)))
def test_a_venue_that_reports_everything_loses_nothing(reported: set[int]) -> None:
    nodes = {
        sid: node(sid, StepState.BUILDING, lease_id=f"L{sid}", venue="m1") for sid in range(1, 7)
    }
    back = reattach("m1", [(s, f"L{s}") for s in sorted(reported)], nodes, list(nodes.values()))
    assert set(back.kept) == reported
    assert set(back.lost) == set(nodes) - reported


# ---- admitting a derivation -----------------------------------------------------------------
TTL = 3600.0
CACHED_FAIL = StoredStep(StepState.FAILED, "build_failure", NOW - 10.0)
OLD_FAIL = StoredStep(StepState.FAILED, "build_failure", NOW - 2 * TTL)
INFRA_FAIL = StoredStep(StepState.FAILED, "agent_lost", NOW - 10.0)


@pytest.mark.parametrize(
    ("here", "stored", "verdict"),
    [
        (StepState.RUNNABLE, StoredStep(StepState.ASSIGNED, None, None), Admit.JOIN),
        (StepState.SUCCEEDED, None, Admit.JOIN),  # active here: joined whatever it does
        (None, None, Admit.CREATE),
        (None, CACHED_FAIL, Admit.CACHED),
        (StepState.FAILED, CACHED_FAIL, Admit.CACHED),
        (None, OLD_FAIL, Admit.REQUEUE),  # past the failure cache's TTL
        (None, INFRA_FAIL, Admit.REQUEUE),  # infrastructure failures are never cached
        (StepState.CANCELLED, StoredStep(StepState.CANCELLED, None, None), Admit.REQUEUE),
        (None, StoredStep(StepState.DEPENDENCY_FAILED, None, None), Admit.REQUEUE),
    ],
)
def test_what_a_new_build_does_about_a_derivation(
    here: StepState | None, stored: StoredStep | None, verdict: Admit
) -> None:
    assert admit_verdict("/nix/store/x.drv", here, stored, NOW, TTL) is verdict


@pytest.mark.parametrize(
    ("here", "stored", "says"),
    [
        (StepState.FAILED, None, "is gone from the database"),
        (None, StoredStep(StepState.BUILDING, None, None), "building in the database, unknown"),
        (StepState.FAILED, StoredStep(StepState.RUNNABLE, None, None), "runnable in the data"),
    ],
)
def test_another_runner_changed_the_step_first(
    here: StepState | None, stored: StoredStep | None, says: str
) -> None:
    with pytest.raises(LostRace, match=says):
        admit_verdict("/nix/store/x.drv", here, stored, NOW, TTL)


# ---- admitted ------------------------------------------------------------------------------
W, S, F, C = StepState.WAITING, StepState.SUCCEEDED, StepState.FAILED, StepState.CANCELLED


@pytest.mark.parametrize(
    ("states", "pairs", "queued", "waits", "links", "failed", "runnable"),
    [
        # a queued chain: the bottom runs, the rest wait
        ({1: W, 2: W, 3: W}, [(2, 1), (3, 2)], [1, 2, 3], {2: {1}, 3: {2}}, 2, {}, [1]),
        # a succeeded dependency is linked but not waited for
        ({1: S, 2: W}, [(2, 1)], [2], {}, 1, {}, [2]),
        # a failed dependency fails what is queued on it, and what is queued on that
        ({1: F, 2: W, 3: W}, [(2, 1), (3, 2)], [2, 3], {2: {1}, 3: {2}}, 2, {2: "d1", 3: "d2"}, []),
        # a joined step that already runs gains no edge
        ({1: W, 2: StepState.BUILDING}, [(2, 1)], [1], {}, 0, {}, [1]),
        # a joined waiting step waits for a new dependency too
        ({1: W, 2: W}, [(2, 1)], [1], {2: {1}}, 1, {}, [1]),
        # a cancelled dependency fails the step; one of two waits on the other
        (
            {1: StepState.CANCELLED, 2: W, 3: W},
            [(3, 1), (3, 2)],
            [2, 3],
            {3: {1, 2}},
            2,
            {3: "d1"},
            [2],
        ),
    ],
)
def test_admitted_decides_edges_failures_and_runnables(
    states: dict[int, StepState],
    pairs: list[tuple[int, int]],
    queued: list[int],
    waits: dict[int, set[int]],
    links: int,
    failed: dict[int, str],
    runnable: list[int],
) -> None:
    decided = admitted(pairs, queued, states.__getitem__, lambda sid: f"d{sid}")
    assert decided.waits == waits
    assert len(decided.links) == links
    assert decided.failed == {sid: f"dependency {drv} failed" for sid, drv in failed.items()}
    assert decided.runnable == runnable


@given(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9)), max_size=30))
def test_admitted_never_leaves_a_queued_step_both_failed_and_runnable(
    edges: list[tuple[int, int]],
) -> None:
    pairs = [(s, d) for s, d in edges if d < s]  # dependencies first
    states = {i: (F if i == 0 else W) for i in range(10)}
    decided = admitted(pairs, range(1, 10), states.__getitem__, str)
    assert not set(decided.failed) & set(decided.runnable)
    for sid in range(1, 10):
        deps = decided.waits.get(sid, set())
        assert (sid in decided.runnable) is (not deps)
        assert (sid in decided.failed) is any(d == 0 or d in decided.failed for d in deps)
