"""The in-memory step DAG and the runnable index (architecture §5). Pure code: no I/O, no clock.

The database is the record; this is the working copy the dispatcher decides on, rebuilt from
the database at start. Runnable steps live in one heap per requirement (system + feature set),
so choosing the next dispatch looks at the top of each bucket, never at the whole queue.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

from bigtent.runner.scheduler.matching import (
    Requirement,
    VenuePool,
    VenueView,
    best_venue,
    can_run,
    contended_waste,
    may_take,
    venue_rank,
)
from bigtent.states import BuildState, StepState


@dataclass(slots=True, eq=False)
class StepNode:
    """One derivation to build and its place in the DAG."""

    id: int
    drv_path: str
    req: Requirement
    state: StepState
    created_at: float
    priority: int = 0
    height: int = 0
    """Length of the longest chain of dependents above this step (itself included): the
    critical-path weight used to order runnable work (0 until computed)."""
    not_before: float | None = None
    attempts: int = 0
    lease_id: str | None = None
    lease_expires_at: float | None = None
    venue: str | None = None
    deps: set[int] = field(default_factory=set)
    """Dependencies that have not succeeded yet."""
    dependents: set[int] = field(default_factory=set)
    builds: set[int] = field(default_factory=set)
    outputs: dict[str, str] = field(default_factory=dict)
    """Output name -> store path, from the derivation."""
    runnable_at: float | None = None
    """When the step became runnable (again) and may be dispatched, for the dispatch latency
    (``runner.metrics``); None when unknown (runnable before the runner started) or not
    runnable."""
    assigned_at: float | None = None
    """When the current assignment was made, until the venue accepts it (``runner.metrics``)."""
    inputs_on: dict[str, int] | None = None
    """Machine id -> how many of this step's inputs succeeded on that venue (its store holds
    their outputs), for at most ``MAX_HOLDERS`` venues; None when none did yet. Kept by
    ``note_built`` while the step waits, dropped when it succeeds; ``plan_dispatch`` prefers
    a free venue that holds inputs (locality)."""

    def sort_key(self) -> tuple[int, int, float, int]:
        """Runnable order: build priority, then work waiting behind it, then age."""
        return (-self.priority, -self.height, self.created_at, self.id)


_Key = tuple[int, int, float, int]
_Entry = tuple[_Key, int]


class RunnableIndex:
    """Runnable steps bucketed by requirement, each bucket a heap with lazy deletion.

    ``_live`` holds each runnable step's current (requirement, key); a heap entry that no
    longer matches it (popped, discarded, or pushed again with a new key) is stale and is
    dropped when it reaches the top. ``_counts`` keeps the live steps per requirement, so
    asking which requirements wait costs the number of buckets, not the number of steps.
    """

    def __init__(self) -> None:
        self._buckets: dict[Requirement, list[_Entry]] = {}
        self._live: dict[int, tuple[Requirement, tuple[int, int, float, int]]] = {}
        self._counts: dict[Requirement, int] = {}
        self.version = 0
        """Counts pushes: only a push can make a step takeable that was not (a new step, or
        one re-keyed after a new build joined it); a scan's "nothing" holds until then."""

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, step_id: int) -> bool:
        return step_id in self._live

    def push(self, node: StepNode) -> None:
        """Add a runnable step, or re-key it after its priority or height changed."""
        key = node.sort_key()
        self.version += 1
        self.discard(node.id)
        self._live[node.id] = (node.req, key)
        self._counts[node.req] = self._counts.get(node.req, 0) + 1
        heapq.heappush(self._buckets.setdefault(node.req, []), (key, node.id))

    def discard(self, step_id: int) -> None:
        live = self._live.pop(step_id, None)
        if live is not None:
            req = live[0]
            self._counts[req] -= 1
            if not self._counts[req]:
                del self._counts[req]

    def _clean_top(self, req: Requirement) -> _Entry | None:
        heap = self._buckets.get(req)
        while heap:
            key, sid = heap[0]
            live = self._live.get(sid)
            if live is not None and live == (req, key):
                return heap[0]
            heapq.heappop(heap)
        if heap is not None:
            del self._buckets[req]
        return None

    def tops(self) -> Iterator[tuple[Requirement, _Entry]]:
        """The best entry of every non-empty bucket."""
        for req in list(self._buckets):
            top = self._clean_top(req)
            if top is not None:
                yield req, top

    def pop(self, req: Requirement) -> int | None:
        top = self._clean_top(req)
        if top is None:
            return None
        heapq.heappop(self._buckets[req])
        self.discard(top[1])
        return top[1]

    def count_by_system(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for req, n in self._counts.items():
            counts[req.system] = counts.get(req.system, 0) + n
        return counts

    def requirements(self) -> set[Requirement]:
        """The requirements of the waiting steps (one per bucket, not one per step)."""
        return set(self._counts)

    def entries(self, req: Requirement) -> Iterator[_Entry]:
        """Every live entry of one bucket, in no particular order (a scan: O(bucket))."""
        live = self._live
        for key, sid in self._buckets.get(req, ()):
            if live.get(sid) == (req, key):
                yield key, sid

    def peers(self, req: Requirement, limit: int) -> list[_Entry]:
        """The best live entries of one bucket that equal its top but for the step id (the
        same priority, height and age), at most ``limit``, best first. Read only: walks the
        heap's tree from its root in key order (a small heap of the frontier), so it costs
        O(limit log limit) whatever the bucket's size; stale entries on the way are stepped
        over, at most ``limit`` times over."""
        heap = self._buckets.get(req)
        if not heap:
            return []
        live = self._live
        got: list[_Entry] = []
        seen: set[int] = set()
        frontier: list[tuple[_Entry, int]] = [(heap[0], 0)]
        looked = 0
        while frontier and len(got) < limit and looked < 4 * limit:
            entry, at = heapq.heappop(frontier)
            looked += 1
            key, sid = entry
            if live.get(sid) == (req, key) and sid not in seen:
                if got and key[:3] != got[0][0][:3]:
                    break
                got.append(entry)
                seen.add(sid)  # a step pushed again with the same key has two entries
            for child in (2 * at + 1, 2 * at + 2):
                if child < len(heap):
                    heapq.heappush(frontier, (heap[child], child))
        return got

    def best_where(
        self, req: Requirement, ok: Callable[[int], bool], below: _Key | None = None
    ) -> _Entry | None:
        """The best live entry of one bucket whose step satisfies ``ok`` (and whose key is
        below ``below``): a scan of the bucket, asking ``ok`` only of entries that would
        improve on the best so far."""
        live = self._live
        best: _Entry | None = None
        bound = below
        for key, sid in self._buckets.get(req, ()):
            if bound is not None and key >= bound:
                continue
            if live.get(sid) != (req, key) or not ok(sid):
                continue
            best = (key, sid)
            bound = key
        return best


@dataclass(frozen=True, slots=True)
class Dispatch:
    """A decision: send step ``step_id`` to venue ``machine_id``."""

    step_id: int
    machine_id: str


RepositoriesOf = Callable[[int], Collection[str | None]]
"""Step id -> the repositories of its live builds (None for a build without one)."""
HoldersOf = Callable[[int], Mapping[str, int] | None]
"""Step id -> machine id -> how many of its inputs that venue built (``StepNode.inputs_on``)."""

MAX_PEERS = 16
"""Runnable steps of equal key (``RunnableIndex.peers``) a dispatch decision looks at for
one whose inputs the chosen venue holds."""
MAX_HOLDERS = 8
"""Venues a step's tally of built inputs names at most: a step with thousands of inputs
spread over a large farm costs a bounded look per dispatch decision (the first venues to
build its inputs are remembered, later ones are not)."""
_WAITING_FOR_INPUTS = (StepState.WAITING, StepState.RUNNABLE)


def note_built(nodes: Mapping[int, StepNode], node: StepNode) -> None:
    """``node`` succeeded on ``node.venue`` (applied after its commit): each of its waiting
    dependents has one more input in that venue's store. Costs one look per dependent, as
    releasing the dependents does."""
    node.inputs_on = None  # built: its own tally is of no more use
    where = node.venue
    if where is None:
        return
    for d in node.dependents:
        _tally(nodes.get(d), where)


def tally_built_inputs(nodes: Mapping[int, StepNode], built: Iterable[tuple[int, str]]) -> None:
    """At a start, the tallies ``note_built`` kept before it: ``built`` is (step id, machine
    id) for each input of a step that succeeded on a venue, in the order they succeeded (the
    database's record, ``reads.active``), so a step still waiting goes where its inputs are
    as it would have without the restart."""
    for sid, where in built:
        _tally(nodes.get(sid), where)


def _tally(node: StepNode | None, where: str) -> None:
    """One more of ``node``'s inputs is in ``where``'s store, if ``node`` still waits."""
    if node is None or node.state not in _WAITING_FOR_INPUTS:
        return
    tally = node.inputs_on
    if tally is None:
        node.inputs_on = {where: 1}
    elif where in tally:
        tally[where] += 1
    elif len(tally) < MAX_HOLDERS:
        tally[where] = 1


_Found = tuple[tuple[int, int, float, int], Requirement, int]
"""(sort key, bucket, step id) of a runnable step."""


def plan_dispatch(
    index: RunnableIndex,
    venues: Collection[VenueView],
    limit: int | None = None,
    repositories_of: RepositoriesOf | None = None,
    nothing_for: dict[Scope, int] | None = None,
    holders_of: HoldersOf | None = None,
) -> list[Dispatch]:
    """Match runnable steps to free slots, best step first, best venue for it (architecture §5).

    Pops the chosen steps from ``index``. Each decision looks at the top of each bucket and
    at the kinds of free venues (``VenuePool``), never at the whole queue nor at every
    venue. Deterministic for a given state.

    Trust needs no scan: trusted and untrusted steps sit in different buckets
    (``Requirement.trusted``), and a kind of venue includes its trust. A venue scoped to
    repositories (an OIDC agent, architecture §6) may find the tops of its buckets are for builds
    it cannot serve: for it alone the buckets it can run are scanned for the best step it may
    take. Venues of one scope (capabilities, trust and repositories: the agents of one OIDC
    rule) share a scan, and its answer is kept for the pass until that step is taken (the
    index only shrinks during a pass): a scope costs one scan per step its venues take, and
    one in all when nothing is for it. ``nothing_for`` (kept by the caller across passes)
    remembers the index version at which a scope's scan found nothing, so idle scoped venues
    cost nothing until a step is pushed again.

    Locality (``holders_of``): once the step and its venue are chosen, a free venue that
    built more of the step's inputs (its store holds them, so Nix substitutes nothing from
    the cache) takes the step instead when it ranks as well on everything but load: it can
    run the step and may take it, wastes as few contended features and has the same speed.
    The most inputs win, ties keep ``venue_rank``'s order. Only free venues count (a busy
    holder is never waited for) and the look is bounded by ``MAX_HOLDERS``. Then, when the
    step's inputs are all on other venues, a step of equal key (the same priority, height
    and age: only the id tells them apart) whose inputs the venue holds goes instead, the one
    with most (ties: the lower id); at most ``MAX_PEERS`` are looked at. A step none of whose
    inputs was built here (a leaf: its peers are most likely leaves too) costs no such look.
    Which work goes first is unchanged but among such equals.
    """
    repos = repositories_of or _no_repositories
    pool = VenuePool(v for v in venues if v.repositories is None)
    free = {v.machine_id: v for v in venues if v.repositories is not None and v.free_slots > 0}
    """Free scoped venues (few: the unscoped ones are in ``pool``)."""
    decisions: list[Dispatch] = []
    deep: dict[Scope, _Found | None] = {}
    while (pool or free) and (limit is None or len(decisions) < limit):
        wanted = frozenset(f for req in index.requirements() for f in req.features)
        scoped = list(free.values())
        best: tuple[tuple[int, int, float, int], Requirement, int, VenueView] | None = None
        for req, (key, sid) in sorted(index.tops(), key=lambda t: t[1]):
            venue = pool.best(req, wanted) if pool else None
            if scoped:
                step_repos = repos(sid)
                other = best_venue([v for v in scoped if may_take(v, step_repos)], req, wanted)
                if other is not None and (
                    venue is None or venue_rank(other, req, wanted) < venue_rank(venue, req, wanted)
                ):
                    venue = other
            if venue is not None:
                best = (key, req, sid, venue)
                break  # tops in key order: the first one some venue takes is the best
        groups: dict[Scope, list[VenueView]] = {}
        for v in scoped:
            groups.setdefault(_scope(v), []).append(v)
        for scope, members in groups.items():
            found = deep.get(scope, _UNKNOWN)
            if (
                found is _UNKNOWN
                and nothing_for is not None
                and nothing_for.get(scope) == index.version
            ):
                found = deep[scope] = None
            if found is _UNKNOWN or (found is not None and found[2] not in index):
                found = deep[scope] = _best_for(index, members[0], repos)
                if found is None and nothing_for is not None:
                    if len(nothing_for) >= _MAX_REMEMBERED_SCOPES:
                        nothing_for.clear()
                    nothing_for[scope] = index.version
            if found is not None and (best is None or found[0] < best[0]):
                chosen = best_venue(members, found[1], wanted)
                assert chosen is not None  # every member can run it: same scope
                best = (*found, chosen)
        if best is None:
            break
        _, req, step_id, venue = best
        if holders_of is not None:
            held = holders_of(step_id)
            if held:
                venue = _holder(venue, req, wanted, held, pool, free, repos, step_id)
                if not held.get(venue.machine_id):
                    step_id = _peer(index, req, step_id, venue, holders_of, repos)
        index.discard(step_id)
        decisions.append(Dispatch(step_id, venue.machine_id))
        if venue.repositories is None:
            pool.take(venue)
        else:
            updated = replace(venue, running=venue.running + 1)
            if updated.free_slots > 0:
                free[venue.machine_id] = updated
            else:
                del free[venue.machine_id]
    return decisions


def _holder(
    chosen: VenueView,
    req: Requirement,
    wanted: Collection[str],
    held: Mapping[str, int],
    pool: VenuePool,
    scoped: Mapping[str, VenueView],
    repositories_of: RepositoriesOf,
    step_id: int,
) -> VenueView:
    """The free venue that holds the most of the step's inputs among those that rank as well
    as ``chosen`` on everything but load (``plan_dispatch``); ``chosen`` on a tie."""
    waste = contended_waste(chosen, req, wanted)
    best = chosen
    best_key = (-held.get(chosen.machine_id, 0), venue_rank(chosen, req, wanted))
    step_repos: Collection[str | None] | None = None
    for machine_id, count in held.items():
        if machine_id == chosen.machine_id or -count > best_key[0]:
            continue
        v = pool.get(machine_id) or scoped.get(machine_id)
        if v is None or v.speed_factor != chosen.speed_factor or not can_run(v, req):
            continue
        if v.repositories is not None:
            if step_repos is None:
                step_repos = repositories_of(step_id)
            if not may_take(v, step_repos):
                continue
        rank = venue_rank(v, req, wanted)
        if rank[0] != waste:
            continue
        key = (-count, rank)
        if key < best_key:
            best, best_key = v, key
    return best


def _peer(
    index: RunnableIndex,
    req: Requirement,
    step_id: int,
    venue: VenueView,
    holders_of: HoldersOf,
    repositories_of: RepositoriesOf,
) -> int:
    """A step of equal key to ``step_id`` (the top of its bucket) whose inputs ``venue``
    holds most, when ``step_id`` has none there and ``venue`` may take it; else ``step_id``.
    Its peers share its requirement, so the venue can run them all."""
    peers = index.peers(req, MAX_PEERS)
    if not peers or peers[0][1] != step_id:
        return step_id  # not the top (a scoped venue's scan found it): no peers
    best, most = step_id, 0
    for _, sid in peers[1:]:
        held = holders_of(sid)
        count = held.get(venue.machine_id, 0) if held else 0
        if count > most and (venue.repositories is None or may_take(venue, repositories_of(sid))):
            best, most = sid, count
    return best


def plan_heights(items: Sequence[tuple[str, Sequence[str]]]) -> dict[str, int]:
    """Heights within one plan: ``items`` are (name, names of its dependencies), each after
    its dependencies. A step's height is 1 + the largest height among the steps that depend
    on it (the longest chain of dependents above it, itself included)."""
    heights: dict[str, int] = {}
    for name, deps in reversed(items):
        above = heights.setdefault(name, 1) + 1
        for d in deps:
            if heights.get(d, 0) < above:
                heights[d] = above
    return heights


_UNKNOWN: _Found = ((0, 0, 0.0, 0), Requirement("", frozenset()), -1)
"""Marks a scoped venue not scanned yet in this pass (None: scanned, nothing for it)."""


def _no_repositories(step_id: int) -> Collection[str | None]:
    return ()


Scope = tuple[frozenset[str], frozenset[str], frozenset[str], bool, frozenset[str] | None]
"""What decides which steps a venue may take: systems, features, trust, repositories."""
_MAX_REMEMBERED_SCOPES = 1024


def _scope(v: VenueView) -> Scope:
    return (v.systems, v.supported_features, v.mandatory_features, v.trusted, v.repositories)


def _best_for(index: RunnableIndex, venue: VenueView, repos: RepositoriesOf) -> _Found | None:
    """The best runnable step ``venue`` can run and may take, by a scan of its buckets."""
    best: _Found | None = None

    def ok(sid: int) -> bool:
        return may_take(venue, repos(sid))

    for req in index.requirements():
        if not can_run(venue, req):
            continue
        found = index.best_where(req, ok, best[0] if best is not None else None)
        if found is not None:
            best = (found[0], req, found[1])
    return best


def raise_heights(nodes: dict[int, StepNode], order: Iterable[int]) -> set[int]:
    """Recompute ``height`` for the steps in ``order`` (dependents before dependencies) and
    propagate increases to everything below them. Returns the ids whose height changed, so
    the caller can re-key those that are runnable.

    Height is 1 + the largest height among dependents. It only ever grows (new builds add
    dependents), so the propagation stops: a dependency is revisited only when it grew.
    """
    changed: set[int] = set()
    stack = list(order)
    stack.reverse()
    while stack:
        sid = stack.pop()
        node = nodes.get(sid)
        if node is None:
            continue
        height = 1 + max((nodes[d].height for d in node.dependents if d in nodes), default=0)
        if height > node.height:
            node.height = height
            changed.add(sid)
            stack.extend(node.deps)
    return changed


def dependents_closure(nodes: Mapping[int, StepNode], start: int) -> list[int]:
    """Every step that (transitively) depends on ``start``, in no particular order."""
    seen: set[int] = set()
    stack = list(nodes[start].dependents)
    while stack:
        sid = stack.pop()
        if sid in seen or sid not in nodes:
            continue
        seen.add(sid)
        stack.extend(nodes[sid].dependents)
    return list(seen)


def restart_selection(
    members: Mapping[int, StepState],
    deps: Iterable[tuple[int, int]],
    roots: Collection[int] | None,
) -> set[int]:
    """The member steps a restart admits again: those not succeeded, or with ``roots`` only
    those among them that the given roots need (the roots themselves and, transitively, their
    dependencies within the build). ``deps`` are (step, dependency) pairs.

    A restart of one job of a CI evaluation names its root, so the build's other failed jobs
    stay failed; ``bigtent restart`` names none and redoes every failed step.
    """
    pending = {sid for sid, state in members.items() if state is not StepState.SUCCEEDED}
    if roots is None:
        return pending
    below: dict[int, list[int]] = {}
    for step, dep in deps:
        below.setdefault(step, []).append(dep)
    seen: set[int] = set()
    stack = [r for r in roots if r in members]
    while stack:
        sid = stack.pop()
        if sid in seen or sid not in pending:
            continue
        seen.add(sid)
        stack.extend(below.get(sid, ()))
    return seen


def build_outcome(root_states: Iterable[StepState | None]) -> BuildState | None:
    """A build is over when every root is final (None: a root that was already cached).

    It succeeded when every root succeeded (or was cached); otherwise it failed.
    """
    states = list(root_states)
    if any(s is not None and not s.is_final for s in states):
        return None
    if all(s is None or s is StepState.SUCCEEDED for s in states):
        return BuildState.SUCCEEDED
    return BuildState.FAILED
