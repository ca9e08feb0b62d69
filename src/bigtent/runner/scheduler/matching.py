"""Which venue may run which step, and which venue is best for it (architecture §5). Pure code.

Trust (architecture §6, docs/security.md) is part of matching: a trusted step runs only on a
trusted venue and an untrusted step only on an untrusted one (``Requirement.trusted``), and
a venue scoped to repositories (an OIDC agent) takes a step only when some live build of the
step is for one of them (``may_take``).
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Iterable
from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class Requirement:
    """What a step needs from a venue: its system, its required features and its trust.

    Runnable steps are bucketed by requirement, so trusted and untrusted work never share a
    bucket: the top of a bucket is always a step of the bucket's trust."""

    system: str
    features: frozenset[str]
    trusted: bool = True
    """A trusted step (its outputs go to the main cache) needs a trusted venue; an untrusted
    step needs an untrusted venue."""


@dataclass(frozen=True, slots=True)
class VenueView:
    """A snapshot of one venue's capabilities and load, as the dispatcher sees it."""

    machine_id: str
    systems: frozenset[str]
    supported_features: frozenset[str]
    mandatory_features: frozenset[str]
    max_jobs: int
    running: int
    speed_factor: float = 1.0
    trusted: bool = True
    """A trusted venue (token agents, SSH builders, OIDC agents by default) takes only trusted
    steps; an untrusted venue only untrusted ones."""
    repositories: frozenset[str] | None = None
    """The build repositories the venue may serve (an OIDC agent's rule); None: any."""

    @property
    def free_slots(self) -> int:
        return max(0, self.max_jobs - self.running)


def can_run(venue: VenueView, req: Requirement) -> bool:
    """architecture §5: the venue is of the step's trust, has the step's system, supports every
    required feature, and every one of its mandatory features is required by the step.
    (Slots and backoff are the dispatcher's business; repositories are ``may_take``'s.)

    A venue's mandatory features count as supported too, as in Nix's machines file.
    """
    if venue.trusted != req.trusted:
        return False
    if req.system not in venue.systems:
        return False
    if not venue.mandatory_features <= req.features:
        return False
    return req.features <= (venue.supported_features | venue.mandatory_features)


def has_room(free_store_bytes: int | None, min_free_bytes: int) -> bool:
    """Whether a venue has room in its store for a step: it reported at least
    ``min_free_bytes`` free (``scheduler.min_free_store_bytes``). A venue that reports
    nothing (an older agent, an SSH builder) and a minimum of 0 always have room."""
    return min_free_bytes <= 0 or free_store_bytes is None or free_store_bytes >= min_free_bytes


def may_take(venue: VenueView, repositories: Collection[str | None]) -> bool:
    """architecture §6: a venue scoped to repositories (an OIDC agent) takes a step only when some
    live build of the step is for one of them; a build without a repository (None) matches no
    scope. An unscoped venue (token agents, SSH builders, a rule with ``"*"``) takes any."""
    if venue.repositories is None:
        return True
    return not venue.repositories.isdisjoint(repositories)


def eligible(venue: VenueView, req: Requirement, repositories: Collection[str | None]) -> bool:
    """Everything but load: ``can_run`` (capabilities and trust) and ``may_take``."""
    return can_run(venue, req) and may_take(venue, repositories)


def contended_waste(venue: VenueView, req: Requirement, wanted: Collection[str]) -> int:
    """How many features this venue offers that other waiting work needs but this step does
    not: running the step here keeps that venue away from work only it can do."""
    offered = venue.supported_features | venue.mandatory_features
    return len((offered - req.features) & frozenset(wanted))


def venue_rank(
    venue: VenueView, req: Requirement, wanted: Collection[str]
) -> tuple[int, float, str]:
    """Sort key, smallest best: fewest contended features wasted, then most free capacity
    weighted by speed, then machine id (a total order: the same state gives the same choice)."""
    return (
        contended_waste(venue, req, wanted),
        -(venue.free_slots * venue.speed_factor),
        venue.machine_id,
    )


def best_venue(
    venues: Collection[VenueView], req: Requirement, wanted: Collection[str]
) -> VenueView | None:
    """The best venue with a free slot that can run ``req``, or None."""
    candidates = [v for v in venues if v.free_slots > 0 and can_run(v, req)]
    if not candidates:
        return None
    return min(candidates, key=lambda v: venue_rank(v, req, wanted))


_Class = tuple[frozenset[str], frozenset[str], frozenset[str], bool]
"""A venue's capabilities: systems, supported features, mandatory features, trust."""


class VenuePool:
    """Free venues for one dispatch pass, grouped by capabilities and trust, so finding the
    best venue for a step costs the number of distinct kinds, not the number of venues.

    A farm of a thousand agents has a handful of kinds of machines. Within one kind,
    ``can_run`` and ``contended_waste`` are the same for every member, so the best member is
    the one ``venue_rank`` orders first on its remaining keys (free capacity times speed, then
    machine id): the top of a heap per kind. ``best`` gives exactly what ``best_venue`` would
    over the same venues; ``get`` finds a free venue by machine id (the holder of a step's
    inputs, ``plan_dispatch``); ``take`` uses up one slot of a venue either returned.

    The heaps delete lazily: ``_free`` holds each free venue's current view, and a heap entry
    whose view is no longer current (the venue took a step since) is dropped when it reaches
    the top.
    """

    def __init__(self, venues: Iterable[VenueView]) -> None:
        self._heaps: dict[_Class, list[_PoolEntry]] = {}
        self._members: dict[_Class, VenueView] = {}
        """One venue of each kind: what can run where is decided on it."""
        self._fits: dict[Requirement, list[_Class]] = {}
        self._free: dict[str, VenueView] = {}
        """Machine id -> the venue's current view, while it has a free slot."""
        self._pushed = 0
        unique = {v.machine_id: v for v in venues}
        for v in unique.values():
            if v.free_slots > 0:
                self._free[v.machine_id] = v
                self._heaps.setdefault(_class_of(v), []).append(self._entry(v))
                self._members.setdefault(_class_of(v), v)
        for heap in self._heaps.values():
            heapq.heapify(heap)

    def __bool__(self) -> bool:
        return bool(self._free)

    def _entry(self, v: VenueView) -> _PoolEntry:
        self._pushed += 1
        return (-(v.free_slots * v.speed_factor), v.machine_id, self._pushed, v)

    def _top(self, heap: list[_PoolEntry]) -> _PoolEntry | None:
        free = self._free
        while heap:
            top = heap[0]
            if free.get(top[1]) is top[3]:
                return top
            heapq.heappop(heap)
        return None

    def _classes_for(self, req: Requirement) -> list[_Class]:
        fits = self._fits.get(req)
        if fits is None:
            fits = [c for c, member in self._members.items() if can_run(member, req)]
            self._fits[req] = fits
        return fits

    def best(self, req: Requirement, wanted: Collection[str]) -> VenueView | None:
        """The venue ``best_venue`` would choose for ``req`` among the pool's free venues."""
        best: tuple[int, float, str] | None = None
        chosen: VenueView | None = None
        for cls in self._classes_for(req):
            top = self._top(self._heaps[cls])
            if top is None:
                continue
            capacity, machine_id, _, venue = top
            rank = (contended_waste(venue, req, wanted), capacity, machine_id)
            if best is None or rank < best:
                best, chosen = rank, venue
        return chosen

    def get(self, machine_id: str) -> VenueView | None:
        """The venue ``machine_id`` as it stands in this pass, if it is in the pool and has a
        free slot (else None)."""
        return self._free.get(machine_id)

    def take(self, venue: VenueView) -> None:
        """Use one slot of ``venue``, a free venue of the pool as ``best`` or ``get`` just
        returned it."""
        assert self._free.get(venue.machine_id) is venue, "take() must follow best() or get()"
        updated = replace(venue, running=venue.running + 1)
        if updated.free_slots > 0:
            self._free[venue.machine_id] = updated
            heapq.heappush(self._heaps[_class_of(venue)], self._entry(updated))
        else:
            del self._free[venue.machine_id]


_PoolEntry = tuple[float, str, int, VenueView]
"""A pool heap entry: minus free capacity times speed, machine id, a push counter (so two
entries never compare their views), the view."""


def _class_of(v: VenueView) -> _Class:
    return (v.systems, v.supported_features, v.mandatory_features, v.trusted)
