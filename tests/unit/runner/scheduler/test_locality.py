"""Locality in dispatch (architecture §5): a step goes to a free venue that built its inputs
when that venue ranks as well as today's choice on everything but load; never at the price of
waiting, of the step order, of trust, scope, features or speed."""

from __future__ import annotations

from collections.abc import Collection, Mapping

from hypothesis import given
from hypothesis import strategies as st

from bigtent.runner.scheduler.matching import Requirement, VenueView
from bigtent.runner.scheduler.steps import (
    MAX_HOLDERS,
    MAX_PEERS,
    Dispatch,
    RunnableIndex,
    StepNode,
    note_built,
    plan_dispatch,
    tally_built_inputs,
)
from bigtent.states import StepState

X86 = "x86_64-linux"
PLAIN = Requirement(X86, frozenset())
KVM = Requirement(X86, frozenset({"kvm"}))
UNTRUSTED = Requirement(X86, frozenset(), trusted=False)


def node(
    sid: int,
    req: Requirement = PLAIN,
    *,
    priority: int = 0,
    state: StepState = StepState.RUNNABLE,
    venue: str | None = None,
) -> StepNode:
    return StepNode(
        id=sid,
        drv_path=f"/nix/store/{sid:032d}-s{sid}.drv",
        req=req,
        state=state,
        created_at=0.0,
        priority=priority,
        venue=venue,
    )


def venue(
    machine_id: str,
    *,
    max_jobs: int = 1,
    running: int = 0,
    supported: Collection[str] = (),
    speed: float = 1.0,
    trusted: bool = True,
    repositories: Collection[str] | None = None,
) -> VenueView:
    return VenueView(
        machine_id,
        frozenset({X86}),
        frozenset(supported),
        frozenset(),
        max_jobs,
        running,
        speed,
        trusted,
        None if repositories is None else frozenset(repositories),
    )


def plan(
    nodes: Collection[StepNode],
    venues: Collection[VenueView],
    held: Mapping[int, Mapping[str, int]],
    repositories: Mapping[int, Collection[str | None]] | None = None,
) -> list[Dispatch]:
    index = RunnableIndex()
    for n in nodes:
        index.push(n)
    repos = repositories or {}
    return plan_dispatch(
        index,
        venues,
        repositories_of=lambda sid: repos.get(sid, ()),
        holders_of=held.get,
    )


def test_a_step_goes_to_the_venue_that_built_its_inputs() -> None:
    venues = [venue("a"), venue("b")]
    assert plan([node(1)], venues, {}) == [Dispatch(1, "a")]  # today's order: machine id
    assert plan([node(1)], venues, {1: {"b": 2}}) == [Dispatch(1, "b")]


def test_locality_beats_free_capacity() -> None:
    # "a" has more free slots (today's choice); "b" holds the inputs and has one free slot.
    venues = [venue("a", max_jobs=2), venue("b", max_jobs=2, running=1)]
    assert plan([node(1)], venues, {}) == [Dispatch(1, "a")]
    assert plan([node(1)], venues, {1: {"b": 1}}) == [Dispatch(1, "b")]


def test_the_most_inputs_win() -> None:
    venues = [venue("a"), venue("b"), venue("c")]
    assert plan([node(1)], venues, {1: {"b": 1, "c": 3}}) == [Dispatch(1, "c")]


def test_a_busy_holder_does_not_delay_the_step() -> None:
    venues = [venue("a"), venue("b", running=1)]
    assert plan([node(1)], venues, {1: {"b": 5}}) == [Dispatch(1, "a")]


def test_a_holder_filled_earlier_in_the_pass_is_not_waited_for() -> None:
    # Both steps' inputs are on "b", which has one slot: the first step (priority) takes it,
    # the second goes to "a" at once.
    venues = [venue("a"), venue("b")]
    decisions = plan([node(1, priority=2), node(2, priority=1)], venues, {1: {"b": 1}, 2: {"b": 1}})
    assert decisions == [Dispatch(1, "b"), Dispatch(2, "a")]


def test_the_step_order_does_not_change() -> None:
    # Step 2's inputs are on "a", but step 1 comes first and takes "a" (today's choice, no
    # inputs anywhere): step 2 goes to "b", not ahead of step 1.
    venues = [venue("a"), venue("b")]
    decisions = plan([node(1, priority=2), node(2, priority=1)], venues, {2: {"a": 3}})
    assert decisions == [Dispatch(1, "a"), Dispatch(2, "b")]


def test_contended_features_win_over_locality() -> None:
    # The kvm venue built the plain step's inputs, but kvm work waits: the plain step goes to
    # the plain venue, as without locality.
    venues = [venue("kvm", supported=("kvm",)), venue("plain")]
    decisions = plan([node(1, priority=1), node(2, KVM)], venues, {1: {"kvm": 4}})
    assert decisions == [Dispatch(1, "plain"), Dispatch(2, "kvm")]


def test_a_kvm_holder_takes_plain_work_when_no_kvm_work_waits() -> None:
    venues = [venue("kvm", supported=("kvm",)), venue("plain")]
    assert plan([node(1)], venues, {1: {"kvm": 1}}) == [Dispatch(1, "kvm")]


def test_speed_wins_over_locality() -> None:
    venues = [venue("fast", speed=2.0), venue("slow")]
    assert plan([node(1)], venues, {1: {"slow": 9}}) == [Dispatch(1, "fast")]


def test_trust_wins_over_locality() -> None:
    # An untrusted venue built inputs of a trusted step (say, for another build): it cannot
    # take the step, and an untrusted step never goes to a trusted holder.
    venues = [venue("t"), venue("u", trusted=False)]
    assert plan([node(1)], venues, {1: {"u": 3}}) == [Dispatch(1, "t")]
    assert plan([node(2, UNTRUSTED)], venues, {2: {"t": 3}}) == [Dispatch(2, "u")]


def test_repository_scope_wins_over_locality() -> None:
    venues = [venue("a"), venue("oidc", repositories=("org/app",))]
    held = {1: {"oidc": 3}}
    assert plan([node(1)], venues, held, {1: ["org/other"]}) == [Dispatch(1, "a")]
    assert plan([node(1)], venues, held, {1: ["org/app"]}) == [Dispatch(1, "oidc")]


def test_a_scoped_venue_chosen_gives_way_to_an_unscoped_holder() -> None:
    # The scoped venue has more free capacity (today's choice); the unscoped one holds inputs.
    venues = [venue("a", max_jobs=2, running=1), venue("oidc", max_jobs=2, repositories=("r",))]
    assert plan([node(1)], venues, {}, {1: ["r"]}) == [Dispatch(1, "oidc")]
    assert plan([node(1)], venues, {1: {"a": 1}}, {1: ["r"]}) == [Dispatch(1, "a")]


def test_ties_keep_todays_order() -> None:
    venues = [venue("a"), venue("b"), venue("c")]
    # Equal counts on "b" and "c": venue_rank's order (machine id here) decides.
    assert plan([node(1)], venues, {1: {"c": 2, "b": 2}}) == [Dispatch(1, "b")]
    # Today's choice holds as many inputs as anyone: it stays.
    assert plan([node(1)], venues, {1: {"c": 2, "a": 2}}) == [Dispatch(1, "a")]
    # Unknown or absent holders change nothing.
    assert plan([node(1)], venues, {1: {"gone": 5}}) == [Dispatch(1, "a")]


def test_a_pool_venue_taken_by_locality_is_used_up_correctly() -> None:
    # "b" (not the top of its kind's heap) takes two steps by locality, then has no slot.
    venues = [venue("a", max_jobs=3), venue("b", max_jobs=2)]
    held = {1: {"b": 1}, 2: {"b": 1}, 3: {"b": 1}}
    decisions = plan([node(1, priority=3), node(2, priority=2), node(3, priority=1)], venues, held)
    assert decisions == [Dispatch(1, "b"), Dispatch(2, "b"), Dispatch(3, "a")]


# ---- peers: a free venue takes an equal step whose inputs it holds -------------------------
def test_a_free_venue_takes_an_equal_step_whose_inputs_it_holds() -> None:
    assert plan([node(1), node(2), node(3)], [venue("a")], {}) == [Dispatch(1, "a")]
    # Step 1's inputs are on "b", busy: "a" takes the equal step holding most inputs there.
    held = {1: {"b": 1}, 2: {"a": 1}, 3: {"a": 2, "b": 5}}
    assert plan([node(1), node(2), node(3)], [venue("a")], held) == [Dispatch(3, "a")]
    # A step with no input built anywhere (a leaf) is not swapped: no look at its peers.
    del held[1]
    assert plan([node(1), node(2), node(3)], [venue("a")], held) == [Dispatch(1, "a")]


def test_better_work_is_not_overtaken_by_a_step_with_local_inputs() -> None:
    steps = [node(1, priority=1), node(2)]
    assert plan(steps, [venue("a")], {2: {"a": 3}}) == [Dispatch(1, "a")]
    taller = StepNode(1, "/nix/store/x.drv", PLAIN, StepState.RUNNABLE, 0.0, height=2)
    older = StepNode(2, "/nix/store/y.drv", PLAIN, StepState.RUNNABLE, 0.0)
    younger = StepNode(3, "/nix/store/z.drv", PLAIN, StepState.RUNNABLE, 1.0)
    assert plan([taller, younger], [venue("a")], {3: {"a": 1}}) == [Dispatch(1, "a")]
    assert plan([older, younger], [venue("a")], {3: {"a": 1}}) == [Dispatch(2, "a")]


def test_a_step_whose_inputs_the_venue_holds_is_not_swapped() -> None:
    held = {1: {"a": 1}, 2: {"a": 4}}
    assert plan([node(1), node(2)], [venue("a")], held) == [Dispatch(1, "a")]


def test_a_scoped_venue_takes_only_a_peer_it_may_take() -> None:
    oidc = venue("oidc", repositories=("r",))
    repos = {1: ["r"], 2: ["other"], 3: ["r"]}
    held = {1: {"elsewhere": 1}, 2: {"oidc": 5}, 3: {"oidc": 1}}
    assert plan([node(1), node(2), node(3)], [oidc], held, repos) == [Dispatch(3, "oidc")]


def test_peers_are_looked_at_up_to_a_bound() -> None:
    steps = [node(i) for i in range(1, MAX_PEERS + 3)]
    far = {1: {"b": 1}, MAX_PEERS + 2: {"a": 1}}
    assert plan(steps, [venue("a")], far) == [Dispatch(1, "a")]
    near = {1: {"b": 1}, MAX_PEERS: {"a": 1}}
    assert plan(steps, [venue("a")], near) == [Dispatch(MAX_PEERS, "a")]


def test_index_peers_are_the_equal_best_and_leave_the_index_as_it_was() -> None:
    index = RunnableIndex()
    for n in [node(5), node(1), node(3, priority=1), node(4), node(2)]:
        index.push(n)
    index.discard(1)
    assert [sid for _, sid in index.peers(PLAIN, 10)] == [3]
    index.discard(3)
    assert [sid for _, sid in index.peers(PLAIN, 2)] == [2, 4]
    assert [sid for _, sid in index.peers(PLAIN, 10)] == [2, 4, 5]
    assert index.peers(KVM, 10) == []
    assert [index.pop(PLAIN) for _ in range(4)] == [2, 4, 5, None]


@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["push", "discard", "pop"]), st.integers(1, 30), st.integers(0, 2)
        ),
        max_size=80,
    ),
    limit=st.integers(1, 8),
)
def test_index_peers_match_a_naive_model(ops: list[tuple[str, int, int]], limit: int) -> None:
    index = RunnableIndex()
    keys: dict[int, tuple[int, int, float, int]] = {}
    for op, sid, priority in ops:
        if op == "push":
            n = node(sid, priority=priority)
            index.push(n)
            keys[sid] = n.sort_key()
        elif op == "discard":
            index.discard(sid)
            keys.pop(sid, None)
        else:
            popped = index.pop(PLAIN)
            if popped is not None:
                del keys[popped]
    ordered = sorted((k, sid) for sid, k in keys.items())
    expected = [e for e in ordered if e[0][:3] == ordered[0][0][:3]][:limit] if ordered else []
    list(index.tops())  # as in plan_dispatch: the top is live when peers are asked for
    got = index.peers(PLAIN, limit)
    # Stale entries are stepped over a bounded number of times: the answer is a prefix.
    assert got == expected[: len(got)]
    assert got or not expected
    assert len(index) == len(keys)  # read only


holder_maps = st.dictionaries(
    st.integers(1, 12),
    st.dictionaries(st.sampled_from("abcdez"), st.integers(1, 4), max_size=4),
)


@given(
    held=holder_maps,
    jobs=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=5),
    count=st.integers(0, 12),
)
def test_locality_keeps_the_step_order_and_the_slots(
    held: dict[int, dict[str, int]], jobs: list[tuple[int, int]], count: int
) -> None:
    venues = [venue("abcde"[i], max_jobs=m, running=r) for i, (m, r) in enumerate(jobs)]
    steps = [node(i, priority=i % 3) for i in range(1, count + 1)]
    plain = plan(steps, venues, {})
    local = plan([node(n.id, priority=n.priority) for n in steps], venues, held)
    # Work goes in the same order but among steps of equal key, each step once.
    priority = {n.id: n.priority for n in steps}
    assert [priority[d.step_id] for d in local] == [priority[d.step_id] for d in plain]
    assert len({d.step_id for d in local}) == len(local)
    used = {v.machine_id: 0 for v in venues}
    for d in local:
        used[d.machine_id] += 1
    assert all(used[v.machine_id] <= v.free_slots for v in venues)
    # Deterministic: the same state (holders listed in another order) gives the same plan.
    flipped = {sid: dict(reversed(list(h.items()))) for sid, h in held.items()}
    again = plan([node(n.id, priority=n.priority) for n in steps], venues, flipped)
    assert again == local


# ---- note_built --------------------------------------------------------------------------
def tally_of(n: StepNode) -> dict[str, int] | None:
    return n.inputs_on


def test_note_built_counts_inputs_per_venue_for_waiting_dependents() -> None:
    nodes = {
        i: node(i, state=StepState.WAITING if i > 3 else StepState.SUCCEEDED, venue=v)
        for i, v in [(1, "a"), (2, "a"), (3, "b"), (4, None), (5, None)]
    }
    for i in (1, 2, 3):
        nodes[i].dependents = {4, 5}
    nodes[5].state = StepState.CANCELLED  # final: not counted
    for i in (1, 2, 3):
        note_built(nodes, nodes[i])
    assert nodes[4].inputs_on == {"a": 2, "b": 1}
    assert nodes[5].inputs_on is None
    assert nodes[1].inputs_on is None


def test_note_built_forgets_its_own_tally_and_ignores_unknown_venue() -> None:
    built = node(1, state=StepState.SUCCEEDED)
    built.inputs_on = {"a": 1}
    built.dependents = {2, 99}  # 99: forgotten
    waiting = node(2, state=StepState.WAITING)
    note_built({1: built, 2: waiting}, built)
    assert tally_of(built) is None and tally_of(waiting) is None


def test_note_built_names_at_most_max_holders() -> None:
    dependent = node(0, state=StepState.WAITING)
    nodes = {0: dependent}
    for i in range(1, MAX_HOLDERS + 4):
        nodes[i] = node(i, state=StepState.SUCCEEDED, venue=f"m{i}")
        nodes[i].dependents = {0}
        note_built(nodes, nodes[i])
    again = node(100, state=StepState.SUCCEEDED, venue="m1")
    again.dependents = {0}
    note_built(nodes, again)
    assert dependent.inputs_on is not None
    assert len(dependent.inputs_on) == MAX_HOLDERS
    assert dependent.inputs_on["m1"] == 2  # a venue already named still counts
    assert f"m{MAX_HOLDERS + 1}" not in dependent.inputs_on


def test_a_start_tallies_the_built_inputs_as_note_built_did() -> None:
    # The same successes, applied one by one as they happened or read back at a start, leave
    # the same tallies (the order of the record keeps which MAX_HOLDERS venues are named).
    where = [f"m{i % (MAX_HOLDERS + 2)}" for i in range(3 * MAX_HOLDERS)]
    live = {0: node(0, state=StepState.WAITING), 1: node(1, state=StepState.RUNNABLE)}
    for i, machine in enumerate(where, start=10):
        live[i] = node(i, state=StepState.SUCCEEDED, venue=machine)
        live[i].dependents = {0, 1}
        note_built(live, live[i])
    loaded = {
        0: node(0, state=StepState.WAITING),
        1: node(1, state=StepState.RUNNABLE),
        2: node(2, state=StepState.BUILDING),  # running already: no tally
    }
    tally_built_inputs(
        loaded,
        [(sid, m) for m in where for sid in (0, 1, 2)] + [(99, "m1")],  # 99: not loaded
    )
    assert loaded[0].inputs_on == live[0].inputs_on == loaded[1].inputs_on
    assert loaded[0].inputs_on is not None and len(loaded[0].inputs_on) == MAX_HOLDERS
    assert loaded[2].inputs_on is None
