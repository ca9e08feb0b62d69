"""The scheduler's values: venues as it sees them, active builds, a build's plan, and the
few constants and row conversions every part of it shares."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from bigtent import protocol as p
from bigtent.runner.scheduler.matching import Requirement, VenueView
from bigtent.runner.scheduler.reads import DrvInfo
from bigtent.runner.scheduler.steps import StepNode
from bigtent.states import BuildState, StepState

RUNNER_ACTOR = "runner"
"""The actor of what the runner does to a build on its own (build events)."""
INTERRUPTED_ADMISSION = (
    "the runner stopped while admitting this build; nobody cancelled it, and submitting it "
    "again (the client's retry does) builds it"
)

ACTIVE_STATES = [StepState.WAITING, StepState.RUNNABLE, StepState.ASSIGNED, StepState.BUILDING]
REDO_STATES = frozenset({StepState.FAILED, StepState.DEPENDENCY_FAILED, StepState.CANCELLED})
"""Finished without succeeding: a new build (outside the failure cache) or a restart queues
these again."""
MAX_LAST_ERROR_CHARS = 2000
"""A venue's last infrastructure error is kept (and stored) up to this long."""


AGENT = "agent"
"""``Venue.kind`` of a connected agent."""
SSH = "ssh"
"""``Venue.kind`` of an SSH remote builder (``bigtent.runner.venues.sshvenue``): used only for steps
no agent slot takes in the same pass."""


Kind = tuple[frozenset[str], frozenset[str], frozenset[str], bool, frozenset[str] | None]
"""What a venue can run and may take: its systems, supported and mandatory features, trust
and repositories."""


class SessionClosed(Exception):
    """The venue's connection is gone; the message was not sent."""


@dataclass(slots=True, eq=False)
class Venue:
    """A connected agent (or an SSH builder) as the scheduler sees it. ``send`` queues a
    message (never blocks)."""

    machine_id: str
    name: str
    systems: frozenset[str]
    supported_features: frozenset[str]
    mandatory_features: frozenset[str]
    max_jobs: int
    speed_factor: float
    send: Callable[[BaseModel], None]
    running: set[int] = field(default_factory=set)
    cooldown_until: float = 0.0
    backoff_until: float = 0.0
    consecutive_failures: int = 0
    last_error: str = ""
    """The last infrastructure failure's error (``health.shown_error`` shows it)."""
    draining: bool = False
    kind: str = AGENT
    """``AGENT`` or ``SSH``: agents are served first (architecture §1 venues)."""
    launch_id: str | None = None
    """The autoscaler launch the agent reported at register (docs/autoscaling.md)."""
    trusted: bool = True
    """A trusted venue takes trusted steps only, an untrusted one untrusted steps only."""
    repositories: frozenset[str] | None = None
    """Build repositories the venue serves (an OIDC agent's rule); None: any."""
    free_store_bytes: int | None = None
    """Free disk in the agent's store, as its last heartbeat said (None: not said)."""

    def view(self) -> VenueView:
        return VenueView(
            self.machine_id,
            self.systems,
            self.supported_features,
            self.mandatory_features,
            self.max_jobs,
            len(self.running),
            self.speed_factor,
            self.trusted,
            self.repositories,
        )

    def available(self, now: float) -> bool:
        return (
            not self.draining
            and self.cooldown_until <= now
            and self.backoff_until <= now
            and len(self.running) < self.max_jobs
        )


@dataclass(slots=True)
class ActiveBuild:
    id: int
    priority: int
    roots: dict[str, int | None]
    steps: set[int]
    state: BuildState
    unfinished: int = 0
    """Member steps not final yet: a build ends only when all of them are (keep going)."""
    repository: str | None = None
    """What the build is for: repository-scoped venues serve only their repositories."""
    trusted: bool = True


@dataclass(frozen=True, slots=True)
class PlanPart:
    """Part of a build's plan (``Scheduler.admit_build``)."""

    steps: Sequence[PlannedStep]
    """Dependencies first; each depends only on steps of this or earlier parts."""
    heights: Mapping[str, int]
    """Heights (``StepNode.height``) of .drv paths within the plan, as far as known: exact
    for the last part, an estimate (a lower bound) for leaves handed over early."""
    roots: dict[str, str | None] | None = None
    """Root .drv -> itself when it needs a step, None when cached; on the last part."""


@dataclass(frozen=True, slots=True)
class PlannedStep:
    """A derivation a new build needs built, with the derivations it depends on."""

    drv: DrvInfo
    deps: tuple[str, ...]
    """.drv paths of needed input derivations (those whose outputs are not available)."""


def kind_of(view: VenueView) -> Kind:
    return (
        view.systems,
        view.supported_features,
        view.mandatory_features,
        view.trusted,
        view.repositories,
    )


def new_node(sid: int, drv: DrvInfo, trusted: bool, now: float) -> StepNode:
    return StepNode(
        id=sid,
        drv_path=drv.drv_path,
        req=Requirement(drv.system, drv.required_features, trusted),
        state=StepState.WAITING,
        created_at=now,
        outputs=dict(drv.outputs),
    )


def node_from_row(row: Any) -> StepNode:
    return StepNode(
        id=int(row.id),
        drv_path=row.drv_path,
        req=Requirement(
            row.system, frozenset(json.loads(row.required_features)), bool(row.trusted)
        ),
        state=StepState(row.state),
        created_at=float(row.created_at),
        not_before=row.not_before,
        attempts=int(row.attempts),
        lease_id=row.lease_id,
        lease_expires_at=row.lease_expires_at,
        venue=row.agent_machine_id,
        outputs=json.loads(row.outputs),
    )


def send_aborts(aborts: Iterable[tuple[Venue, int]], reason: str) -> None:
    for venue, sid in aborts:
        try_send(venue, p.Abort(step_id=p.StepId(sid), reason=reason))


def try_send(venue: Venue, msg: BaseModel) -> bool:
    try:
        venue.send(msg)
    except SessionClosed:
        return False
    return True
