"""Which venue may run which step, and which venue is best for it (DESIGN §5). Pure code."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Requirement:
    """What a step needs from a venue: its system and its required features."""

    system: str
    features: frozenset[str]


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

    @property
    def free_slots(self) -> int:
        return max(0, self.max_jobs - self.running)


def can_run(venue: VenueView, req: Requirement) -> bool:
    """DESIGN §5: the venue has the step's system, supports every required feature, and every
    one of its mandatory features is required by the step. (Slots, backoff and trust are the
    dispatcher's business.)

    A venue's mandatory features count as supported too, as in Nix's machines file.
    """
    if req.system not in venue.systems:
        return False
    if not venue.mandatory_features <= req.features:
        return False
    return req.features <= (venue.supported_features | venue.mandatory_features)


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
