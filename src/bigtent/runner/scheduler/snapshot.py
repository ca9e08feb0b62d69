"""The scheduler as the rest of the runner reads it: plain values copied out of its working
copy in one synchronous call, so the API, the dashboard and the autoscaler never hold (or
change) the scheduler's own objects."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from bigtent.runner.scheduler.matching import Requirement, VenueView
from bigtent.runner.scheduler.model import Venue
from bigtent.runner.scheduler.recovery import RecoveryFailure


@dataclass(frozen=True, slots=True)
class Overview:
    """The scheduler at a glance (``GET /api/v1/status``)."""

    queue: Mapping[str, int]
    """Runnable steps by system."""
    agents_connected: int
    builds_active: int
    steps_waiting_for_capacity: int
    recovery: RecoveryFailure | None
    """Set while reloading its state from the database fails."""
    shared_database: bool
    """Several runners share the database (PostgreSQL)."""


@dataclass(frozen=True, slots=True)
class VenueInfo:
    """A connected venue (agent or SSH builder) as the scheduler has it."""

    machine_id: str
    name: str
    kind: str
    max_jobs: int
    running: int
    """Steps it holds now."""
    trusted: bool
    repositories: frozenset[str] | None
    draining: bool
    free_store_bytes: int | None
    consecutive_failures: int
    backoff_until: float
    last_error: str
    launch_id: str | None
    view: VenueView
    """What matching sees of it (``matching.can_run``)."""

    @classmethod
    def of(cls, venue: Venue) -> VenueInfo:
        return cls(
            machine_id=venue.machine_id,
            name=venue.name,
            kind=venue.kind,
            max_jobs=venue.max_jobs,
            running=len(venue.running),
            trusted=venue.trusted,
            repositories=venue.repositories,
            draining=venue.draining,
            free_store_bytes=venue.free_store_bytes,
            consecutive_failures=venue.consecutive_failures,
            backoff_until=venue.backoff_until,
            last_error=venue.last_error,
            launch_id=venue.launch_id,
            view=venue.view(),
        )


@dataclass(frozen=True, slots=True)
class RunnableStep:
    """A step in the runnable queue: what it needs and which builds want it."""

    id: int
    req: Requirement
    builds: frozenset[int]
