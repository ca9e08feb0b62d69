"""Trust in matching and dispatch (architecture §6): trusted steps only on trusted venues, untrusted
steps only on untrusted venues, and repository-scoped venues (OIDC agents) only on steps with
a live build of one of their repositories."""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bigtent.runner.scheduler.matching import (
    Requirement,
    VenueView,
    can_run,
    eligible,
    may_take,
)
from bigtent.runner.scheduler.steps import RunnableIndex, StepNode, plan_dispatch
from bigtent.states import StepState

X86 = "x86_64-linux"
TRUSTED = Requirement(X86, frozenset(), True)
UNTRUSTED = Requirement(X86, frozenset(), False)


def venue(
    machine_id: str,
    *,
    trusted: bool = True,
    repositories: Collection[str] | None = None,
    max_jobs: int = 1,
    running: int = 0,
    supported: Collection[str] = (),
) -> VenueView:
    return VenueView(
        machine_id,
        frozenset({X86}),
        frozenset(supported),
        frozenset(),
        max_jobs,
        running,
        1.0,
        trusted,
        None if repositories is None else frozenset(repositories),
    )


def node(sid: int, req: Requirement = TRUSTED, *, priority: int = 0) -> StepNode:
    return StepNode(
        id=sid,
        drv_path=f"/nix/store/{sid:032d}-s{sid}.drv",
        req=req,
        state=StepState.RUNNABLE,
        created_at=float(sid),
        priority=priority,
    )


def index_of(*nodes: StepNode) -> RunnableIndex:
    index = RunnableIndex()
    for n in nodes:
        index.push(n)
    return index


# ---- the predicates ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("venue_trusted", "step_trusted", "expected"),
    [(True, True, True), (True, False, False), (False, True, False), (False, False, True)],
)
def test_trust_must_match(venue_trusted: bool, step_trusted: bool, expected: bool) -> None:
    v = venue("m", trusted=venue_trusted)
    assert can_run(v, Requirement(X86, frozenset(), step_trusted)) is expected


@pytest.mark.parametrize(
    ("scope", "repos", "expected"),
    [
        pytest.param(None, [], True, id="unscoped-takes-a-build-without-repository"),
        pytest.param(None, ["x/y"], True, id="unscoped-takes-any"),
        pytest.param({"acme/w"}, ["acme/w"], True, id="allowed"),
        pytest.param({"acme/w"}, ["evil/w"], False, id="other-repository"),
        pytest.param({"acme/w"}, [None], False, id="no-repository"),
        pytest.param({"acme/w"}, [], False, id="no-live-build"),
        pytest.param({"acme/w"}, ["evil/w", "acme/w"], True, id="one-build-allowed"),
        pytest.param({"acme/w"}, ["ACME/w"], False, id="case-sensitive"),
        pytest.param(set(), ["acme/w"], False, id="empty-scope"),
    ],
)
def test_may_take(scope: set[str] | None, repos: list[str | None], expected: bool) -> None:
    assert may_take(venue("m", repositories=scope), repos) is expected


@given(
    venue_trusted=st.booleans(),
    step_trusted=st.booleans(),
    scope=st.none() | st.sets(st.sampled_from(["a/1", "a/2", "b/1"])),
    repos=st.lists(st.none() | st.sampled_from(["a/1", "a/2", "b/1", "c/9"]), max_size=4),
)
def test_eligible_is_trust_and_scope(
    venue_trusted: bool,
    step_trusted: bool,
    scope: set[str] | None,
    repos: list[str | None],
) -> None:
    v = venue("m", trusted=venue_trusted, repositories=scope)
    ok = eligible(v, Requirement(X86, frozenset(), step_trusted), repos)
    if ok:
        assert venue_trusted == step_trusted
        assert scope is None or any(r in scope for r in repos if r is not None)
    else:
        assert venue_trusted != step_trusted or (
            scope is not None and not any(r in scope for r in repos if r is not None)
        )


# ---- dispatch ----------------------------------------------------------------------------------
def test_an_untrusted_step_waits_while_only_a_trusted_venue_is_free() -> None:
    index = index_of(node(1, UNTRUSTED, priority=5), node(2, TRUSTED))
    decisions = plan_dispatch(index, [venue("t", max_jobs=2)])
    assert [(d.step_id, d.machine_id) for d in decisions] == [(2, "t")]
    assert 1 in index


def test_each_trust_goes_to_its_own_venues() -> None:
    index = index_of(node(1, UNTRUSTED), node(2, TRUSTED), node(3, UNTRUSTED))
    decisions = plan_dispatch(
        index, [venue("t", max_jobs=3), venue("u", trusted=False, max_jobs=3)]
    )
    assert {(d.step_id, d.machine_id) for d in decisions} == {(1, "u"), (2, "t"), (3, "u")}


def test_a_scoped_venue_takes_a_step_below_the_top_of_its_bucket() -> None:
    # Step 1 (best) is for a repository the OIDC venue does not serve; step 2 is for its own.
    repos = {1: {"evil/x"}, 2: {"acme/w"}, 3: {"acme/w"}}
    index = index_of(node(1, priority=9), node(2, priority=5), node(3))
    decisions = plan_dispatch(
        index, [venue("oidc", repositories={"acme/w"})], repositories_of=lambda s: repos[s]
    )
    assert [(d.step_id, d.machine_id) for d in decisions] == [(2, "oidc")]
    assert 1 in index and 3 in index


def test_a_scoped_venue_never_takes_another_repositorys_step() -> None:
    repos: dict[int, set[str | None]] = {1: {"evil/x"}, 2: {None}}
    index = index_of(node(1), node(2))
    decisions = plan_dispatch(
        index,
        [venue("oidc", repositories={"acme/w"}, max_jobs=2)],
        repositories_of=lambda s: repos[s],
    )
    assert decisions == []
    assert len(index) == 2


def test_scoped_and_unscoped_venues_share_the_work() -> None:
    repos = {1: {"evil/x"}, 2: {"acme/w"}}
    index = index_of(node(1, priority=9), node(2))
    decisions = plan_dispatch(
        index,
        [venue("oidc", repositories={"acme/w"}), venue("token")],
        repositories_of=lambda s: repos[s],
    )
    assert {(d.step_id, d.machine_id) for d in decisions} == {(1, "token"), (2, "oidc")}


def test_an_idle_scope_is_not_scanned_again_until_a_step_is_pushed() -> None:
    repos: dict[int, set[str | None]] = {1: {"evil/x"}, 2: {"evil/x"}}
    asked: list[int] = []

    def repositories_of(sid: int) -> set[str | None]:
        asked.append(sid)
        return repos[sid]

    index = index_of(node(1), node(2))
    oidc = [venue("o1", repositories={"acme/w"}), venue("o2", repositories={"acme/w"})]
    memo: dict[Any, int] = {}
    assert plan_dispatch(index, oidc, repositories_of=repositories_of, nothing_for=memo) == []
    # Both venues share one scope: one scan of the two steps (and the tops' checks).
    scanned = len(asked)
    assert 2 <= scanned <= 4
    assert plan_dispatch(index, oidc, repositories_of=repositories_of, nothing_for=memo) == []
    assert len(asked) - scanned <= 1  # only the top's check; no scan
    # A new build of its repository joins step 2: re-pushed, scanned, taken.
    repos[2] = {"evil/x", "acme/w"}
    index.push(node(2))
    decisions = plan_dispatch(index, oidc, repositories_of=repositories_of, nothing_for=memo)
    assert [(d.step_id, d.machine_id) for d in decisions] == [(2, "o1")]


REPOS = ["a/1", "a/2", "b/1"]
step_specs = st.lists(
    st.tuples(
        st.booleans(),  # trusted
        st.integers(0, 3),  # priority
        st.sets(st.none() | st.sampled_from(REPOS), max_size=2),  # repositories of its builds
        st.booleans(),  # needs kvm
    ),
    max_size=20,
)
venue_specs = st.lists(
    st.tuples(
        st.booleans(),  # trusted
        st.none() | st.sets(st.sampled_from(REPOS), max_size=2),  # scope
        st.integers(0, 3),  # max_jobs
        st.booleans(),  # supports kvm
    ),
    max_size=5,
)


@given(specs=step_specs, vspecs=venue_specs)
def test_dispatch_respects_trust_and_scope_and_leaves_nothing_takeable(
    specs: list[tuple[bool, int, set[str | None], bool]],
    vspecs: list[tuple[bool, set[str] | None, int, bool]],
) -> None:
    nodes = [
        node(i, Requirement(X86, frozenset({"kvm"} if kvm else ()), tr), priority=p)
        for i, (tr, p, _, kvm) in enumerate(specs)
    ]
    repos = {i: r for i, (_, _, r, _) in enumerate(specs)}
    venues = [
        venue(f"v{i}", trusted=tr, repositories=scope, max_jobs=jobs, supported=["kvm"] * kvm)
        for i, (tr, scope, jobs, kvm) in enumerate(vspecs)
    ]
    by_id = {n.id: n for n in nodes}
    vs = {v.machine_id: v for v in venues}
    index = index_of(*nodes)
    decisions = plan_dispatch(index, venues, repositories_of=lambda s: repos[s])

    assigned = [d.step_id for d in decisions]
    assert len(assigned) == len(set(assigned))
    for d in decisions:
        # Never a trusted step on an untrusted venue or the other way round, never a step of
        # a repository the venue does not serve.
        assert eligible(vs[d.machine_id], by_id[d.step_id].req, repos[d.step_id])
    used = Counter(d.machine_id for d in decisions)
    for mid, count in used.items():
        assert count <= vs[mid].free_slots
    # Best first, and no better step left behind was takeable by a venue given a worse one.
    keys = [by_id[s].sort_key() for s in assigned]
    assert keys == sorted(keys)
    left = [n for n in nodes if n.id not in set(assigned)]
    for d in decisions:
        for waiting in left:
            if waiting.sort_key() < by_id[d.step_id].sort_key():
                assert not eligible(vs[d.machine_id], waiting.req, repos[waiting.id])
    # Nothing left that a venue with a free slot could take.
    for v in venues:
        if used[v.machine_id] < v.free_slots:
            assert not any(eligible(v, n.req, repos[n.id]) for n in left)
