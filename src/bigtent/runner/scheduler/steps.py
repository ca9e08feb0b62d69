"""The in-memory step DAG and the runnable index (DESIGN §5). Pure code: no I/O, no clock.

The database is the record; this is the working copy the dispatcher decides on, rebuilt from
the database at start. Runnable steps live in one heap per requirement (system + feature set),
so choosing the next dispatch looks at the top of each bucket, never at the whole queue.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from bigtent.runner.scheduler.matching import Requirement, VenuePool, VenueView
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

    def sort_key(self) -> tuple[int, int, float, int]:
        """Runnable order: build priority, then work waiting behind it, then age."""
        return (-self.priority, -self.height, self.created_at, self.id)


_Entry = tuple[tuple[int, int, float, int], int]


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

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, step_id: int) -> bool:
        return step_id in self._live

    def push(self, node: StepNode) -> None:
        """Add a runnable step, or re-key it after its priority or height changed."""
        key = node.sort_key()
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


@dataclass(frozen=True, slots=True)
class Dispatch:
    """A decision: send step ``step_id`` to venue ``machine_id``."""

    step_id: int
    machine_id: str


def plan_dispatch(
    index: RunnableIndex, venues: Collection[VenueView], limit: int | None = None
) -> list[Dispatch]:
    """Match runnable steps to free slots, best step first, best venue for it (DESIGN §5).

    Pops the chosen steps from ``index``. Each decision looks at the top of each bucket and
    at the kinds of free venues (``VenuePool``), never at the whole queue nor at every
    venue. Deterministic for a given state.
    """
    pool = VenuePool(venues)
    decisions: list[Dispatch] = []
    while pool and (limit is None or len(decisions) < limit):
        wanted = frozenset(f for req in index.requirements() for f in req.features)
        chosen: tuple[Requirement, VenueView] | None = None
        # The best step first: the first bucket top (in key order) some free venue can run.
        for req, _top in sorted(index.tops(), key=lambda t: t[1]):
            venue = pool.best(req, wanted)
            if venue is not None:
                chosen = (req, venue)
                break
        if chosen is None:
            break
        req, venue = chosen
        step_id = index.pop(req)
        assert step_id is not None
        decisions.append(Dispatch(step_id, venue.machine_id))
        pool.take(venue)
    return decisions


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


def dependents_closure(nodes: dict[int, StepNode], start: int) -> list[int]:
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
