"""The step DAG working copy: runnable index, dispatch planning, heights, build outcome."""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bigtent.runner.scheduler.matching import Requirement, VenueView, best_venue, can_run
from bigtent.runner.scheduler.steps import (
    Dispatch,
    RunnableIndex,
    StepNode,
    build_outcome,
    dependents_closure,
    plan_dispatch,
    plan_heights,
    raise_heights,
    restart_selection,
)
from bigtent.states import BuildState, StepState

X86 = "x86_64-linux"
ARM = "aarch64-linux"
PLAIN = Requirement(X86, frozenset())
KVM = Requirement(X86, frozenset({"kvm"}))
ARM_PLAIN = Requirement(ARM, frozenset())


def node(
    sid: int,
    req: Requirement = PLAIN,
    *,
    priority: int = 0,
    height: int = 0,
    created_at: float = 0.0,
    state: StepState = StepState.RUNNABLE,
) -> StepNode:
    return StepNode(
        id=sid,
        drv_path=f"/nix/store/{sid:032d}-s{sid}.drv",
        req=req,
        state=state,
        created_at=created_at,
        priority=priority,
        height=height,
    )


def venue(
    machine_id: str,
    systems: tuple[str, ...] = (X86,),
    supported: tuple[str, ...] = (),
    mandatory: tuple[str, ...] = (),
    max_jobs: int = 1,
    running: int = 0,
    speed: float = 1.0,
) -> VenueView:
    return VenueView(
        machine_id,
        frozenset(systems),
        frozenset(supported),
        frozenset(mandatory),
        max_jobs,
        running,
        speed,
    )


def index_of(*nodes: StepNode) -> RunnableIndex:
    index = RunnableIndex()
    for n in nodes:
        index.push(n)
    return index


def drain(index: RunnableIndex, req: Requirement) -> list[int]:
    out = []
    while (sid := index.pop(req)) is not None:
        out.append(sid)
    return out


# ---- RunnableIndex ------------------------------------------------------------------------
def test_index_pops_by_priority_then_height_then_age_then_id() -> None:
    index = index_of(
        node(1, created_at=5.0),
        node(2, created_at=1.0),
        node(3, height=3),
        node(4, priority=1),
        node(5, created_at=1.0),
    )
    assert len(index) == 5
    assert drain(index, PLAIN) == [4, 3, 2, 5, 1]
    assert len(index) == 0


def test_index_discard_is_lazy_and_exact() -> None:
    index = index_of(node(1), node(2), node(3))
    index.discard(1)
    index.discard(1)  # twice is harmless
    index.discard(99)  # unknown is harmless
    assert 1 not in index and 2 in index and len(index) == 2
    assert drain(index, PLAIN) == [2, 3]


def test_index_repush_after_priority_change_reorders_and_keeps_one_entry() -> None:
    a, b, c = node(1), node(2), node(3)
    index = index_of(a, b, c)
    c.priority = 10
    index.push(c)
    index.push(c)  # pushing an unchanged step again does not duplicate it
    assert len(index) == 3
    assert drain(index, PLAIN) == [3, 1, 2]
    assert index.pop(PLAIN) is None


def test_index_repush_after_height_change() -> None:
    a, b = node(1), node(2)
    index = index_of(a, b)
    b.height = 2
    index.push(b)
    assert drain(index, PLAIN) == [2, 1]


def test_index_pop_then_push_again_runs_once_per_push() -> None:
    a = node(1)
    index = index_of(a, a)
    assert index.pop(PLAIN) == 1
    assert index.pop(PLAIN) is None
    index.push(a)
    assert index.pop(PLAIN) == 1
    assert index.pop(PLAIN) is None


def test_index_tops_one_per_bucket_skipping_stale_entries() -> None:
    index = index_of(node(1, PLAIN, priority=1), node(2, PLAIN), node(3, KVM), node(4, ARM_PLAIN))
    index.discard(4)
    index.discard(1)
    tops = {req: sid for req, (_key, sid) in index.tops()}
    assert tops == {PLAIN: 2, KVM: 3}
    assert index.requirements() == {PLAIN, KVM}
    assert index.count_by_system() == {X86: 2}


def test_index_counts_follow_pushes_pops_and_discards() -> None:
    index = index_of(node(1), node(2), node(3, ARM_PLAIN), node(4, KVM))
    assert index.count_by_system() == {X86: 3, ARM: 1}
    assert index.requirements() == {PLAIN, KVM, ARM_PLAIN}
    index.pop(ARM_PLAIN)
    index.discard(4)
    assert index.count_by_system() == {X86: 2}
    assert index.requirements() == {PLAIN}
    assert index.pop(KVM) is None


@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(("push", "discard", "pop")),
            st.integers(0, 7),
            st.integers(0, 3),
        ),
        max_size=60,
    )
)
def test_index_matches_a_naive_model(ops: list[tuple[str, int, int]]) -> None:
    """Whatever the sequence of pushes, re-keys, discards and pops, the index behaves like a
    dict of live steps from which the smallest key is taken."""
    reqs = [PLAIN, KVM]
    nodes = {i: node(i, reqs[i % 2]) for i in range(8)}
    index = RunnableIndex()
    model: dict[int, tuple[int, int, float, int]] = {}
    for op, sid, value in ops:
        n = nodes[sid]
        if op == "push":
            n.priority = value
            index.push(n)
            model[sid] = n.sort_key()
        elif op == "discard":
            index.discard(sid)
            model.pop(sid, None)
        else:
            got = index.pop(n.req)
            live = [(k, i) for i, k in model.items() if nodes[i].req == n.req]
            expected = min(live)[1] if live else None
            assert got == expected
            if expected is not None:
                del model[expected]
        assert len(index) == len(model)
        assert index.requirements() == {nodes[i].req for i in model}


# ---- plan_dispatch ------------------------------------------------------------------------
def test_plan_dispatch_highest_priority_first_within_free_slots() -> None:
    index = index_of(node(1), node(2, priority=5), node(3, height=4), node(4))
    decisions = plan_dispatch(index, [venue("a", max_jobs=2)])
    assert decisions == [Dispatch(2, "a"), Dispatch(3, "a")]
    assert len(index) == 2 and 1 in index and 4 in index


def test_plan_dispatch_skips_steps_no_free_venue_can_run() -> None:
    index = index_of(node(1, ARM_PLAIN, priority=9), node(2, KVM, priority=5), node(3))
    decisions = plan_dispatch(index, [venue("a", max_jobs=4)])
    assert decisions == [Dispatch(3, "a")]
    assert 1 in index and 2 in index


def test_plan_dispatch_keeps_kvm_venue_for_kvm_work() -> None:
    index = index_of(node(1, priority=2), node(2, priority=1), node(3, KVM))
    decisions = plan_dispatch(
        index, [venue("kvm", supported=("kvm",), max_jobs=1), venue("plain", max_jobs=2)]
    )
    assert sorted(decisions, key=lambda d: d.step_id) == [
        Dispatch(1, "plain"),
        Dispatch(2, "plain"),
        Dispatch(3, "kvm"),
    ]


def test_plan_dispatch_honours_limit_and_full_venues() -> None:
    index = index_of(node(1), node(2), node(3))
    assert plan_dispatch(index, [venue("a", max_jobs=3)], limit=1) == [Dispatch(1, "a")]
    assert plan_dispatch(index, [venue("a", max_jobs=3, running=3)]) == []
    assert plan_dispatch(index, []) == []
    assert len(index) == 2


def test_plan_dispatch_spreads_by_free_capacity() -> None:
    index = index_of(*(node(i) for i in range(1, 5)))
    decisions = plan_dispatch(index, [venue("a", max_jobs=2), venue("b", max_jobs=2)])
    assert Counter(d.machine_id for d in decisions) == {"a": 2, "b": 2}
    # Equal capacity: machine id breaks the tie, then the other venue has more free slots.
    assert [d.machine_id for d in decisions] == ["a", "b", "a", "b"]


REQS = [PLAIN, KVM, ARM_PLAIN, Requirement(X86, frozenset({"benchmark"}))]

step_specs = st.lists(
    st.tuples(
        st.integers(0, len(REQS) - 1),
        st.integers(0, 2),
        st.integers(0, 3),
        st.integers(0, 3),
    ),
    max_size=25,
)
venue_specs = st.lists(
    st.builds(
        venue,
        machine_id=st.text("abcdef", min_size=1, max_size=2),
        systems=st.sampled_from([(X86,), (ARM,), (X86, ARM)]),
        supported=st.sampled_from([(), ("kvm",), ("kvm", "big-parallel")]),
        mandatory=st.sampled_from([(), (), ("benchmark",)]),
        max_jobs=st.integers(0, 3),
        running=st.integers(0, 3),
        speed=st.sampled_from([1.0, 2.0]),
    ),
    max_size=5,
    unique_by=lambda v: v.machine_id,
)


def _nodes(specs: list[tuple[int, int, int, int]]) -> list[StepNode]:
    return [
        node(i, REQS[r], priority=p, height=h, created_at=float(age))
        for i, (r, p, h, age) in enumerate(specs)
    ]


@given(specs=step_specs, venues=venue_specs, data=st.data())
def test_plan_dispatch_properties(
    specs: list[tuple[int, int, int, int]], venues: list[VenueView], data: st.DataObject
) -> None:
    nodes = _nodes(specs)
    by_id = {n.id: n for n in nodes}
    vs = {v.machine_id: v for v in venues}
    index = index_of(*nodes)
    decisions = plan_dispatch(index, venues)

    # Every decision is valid and no step is assigned twice.
    assigned = [d.step_id for d in decisions]
    assert len(assigned) == len(set(assigned))
    for d in decisions:
        assert can_run(vs[d.machine_id], by_id[d.step_id].req)
        assert d.step_id not in index
    # Never more than the free slots of any venue.
    used = Counter(d.machine_id for d in decisions)
    for mid, count in used.items():
        assert count <= vs[mid].free_slots
    # Best work first: keys only grow, and no better step left behind could have used a
    # venue that got a worse one.
    keys = [by_id[s].sort_key() for s in assigned]
    assert keys == sorted(keys)
    left = [n for n in nodes if n.id not in set(assigned)]
    for d in decisions:
        key = by_id[d.step_id].sort_key()
        for waiting in left:
            if waiting.sort_key() < key:
                assert not can_run(vs[d.machine_id], waiting.req)
    # Nothing that could still run is left waiting next to a free slot.
    for v in venues:
        if v.free_slots - used[v.machine_id] > 0:
            assert not any(can_run(v, n.req) for n in left)
    assert len(index) == len(left)
    # Deterministic whatever the order of venues and of pushes.
    again = plan_dispatch(
        index_of(*data.draw(st.permutations(_nodes(specs)))), data.draw(st.permutations(venues))
    )
    assert again == decisions


def reference_plan_dispatch(
    index: RunnableIndex, venues: Collection[VenueView], limit: int | None = None
) -> list[Dispatch]:
    """The plain algorithm ``plan_dispatch`` must agree with: for every decision, every
    bucket top against every free venue (``best_venue``)."""
    free = {v.machine_id: v for v in venues if v.free_slots > 0}
    decisions: list[Dispatch] = []
    while free and (limit is None or len(decisions) < limit):
        wanted = frozenset(f for req in index.requirements() for f in req.features)
        best: tuple[tuple[int, int, float, int], Requirement, VenueView] | None = None
        for req, (key, _sid) in index.tops():
            if best is not None and key >= best[0]:
                continue
            v = best_venue(free.values(), req, wanted)
            if v is not None:
                best = (key, req, v)
        if best is None:
            break
        _, req, v = best
        step_id = index.pop(req)
        assert step_id is not None
        decisions.append(Dispatch(step_id, v.machine_id))
        updated = replace(v, running=v.running + 1)
        if updated.free_slots > 0:
            free[v.machine_id] = updated
        else:
            del free[v.machine_id]
    return decisions


@given(specs=step_specs, venues=venue_specs, limit=st.none() | st.integers(0, 10))
def test_plan_dispatch_agrees_with_the_plain_algorithm(
    specs: list[tuple[int, int, int, int]], venues: list[VenueView], limit: int | None
) -> None:
    """Grouping venues by capabilities changes the cost of a decision, never the decision."""
    fast, plain = index_of(*_nodes(specs)), index_of(*_nodes(specs))
    assert plan_dispatch(fast, venues, limit) == reference_plan_dispatch(plain, venues, limit)
    assert len(fast) == len(plain)


# ---- raise_heights -----------------------------------------------------------------------
def _dag(edges: list[tuple[int, int]], n: int) -> dict[int, StepNode]:
    """``edges`` are (dependent, dependency) pairs."""
    nodes = {i: node(i, state=StepState.WAITING) for i in range(n)}
    for s, d in edges:
        nodes[s].deps.add(d)
        nodes[d].dependents.add(s)
    return nodes


def _longest(nodes: dict[int, StepNode]) -> dict[int, int]:
    memo: dict[int, int] = {}

    def height(sid: int) -> int:
        if sid not in memo:
            memo[sid] = 1 + max((height(d) for d in nodes[sid].dependents), default=0)
        return memo[sid]

    return {sid: height(sid) for sid in nodes}


@pytest.mark.parametrize(
    ("edges", "n", "expected"),
    [
        pytest.param([], 1, {0: 1}, id="single"),
        pytest.param([(0, 1), (1, 2)], 3, {0: 1, 1: 2, 2: 3}, id="chain"),
        pytest.param([(0, 1), (0, 2), (1, 3), (2, 3)], 4, {0: 1, 1: 2, 2: 2, 3: 3}, id="diamond"),
        pytest.param(
            # Two roots share the sub-DAG 2 -> 3; root 0 reaches it by a longer path.
            [(0, 4), (4, 2), (1, 2), (2, 3)],
            5,
            {0: 1, 1: 1, 4: 2, 2: 3, 3: 4},
            id="shared-sub-dag",
        ),
    ],
)
def test_raise_heights_critical_path(
    edges: list[tuple[int, int]], n: int, expected: dict[int, int]
) -> None:
    nodes = _dag(edges, n)
    changed = raise_heights(nodes, sorted(nodes))  # any order reaches the fixpoint
    assert {sid: nd.height for sid, nd in nodes.items()} == expected
    assert changed == set(nodes)
    assert raise_heights(nodes, sorted(nodes)) == set()  # nothing left to raise


def test_raise_heights_propagates_new_dependents_into_existing_steps() -> None:
    nodes = _dag([(0, 1), (1, 2)], 3)
    raise_heights(nodes, [0, 1, 2])
    # A new build puts step 3 on top of step 0: only the old steps below it grow.
    nodes[3] = node(3, state=StepState.WAITING)
    nodes[3].deps.add(0)
    nodes[0].dependents.add(3)
    changed = raise_heights(nodes, [3, 0])
    assert changed == {0, 1, 2, 3}
    assert [nodes[i].height for i in range(4)] == [2, 3, 4, 1]


@st.composite
def dags(draw: st.DrawFn) -> tuple[int, list[tuple[int, int]]]:
    n = draw(st.integers(1, 12))
    pairs = [(a, b) for a in range(n) for b in range(a + 1, n)]
    edges = draw(st.lists(st.sampled_from(pairs), unique=True)) if pairs else []
    return n, edges


@given(dag=dags(), data=st.data())
def test_raise_heights_reaches_the_longest_path_in_any_order(
    dag: tuple[int, list[tuple[int, int]]], data: st.DataObject
) -> None:
    n, edges = dag
    nodes = _dag(edges, n)
    order = data.draw(st.permutations(list(nodes)))
    raise_heights(nodes, order)
    assert {sid: nd.height for sid, nd in nodes.items()} == _longest(nodes)


@given(dag=dags())
def test_plan_heights_are_the_longest_chains_above(dag: tuple[int, list[tuple[int, int]]]) -> None:
    """``plan_heights`` on a plan (dependencies first) gives what ``raise_heights`` reaches."""
    n, edges = dag
    nodes = _dag(edges, n)
    # Edges go from a lower id to a higher one: higher ids are dependencies, so they come first.
    items = [(f"d{i}", [f"d{d}" for d in sorted(nodes[i].deps)]) for i in reversed(range(n))]
    assert plan_heights(items) == {f"d{sid}": h for sid, h in _longest(nodes).items()}


# ---- dependents_closure, build_outcome ----------------------------------------------------
def test_dependents_closure() -> None:
    nodes = _dag([(0, 2), (1, 2), (2, 3), (4, 3), (5, 6)], 7)
    assert sorted(dependents_closure(nodes, 3)) == [0, 1, 2, 4]
    assert sorted(dependents_closure(nodes, 2)) == [0, 1]
    assert dependents_closure(nodes, 0) == []
    assert dependents_closure(nodes, 6) == [5]
    del nodes[1]  # a forgotten step is skipped
    assert sorted(dependents_closure(nodes, 3)) == [0, 2, 4]


S = StepState


@pytest.mark.parametrize(
    ("states", "expected"),
    [
        pytest.param([], BuildState.SUCCEEDED, id="no-roots"),
        pytest.param([None], BuildState.SUCCEEDED, id="cached"),
        pytest.param([S.SUCCEEDED, None], BuildState.SUCCEEDED, id="built-and-cached"),
        pytest.param([S.SUCCEEDED, S.RUNNABLE], None, id="one-pending"),
        pytest.param([S.FAILED, S.BUILDING], None, id="failed-but-one-running"),
        pytest.param([S.WAITING], None, id="waiting"),
        pytest.param([S.ASSIGNED], None, id="assigned"),
        pytest.param([S.SUCCEEDED, S.FAILED], BuildState.FAILED, id="one-failed"),
        pytest.param([S.DEPENDENCY_FAILED], BuildState.FAILED, id="dependency-failed"),
        pytest.param([S.CANCELLED, None], BuildState.FAILED, id="cancelled-root"),
    ],
)
def test_build_outcome(states: list[StepState | None], expected: BuildState | None) -> None:
    assert build_outcome(states) is expected


@pytest.mark.parametrize("state", list(StepState))
def test_step_state_flags(state: StepState) -> None:
    assert state.is_leased == (state in (S.ASSIGNED, S.BUILDING))
    assert state.is_final == (state in (S.SUCCEEDED, S.FAILED, S.DEPENDENCY_FAILED, S.CANCELLED))


# ---- restart_selection -------------------------------------------------------------------------
OK, FL, DF, CA, BU = (
    StepState.SUCCEEDED,
    StepState.FAILED,
    StepState.DEPENDENCY_FAILED,
    StepState.CANCELLED,
    StepState.BUILDING,
)
# Two jobs: root 1 (dependency-failed) needs 3 (failed) and 4 (succeeded); root 2 (failed)
# needs 5 (cancelled); root 6 succeeded; 3 needs 7 (failed).
MEMBERS = {1: DF, 2: FL, 3: FL, 4: OK, 5: CA, 6: OK, 7: FL}
DEPS = [(1, 3), (1, 4), (2, 5), (3, 7)]


def test_restart_selection_without_roots_is_every_step_not_succeeded() -> None:
    assert restart_selection(MEMBERS, DEPS, None) == {1, 2, 3, 5, 7}


def test_restart_selection_of_one_root_is_what_it_needs() -> None:
    assert restart_selection(MEMBERS, DEPS, {1}) == {1, 3, 7}
    assert restart_selection(MEMBERS, DEPS, {2}) == {2, 5}
    assert restart_selection(MEMBERS, DEPS, {1, 2}) == {1, 2, 3, 5, 7}


def test_restart_selection_skips_succeeded_and_unknown_roots() -> None:
    assert restart_selection(MEMBERS, DEPS, {6}) == set()
    assert restart_selection(MEMBERS, DEPS, {99}) == set()
    assert restart_selection(MEMBERS, DEPS, set()) == set()


def test_restart_selection_keeps_active_steps_a_root_needs() -> None:
    # A step still running below the root is joined again, not skipped.
    assert restart_selection({1: FL, 2: BU}, [(1, 2)], {1}) == {1, 2}


@given(
    st.dictionaries(st.integers(0, 12), st.sampled_from([OK, FL, DF, CA, BU]), min_size=1),
    st.lists(st.tuples(st.integers(0, 12), st.integers(0, 12)), max_size=30),
    st.sets(st.integers(0, 12)),
)
def test_restart_selection_properties(
    members: dict[int, StepState], deps: list[tuple[int, int]], roots: set[int]
) -> None:
    everything = restart_selection(members, deps, None)
    chosen = restart_selection(members, deps, roots)
    assert chosen <= everything
    assert all(members[s] is not OK for s in chosen)
    assert {r for r in roots if r in everything} <= chosen
    # Closed under dependencies that are not succeeded.
    assert all(d in chosen for s, d in deps if s in chosen and d in everything)
