"""The autoscaler's arithmetic (``plan``), trust filter, lifecycle rules and workflow inputs,
as pure functions: tables for the worked examples, hypothesis for the invariants."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bigtent.runner.autoscale.plan import (
    MAX_RETRY_AFTER_SECS,
    BuildScope,
    ConnectedSlots,
    LaunchView,
    PendingLaunch,
    PoolPlan,
    PoolSpec,
    Work,
    claim_refusal,
    cooldown_end,
    dispatch_inputs,
    expired,
    may_take,
    new_launch_id,
    next_expiry,
    plan,
)
from bigtent.runner.scheduler.matching import Requirement, VenueView, can_run
from bigtent.states import LaunchState

X86 = "x86_64-linux"
ARM = "aarch64-linux"
REPO = "acme/widgets"
OTHER = "acme/other"
T0 = 1_700_000_000.0
TRUSTED = frozenset({BuildScope(REPO, True)})


def pool(
    name: str = "gha",
    *,
    systems: Sequence[str] = (X86,),
    supported: Sequence[str] = (),
    mandatory: Sequence[str] = (),
    max_jobs: int = 1,
    repos: Sequence[str] = (REPO,),
    max_inflight: int = 10,
) -> PoolSpec:
    return PoolSpec(
        name,
        frozenset(systems),
        frozenset(supported),
        frozenset(mandatory),
        max_jobs,
        frozenset(repos),
        max_inflight,
    )


def work(
    count: int = 1,
    *,
    system: str = X86,
    features: Sequence[str] = (),
    scopes: frozenset[BuildScope] = TRUSTED,
) -> Work:
    return Work(Requirement(system, frozenset(features)), scopes, count)


def agent(
    machine_id: str,
    free: int,
    *,
    systems: Sequence[str] = (X86,),
    supported: Sequence[str] = (),
    mandatory: Sequence[str] = (),
    scope: Sequence[str] | None = None,
    launch_id: str | None = None,
) -> ConnectedSlots:
    view = VenueView(
        machine_id,
        frozenset(systems),
        frozenset(supported),
        frozenset(mandatory),
        max_jobs=free,
        running=0,
    )
    return ConnectedSlots(view, frozenset(scope) if scope is not None else None, launch_id)


def one(plans: tuple[PoolPlan, ...], name: str = "gha") -> PoolPlan:
    (found,) = [p for p in plans if p.pool == name]
    return found


# ---- trust ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("scopes", "allowed", "allow_untrusted", "expected"),
    [
        ({BuildScope(REPO, True)}, None, False, True),  # unscoped venue: anything
        ({BuildScope(None, False)}, None, False, True),
        ({BuildScope(REPO, True)}, {REPO}, False, True),
        ({BuildScope(REPO, False)}, {REPO}, False, False),  # untrusted build
        ({BuildScope(REPO, False)}, {REPO}, True, True),  # ... unless allowed
        ({BuildScope(OTHER, True)}, {REPO}, False, False),  # repository not allowed
        ({BuildScope(None, True)}, {REPO}, False, False),  # a build naming no repository
        ({BuildScope(OTHER, True), BuildScope(REPO, True)}, {REPO}, False, True),  # shared step
        # The allowed build of a shared step must itself be trusted.
        ({BuildScope(OTHER, True), BuildScope(REPO, False)}, {REPO}, False, False),
        (set(), {REPO}, False, False),
    ],
)
def test_may_take(
    scopes: set[BuildScope], allowed: set[str] | None, allow_untrusted: bool, expected: bool
) -> None:
    assert may_take(scopes, allowed, allow_untrusted=allow_untrusted) is expected


# ---- worked examples (docs/autoscaling.md) ----------------------------------------------------
def test_worked_example_from_the_docs() -> None:
    """Pool max_jobs 2, max_inflight 4: 9 steps wait; a connected pool agent has 1 free slot;
    1 launch is pending (2 slots). 9 - 1 - 2 = 6 steps left -> deficit 3 -> launch
    min(3, 4 - 1) = 3."""
    plans = plan(
        [work(9)],
        [agent("m1", 1, scope=[REPO], launch_id="L0")],
        [pool(max_jobs=2, max_inflight=4)],
        [PendingLaunch("L1", "gha")],
        T0,
        {},
    )
    assert one(plans) == PoolPlan("gha", demand=8, pending=1, covered=2, deficit=3, launch=3)


def test_max_inflight_caps_the_launches() -> None:
    plans = plan([work(9)], [], [pool(max_jobs=2, max_inflight=4)], [], T0, {})
    assert (one(plans).deficit, one(plans).launch) == (5, 4)
    pending = [PendingLaunch(f"L{i}", "gha") for i in range(4)]
    assert one(plan([work(20)], [], [pool(max_inflight=4)], pending, T0, {})).launch == 0


def test_steps_a_connected_agent_can_take_are_no_demand() -> None:
    persistent = agent("build-01", 2)
    plans = plan([work(3)], [persistent], [pool()], [], T0, {})
    assert one(plans) == PoolPlan("gha", demand=1, pending=0, covered=0, deficit=1, launch=1)


def test_no_launch_for_work_the_pool_cannot_take() -> None:
    unfit = [
        work(system=ARM),  # system
        work(features=["kvm"]),  # a feature the pool lacks
        work(scopes=frozenset({BuildScope(OTHER, True)})),  # repository not allowed
        work(scopes=frozenset({BuildScope(REPO, False)})),  # untrusted
        work(scopes=frozenset({BuildScope(None, True)})),  # no repository
    ]
    assert one(plan(unfit, [], [pool()], [], T0, {})).launch == 0
    # A pool with a mandatory feature only takes steps that require it.
    big = pool(supported=["kvm"], mandatory=["big"])
    assert one(plan([work(features=["kvm"])], [], [big], [], T0, {})).launch == 0
    assert one(plan([work(features=["kvm", "big"])], [], [big], [], T0, {})).launch == 1


def test_cooldown_stops_launches_but_pending_ones_still_count() -> None:
    plans = plan([work(5)], [], [pool()], [PendingLaunch("L1", "gha")], T0, {"gha": T0 + 1})
    assert one(plans) == PoolPlan(
        "gha", demand=5, pending=1, covered=1, deficit=4, launch=0, cooling_down=True
    )
    # Once the cooldown has passed, it launches.
    assert one(plan([work(5)], [], [pool()], [], T0 + 1, {"gha": T0 + 1})).launch == 5


def test_a_pending_launch_whose_agent_is_connected_counts_once() -> None:
    """The agent registered (it is connected with its launch id), but the launch is still
    listed as pending: its slots are the agent's, not twice."""
    here = agent("m1", 1, scope=[REPO], launch_id="L1")
    plans = plan([work(3)], [here], [pool()], [PendingLaunch("L1", "gha")], T0, {})
    assert one(plans) == PoolPlan("gha", demand=2, pending=0, covered=0, deficit=2, launch=2)


def test_the_least_capable_slot_takes_the_common_work() -> None:
    """The kvm agent's slot is kept for the kvm step: a plain agent takes the plain step, so
    nothing needs launching (the other order would leave the kvm step without a slot)."""
    kvm_pool = pool("gha-kvm", supported=["kvm"])
    slots = [agent("a-kvm", 1, supported=["kvm"]), agent("b-plain", 1)]
    plans = plan([work(1), work(1, features=["kvm"])], slots, [kvm_pool], [], T0, {})
    assert one(plans, "gha-kvm").launch == 0


def test_the_most_constrained_step_is_matched_first() -> None:
    """One kvm slot, a kvm step and a plain step: the kvm step gets it, the plain one needs
    the plain pool."""
    pools = [pool("plain"), pool("kvm", supported=["kvm"])]
    plans = plan(
        [work(1), work(1, features=["kvm"])], [agent("k", 1, supported=["kvm"])], pools, [], T0, {}
    )
    assert (one(plans, "plain").launch, one(plans, "kvm").launch) == (1, 0)


def test_two_pools_do_not_launch_for_the_same_steps() -> None:
    """Both pools could take the 3 steps: the narrower pool launches, the other none."""
    pools = [pool("wide", systems=[X86, ARM]), pool("narrow")]
    plans = plan([work(3)], [], pools, [], T0, {})
    assert (one(plans, "narrow").launch, one(plans, "wide").launch) == (3, 0)
    # When the narrower pool cools down, the other one takes over.
    plans = plan([work(3)], [], pools, [], T0, {"narrow": T0 + 60})
    assert (one(plans, "narrow").launch, one(plans, "wide").launch) == (0, 3)


def test_a_scoped_agent_only_covers_its_repositories() -> None:
    """A pool agent scoped to another repository does not stand in for this pool's demand."""
    pools = [pool(), pool("other", repos=[OTHER])]
    other_agent = agent("o1", 4, scope=[OTHER], launch_id="LO")
    assert one(plan([work(2)], [other_agent], pools, [], T0, {})).launch == 2


def test_pending_launches_of_unknown_pools_count_for_nothing() -> None:
    plans = plan([work(2)], [], [pool()], [PendingLaunch("L1", "gone")], T0, {})
    assert one(plans).launch == 2


# ---- invariants (hypothesis) ------------------------------------------------------------------
SYSTEMS = [X86, ARM]
FEATURES = ["kvm", "big", "nixos-test"]
REPOS = [REPO, OTHER, "acme/third"]

scopes_st = st.frozensets(
    st.builds(BuildScope, st.sampled_from([*REPOS, None]), st.booleans()), max_size=3
)
work_st = st.builds(
    Work,
    st.builds(
        Requirement,
        st.sampled_from(SYSTEMS),
        st.frozensets(st.sampled_from(FEATURES), max_size=2),
    ),
    scopes_st,
    st.integers(0, 6),
)


@st.composite
def pools_st(draw: st.DrawFn) -> list[PoolSpec]:
    names = draw(st.lists(st.sampled_from(["p1", "p2", "p3"]), unique=True, max_size=3))
    return [
        PoolSpec(
            name,
            draw(st.frozensets(st.sampled_from(SYSTEMS), min_size=1)),
            draw(st.frozensets(st.sampled_from(FEATURES), max_size=2)),
            draw(st.frozensets(st.sampled_from(FEATURES), max_size=1)),
            draw(st.integers(1, 3)),
            draw(st.frozensets(st.sampled_from(REPOS), min_size=1)),
            draw(st.integers(1, 6)),
        )
        for name in names
    ]


@st.composite
def slots_st(draw: st.DrawFn) -> list[ConnectedSlots]:
    n = draw(st.integers(0, 4))
    out = []
    for i in range(n):
        view = VenueView(
            f"m{i}",
            draw(st.frozensets(st.sampled_from(SYSTEMS), min_size=1)),
            draw(st.frozensets(st.sampled_from(FEATURES), max_size=2)),
            draw(st.frozensets(st.sampled_from(FEATURES), max_size=1)),
            max_jobs=draw(st.integers(0, 3)),
            running=0,
        )
        scope = draw(st.one_of(st.none(), st.frozensets(st.sampled_from(REPOS), min_size=1)))
        launch_id = draw(st.one_of(st.none(), st.sampled_from(["L0", "L1", "L2"])))
        out.append(ConnectedSlots(view, scope, launch_id))
    return out


pending_st = st.lists(
    st.builds(
        PendingLaunch,
        st.sampled_from(["L0", "L1", "L2", "L3", "L4"]),
        st.sampled_from(["p1", "p2", "p3", "gone"]),
    ),
    max_size=5,
    unique_by=lambda p: p.launch_id,
)
cooldown_st = st.dictionaries(
    st.sampled_from(["p1", "p2", "p3"]), st.floats(T0 - 10, T0 + 10), max_size=3
)

Snapshot = tuple[
    list[Work], list[ConnectedSlots], list[PoolSpec], list[PendingLaunch], dict[str, float]
]
snapshot_st = st.tuples(
    st.lists(work_st, max_size=8), slots_st(), pools_st(), pending_st, cooldown_st
)


def _run(s: Snapshot) -> dict[str, PoolPlan]:
    return {p.pool: p for p in plan(s[0], s[1], s[2], s[3], T0, s[4])}


def _pending_per_pool(s: Snapshot) -> dict[str, int]:
    here = {c.launch_id for c in s[1] if c.launch_id is not None}
    out = {p.name: 0 for p in s[2]}
    for item in s[3]:
        if item.pool in out and item.launch_id not in here:
            out[item.pool] += 1
    return out


@settings(max_examples=100, deadline=None)
@given(snapshot_st)
def test_never_more_than_the_deficit_nor_past_max_inflight(s: Snapshot) -> None:
    plans = _run(s)
    pending = _pending_per_pool(s)
    specs = {p.name: p for p in s[2]}
    assert set(plans) == set(specs)
    for name, p in plans.items():
        assert 0 <= p.launch <= p.deficit
        assert p.pending == pending[name]
        assert p.launch == 0 or p.pending + p.launch <= specs[name].max_inflight
        if s[4].get(name, 0.0) > T0:
            assert p.launch == 0


@settings(max_examples=100, deadline=None)
@given(snapshot_st)
def test_every_launched_agent_has_work_that_nothing_else_takes(s: Snapshot) -> None:
    """Launched slots never exceed the steps left for them: the steps the pools could take,
    minus every free connected slot and every pending launch's slots."""
    plans = _run(s)
    specs = {p.name: p for p in s[2]}
    takeable = sum(
        w.count
        for w in s[0]
        if any(
            can_run(p.venue(p.name, 1), w.req) and may_take(w.scopes, p.allowed_repositories)
            for p in s[2]
        )
    )
    for name, p in plans.items():
        # The last launched agent of a pool has at least one step of its own.
        assert p.launch == 0 or (p.launch - 1) * specs[name].max_jobs < takeable
    launched = sum(p.launch for p in plans.values())
    assert launched <= takeable


@settings(max_examples=100, deadline=None)
@given(snapshot_st, st.randoms(use_true_random=False))
def test_the_same_answer_for_any_input_order(s: Snapshot, rand: random.Random) -> None:
    expected = _run(s)
    slots, pools, pending = list(s[1]), list(s[2]), list(s[3])
    rand.shuffle(slots)
    rand.shuffle(pools)
    rand.shuffle(pending)
    # Splitting a class into several items (or merging them) changes nothing either.
    split: list[Work] = []
    for w in s[0]:
        if w.count > 1:
            split.extend([Work(w.req, w.scopes, 1), Work(w.req, w.scopes, w.count - 1)])
        else:
            split.append(w)
    rand.shuffle(split)
    again = _run((split, slots, pools, pending, s[4]))
    assert again == expected


@settings(max_examples=100, deadline=None)
@given(snapshot_st)
def test_registered_launches_are_not_counted_twice(s: Snapshot) -> None:
    """A launch whose agent is connected (same launch id) is the agent: listing it as pending
    too changes nothing."""
    work_items, slots, pools, pending, cooldown = s
    here = [c for c in slots if c.launch_id is not None]
    known = {p.name for p in pools}
    if not here or not known:
        return
    extra = [PendingLaunch(c.launch_id, sorted(known)[0]) for c in here if c.launch_id]
    without = [item for item in pending if item.launch_id not in {e.launch_id for e in extra}]
    a = _run((work_items, slots, pools, without, cooldown))
    b = _run((work_items, slots, pools, without + extra, cooldown))
    assert a == b


@settings(max_examples=100, deadline=None)
@given(st.lists(work_st, max_size=8), pools_st())
def test_without_limits_every_takeable_step_gets_a_slot(
    work_items: list[Work], pools: list[PoolSpec]
) -> None:
    """No agents, nothing pending, no cooldown, max_inflight out of reach: the launches cover
    every step some pool can take, and no pool launches an agent more than it needs."""
    roomy = [
        PoolSpec(
            p.name,
            p.systems,
            p.supported_features,
            p.mandatory_features,
            p.max_jobs,
            p.allowed_repositories,
            10_000,
        )
        for p in pools
    ]
    plans = {p.pool: p for p in plan(work_items, [], roomy, [], T0, {})}
    takeable = sum(
        w.count
        for w in work_items
        if any(
            can_run(p.venue(p.name, 1), w.req) and may_take(w.scopes, p.allowed_repositories)
            for p in roomy
        )
    )
    slots = sum(plans[p.name].launch * p.max_jobs for p in roomy)
    assert slots >= takeable
    for p in roomy:
        assert plans[p.name].launch == plans[p.name].deficit
    if len(roomy) == 1 and takeable:
        assert plans[roomy[0].name].launch == math.ceil(takeable / roomy[0].max_jobs)


# ---- lifecycle --------------------------------------------------------------------------------
def _launch(launch_id: str, pool_name: str, created: float, state: LaunchState) -> LaunchView:
    return LaunchView(launch_id, pool_name, created, state)


def test_expiry_after_the_pools_ttl() -> None:
    launches = [
        _launch("a", "gha", T0, LaunchState.PENDING),
        _launch("b", "gha", T0 + 5, LaunchState.PENDING),
        _launch("c", "gha", T0 - 100, LaunchState.REGISTERED),  # not pending: never expires
        _launch("d", "gone", T0 + 5, LaunchState.PENDING),  # pool no longer configured
    ]
    ttl = {"gha": 10.0}
    assert expired(launches, ttl, T0 + 9.9) == ["d"]
    assert expired(launches, ttl, T0 + 10) == ["a", "d"]
    assert expired(launches, ttl, T0 + 15) == ["a", "b", "d"]
    assert next_expiry(launches, ttl) == T0 + 10
    assert next_expiry([], ttl) is None


@pytest.mark.parametrize(
    ("cooldown", "retry_after", "expected"),
    [
        (30.0, None, 30.0),
        (30.0, 10.0, 30.0),  # at least the configured cooldown
        (30.0, 120.0, 120.0),  # Retry-After asks for longer
        (0.0, 5.0, 5.0),
        (30.0, 10 * MAX_RETRY_AFTER_SECS, MAX_RETRY_AFTER_SECS),  # bounded
        (30.0, -5.0, 30.0),
    ],
)
def test_cooldown_end(cooldown: float, retry_after: float | None, expected: float) -> None:
    assert cooldown_end(T0, cooldown, retry_after) == T0 + expected


W = "acme/bigtent-agents"


@pytest.mark.parametrize(
    ("state", "holder", "workflow_repo", "identity_repo", "refused"),
    [
        (LaunchState.PENDING, None, W, W, None),
        (LaunchState.EXPIRED, None, W, W, None),  # late registration
        (LaunchState.FAILED, None, W, W, None),  # the dispatch reached GitHub after all
        (LaunchState.REGISTERED, "m1", W, W, None),  # the same machine again
        (LaunchState.REGISTERED, "m2", W, W, "another agent"),
        (LaunchState.PENDING, None, W, None, "OIDC"),  # a token agent
        (LaunchState.PENDING, None, W, "acme/widgets", "not the pool's workflow repository"),
        (LaunchState.PENDING, None, None, W, "no longer configured"),
    ],
)
def test_who_may_claim_a_launch(
    state: LaunchState,
    holder: str | None,
    workflow_repo: str | None,
    identity_repo: str | None,
    refused: str | None,
) -> None:
    reason = claim_refusal(state, holder, "m1", workflow_repo, identity_repo)
    if refused is None:
        assert reason is None
    else:
        assert reason is not None and refused in reason


def test_launch_ids_are_long_random_hex() -> None:
    ids = {new_launch_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_dispatch_inputs_are_strings_with_comma_joined_lists() -> None:
    inputs = dispatch_inputs(
        name="gha-x86",
        runner_url="https://ci.example.org:8443",
        audience="bigtent",
        systems=[X86, "i686-linux"],
        supported_features=["kvm", "big-parallel"],
        mandatory_features=[],
        max_jobs=2,
        launch_id="f" * 32,
        bigtent_version="0.1.0",
    )
    assert inputs == {
        "name": "gha-x86",
        "runner_url": "https://ci.example.org:8443",
        "audience": "bigtent",
        "systems": "x86_64-linux,i686-linux",
        "supported_features": "kvm,big-parallel",
        "mandatory_features": "",
        "max_jobs": "2",
        "launch_id": "f" * 32,
        "bigtent_version": "0.1.0",
    }
    assert all(isinstance(v, str) for v in inputs.values())
