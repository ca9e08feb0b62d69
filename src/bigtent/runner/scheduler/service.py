"""The scheduler service: applies the pure decisions of ``steps``/``matching``/``leases`` to
the database, the connected venues and the build records.

Every transition is written to the database before its effect is sent, so a runner restart
rebuilds the same state (architecture §3). All methods run on the event loop; none blocks.

Trust (architecture §6, docs/security.md): every step is trusted or untrusted. A trusted build makes
and joins trusted steps only; an untrusted build makes untrusted steps, sharing live trusted
ones (``trust.untrusted_work``). One derivation has at most one active step of each trust
(``by_drv`` and ``untrusted_by_drv``). Matching sends trusted steps to trusted venues only and
untrusted steps to untrusted venues only, and a venue scoped to repositories (an OIDC agent)
only steps with a live build of one of them (the repositories of a step are those of its
builds, looked up when a scoped venue is free).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import logging
import random
import time
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Callable,
    Collection,
    Coroutine,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from bigtent import protocol as p
from bigtent.config import SchedulerSection
from bigtent.errors import Conflict, Unavailable
from bigtent.runner.db import queries
from bigtent.runner.db.notify import Change, ChangeFeed, LocalFeed, is_conflict, take_pending
from bigtent.runner.logs import LogStore
from bigtent.runner.metrics import Metrics
from bigtent.runner.scheduler import recovery
from bigtent.runner.scheduler.capacity import (
    assess,
    unmet_requirements,
    unsupported_error,
    waiting_reason,
)
from bigtent.runner.scheduler.health import allowed_jobs, became_unhealthy
from bigtent.runner.scheduler.leases import (
    Disposition,
    attempt_retry_at,
    backoff_secs,
    classify,
    is_cached_failure,
    new_lease_id,
    next_retry_at,
)
from bigtent.runner.scheduler.matching import Requirement, VenueView, can_run, has_room
from bigtent.runner.scheduler.steps import (
    Dispatch,
    RunnableIndex,
    Scope,
    StepNode,
    build_outcome,
    dependents_closure,
    plan_dispatch,
    plan_heights,
    raise_heights,
    restart_selection,
)
from bigtent.runner.scheduler.sync import LostRace, Seen, Stored, catch_up, waiting_verdict
from bigtent.runner.trust import untrusted_work
from bigtent.states import BuildEventKind, BuildState, StepState

log = logging.getLogger(__name__)

RUNNER_ACTOR = "runner"
"""The actor of what the runner does to a build on its own (build events)."""
INTERRUPTED_ADMISSION = (
    "the runner stopped while admitting this build; nobody cancelled it, and submitting it "
    "again (the client's retry does) builds it"
)

_ACTIVE_STATES = [StepState.WAITING, StepState.RUNNABLE, StepState.ASSIGNED, StepState.BUILDING]
_REDO_STATES = frozenset({StepState.FAILED, StepState.DEPENDENCY_FAILED, StepState.CANCELLED})
"""Finished without succeeding: a new build (outside the failure cache) or a restart queues
these again."""
_CACHED_MARK = "cached failure: "
_FIRST_ERROR = "; first error: "
_ERROR_PAUSE_SECS = 1.0
"""After a failed loop pass, wait this long (or until woken) before the next one."""
_RACE_ATTEMPTS = 5
"""How often a new build is tried when other runners keep changing the rows it needs."""
_CLAIM_ROUNDS = 4
"""Dispatch rounds per pass when another runner keeps claiming the chosen steps first."""
MAX_LAST_ERROR_CHARS = 2000
"""A venue's last infrastructure error is kept (and stored) up to this long."""
DISPATCH_CHUNK = 256
"""Decisions leased, written and sent together (one transaction per chunk)."""
ADMIT_CHUNK_FIRST = 500
ADMIT_CHUNK_MAX = 8000
"""A new build's steps are written in chunks growing from the first size to the largest
(one transaction each): the first is small, so its steps are dispatched soon; later ones
amortise their transaction."""
CAPACITY_LOOK_SECS = 1.0
"""While only the runnable steps changed (not the venues, no grace ended), waiting for
capacity is assessed again at most this often: a large queue no venue can take costs a scan
of its steps per look, not per pass."""
_EXPIRY_SLACK = 1024
"""Stale lease-expiry entries tolerated beyond twice the live leases before a rebuild."""
_T = TypeVar("_T")


AGENT = "agent"
"""``Venue.kind`` of a connected agent."""
SSH = "ssh"
"""``Venue.kind`` of an SSH remote builder (``bigtent.runner.sshvenue``): used only for steps
no agent slot takes in the same pass."""


_Kind = tuple[frozenset[str], frozenset[str], frozenset[str], bool, frozenset[str] | None]
"""What a venue can run and may take: its systems, supported and mandatory features, trust
and repositories."""


class _Same:
    """Sentinel: expect the lease the working copy has."""


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

    drv: queries.DrvInfo
    deps: tuple[str, ...]
    """.drv paths of needed input derivations (those whose outputs are not available)."""


class Scheduler:
    """Owns the working copy of the step DAG and the connected venues."""

    def __init__(
        self,
        engine: AsyncEngine,
        config: SchedulerSection,
        logs: LogStore,
        outputs_present: Callable[[Sequence[str]], Any],
        *,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        metrics: Metrics | None = None,
        untrusted_outputs_present: Callable[[Sequence[str]], Any] | None = None,
        feed: ChangeFeed | None = None,
    ) -> None:
        self.engine = engine
        self.config = config
        self.logs = logs
        self._outputs_present = outputs_present
        self._untrusted_outputs_present = untrusted_outputs_present
        """Paths the untrusted cache holds (an untrusted step's outputs land there)."""
        self.clock = clock
        self.rand = rand
        self.nodes: dict[int, StepNode] = {}
        self.by_drv: dict[str, int] = {}
        """Derivation -> its active trusted step."""
        self.untrusted_by_drv: dict[str, int] = {}
        """Derivation -> its active untrusted step."""
        self.index = RunnableIndex()
        self.delayed: list[tuple[float, int]] = []
        self.leases: dict[str, int] = {}
        self._expiries: list[tuple[float, int, str]] = []
        """Heap of (expiry, step id, lease id) of current leases; an entry whose lease is no
        longer current, or was renewed, is dropped or pushed again when it reaches the top."""
        self.venues: dict[str, Venue] = {}
        self._open: dict[_Kind, dict[str, Venue]] = {}
        """Venues that may have a free slot, by kind: a venue enters when it attaches or a
        slot is released, and leaves when a pass finds it full, draining or gone. A pass
        looks only at kinds that fit some waiting step, so idle venues cost nothing."""
        self._fits: dict[tuple[_Kind, Requirement], bool] = {}
        self._cooling_until: float | None = None
        """When the first venue that could take waiting work comes out of its cooldown or
        backoff (as of the last pass)."""
        self.builds: dict[int, ActiveBuild] = {}
        self._nothing_for: dict[Scope, int] = {}
        """Repository scopes whose scan found no step, and at which index version
        (``plan_dispatch``): idle OIDC agents cost no scan until a step is pushed."""
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._admission = asyncio.Lock()
        """One admission (or restart) at a time: steps are shared by .drv between builds."""
        self._incomplete: set[int] = set()
        """Builds being admitted in stages: not over before all their steps are in."""
        self.metrics = metrics if metrics is not None else Metrics()
        self.metrics.watch_steps(lambda: self.nodes.values())
        self.metrics.agents_without_room.set_function(self.agents_without_room)
        self.recovery: recovery.RecoveryFailure | None = None
        """Set while reloading from the database fails (the working copy is then empty):
        retried with backoff by ``run``, reported by ``/api/v1/status``, ``/metrics``, the
        dashboard and ``/healthz``."""
        self.work_listeners: list[Callable[[], None]] = []
        """Called when a step enters the runnable index (the autoscaler's wake-up)."""
        # Several runners on one database (PostgreSQL; docs/architecture.md).
        self.feed: ChangeFeed = feed if feed is not None else LocalFeed()
        """Announces this runner's changes to the others; ``notice`` hears theirs."""
        self._stale_steps: set[int] = set()
        self._stale_builds: set[int] = set()
        """Rows other runners changed (or claims this runner lost): read them again."""
        self._resync = False
        """Anything may have changed: reload everything."""
        self._stored_expiry: dict[int, float] = {}
        """Per leased step, the lease expiry the database has; renewals are stored once they
        are ``lease_secs / 3`` ahead of it (shared databases only)."""
        self._lost_here: set[int] = set()
        """Leases an agent here gave up when it reconnected: they expire now, whatever the
        database says."""
        # Waiting for capacity (runner/scheduler/capacity.py).
        self.launchable: list[Callable[[], Iterable[VenueView]]] = []
        """Venues that are not connected but could be launched for a step (the autoscaler's
        pools register theirs): capacity too. Register before the loop runs (or call
        ``capacity_changed``): offers are cached per change."""
        self.waiting_for_capacity: dict[int, float] = {}
        """Runnable step id -> since when no venue can take it (as of the last pass)."""
        self._capacity_deadline: float | None = None
        self._capacity_epoch = 0
        self._capacity_seen: tuple[int, int] | None = None
        """(capacity epoch, index version) of the last assessment: nothing to look at again
        until one of them moves or a grace ends."""
        self._capacity_looked_at = float("-inf")
        self._capacity_recheck: float | None = None
        """When a look put off by ``CAPACITY_LOOK_SECS`` is due."""
        self._offers: tuple[int, list[VenueView]] | None = None
        """``capacity_offers`` as of a capacity epoch: venues are looked at once per change."""

    # ---- start-up ----------------------------------------------------------------------------
    async def load(self, *, fresh_start: bool = True) -> None:
        """Rebuild the working state from the database (architecture §3: a restart loses nothing).

        Leased steps keep their leases for one more lease period, so agents that reconnect
        keep their work; the rest expire into infrastructure retries. On a fresh start no
        agent is connected yet, so every agent row is marked disconnected.
        """
        now = self.clock()
        async with self._begin() as conn:
            if fresh_start:
                await queries.mark_all_agents_disconnected(conn)
            rows = await queries.fetch_active_steps(conn, list(_ACTIVE_STATES))
            for row in rows:
                node = _node_from_row(row)
                if node.state.is_leased:
                    self._stored_expiry[node.id] = float(row.lease_expires_at or 0.0)
                    node.lease_expires_at = now + self.config.lease_secs
                    if node.lease_id:
                        self.leases[node.lease_id] = node.id
                        self._watch_lease(node)
                self.nodes[node.id] = node
                self._by_drv(node.req.trusted)[node.drv_path] = node.id
            for sid, dep in await queries.fetch_step_deps(conn, list(self.nodes)):
                if dep in self.nodes:
                    self.nodes[sid].deps.add(dep)
                    self.nodes[dep].dependents.add(sid)
            active = await queries.fetch_active_builds(conn)
            ids = [b.id for b in active]
            roots: dict[int, dict[str, int | None]] = {i: {} for i in ids}
            for r in await queries.fetch_all_build_roots(conn, ids):
                roots[r.build_id][r.drv_path] = r.step_id
            members: dict[int, set[int]] = {i: set() for i in ids}
            for b, s in await queries.fetch_build_step_ids(conn, ids):
                members[b].add(s)
            # Final roots of active builds must be known to decide when those builds end.
            final_roots = {s for r in roots.values() for s in r.values() if s is not None} - set(
                self.nodes
            )
            for row in await queries.fetch_steps_by_ids(conn, sorted(final_roots)):
                node = _node_from_row(row)
                self.nodes[node.id] = node
        for b in active:
            build = ActiveBuild(
                b.id,
                b.priority,
                roots[b.id],
                members[b.id],
                BuildState(b.state),
                repository=b.repository,
                trusted=bool(b.trusted),
            )
            self.builds[b.id] = build
            for sid in build.steps:
                member = self.nodes.get(sid)
                if member is not None:
                    member.builds.add(b.id)
                    member.priority = max(member.priority, build.priority)
                    build.unfinished += not member.state.is_final
        raise_heights(self.nodes, _topological_dependents_first(self.nodes))
        for node in self.nodes.values():
            if node.state is StepState.RUNNABLE:
                self._make_runnable(node, now)
        log.info(
            "scheduler loaded %d active steps (%d runnable, %d leased), %d active builds",
            len(self.by_drv) + len(self.untrusted_by_drv),
            len(self.index),
            len(self.leases),
            len(self.builds),
        )
        # Builds whose roots all finished while the runner was down are closed now. A build
        # without roots was being admitted in stages when the runner stopped: it is cancelled
        # (its client never got its id). Staged admission is only for a runner alone with its
        # database, so no other runner is admitting it.
        async with self._begin() as conn:
            for build in list(self.builds.values()):
                if not build.roots and build.id not in self._incomplete and not self.feed.shared:
                    log.warning(
                        "build %d was cut short while being admitted (the runner stopped): "
                        "cancelled as an interrupted admission",
                        build.id,
                    )
                    await self._cancel(conn, build, now)
                    await queries.insert_build_event(
                        conn,
                        build.id,
                        at=now,
                        kind=BuildEventKind.ADMISSION_INTERRUPTED,
                        actor=RUNNER_ACTOR,
                        detail=INTERRUPTED_ADMISSION,
                    )
                    continue
                await self._maybe_finish_build(conn, build, now)

    # ---- builds -------------------------------------------------------------------------------
    async def add_build(
        self,
        *,
        priority: int,
        created_by: str,
        roots: dict[str, str | None],
        planned: Sequence[PlannedStep],
        repository: str | None = None,
        ref: str | None = None,
        trusted: bool = True,
        submission_key: str | None = None,
    ) -> int:
        """Create a build whose root .drvs map to the planned step of that drv (None: cached),
        from a whole plan, in one transaction (``admit_build`` takes one in parts).

        One drv, one step of each trust: planned derivations that already have an active step
        of the build's trust join it; an untrusted build also shares live trusted steps
        (``trust.untrusted_work``). A derivation whose build failure is within the failure
        cache's TTL fails at once (its dependents with it); other finished steps that did not
        succeed are queued again.
        """
        async with self._admission, self._lock:

            async def body() -> int:
                now = self.clock()
                work, trust, shared = self._trust_plan(planned, roots, trusted)
                heights = plan_heights([(s.drv.drv_path, s.deps) for s in work])
                ids: dict[str, int] = {}
                async with self._begin() as conn:
                    build_id = await queries.insert_build(
                        conn,
                        state=BuildState.QUEUED,
                        priority=priority,
                        created_at=now,
                        created_by=created_by,
                        submission_key=submission_key,
                        repository=repository,
                        ref=ref,
                        trusted=trusted,
                    )
                    build = ActiveBuild(
                        build_id,
                        priority,
                        {},
                        set(),
                        BuildState.QUEUED,
                        repository=repository,
                        trusted=trusted,
                    )
                    self.builds[build_id] = build
                    fresh = await self._admit(
                        conn,
                        build_id,
                        work,
                        ids,
                        heights,
                        now,
                        new_members=True,
                        trust=trust,
                        shared=shared,
                    )
                    root_ids = {
                        drv: ids[step_drv] if step_drv is not None else None
                        for drv, step_drv in roots.items()
                    }
                    await queries.insert_build_roots(conn, build_id, root_ids)
                    build.roots = root_ids
                    self._recount(build)
                    await self._maybe_finish_build(conn, build, now)
                log.info(
                    "build %d: %d roots, %d steps (%d queued)",
                    build_id,
                    len(roots),
                    len(build.steps),
                    fresh,
                )
                self.wake()
                return build_id

            return await self._retrying(body)

    async def admit_build(
        self,
        *,
        priority: int,
        created_by: str,
        parts: AsyncIterable[PlanPart],
        repository: str | None = None,
        ref: str | None = None,
        trusted: bool = True,
        submission_key: str | None = None,
    ) -> int:
        """Create a build from a plan that arrives in parts (``runner.builds.plan_parts``).

        A trusted build on a runner alone with its database (SQLite) is admitted in stages:
        steps are written in chunks, each in its own transaction, as the parts arrive, so the
        first steps are dispatched while later ones are still being planned and written (a
        build of 100,000 steps starts at once). The build's roots are written last; until
        then the build cannot end. If the plan fails part way (an unknown derivation deep in
        the graph), the steps no other build needs are cancelled and the build is deleted. A
        build without roots is one whose admission was cut short by a stop of the runner: the
        next start cancels it (``load``).

        An untrusted build needs its whole plan to split it by trust (``_trust_plan``), and on
        a shared database (PostgreSQL, several runners) other runners must never see a build
        without its roots: both are admitted whole, in one transaction (``add_build``).
        """
        if self.feed.shared or not trusted:
            roots: dict[str, str | None] | None = None
            planned: list[PlannedStep] = []
            async for part in parts:
                planned.extend(part.steps)
                if part.roots is not None:
                    roots = part.roots
            if roots is None:
                raise ValueError("a build plan without roots")
            return await self.add_build(
                priority=priority,
                created_by=created_by,
                roots=roots,
                planned=planned,
                repository=repository,
                ref=ref,
                trusted=trusted,
                submission_key=submission_key,
            )
        async with self._admission:
            now = self.clock()
            build_id: int | None = None
            ids: dict[str, int] = {}
            trust: dict[str, bool] = {}
            roots = None
            fresh = 0
            size = ADMIT_CHUNK_FIRST
            try:
                async for part in parts:
                    if build_id is None:
                        build_id = await self._create_build(
                            priority, created_by, now, repository, ref, submission_key
                        )
                    if part.roots is not None:
                        roots = part.roots
                    start = 0
                    while start < len(part.steps):
                        chunk = part.steps[start : start + size]
                        start += len(chunk)
                        trust.update((s.drv.drv_path, True) for s in chunk)
                        async with self._lock:

                            async def stage(
                                build_id: int = build_id,
                                chunk: Sequence[PlannedStep] = chunk,
                                heights: Mapping[str, int] = part.heights,
                            ) -> int:
                                async with self._begin() as conn:
                                    return await self._admit(
                                        conn,
                                        build_id,
                                        chunk,
                                        ids,
                                        heights,
                                        now,
                                        new_members=True,
                                        trust=trust,
                                        shared=frozenset(),
                                    )

                            fresh += await self._guard(stage())
                        self.wake()
                        size = min(2 * size, ADMIT_CHUNK_MAX)
                if roots is None:
                    raise ValueError("a build plan without roots")
                if build_id is None:
                    build_id = await self._create_build(
                        priority, created_by, now, repository, ref, submission_key
                    )
                await self._finish_admission(build_id, roots, ids, now)
            except BaseException:
                if build_id is not None and build_id in self._incomplete:
                    self._incomplete.discard(build_id)
                    with contextlib.suppress(Exception):
                        await self._discard_build(build_id)
                raise
        log.info("build %d: %d roots, %d steps (%d queued)", build_id, len(roots), len(ids), fresh)
        self.wake()
        return build_id

    async def _create_build(
        self,
        priority: int,
        created_by: str,
        now: float,
        repository: str | None,
        ref: str | None,
        submission_key: str | None,
    ) -> int:
        """A trusted build's row, without roots yet (``_finish_admission`` writes them)."""
        async with self._lock:

            async def create() -> int:
                async with self._begin() as conn:
                    build_id = await queries.insert_build(
                        conn,
                        state=BuildState.QUEUED,
                        priority=priority,
                        created_at=now,
                        created_by=created_by,
                        submission_key=submission_key,
                        repository=repository,
                        ref=ref,
                        trusted=True,
                    )
                self.builds[build_id] = ActiveBuild(
                    build_id, priority, {}, set(), BuildState.QUEUED, repository=repository
                )
                self._incomplete.add(build_id)
                return build_id

            return await self._guard(create())

    async def _finish_admission(
        self, build_id: int, roots: dict[str, str | None], ids: dict[str, int], now: float
    ) -> None:
        """Write the roots: from now on the build ends when its steps do."""
        async with self._lock:

            async def finish() -> None:
                root_ids = {
                    drv: ids[step_drv] if step_drv is not None else None
                    for drv, step_drv in roots.items()
                }
                async with self._begin() as conn:
                    await queries.insert_build_roots(conn, build_id, root_ids)
                    self._incomplete.discard(build_id)
                    build = self.builds.get(build_id)
                    if build is not None:
                        build.roots = root_ids
                        self._recount(build)
                        await self._maybe_finish_build(conn, build, now)

            await self._guard(finish())

    async def _discard_build(self, build_id: int) -> None:
        """Undo a build whose plan failed part way: cancel the steps no other build needs
        and delete the build (its client got an error, never its id)."""
        async with self._lock:

            async def discard() -> None:
                now = self.clock()
                aborts: list[tuple[Venue, int]] = []
                async with self._begin() as conn:
                    build = self.builds.get(build_id)
                    if build is not None:
                        aborts = await self._cancel(conn, build, now)
                    await queries.delete_build(conn, build_id)
                _send_aborts(aborts, "cancelled")
                log.info("build %d discarded: its plan failed", build_id)

            await self._guard(discard())

    def _trust_plan(
        self, planned: Sequence[PlannedStep], roots: dict[str, str | None], trusted: bool
    ) -> tuple[list[PlannedStep], dict[str, bool], frozenset[str]]:
        """The steps a new build needs, the trust of each, and the live trusted ones it only
        shares (no edges are added to those: trusted steps depend on trusted steps only)."""
        if trusted:
            return list(planned), {s.drv.drv_path: True for s in planned}, frozenset()
        live = {
            s.drv.drv_path
            for s in planned
            if (node := self._node_of(s.drv.drv_path, True)) is not None
            and node.state not in _REDO_STATES
        }
        work = untrusted_work(
            {s.drv.drv_path: s.deps for s in planned},
            [d for d in roots.values() if d is not None],
            live,
        )
        kept = [s for s in planned if s.drv.drv_path in work.shared | work.own]
        return kept, {s.drv.drv_path: s.drv.drv_path in work.shared for s in kept}, work.shared

    def _by_drv(self, trusted: bool) -> dict[str, int]:
        return self.by_drv if trusted else self.untrusted_by_drv

    def _node_of(self, drv_path: str, trusted: bool) -> StepNode | None:
        sid = self._by_drv(trusted).get(drv_path)
        return self.nodes.get(sid) if sid is not None else None

    def _repositories_of(self, step_id: int) -> set[str | None]:
        """The repositories of the step's live builds (None for a build without one)."""
        node = self.nodes.get(step_id)
        if node is None:
            return set()
        return {self.builds[b].repository for b in node.builds if b in self.builds}

    async def restart_build(
        self,
        build_id: int,
        *,
        actor: str = RUNNER_ACTOR,
        roots: Collection[str] | None = None,
    ) -> bool:
        """Queue a build's failed, dependency-failed and cancelled steps again, clearing the
        cached failures of its failed steps, so they are rebuilt (``bigtent restart``).
        ``roots`` (the .drv paths of some of the build's roots): only the steps those roots
        need (``restart_selection``), so the build's other failed roots stay failed (a CI
        re-run of one job).

        The build becomes queued (running once a step is dispatched) until its steps end
        again. False when there is no such build.
        """
        async with self._admission, self._lock:

            async def body() -> bool:
                now = self.clock()
                async with self._begin() as conn:
                    row = await queries.fetch_build(conn, build_id)
                    if row is None:
                        return False
                    members = await queries.fetch_build_steps(conn, build_id)
                    build_roots = await queries.fetch_all_build_roots(conn, [build_id])
                    root_ids = {r.drv_path: r.step_id for r in build_roots}
                    member_ids = [int(m.id) for m in members]
                    if roots is not None:
                        named = [root_ids.get(d) for d in roots]
                        chosen = restart_selection(
                            {int(m.id): StepState(m.state) for m in members},
                            await queries.fetch_step_deps(conn, member_ids),
                            {int(s) for s in named if s is not None},
                        )
                        members = [m for m in members if int(m.id) in chosen]
                    redo = [m for m in members if m.state in _REDO_STATES]
                    if not redo:
                        return True
                    await queries.insert_build_event(
                        conn,
                        build_id,
                        at=now,
                        kind=BuildEventKind.RESTARTED,
                        actor=actor,
                        detail=f"{len(redo)} steps queued again",
                    )
                    await queries.update_steps(
                        conn,
                        [int(m.id) for m in redo if m.state == StepState.FAILED],
                        failed_at=None,
                    )
                    pending = [m for m in members if m.state != StepState.SUCCEEDED]
                    drvs = await queries.fetch_derivations(conn, [m.drv_path for m in pending])
                    by_id = {int(m.id): str(m.drv_path) for m in pending}
                    deps: dict[str, list[str]] = {d: [] for d in by_id.values()}
                    for s, d in await queries.fetch_step_deps(conn, list(by_id)):
                        if d in by_id:
                            deps[by_id[s]].append(by_id[d])
                    planned = [
                        PlannedStep(drvs[d], tuple(sorted(deps[d])))
                        for d in _dependencies_first(deps)
                    ]
                    # Every step keeps its trust: an untrusted build's shared trusted step
                    # runs again as the trusted step it is.
                    trust = {str(m.drv_path): bool(m.trusted) for m in pending}
                    build = self.builds.get(build_id)
                    if build is None:
                        await queries.update_build(
                            conn, build_id, state=BuildState.QUEUED, finished_at=None
                        )
                        build = ActiveBuild(
                            build_id,
                            int(row.priority),
                            root_ids,
                            set(member_ids),
                            BuildState.QUEUED,
                            repository=row.repository,
                            trusted=bool(row.trusted),
                        )
                        self.builds[build_id] = build
                    heights = plan_heights([(s.drv.drv_path, s.deps) for s in planned])
                    await self._admit(
                        conn,
                        build_id,
                        planned,
                        {},
                        heights,
                        now,
                        new_members=False,
                        trust=trust,
                        shared=frozenset(),
                    )
                    # Roots not restarted keep their ends, which decide the build's outcome.
                    final_roots = sorted(
                        {s for s in root_ids.values() if s is not None} - set(self.nodes)
                    )
                    for step_row in await queries.fetch_steps_by_ids(conn, final_roots):
                        node = _node_from_row(step_row)
                        self.nodes[node.id] = node
                        self._by_drv(node.req.trusted).setdefault(node.drv_path, node.id)
                        node.builds.add(build_id)
                    self._recount(build)
                    await self._maybe_finish_build(conn, build, now)
                log.info("build %d restarted: %d steps queued again", build_id, len(redo))
                self.wake()
                return True

            return await self._retrying(body)

    async def _admit(
        self,
        conn: AsyncConnection,
        build_id: int,
        planned: Sequence[PlannedStep],
        ids: dict[str, int],
        heights: Mapping[str, int],
        now: float,
        *,
        new_members: bool,
        trust: Mapping[str, bool],
        shared: frozenset[str],
    ) -> int:
        """Make ``planned`` (dependencies first) work of the active build ``build_id``: join
        active steps, fail cached failures at once, queue the rest. Dependencies outside
        ``planned`` were admitted by an earlier call of the same admission: ``ids`` maps
        their .drv paths to step ids, and gains this call's. ``heights`` are the steps'
        heights within the whole plan (``plan_heights``). ``new_members``: write the
        build's membership rows (a new build); otherwise they exist (a restart). ``trust``
        says which step (trusted or untrusted) each derivation uses; the ``shared`` ones are
        live trusted steps of an untrusted build, which get no new dependencies.

        Returns how many steps were queued. Other active builds holding a finished step that
        is queued again are not over after all: their counts are redone."""
        ttl = self.config.failure_cache_ttl_secs
        # Locked until commit: another runner cannot change these steps under this decision.
        existing = {
            tr: await queries.fetch_steps_by_drv(
                conn,
                [s.drv.drv_path for s in planned if trust[s.drv.drv_path] is tr],
                trusted=tr,
                lock=True,
            )
            for tr in (True, False)
        }
        fresh: list[StepNode] = []
        """Steps this build queues: new ones and finished ones queued again."""
        cached: list[StepNode] = []
        """Steps that fail at once as cached failures and were not in memory."""
        touched: list[StepNode] = []
        reopened: set[int] = set()
        inserts: dict[bool, list[queries.DrvInfo]] = {True: [], False: []}
        resets: list[dict[str, Any]] = []
        values: dict[str, Any] = dict(
            state=StepState.WAITING,
            created_at=now,
            not_before=None,
            attempts=0,
            lease_id=None,
            lease_expires_at=None,
            outcome=None,
            error=None,
            exit_code=None,
            finished_at=None,
            failed_at=None,
            started_at=None,
            assigned_at=None,
        )
        for item in planned:
            drv = item.drv
            tr = trust[drv.drv_path]
            node = self._node_of(drv.drv_path, tr)
            row = existing[tr].get(drv.drv_path)
            _check_admit_row(drv.drv_path, node, row)
            if node is not None and node.state not in _REDO_STATES:
                ids[drv.drv_path] = node.id
                touched.append(node)
                continue
            if (
                row is not None
                and row.state == StepState.FAILED
                and is_cached_failure(row.outcome, row.failed_at, now, ttl)
            ):
                sid = int(row.id)
                ids[drv.drv_path] = sid
                # Recorded for this build; the step's row stays the attempt that ran.
                await queries.insert_cached_failure_hit(
                    conn,
                    build_id,
                    sid,
                    hit_at=now,
                    failed_at=float(row.failed_at),
                    failed_outcome=str(row.outcome),
                    cached_until=float(row.failed_at) + ttl,
                )
                log.info("step %d (%s) is a cached failure", sid, drv.drv_path)
                if node is None:
                    cached.append(
                        StepNode(
                            id=sid,
                            drv_path=drv.drv_path,
                            req=Requirement(drv.system, drv.required_features, tr),
                            state=StepState.FAILED,
                            created_at=float(row.created_at),
                            outputs=dict(drv.outputs),
                        )
                    )
                else:
                    touched.append(node)
                continue
            if row is None:
                inserts[tr].append(drv)
                continue
            sid = int(row.id)
            resets.append({"id": sid, **values})
            self.logs.reset(sid)  # a fresh run, not a retry: a fresh log
            ids[drv.drv_path] = sid
            if node is not None:
                # A finished step still held by an active build runs again in place.
                reopened |= node.builds
                node.state = StepState.WAITING
                node.created_at = now
                node.deps.clear()
                node.not_before = None
                node.attempts = 0
                node.venue = None
            else:
                node = _new_node(sid, drv, tr, now)
            fresh.append(node)
        await queries.update_steps_each(conn, resets)
        if inserts[True] or inserts[False]:
            for tr, new in inserts.items():
                new_ids = await queries.insert_steps(
                    conn, [{"drv_path": d.drv_path, "trusted": tr, **values} for d in new]
                )
                for drv in new:
                    sid_new = new_ids.get(drv.drv_path)
                    if sid_new is None:
                        raise LostRace(f"another runner created the step of {drv.drv_path}")
                    ids[drv.drv_path] = sid_new
                    fresh.append(_new_node(sid_new, drv, tr, now))
            # Dependencies first, as planned: failures below fail what is above.
            position = {item.drv.drv_path: i for i, item in enumerate(planned)}
            fresh.sort(key=lambda n: position[n.drv_path])
        pairs = [
            (ids[item.drv.drv_path], ids[d])
            for item in planned
            if item.drv.drv_path not in shared
            for d in item.deps
            # architecture §6: a trusted step never waits for (or uses) an untrusted one.
            if not (trust[item.drv.drv_path] and not trust[d])
        ]
        await queries.insert_step_deps(conn, pairs)
        chunk_ids = [ids[item.drv.drv_path] for item in planned]
        if new_members:
            await queries.insert_build_steps(conn, build_id, chunk_ids)
        for node in fresh + cached:
            self.nodes[node.id] = node
            self._by_drv(node.req.trusted)[node.drv_path] = node.id
        # A dependency admitted earlier may have finished and left memory meanwhile (only
        # after a reload): its row says whether it succeeded.
        gone = sorted({d for _, d in pairs if d not in self.nodes})
        for row in await queries.fetch_steps_by_ids(conn, gone):
            node = _node_from_row(row)
            self.nodes[node.id] = node
            self._by_drv(node.req.trusted).setdefault(node.drv_path, node.id)
        for s, d in pairs:
            dep, node = self.nodes[d], self.nodes[s]
            # A step that already runs (or ran) keeps the dependencies it started with:
            # no edge, so a later failure of the new dependency cannot fail it.
            if node.state is not StepState.WAITING:
                continue
            if dep.state is not StepState.SUCCEEDED:
                node.deps.add(d)
            dep.dependents.add(s)
        build = self.builds[build_id]
        build.steps.update(chunk_ids)
        for sid in chunk_ids:
            member = self.nodes.get(sid)
            if member is not None:
                member.builds.add(build_id)
                member.priority = max(member.priority, build.priority)
        # Queued steps whose dependencies failed fail at once; the others wait or run.
        runnable: list[StepNode] = []
        failed_rows: list[dict[str, Any]] = []
        for node in fresh:
            failed_dep = next(
                (
                    self.nodes[d]
                    for d in sorted(node.deps)
                    if self.nodes[d].state
                    in (StepState.FAILED, StepState.DEPENDENCY_FAILED, StepState.CANCELLED)
                ),
                None,
            )
            if failed_dep is not None:
                node.state = StepState.DEPENDENCY_FAILED
                failed_rows.append(
                    {
                        "id": node.id,
                        "state": node.state,
                        "finished_at": now,
                        "error": f"dependency {failed_dep.drv_path} failed",
                    }
                )
            elif not node.deps:
                runnable.append(node)
        await queries.update_steps_each(conn, failed_rows)
        for node in runnable:
            node.state = StepState.RUNNABLE
            self.metrics.step_runnable(node, now)
        await queries.update_steps(conn, [n.id for n in runnable], state=StepState.RUNNABLE)
        # Heights within the plan first (so dependents admitted later count already), for
        # these steps and their dependencies (a leaf admitted early had only an estimate);
        # then with every active build's dependents.
        raised: list[StepNode] = []
        for sid in sorted(set(chunk_ids).union(d for _, d in pairs)):
            member = self.nodes.get(sid)
            if member is not None and heights.get(member.drv_path, 0) > member.height:
                member.height = heights[member.drv_path]
                raised.append(member)
        order = (
            [n.id for n in reversed(fresh)]
            + [n.id for n in touched + cached]
            + [d for n in raised for d in sorted(n.deps)]
        )
        rekey = raise_heights(self.nodes, order) | {n.id for n in fresh + touched + raised}
        for sid in sorted(rekey):
            node = self.nodes[sid]
            if node.state is StepState.RUNNABLE:
                self._make_runnable(node, now)
        for bid in sorted(reopened - {build_id}):
            other = self.builds.get(bid)
            if other is not None:
                self._recount(other)
        return len(fresh)

    def _recount(self, build: ActiveBuild) -> None:
        """Count the build's member steps that are not final yet."""
        build.unfinished = sum(
            1 for sid in build.steps if sid in self.nodes and not self.nodes[sid].state.is_final
        )

    async def cancel_build(self, build_id: int, *, actor: str = RUNNER_ACTOR) -> bool:
        """Cancel a build: its steps that no other active build needs stop or never start.
        Recorded as a build event by ``actor`` in the same transaction."""
        async with self._lock:

            async def body() -> bool:
                build = self.builds.get(build_id)
                if build is None or build_id in self._incomplete:
                    return False
                now = self.clock()
                async with self._begin() as conn:
                    aborts = await self._cancel(conn, build, now)
                    await queries.insert_build_event(
                        conn, build_id, at=now, kind=BuildEventKind.CANCELLED, actor=actor
                    )
                _send_aborts(aborts, "cancelled")
                self.wake()
                return True

            return await self._retrying(body)

    async def _cancel(
        self, conn: AsyncConnection, build: ActiveBuild, now: float
    ) -> list[tuple[Venue, int]]:
        """Cancel the build and its steps no other active build needs (their rows checked
        first: ``_expect``). Returns the venues to tell to abort, once committed."""
        victims = [
            node
            for sid in sorted(build.steps)
            if (node := self.nodes.get(sid)) is not None
            and not node.state.is_final
            and not any(b != build.id for b in node.builds if b in self.builds)
        ]
        aborts: list[tuple[Venue, int]] = []
        await self._expect(conn, victims)
        for node in victims:
            sid = node.id
            if node.state.is_leased:
                venue = self.venues.get(node.venue or "")
                if venue is not None:
                    aborts.append((venue, sid))
                await self._record_attempt(
                    conn,
                    node,
                    node.attempts + 1,
                    p.Outcome.ABORTED,
                    "cancelled",
                    now,
                    leased=True,
                )
            self._release(node)
            self.logs.close(sid)
            node.state = StepState.CANCELLED
            await queries.update_step(
                conn,
                sid,
                state=node.state,
                finished_at=now,
                lease_id=None,
                lease_expires_at=None,
            )
        build.state = BuildState.CANCELLED
        await queries.finish_build(conn, build.id, build.state, finished_at=now)
        self._forget_build(build)
        return aborts

    async def record_build_event(
        self, build_id: int, kind: BuildEventKind, *, actor: str, detail: str | None = None
    ) -> None:
        """Record an event of a build that changes nothing in the scheduler's memory."""
        async with self._begin() as conn:
            await queries.insert_build_event(
                conn, build_id, at=self.clock(), kind=kind, actor=actor, detail=detail
            )

    async def bump_build(self, build_id: int, priority: int, *, actor: str = RUNNER_ACTOR) -> bool:
        """Set an active build's priority (its steps' rise with it), recorded as a build event
        by ``actor`` in the same transaction."""
        async with self._lock:

            async def body() -> bool:
                build = self.builds.get(build_id)
                if build is None:
                    return False
                now = self.clock()
                async with self._begin() as conn:
                    await queries.update_build(conn, build_id, priority=priority)
                    await queries.insert_build_event(
                        conn,
                        build_id,
                        at=now,
                        kind=BuildEventKind.BUMPED,
                        actor=actor,
                        detail=f"priority {build.priority} -> {priority}",
                    )
                build.priority = priority
                for sid in build.steps:
                    node = self.nodes.get(sid)
                    if node is not None and priority > node.priority:
                        node.priority = priority
                        if node.state is StepState.RUNNABLE:
                            self._make_runnable(node, now)
                self.wake()
                return True

            return await self._guard(body())

    # ---- venues -------------------------------------------------------------------------------
    def attach(self, venue: Venue, running: Sequence[p.RunningStep]) -> list[p.StepId]:
        """A venue (re)connected. Returns the reported running steps whose leases it keeps;
        its other leases are lost at once (it no longer runs them)."""
        now = self.clock()
        self.venues[venue.machine_id] = venue
        self._reopen(venue)
        self._cooled(venue)
        self._capacity_epoch += 1
        kept: list[p.StepId] = []
        for item in running:
            node = self.nodes.get(item.step_id)
            if (
                node is not None
                and node.state.is_leased
                and node.lease_id == item.lease_id
                and node.venue == venue.machine_id
            ):
                node.lease_expires_at = now + self.config.lease_secs
                venue.running.add(node.id)
                kept.append(item.step_id)
        lost = [
            n
            for n in self._leased()
            if n.state.is_leased and n.venue == venue.machine_id and n.id not in venue.running
        ]
        for node in lost:
            node.lease_expires_at = now  # expires on the next pass: an infrastructure retry
            self._lost_here.add(node.id)
            self._watch_lease(node)
        self.wake()
        return kept

    def forfeit(self, venue: Venue) -> int:
        """After ``detach``: the venue's session ended because it broke the protocol (a
        message out of range, say). Its word is worth nothing, so its leases are not kept for
        a return: they expire at the next pass (an infrastructure retry, counted against the
        venue), unless a newer session of the same machine took over. Returns how many."""
        if venue.machine_id in self.venues:
            return 0
        now = self.clock()
        lost = [n for n in self._leased() if n.state.is_leased and n.venue == venue.machine_id]
        for node in lost:
            node.lease_expires_at = now
            self._lost_here.add(node.id)
            self._watch_lease(node)
        if lost:
            self.wake()
        return len(lost)

    def detach(self, venue: Venue) -> None:
        """A venue's connection ended. Its leases live on until they expire (it may return)."""
        if self.venues.get(venue.machine_id) is venue:
            del self.venues[venue.machine_id]
            self.capacity_changed()

    async def release_unaccepted(self, venue: Venue) -> None:
        """After ``detach``: steps assigned to the departed venue that it never accepted go
        back to the queue at once (it never started them), unless a newer session of the same
        machine took over (its own ``attach`` decided about them). Accepted steps keep their
        leases until they expire: the agent may come back still running them."""
        async with self._lock:
            if venue.machine_id in self.venues:
                return
            unaccepted = [
                n
                for n in self._leased()
                if n.state is StepState.ASSIGNED
                and n.venue == venue.machine_id
                and n.id in venue.running
            ]
            now = self.clock()
            for node in unaccepted:
                log.info("step %d was never accepted by %s; queued again", node.id, venue.name)
                with contextlib.suppress(LostRace):
                    await self._guard(self._give_back(node, venue, now))
            if unaccepted:
                self.wake()

    def drain(self, machine_id: str) -> bool:
        venue = self.venues.get(machine_id)
        if venue is None:
            return False
        venue.draining = True
        _try_send(venue, p.Drain(reason="drain requested"))
        self.capacity_changed()
        return True

    def heartbeat(self, venue: Venue, running: Iterable[int]) -> None:
        """architecture §3: heartbeats renew the leases of the steps the agent reports running."""
        expires = self.clock() + self.config.lease_secs
        store = False
        for sid in running:
            node = self.nodes.get(sid)
            if node is not None and node.state.is_leased and node.venue == venue.machine_id:
                node.lease_expires_at = expires
                store = store or self._renewal_due(node)
        if store and self.feed.shared:
            self.wake()  # the loop stores it, so other runners see the lease is alive

    def step_active(self, step_id: int) -> bool:
        """Whether a step is in the working copy and not final (its log may still grow)."""
        node = self.nodes.get(step_id)
        return node is not None and not node.state.is_final

    def agents_without_room(self) -> int:
        """Connected venues held back by ``scheduler.min_free_store_bytes`` (a metric)."""
        minimum = self.config.min_free_store_bytes
        return sum(not has_room(v.free_store_bytes, minimum) for v in self.venues.values())

    def disk_report(self, venue: Venue, free_store_bytes: int | None) -> None:
        """Note the free disk a heartbeat reported. A venue below
        ``scheduler.min_free_store_bytes`` gets no new steps (``has_room``) until it reports
        enough again (its own collection freed some, or its steps' outputs were removed)."""
        minimum = self.config.min_free_store_bytes
        had = has_room(venue.free_store_bytes, minimum)
        venue.free_store_bytes = free_store_bytes
        if has_room(free_store_bytes, minimum) == had:
            return
        if had:
            log.warning(
                "%s has %d bytes free in its store, below scheduler.min_free_store_bytes %d: "
                "no new steps until it has room",
                venue.name,
                free_store_bytes or 0,
                minimum,
            )
        else:
            log.info(
                "%s has room in its store again (%d bytes free)", venue.name, free_store_bytes or 0
            )
            self._reopen(venue)
            self.wake()

    def lease_holder(self, lease_id: str) -> StepNode | None:
        """The step a current lease is for, or None when the lease is unknown or over."""
        sid = self.leases.get(lease_id)
        node = self.nodes.get(sid) if sid is not None else None
        if node is None or node.lease_id != lease_id or not node.state.is_leased:
            return None
        return node

    # ---- messages from venues --------------------------------------------------------------
    async def accepted(self, venue: Venue, msg: p.Accepted) -> None:
        async with self._lock:

            async def body() -> None:
                node = self.nodes.get(msg.step_id)
                if node is None or node.lease_id != msg.lease_id:
                    return
                if node.state is not StepState.ASSIGNED:
                    return
                async with self._begin() as conn:
                    await self._expect(conn, [node])
                    node.state = StepState.BUILDING
                    self.metrics.step_accepted(node, self.clock())
                    await queries.update_step(
                        conn, node.id, state=node.state, started_at=self.clock()
                    )

            with contextlib.suppress(LostRace):
                await self._guard(body())

    async def refused(self, venue: Venue, msg: p.Refused) -> None:
        async with self._lock:
            with contextlib.suppress(LostRace):
                await self._guard(self._refused(venue, msg))

    async def _refused(self, venue: Venue, msg: p.Refused) -> None:
        node = self.nodes.get(msg.step_id)
        if node is None or node.lease_id != msg.lease_id or not node.state.is_leased:
            return
        log.info("%s refused step %d: %s", venue.name, node.id, msg.reason)
        await self._give_back(node, venue, self.clock())
        self.wake()

    async def _give_back(self, node: StepNode, venue: Venue, now: float) -> None:
        """architecture §5: a refusal or a failed send releases the slot, cools the venue down and
        makes the step runnable again, as if it had never been assigned."""
        venue.cooldown_until = now + self.config.refuse_cooldown_secs
        self._cooled(venue)
        async with self._begin() as conn:
            await self._expect(conn, [node])
            self._release(node)
            node.state = StepState.RUNNABLE
            self.metrics.step_requeued(node, now)
            await queries.update_step(
                conn,
                node.id,
                state=node.state,
                lease_id=None,
                lease_expires_at=None,
                agent_machine_id=None,
            )
        self._make_runnable(node, now)

    def log_lines(self, venue: Venue, msg: p.Log) -> None:
        node = self.nodes.get(msg.step_id)
        if node is not None and node.lease_id == msg.lease_id and node.venue == venue.machine_id:
            self.logs.append(node.id, msg.lines)

    async def result(self, venue: Venue, msg: p.Result) -> bool:
        """Record a step's result. Returns False when its lease is no longer current: the
        result is acknowledged and ignored, so a step finishes exactly once (architecture §3)."""
        async with self._lock:

            async def body() -> bool:
                node = self.nodes.get(msg.step_id)
                if node is None or node.lease_id != msg.lease_id or not node.state.is_leased:
                    log.info("ignoring result for step %s with a stale lease", msg.step_id)
                    return False
                outcome, error = msg.outcome, msg.error
                if outcome is p.Outcome.UNSUPPORTED:  # the runner's verdict, not an agent's
                    outcome, error = p.Outcome.PREPARE_FAILURE, f"agent said unsupported: {error}"
                if outcome is p.Outcome.SUCCESS:
                    present = await self._present(node, list(node.outputs.values()))
                    missing = sorted(set(node.outputs.values()) - set(present))
                    if missing:
                        outcome = p.Outcome.UPLOAD_FAILURE
                        error = "outputs not uploaded: " + ", ".join(missing)
                await self._finish_attempt(node, venue, outcome, error, msg, self.clock())
                return True

            try:
                return await self._guard(body())
            except LostRace:
                log.info("ignoring result for step %s: another runner moved it on", msg.step_id)
                return False

    async def _present(self, node: StepNode, paths: list[str]) -> set[str]:
        """Which outputs of ``node`` are published: in the main cache, or for an untrusted
        step also in the untrusted cache."""
        found = set(await self._outputs_present(paths))
        if not node.req.trusted and self._untrusted_outputs_present is not None:
            found |= set(
                await self._untrusted_outputs_present([x for x in paths if x not in found])
            )
        return found

    # ---- the loop --------------------------------------------------------------------------
    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Dispatch forever: one ``tick`` at a time, then sleep until woken or until the
        next deadline. A failed pass is logged and retried: one database error must not stop
        all dispatching (leases assigned in a failed pass simply expire)."""
        while True:
            self._wake.clear()
            wake_at: float | None
            try:
                if self.recovery is not None:
                    # The working copy is empty: no pass until a reload succeeds.
                    if recovery.due(self.recovery, self.clock()):
                        async with self._lock:
                            await self.recover()
                    wake_at = self.clock() if self.recovery is None else self.recovery.retry_at
                else:
                    wake_at = await self.tick(self.clock())
            except LostRace as exc:
                # Memory may be ahead of the database (the pass changed it before the check
                # failed): the database is the record.
                log.info("another runner changed a step first (%s); reloading", exc)
                wake_at = self.clock()
                with contextlib.suppress(Exception):  # a failure is in self.recovery
                    async with self._lock:
                        await self.recover(quiet=True)
            except Exception:
                if self.recovery is not None:
                    wake_at = self.recovery.retry_at  # recover logged it
                else:
                    log.exception(
                        "scheduler pass failed; trying again in %.0f s", _ERROR_PAUSE_SECS
                    )
                    wake_at = self.clock() + _ERROR_PAUSE_SECS
                    with contextlib.suppress(Exception):  # a failure is in self.recovery
                        async with self._lock:
                            await self.recover()
                if self.recovery is not None:
                    wake_at = self.recovery.retry_at
            timeout = None if wake_at is None else max(0.0, wake_at - self.clock())
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation
            # that arrives as the event is set, and the loop would not stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    async def recover(self, *, quiet: bool = False) -> None:
        """Rebuild the working state from the database, as at start (the caller holds the
        lock). After a failed transaction memory may be ahead of the database; the database
        is the record, so memory is thrown away and reloaded. Connected venues stay.
        ``quiet``: an expected reload (another runner's changes may have been missed).

        If the reload fails, the failure is kept in ``self.recovery`` (and re-raised): ``run``
        tries again with backoff, and transitions are refused meanwhile."""
        try:
            await self._reload(quiet=quiet)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError | GeneratorExit):
                raise
            self.recovery = recovery.failed(self.recovery, recovery.describe(exc), self.clock())
            self.metrics.scheduler_recovery(self.recovery)
            log.error(
                "scheduler state could not be reloaded from the database (failure %d); "
                "trying again in %.1f s: %s",
                self.recovery.failures,
                self.recovery.retry_at - self.clock(),
                self.recovery.error,
            )
            self.wake()  # the loop now waits for the retry, not for work
            raise
        if self.recovery is not None:
            log.warning(
                "scheduler state reloaded from the database after %d failed attempts",
                self.recovery.failures,
            )
            self.recovery = None
            self.metrics.scheduler_recovery(None)

    async def _reload(self, *, quiet: bool) -> None:
        venues = self.venues
        self.nodes, self.by_drv, self.leases, self.builds = {}, {}, {}, {}
        self.untrusted_by_drv = {}
        self._expiries = []
        self.index, self.delayed = RunnableIndex(), []
        self._open = {}
        self._nothing_for = {}
        self._stored_expiry, self._lost_here = {}, set()
        self._stale_steps, self._stale_builds, self._resync = set(), set(), False
        self._capacity_seen = None  # a new index: look again (the waits keep their starts)
        for connected in venues.values():
            connected.running.clear()
            self._reopen(connected)
        await self.load(fresh_start=False)
        for node in self._leased():
            holder = venues.get(node.venue or "")
            if holder is not None:
                holder.running.add(node.id)
        if quiet:
            log.info("scheduler state reloaded from the database")
        else:
            log.warning("scheduler state reloaded from the database")
        self.wake()

    async def _guard(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run a transition (lock held), after catching up with other runners; if it fails,
        reload from the database and re-raise. While reloading fails (``self.recovery``) the
        working copy is empty: the transition is refused (503) before it starts."""
        if self.recovery is not None:
            coro.close()
            raise Unavailable(
                "the scheduler is reloading its state from the database; try again later",
                detail=recovery.problem(self.recovery),
            )
        try:
            await self._catch_up()
            return await coro
        except BaseException as exc:
            coro.close()  # never started if catching up failed
            if isinstance(exc, asyncio.CancelledError | GeneratorExit):
                raise
            lost = isinstance(exc, LostRace)
            if lost:
                log.info("another runner changed a step first (%s); reloading", exc)
            else:
                log.exception("scheduler transition failed; reloading state from the database")
            try:
                await self.recover(quiet=lost)
            except Exception as failed:
                raise Unavailable(
                    "the scheduler is reloading its state from the database; try again later",
                    detail=recovery.problem(self.recovery),
                ) from failed
            raise

    async def _retrying(self, body: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
        """``_guard(body())``, again (after reloading) when another runner won a race."""
        for _attempt in range(_RACE_ATTEMPTS - 1):
            with contextlib.suppress(LostRace):
                return await self._guard(body())
        try:
            return await self._guard(body())
        except LostRace as exc:
            raise Conflict("other runners kept changing the same steps; try again") from exc

    async def tick(self, now: float) -> float | None:
        """One pass of the loop at time ``now``: expire leases, release due retries, match
        work to free slots. Returns when the next pass is due (None: only when woken)."""
        async with self._lock:
            await self._catch_up()
            await self._store_renewals()
            await self._expire_leases(now)
            self._promote_delayed(now)
            for _round in range(_CLAIM_ROUNDS):
                if not await self._dispatch(now):
                    break
                await self._catch_up()  # claims lost to another runner: read, then plan again
            await self._assess_capacity(now)
            return self._next_deadline(now)

    def _next_deadline(self, now: float) -> float | None:
        self._file_expiries()
        times = [self._expiries[0][0]] if self._expiries else []
        if self.delayed:
            times.append(self.delayed[0][0])
        if len(self.index) and self._cooling_until is not None and self._cooling_until > now:
            times.append(self._cooling_until)
        if self._capacity_deadline is not None:
            times.append(self._capacity_deadline)
        if self._capacity_recheck is not None:
            times.append(self._capacity_recheck)
        return min(times) if times else None

    # ---- waiting for capacity ----------------------------------------------------------------
    def capacity_changed(self) -> None:
        """The venues that count as capacity changed (one attached, left, drains, or its
        health changed): the next pass assesses the waiting steps again."""
        self._capacity_epoch += 1
        self.wake()

    def takes_work(self, venue: Venue) -> bool:
        """Whether a connected venue counts as capacity: one that may be given new work some
        time (not draining). Load, cooldown and backoff do not matter: they pass."""
        return not venue.draining

    def capacity_offers(self) -> list[VenueView]:
        """One view per kind of venue that counts as capacity: connected agents and SSH
        builders that take work (``takes_work``) and what ``launchable`` could launch."""
        if self._offers is not None and self._offers[0] == self._capacity_epoch:
            return self._offers[1]
        kinds: dict[_Kind, VenueView] = {}
        for venue in self.venues.values():
            if self.takes_work(venue):
                view = venue.view()
                kinds.setdefault(_kind_of(view), view)
        for offers in self.launchable:
            for view in offers():
                kinds.setdefault(_kind_of(view), view)
        self._offers = (self._capacity_epoch, list(kinds.values()))
        return self._offers[1]

    def capacity_waiting(self) -> dict[int, float]:
        """The runnable steps waiting for capacity and since when (as of the last pass)."""
        return {sid: since for sid, since in self.waiting_for_capacity.items() if sid in self.index}

    def waiting_reason(self, step_id: int) -> str | None:
        """Why a runnable step waits, when it waits for capacity (else None)."""
        node = self.nodes.get(step_id)
        if node is None or step_id not in self.index or step_id not in self.waiting_for_capacity:
            return None
        return waiting_reason(node.req)

    async def _assess_capacity(self, now: float) -> None:
        """Find the runnable steps no venue can take (``capacity.assess``) and fail those that
        waited past ``scheduler.capacity_grace_secs`` as ``unsupported``; their dependents
        fail as after any failure. Looks again only when the venues or the runnable steps
        changed, or a grace ends."""
        seen = (self._capacity_epoch, self.index.version)
        due = self._capacity_deadline is not None and self._capacity_deadline <= now
        if seen == self._capacity_seen and not due:
            return
        offers = self.capacity_offers()
        unmet = unmet_requirements(self.index.requirements(), offers)
        same_venues = self._capacity_seen is not None and self._capacity_seen[0] == seen[0]
        if (
            unmet
            and same_venues
            and not due
            and now < self._capacity_looked_at + CAPACITY_LOOK_SECS
        ):
            # Steps may have started waiting, but looking costs a scan of their buckets.
            self._capacity_recheck = self._capacity_looked_at + CAPACITY_LOOK_SECS
            return
        self._capacity_recheck = None
        self._capacity_looked_at = now
        verdict = assess(
            unmet,
            lambda req: [sid for _, sid in self.index.entries(req)],
            offers,
            self._repositories_of,
            self.waiting_for_capacity,
            now,
            self.config.capacity_grace_secs,
        )
        for sid in sorted(verdict.waiting.keys() - self.waiting_for_capacity.keys()):
            started = self.nodes[sid]
            log.warning("step %d (%s): %s", sid, started.drv_path, waiting_reason(started.req))
        self.waiting_for_capacity = verdict.waiting
        self._capacity_deadline = verdict.next_deadline
        self._capacity_seen = seen
        for sid in verdict.unsupported:
            node = self.nodes.get(sid)
            since = self.waiting_for_capacity.pop(sid)
            if node is None or sid not in self.index:
                continue
            error = unsupported_error(node.req, now - since)
            log.warning("step %d (%s) fails: %s", sid, node.drv_path, error)
            await self._finish_attempt(node, None, p.Outcome.UNSUPPORTED, error, None, now)

    def _leased(self) -> list[StepNode]:
        return [self.nodes[s] for s in self.leases.values() if s in self.nodes]

    def _watch_lease(self, node: StepNode) -> None:
        """File a lease's expiry (after it was granted, learned, or moved earlier)."""
        if node.lease_id is None or node.lease_expires_at is None:
            return
        heapq.heappush(self._expiries, (node.lease_expires_at, node.id, node.lease_id))
        if len(self._expiries) > 2 * len(self.leases) + _EXPIRY_SLACK:
            # Mostly entries of leases that ended: rebuild from the current ones.
            self._expiries = [
                (n.lease_expires_at, n.id, n.lease_id)
                for n in self._leased()
                if n.lease_id is not None and n.lease_expires_at is not None
            ]
            heapq.heapify(self._expiries)

    def _file_expiries(self) -> None:
        """Bring the heap's first entry up to date: drop entries of leases that ended and
        re-file renewed ones, until the first is a current lease's expiry."""
        while self._expiries:
            at, sid, lease = self._expiries[0]
            node = self.nodes.get(sid)
            if node is None or node.lease_id != lease or not node.state.is_leased:
                heapq.heappop(self._expiries)  # the lease ended
            elif node.lease_expires_at is not None and node.lease_expires_at != at:
                heapq.heapreplace(self._expiries, (node.lease_expires_at, sid, lease))
            else:
                return

    async def _expire_leases(self, now: float) -> None:
        """Expire the leases due by ``now``: only the due end of the heap is looked at. On a
        shared database a lease expires only when the database agrees (another runner may
        have renewed it)."""
        due: dict[int, StepNode] = {}
        """A lease may have several entries (re-filed when moved earlier): once each."""
        while True:
            self._file_expiries()
            if not self._expiries or self._expiries[0][0] > now:
                break
            _, sid, _ = heapq.heappop(self._expiries)
            due[sid] = self.nodes[sid]
        checked = (
            await self._expired_in_database(list(due.values()), now)
            if due and self.feed.shared
            else set()
        )
        for node in due.values():
            if node.lease_id is None or not node.state.is_leased:
                continue
            if self.feed.shared and node.id not in checked and node.id not in self._lost_here:
                self._watch_lease(node)  # renewed elsewhere, or read again: still watched
                continue
            venue = self.venues.get(node.venue or "")
            log.warning("lease of step %d on %s expired", node.id, node.venue)
            if venue is not None:
                _try_send(venue, p.Abort(step_id=p.StepId(node.id), reason="lease expired"))
            await self._finish_attempt(
                node,
                venue,
                p.Outcome.AGENT_LOST,
                "lease expired: the agent stopped reporting it",
                None,
                now,
                expired_by=now if node.id in checked else None,
            )

    def _promote_delayed(self, now: float) -> None:
        while self.delayed and self.delayed[0][0] <= now:
            _, sid = heapq.heappop(self.delayed)
            node = self.nodes.get(sid)
            # Entries are never removed early: skip steps that left the queue, and duplicates
            # of a step already promoted (its not_before is cleared then).
            if (
                node is not None
                and node.state is StepState.RUNNABLE
                and node.not_before is not None
                and node.not_before <= now
            ):
                node.not_before = None
                self.index.push(node)
                self._work_arrived()

    async def _dispatch(self, now: float) -> bool:
        """Fill free slots, in chunks of at most ``DISPATCH_CHUNK`` decisions: each chunk's
        steps are claimed and leased in one transaction and its ``assign`` messages sent
        before the next chunk is planned, so the first agents start while later decisions
        are made. True when another runner claimed some of the chosen steps first (they are
        read again, the slots stay free)."""
        lost = False
        while len(self.index):
            agents, ssh = self._free_views(now)
            if not agents and not ssh:
                break
            # Agents first (architecture §5's order among them); SSH builders only get the steps
            # that no free agent slot takes.
            decisions = plan_dispatch(
                self.index,
                agents,
                limit=DISPATCH_CHUNK,
                repositories_of=self._repositories_of,
                nothing_for=self._nothing_for,
            )
            if ssh and len(decisions) < DISPATCH_CHUNK and len(self.index):
                decisions += plan_dispatch(
                    self.index,
                    ssh,
                    limit=DISPATCH_CHUNK - len(decisions),
                    repositories_of=self._repositories_of,
                )
            if not decisions:
                break
            lost = await self._assign(decisions, now) or lost
            if len(decisions) < DISPATCH_CHUNK:
                break
        return lost

    def _free_views(self, now: float) -> tuple[list[VenueView], list[VenueView]]:
        """Views of the available agents and SSH builders that could run some runnable step.

        Only kinds of venues (systems, features, trust, repositories) that fit a waiting step
        are looked at: a pass costs the number of kinds plus the free venues that could take
        work, not the number of venues."""
        wanted = self.index.requirements()
        agents: list[VenueView] = []
        ssh: list[VenueView] = []
        cooling: float | None = None
        for kind, members in list(self._open.items()):
            if not members:
                del self._open[kind]
                continue
            if not any(self._kind_fits(kind, members, req) for req in wanted):
                continue
            for machine_id, venue in list(members.items()):
                # An unhealthy venue runs one step at a time (half-open, ``health``).
                jobs = allowed_jobs(
                    venue.max_jobs,
                    venue.consecutive_failures,
                    self.config.unhealthy_after_failures,
                )
                if (
                    self.venues.get(machine_id) is not venue
                    or venue.draining
                    or len(venue.running) >= jobs
                ):
                    del members[machine_id]  # back when a slot is released or it attaches
                    continue
                until = max(venue.cooldown_until, venue.backoff_until)
                if until > now:
                    cooling = until if cooling is None else min(cooling, until)
                    continue
                if not has_room(venue.free_store_bytes, self.config.min_free_store_bytes):
                    continue  # looked at again when a heartbeat reports room (disk_report)
                view = venue.view()
                if jobs != view.max_jobs:
                    view = replace(view, max_jobs=jobs)
                (ssh if venue.kind == SSH else agents).append(view)
        self._cooling_until = cooling
        return agents, ssh

    def _kind_fits(self, kind: _Kind, members: dict[str, Venue], req: Requirement) -> bool:
        fits = self._fits.get((kind, req))
        if fits is None:
            fits = self._fits[(kind, req)] = can_run(next(iter(members.values())).view(), req)
        return fits

    def _note_infra_failure(self, venue: Venue, error: str) -> None:
        """Keep the venue's last infrastructure error; say when it just became unhealthy
        (``health``: one step at a time after its backoff until one succeeds)."""
        venue.last_error = error[:MAX_LAST_ERROR_CHARS]
        if became_unhealthy(venue.consecutive_failures, self.config.unhealthy_after_failures):
            log.warning(
                "%s is unhealthy after %d consecutive infrastructure failures (last: %s); "
                "it gets one step at a time after its backoff until one succeeds",
                venue.name,
                venue.consecutive_failures,
                error.splitlines()[0] if error else "no error text",
            )

    def _cooled(self, venue: Venue) -> None:
        """The venue's cooldown or backoff was set: the loop wakes when it ends."""
        until = max(venue.cooldown_until, venue.backoff_until)
        if until > 0 and (self._cooling_until is None or until < self._cooling_until):
            self._cooling_until = until

    def _reopen(self, venue: Venue) -> None:
        """The venue may have a free slot (again)."""
        if self.venues.get(venue.machine_id) is venue:
            kind = (
                venue.systems,
                venue.supported_features,
                venue.mandatory_features,
                venue.trusted,
                venue.repositories,
            )
            self._open.setdefault(kind, {})[venue.machine_id] = venue

    async def _assign(self, decisions: Sequence[Dispatch], now: float) -> bool:
        """Claim, lease, record and send one chunk of decisions; True when another runner
        claimed some of the steps first."""
        # Resolve every venue before the first await: a venue may detach meanwhile, and a
        # send to its closed session then fails and releases the slot like any send failure.
        chosen = [(self.nodes[d.step_id], self.venues[d.machine_id]) for d in decisions]
        # Build every message before touching any state: a step whose message cannot be
        # built (a derivation beyond the protocol's limits) must not take others down.
        ready: list[tuple[StepNode, Venue, p.Assign]] = []
        for node, venue in chosen:
            lease = new_lease_id()
            try:
                ready.append((node, venue, self._assign_message(node, lease)))
            except ValidationError as exc:
                log.error("step %d cannot be sent to agents: %s", node.id, exc)
                await self._finish_attempt(
                    node,
                    None,
                    p.Outcome.BUILD_FAILURE,
                    f"the derivation cannot be sent to agents: {exc}",
                    None,
                    now,
                )
        if not ready:
            return False
        expires = now + self.config.lease_secs
        sent: list[tuple[StepNode, Venue, p.Assign]] = []
        started: set[int] = set()
        async with self._begin() as conn:
            # Only steps still runnable in the database, and not being claimed by another
            # runner right now, are assigned; the others go back to be read again.
            ids = [n.id for n, _, _ in ready]
            claimed = (
                await queries.claim_runnable_steps(conn, ids) if self.feed.shared else set(ids)
            )
            lost = [node.id for node, _, _ in ready if node.id not in claimed]
            self._stale_steps.update(lost)
            rows: list[dict[str, Any]] = []
            for node, venue, msg in ready:
                if node.id not in claimed:
                    continue
                lease = msg.lease_id
                node.state = StepState.ASSIGNED
                node.lease_id = lease
                node.lease_expires_at = expires
                node.venue = venue.machine_id
                self.leases[lease] = node.id
                self._watch_lease(node)
                venue.running.add(node.id)
                self.metrics.step_assigned(node, now)
                rows.append(
                    {
                        "id": node.id,
                        "state": node.state,
                        "lease_id": lease,
                        "lease_expires_at": expires,
                        "agent_machine_id": venue.machine_id,
                        "agent_name": venue.name,
                        "assigned_at": now,
                    }
                )
                self._stored_expiry[node.id] = expires
                for bid in node.builds:
                    build = self.builds.get(bid)
                    if build is not None and build.state is BuildState.QUEUED:
                        build.state = BuildState.RUNNING
                        started.add(bid)
                sent.append((node, venue, msg))
            await queries.update_steps_each(conn, rows)
            await queries.start_builds(conn, sorted(started))
        for node, venue, msg in sent:
            if node.attempts:
                self.logs.append(
                    node.id, [f"[bigtent: attempt {node.attempts + 1} on {venue.name}]"]
                )
            if not _try_send(venue, msg):
                log.warning("could not send step %d to %s; cooling it down", node.id, venue.name)
                await self._give_back(node, venue, now)
        if lost:
            log.debug("another runner claimed steps %s first", lost)
        return bool(lost)

    def _assign_message(self, node: StepNode, lease: str) -> p.Assign:
        return p.Assign(
            step_id=p.StepId(node.id),
            lease_id=p.LeaseId(lease),
            drv_path=node.drv_path,
            outputs=node.outputs,
            upload_urls={name: f"/api/v1/agent/upload/{lease}/{name}" for name in node.outputs},
            timeout_secs=self.config.step_timeout_secs,
            max_silent_secs=self.config.max_silent_secs,
            max_log_bytes=self.config.max_log_bytes,
        )

    # ---- transitions ---------------------------------------------------------------------
    def _make_runnable(self, node: StepNode, now: float) -> None:
        if node.not_before is not None and node.not_before > now:
            heapq.heappush(self.delayed, (node.not_before, node.id))
        else:
            self.index.push(node)
            self._work_arrived()

    def _work_arrived(self) -> None:
        for listener in self.work_listeners:
            listener()

    def _release(self, node: StepNode) -> None:
        """Give back the node's slot and drop its lease."""
        venue = self.venues.get(node.venue or "")
        if venue is not None:
            venue.running.discard(node.id)
            self._reopen(venue)
        if node.lease_id is not None:
            self.leases.pop(node.lease_id, None)
        node.lease_id = None
        node.lease_expires_at = None
        self.index.discard(node.id)
        self._stored_expiry.pop(node.id, None)
        self._lost_here.discard(node.id)

    async def _finish_attempt(
        self,
        node: StepNode,
        venue: Venue | None,
        outcome: p.Outcome,
        error: str,
        msg: p.Result | None,
        now: float,
        *,
        expired_by: float | None = None,
    ) -> None:
        """End the step's current attempt. ``expired_by``: only if its lease expired by then
        in the database too (another runner may have renewed it). The step must still be as
        the working copy has it, or nothing happens but a LostRace."""
        policy = classify(outcome)
        lease_id = node.lease_id
        attempt = node.attempts + 1
        self._release(node)
        if policy.disposition is Disposition.RETRY:
            # The log tells why this attempt ended (the client shows its tail).
            where = f" on {venue.name}" if venue is not None else ""
            reason = next((ln for ln in error.splitlines() if ln.strip()), "")
            self.logs.append(node.id, [f"[bigtent: attempt {attempt}{where}: {outcome}: {reason}]"])
        self.logs.close(node.id)
        self.metrics.step_finished(node, outcome, msg.timings if msg is not None else None)
        values: dict[str, Any] = dict(
            outcome=outcome,
            error=error[:8000] or None,
            lease_id=None,
            lease_expires_at=None,
        )
        if msg is not None:
            values.update(
                exit_code=msg.exit_code,
                prepare_secs=msg.timings.prepare_secs,
                build_secs=msg.timings.build_secs,
                upload_secs=msg.timings.upload_secs,
            )
        if venue is not None:
            if policy.counts_against_venue:
                venue.consecutive_failures += 1
                venue.backoff_until = now + backoff_secs(
                    venue.consecutive_failures,
                    self.config.agent_backoff_base_secs,
                    self.config.agent_backoff_max_secs,
                )
                self._cooled(venue)
                self._note_infra_failure(venue, error)
                log.warning(
                    "%s: %s on step %d; backing off until %.0f",
                    venue.name,
                    outcome,
                    node.id,
                    venue.backoff_until,
                )
            elif policy.disposition is Disposition.REQUEUE:
                # Not the venue's fault, but it must not get the step straight back in a
                # loop (an agent that aborts everything): a short cooldown.
                venue.cooldown_until = now + self.config.refuse_cooldown_secs
                self._cooled(venue)
            else:
                venue.consecutive_failures = 0
                venue.backoff_until = 0.0
        newly_final: list[StepNode] = []
        async with self._begin() as conn:
            await self._expect(conn, [node], lease_id=lease_id, expired_by=expired_by)
            if venue is not None:
                # The agent's row keeps its counters and backoff in step with memory, so a
                # reconnect cannot shed the backoff (architecture §4).
                await queries.record_agent_attempt(
                    conn,
                    venue.machine_id,
                    succeeded=int(policy.disposition is Disposition.SUCCEED),
                    failed=int(policy.disposition is Disposition.FAIL),
                    infra=int(policy.counts_against_venue),
                    consecutive_failures=venue.consecutive_failures,
                    backoff_until=venue.backoff_until or None,
                    last_error=venue.last_error or None,
                )
            match policy.disposition:
                case Disposition.SUCCEED:
                    node.state = StepState.SUCCEEDED
                    self._count_final(node)
                    await queries.update_step(
                        conn, node.id, state=node.state, finished_at=now, **values
                    )
                    newly_final.append(node)
                    ready = []
                    for d in node.dependents:
                        dep = self.nodes.get(d)
                        if dep is None:
                            continue
                        dep.deps.discard(node.id)
                        if not dep.deps and dep.state is StepState.WAITING:
                            ready.append(dep)
                    promoted = await queries.update_steps_in_state(
                        conn, [n.id for n in ready], [StepState.WAITING], state=StepState.RUNNABLE
                    )
                    for dep in self._moved_on_elsewhere(promoted, ready):
                        dep.state = StepState.RUNNABLE
                        self.metrics.step_runnable(dep, now)
                        self._make_runnable(dep, now)
                case Disposition.FAIL:
                    # A build failure is final and cached (failed_at) for the failure cache's
                    # TTL; infrastructure failures (below) never are.
                    node.state = StepState.FAILED
                    self._count_final(node)
                    await queries.update_step(
                        conn, node.id, state=node.state, finished_at=now, failed_at=now, **values
                    )
                    newly_final.append(node)
                    newly_final.extend(await self._fail_dependents(conn, node, now))
                case Disposition.RETRY:
                    node.attempts += 1
                    if node.attempts >= self.config.max_infra_attempts:
                        node.state = StepState.FAILED
                        self._count_final(node)
                        values["error"] = (
                            f"infrastructure failure after {node.attempts} attempts; last: "
                            f"{outcome}: {error}"
                        )[:8000]
                        await queries.update_step(
                            conn,
                            node.id,
                            state=node.state,
                            finished_at=now,
                            attempts=node.attempts,
                            **values,
                        )
                        newly_final.append(node)
                        newly_final.extend(await self._fail_dependents(conn, node, now))
                    else:
                        node.state = StepState.RUNNABLE
                        node.not_before = next_retry_at(
                            node.attempts,
                            now,
                            self.config.retry_base_secs,
                            self.config.retry_max_secs,
                            self.rand(),
                        )
                        self.metrics.step_requeued(node, node.not_before)
                        await queries.update_step(
                            conn,
                            node.id,
                            state=node.state,
                            attempts=node.attempts,
                            not_before=node.not_before,
                            **values,
                        )
                        self._make_runnable(node, now)
                case Disposition.REQUEUE:
                    node.state = StepState.RUNNABLE
                    self.metrics.step_requeued(node, now)
                    await queries.update_step(conn, node.id, state=node.state, **values)
                    self._make_runnable(node, now)
            await self._record_attempt(
                conn, node, attempt, outcome, error, now, leased=lease_id is not None
            )
            for bid in sorted({b for n in newly_final for b in n.builds}):
                build = self.builds.get(bid)
                if build is not None:
                    await self._maybe_finish_build(conn, build, now)
        self.wake()

    async def _record_attempt(
        self,
        conn: AsyncConnection,
        node: StepNode,
        attempt: int,
        outcome: p.Outcome,
        error: str,
        now: float,
        *,
        leased: bool,
    ) -> None:
        """Record the attempt that just ended, in the transaction of the step's new state
        (``node`` already has it): every attempt is visible (docs/api.md "Attempts")."""
        await queries.insert_step_attempt(
            conn,
            node.id,
            attempt=attempt,
            max_attempts=self.config.max_infra_attempts,
            finished_at=now,
            outcome=outcome,
            error=error[:8000] or None,
            retry_at=attempt_retry_at(node.state, node.not_before, now),
            leased=leased,
        )

    async def _fail_dependents(
        self, conn: AsyncConnection, node: StepNode, now: float
    ) -> list[StepNode]:
        """A failure fails only what depends on it; unrelated steps go on."""
        failed = [
            self.nodes[sid]
            for sid in dependents_closure(self.nodes, node.id)
            if self.nodes[sid].state in (StepState.WAITING, StepState.RUNNABLE)
        ]
        changed = await queries.update_steps_in_state(
            conn,
            [d.id for d in failed],
            [StepState.WAITING, StepState.RUNNABLE],
            state=StepState.DEPENDENCY_FAILED,
            finished_at=now,
            error=f"dependency {node.drv_path} failed",
        )
        failed = self._moved_on_elsewhere(changed, failed)
        for dep in failed:
            self.index.discard(dep.id)
            dep.state = StepState.DEPENDENCY_FAILED
            self._count_final(dep)
        return failed

    def _count_final(self, node: StepNode) -> None:
        """A member step of these builds just became final."""
        for bid in node.builds:
            build = self.builds.get(bid)
            if build is not None:
                build.unfinished -= 1

    async def _maybe_finish_build(
        self, conn: AsyncConnection, build: ActiveBuild, now: float
    ) -> None:
        """End a build once every member step is final: its outcome is its roots' (a failure
        fails the build, but the steps that do not depend on it still run to the end)."""
        if build.unfinished > 0 or build.id in self._incomplete:
            return
        states = [
            self.nodes[sid].state if sid is not None and sid in self.nodes else None
            for sid in build.roots.values()
        ]
        outcome = build_outcome(states)
        if outcome is None or build.state.is_final:
            return
        build.state = outcome
        if await queries.finish_build(conn, build.id, outcome, finished_at=now):
            log.info("build %d %s", build.id, outcome)
        self._forget_build(build)

    def _forget_build(self, build: ActiveBuild) -> None:
        """Drop a finished build and the final steps no other active build needs."""
        self.builds.pop(build.id, None)
        for sid in build.steps:
            node = self.nodes.get(sid)
            if node is None:
                continue
            node.builds.discard(build.id)
            if node.state.is_final and not node.builds:
                self.nodes.pop(sid, None)
                by_drv = self._by_drv(node.req.trusted)
                if by_drv.get(node.drv_path) == sid:
                    del by_drv[node.drv_path]
                for d in node.deps:
                    if d in self.nodes:
                        self.nodes[d].dependents.discard(sid)

    # ---- other runners on the same database (PostgreSQL; docs/architecture.md) --------------
    @contextlib.asynccontextmanager
    async def _begin(self) -> AsyncIterator[AsyncConnection]:
        """A transaction whose step and build changes are announced to the other runners
        when it commits. Losing a deadlock or serialization conflict to another runner's
        transaction is a LostRace."""
        try:
            async with self.engine.begin() as conn:
                take_pending(conn, "")  # notes a previous user of the connection left
                yield conn
                await self.feed.publish(conn)
        except DBAPIError as exc:
            if is_conflict(exc):
                raise LostRace(
                    f"the database chose another runner's transaction: {exc.orig}"
                ) from exc
            raise

    def notice(self, change: Change | None) -> None:
        """Another runner changed these rows (None: anything may have changed, e.g. while
        not listening). The loop reads them again at its next pass, or a transition first."""
        if change is None:
            self._resync = True
        else:
            self._stale_steps |= change.steps
            self._stale_builds |= change.builds
        self.wake()

    async def _catch_up(self) -> None:
        """Apply what other runners changed since the last call (the lock is held)."""
        if self._resync:
            await self.recover(quiet=True)
            return
        if self._stale_steps or self._stale_builds:
            steps, builds = self._stale_steps, self._stale_builds
            self._stale_steps, self._stale_builds = set(), set()
            await self._absorb(steps, builds)

    async def _expect(
        self,
        conn: AsyncConnection,
        nodes: Sequence[StepNode],
        *,
        lease_id: str | type[_Same] | None = _Same,
        expired_by: float | None = None,
    ) -> None:
        """The steps' rows must still say what the working copy does (state and lease;
        ``lease_id`` for a single node whose lease memory already dropped; ``expired_by``:
        and the lease expired by then): otherwise LostRace. The rows stay locked until the
        transaction ends, so no other runner changes them under this transition. Alone on
        its database (SQLite) the runner's memory is the record's exact copy: no check."""
        if not self.feed.shared:
            return
        rows = await queries.lock_steps(conn, [n.id for n in nodes])
        for node in nodes:
            lease = node.lease_id if lease_id is _Same else lease_id
            row = rows.get(node.id)
            if (
                row is None
                or row.state != node.state
                or row.lease_id != lease
                or (expired_by is not None and (row.lease_expires_at or 0.0) > expired_by)
            ):
                self._stale_steps.add(node.id)
                raise LostRace(
                    f"step {node.id} is {row.state if row else 'gone'} in the database, "
                    f"{node.state} here"
                )

    def _moved_on_elsewhere(self, changed: set[int], nodes: list[StepNode]) -> list[StepNode]:
        """The ``nodes`` a conditional update changed. The others were moved on by another
        runner first (it made them runnable, or claimed them): they are read again at the
        next pass, and this transition leaves them alone."""
        missed = {n.id for n in nodes} - changed
        if missed:
            self._stale_steps |= missed
            self.wake()
        return [n for n in nodes if n.id in changed]

    def _renewal_due(self, node: StepNode) -> bool:
        """Is the lease's renewal far enough ahead of what the database has to be stored?"""
        stored = self._stored_expiry.get(node.id, 0.0)
        return (node.lease_expires_at or 0.0) - stored >= self.config.lease_secs / 3

    async def _store_renewals(self) -> None:
        """Store the lease renewals of venues here (shared databases only): another runner
        expires a lease only once the database says it expired."""
        if not self.feed.shared:
            return
        due = [
            node
            for node in self._leased()
            if node.lease_id is not None
            and node.venue in self.venues
            and node.id in self.venues[node.venue].running
            and self._renewal_due(node)
        ]
        if not due:
            return
        renewals = [(n.id, str(n.lease_id), float(n.lease_expires_at or 0.0)) for n in due]
        async with self.engine.begin() as conn:
            await queries.renew_leases(conn, renewals)
        for sid, _, expires in renewals:
            self._stored_expiry[sid] = expires

    async def _expired_in_database(self, due: Sequence[StepNode], now: float) -> set[int]:
        """Of the leases due here, those the database also says expired. A lease another
        runner renewed gets its expiry from the database; a step another runner moved on is
        read again."""
        check = [n for n in due if n.id not in self._lost_here]
        async with self.engine.connect() as conn:
            rows = await queries.lock_steps(conn, [n.id for n in check], lock=False)
        expired: set[int] = set()
        for node in check:
            row = rows.get(node.id)
            if row is None or row.lease_id != node.lease_id or row.state != node.state:
                self._stale_steps.add(node.id)
                self.wake()
            elif row.lease_expires_at is not None and row.lease_expires_at > now:
                node.lease_expires_at = row.lease_expires_at
            else:
                expired.add(node.id)
        return expired

    async def _absorb(self, step_ids: set[int], build_ids: set[int]) -> None:
        """Bring the working copy up to date with steps and builds other runners changed:
        read those rows again (and, for builds new here, their members and roots) and apply
        them (``sync.catch_up``). Waiting steps whose dependencies another runner finished
        are made runnable (or dependency-failed) here too, conditionally: whichever runner
        gets there first does it."""
        now = self.clock()
        async with self._begin() as conn:
            build_rows = await queries.fetch_builds_by_ids(conn, sorted(build_ids))
            new = [
                int(b.id)
                for b in build_rows
                if int(b.id) not in self.builds and not BuildState(b.state).is_final
            ]
            roots: dict[int, dict[str, int | None]] = {i: {} for i in new}
            for r in await queries.fetch_all_build_roots(conn, new):
                roots[r.build_id][r.drv_path] = r.step_id
            members: dict[int, set[int]] = {i: set() for i in new}
            for b, s in await queries.fetch_build_step_ids(conn, new):
                members[b].add(int(s))
            new_roots = {s for r in roots.values() for s in r.values() if s is not None}
            wanted = step_ids | new_roots | {s for m in members.values() for s in m}
            rows = await queries.fetch_steps_by_ids(conn, sorted(wanted))
            fresh: dict[int, StepNode] = {}
            """Steps new here, or waiting again: their edges are read."""
            moved: list[StepNode] = []
            """Steps whose state or lease changed."""
            seen: list[StepNode] = []
            for row in rows:
                node = self.nodes.get(int(row.id))
                if node is None:
                    if StepState(row.state).is_final and int(row.id) not in new_roots:
                        continue
                    node = _node_from_row(row)
                    self.nodes[node.id] = node
                    self._by_drv(node.req.trusted)[node.drv_path] = node.id
                    if node.state.is_leased and node.lease_id is not None:
                        self.leases[node.lease_id] = node.id
                        self._watch_lease(node)
                    fresh[node.id] = node
                    moved.append(node)
                elif self._catch_up_step(node, row):
                    moved.append(node)
                    if node.state is StepState.WAITING:
                        fresh[node.id] = node
                seen.append(node)
            if fresh:
                for s, d in await queries.fetch_step_edges(conn, sorted(fresh)):
                    dependent, dep = self.nodes.get(s), self.nodes.get(d)
                    if dependent is None or dep is None:
                        continue
                    dep.dependents.add(s)
                    if (
                        dependent.state is StepState.WAITING
                        and dep.state is not StepState.SUCCEEDED
                    ):
                        dependent.deps.add(d)
            for node in moved:
                if node.state is StepState.SUCCEEDED:
                    for d in node.dependents:
                        if d in self.nodes:
                            self.nodes[d].deps.discard(node.id)
            waiting = {
                w.id: w
                for n in moved
                for w in [n, *(self.nodes[d] for d in n.dependents if d in self.nodes)]
                if w.state is StepState.WAITING
            }
            await self._settle_waiting(conn, list(waiting.values()), now)
            affected = [*moved, *waiting.values()]
            touched = {b for n in affected for b in n.builds}
            for b in build_rows:
                touched |= self._catch_up_build(b, roots.get(int(b.id)), members.get(int(b.id)))
            rekey: set[int] = set()
            if fresh:
                rekey = raise_heights(self.nodes, _topological_dependents_first(fresh))
            for node in [*seen, *waiting.values(), *(self.nodes[i] for i in sorted(rekey))]:
                if node.state is StepState.RUNNABLE:
                    self._make_runnable(node, now)
            for bid in sorted(touched):
                build = self.builds.get(bid)
                if build is None:
                    continue
                build.unfinished = sum(
                    1
                    for sid in build.steps
                    if sid in self.nodes and not self.nodes[sid].state.is_final
                )
                await self._maybe_finish_build(conn, build, now)
        log.debug("caught up with %d steps and %d builds", len(rows), len(build_rows))

    def _catch_up_step(self, node: StepNode, row: Any) -> bool:
        """Copy a step's row into its node (``sync.catch_up`` decides the side effects);
        True when its state or lease changed."""
        stored = StepState(row.state)
        venue = self.venues.get(node.venue or "")
        held_here = venue is not None and node.id in venue.running
        same = stored is node.state and row.lease_id == node.lease_id
        decision = catch_up(
            Seen(node.state, node.lease_id, held_here), Stored(stored, row.lease_id)
        )
        if decision.release:
            assert venue is not None
            log.info("step %d on %s is %s by another runner", node.id, venue.name, stored)
            _try_send(venue, p.Abort(step_id=p.StepId(node.id), reason=f"{stored} elsewhere"))
            self._release(node)
            self.logs.close(node.id)
        elif node.lease_id is not None and node.lease_id != row.lease_id:
            self.leases.pop(node.lease_id, None)
        if decision.unqueue:
            self.index.discard(node.id)
        if decision.reopened:
            node.deps.clear()
        node.state = stored
        node.lease_id = row.lease_id
        node.venue = row.agent_machine_id
        node.attempts = int(row.attempts)
        node.not_before = row.not_before
        node.created_at = float(row.created_at)
        if stored.is_leased and node.lease_id is not None:
            self.leases[node.lease_id] = node.id
            if not (same and held_here):
                node.lease_expires_at = row.lease_expires_at
            self._watch_lease(node)
        elif not stored.is_leased:
            node.lease_expires_at = None
        if decision.finished:
            self.logs.close(node.id)
        return not same

    async def _settle_waiting(
        self, conn: AsyncConnection, waiting: Sequence[StepNode], now: float
    ) -> None:
        """Waiting steps whose dependencies are all done (as the database says): runnable,
        or dependency-failed, each only if still waiting (another runner may be first)."""
        if not waiting:
            return
        deps: dict[int, list[int]] = {n.id: [] for n in waiting}
        for s, d in await queries.fetch_step_deps(conn, sorted(deps)):
            deps[s].append(d)
        states = await queries.fetch_step_states(
            conn, sorted({d for ds in deps.values() for d in ds})
        )
        for node in waiting:
            verdict = waiting_verdict([StepState(states[d][0]) for d in deps[node.id]])
            if verdict is StepState.WAITING:
                node.deps = {
                    d
                    for d in deps[node.id]
                    if states[d][0] != StepState.SUCCEEDED and d in self.nodes
                }
                continue
            values: dict[str, Any] = {"state": verdict}
            if verdict is StepState.DEPENDENCY_FAILED:
                failed = next(
                    d
                    for d in sorted(deps[node.id])
                    if StepState(states[d][0]).is_final and states[d][0] != StepState.SUCCEEDED
                )
                values.update(finished_at=now, error=f"dependency {states[failed][1]} failed")
            if await queries.update_steps_in_state(conn, [node.id], [StepState.WAITING], **values):
                node.state = verdict
                node.deps.clear()
            else:
                self._stale_steps.add(node.id)
                self.wake()

    def _catch_up_build(
        self, row: Any, roots: dict[str, int | None] | None, members: set[int] | None
    ) -> set[int]:
        """Apply a build's row: new here (with its roots and members), over (forgotten), or
        bumped. Returns the ids of builds whose unfinished steps must be counted again."""
        build_id, state = int(row.id), BuildState(row.state)
        build = self.builds.get(build_id)
        if build is None:
            if state.is_final or roots is None or members is None:
                return set()
            build = ActiveBuild(
                build_id,
                int(row.priority),
                roots,
                members,
                state,
                repository=row.repository,
                trusted=bool(row.trusted),
            )
            self.builds[build_id] = build
        elif state.is_final:
            build.state = state
            self._forget_build(build)
            return set()
        build.state = state
        build.priority = int(row.priority)  # as bump_build: members' priorities only rise
        now = self.clock()
        for sid in build.steps:
            node = self.nodes.get(sid)
            if node is None:
                continue
            node.builds.add(build_id)
            if build.priority > node.priority:
                node.priority = build.priority
                if node.state is StepState.RUNNABLE:
                    self._make_runnable(node, now)
        return {build_id}

    # ---- read side ------------------------------------------------------------------------
    def queue_depth(self) -> dict[str, int]:
        return self.index.count_by_system()


def cached_failure_error(outcome: str, failed_at: float, ttl_secs: float, error: str | None) -> str:
    """The error of a step failed from the failure cache: what failed, when, until when it
    stays cached, and the first failure's own error (kept once, however often it is hit)."""
    first = error or ""
    if first.startswith(_CACHED_MARK):
        first = first.partition(_FIRST_ERROR)[2]
    text = (
        f"{_CACHED_MARK}this derivation failed ({outcome}) at {_iso(failed_at)}; it is not "
        f"rebuilt before {_iso(failed_at + ttl_secs)} unless the build is restarted "
        f"(bigtent restart BUILD){_FIRST_ERROR}{first}"
    )
    return text[:8000]


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def _dependencies_first(deps: dict[str, list[str]]) -> list[str]:
    """The keys of ``deps`` (node -> its dependencies among the keys), each after its
    dependencies; ties in name order, so the order is deterministic."""
    order: list[str] = []
    seen: set[str] = set()
    for start in sorted(deps):
        stack: list[tuple[str, bool]] = [(start, False)]
        while stack:
            name, expanded = stack.pop()
            if expanded:
                order.append(name)
                continue
            if name in seen:
                continue
            seen.add(name)
            stack.append((name, True))
            stack.extend((d, False) for d in sorted(deps[name], reverse=True) if d not in seen)
    return order


def _new_node(sid: int, drv: queries.DrvInfo, trusted: bool, now: float) -> StepNode:
    return StepNode(
        id=sid,
        drv_path=drv.drv_path,
        req=Requirement(drv.system, drv.required_features, trusted),
        state=StepState.WAITING,
        created_at=now,
        outputs=dict(drv.outputs),
    )


def _kind_of(view: VenueView) -> _Kind:
    return (
        view.systems,
        view.supported_features,
        view.mandatory_features,
        view.trusted,
        view.repositories,
    )


def _send_aborts(aborts: Iterable[tuple[Venue, int]], reason: str) -> None:
    for venue, sid in aborts:
        _try_send(venue, p.Abort(step_id=p.StepId(sid), reason=reason))


def _try_send(venue: Venue, msg: BaseModel) -> bool:
    try:
        venue.send(msg)
    except SessionClosed:
        return False
    return True


def _node_from_row(row: Any) -> StepNode:
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


def _topological_dependents_first(nodes: dict[int, StepNode]) -> list[int]:
    """Kahn's order over ``dependents``: a step comes after every step that depends on it."""
    pending = {sid: sum(1 for d in n.dependents if d in nodes) for sid, n in nodes.items()}
    ready = [sid for sid, c in pending.items() if c == 0]
    order: list[int] = []
    while ready:
        sid = ready.pop()
        order.append(sid)
        for dep in nodes[sid].deps:
            if dep in pending:
                pending[dep] -= 1
                if pending[dep] == 0:
                    ready.append(dep)
    return order


def _check_admit_row(drv_path: str, node: StepNode | None, row: Any) -> None:
    """A new build decides about a derivation's step from the working copy. Joining a step
    that is active here is right whatever the step does now; but queueing a step again (or
    creating it) needs the (locked) row to agree that it is finished: otherwise another runner
    changed it first — LostRace (read again, retry). A step active in the database and
    unknown here belongs to a build this runner has not heard of yet."""
    if node is not None and node.state not in _REDO_STATES:
        return
    if row is None:
        if node is not None:
            raise LostRace(f"the step of {drv_path} is gone from the database")
        return
    state = StepState(row.state)
    if node is None and not state.is_final:
        raise LostRace(f"the step of {drv_path} is {state} in the database, unknown here")
    if node is not None and state is not node.state:
        raise LostRace(f"the step of {drv_path} is {state} in the database, {node.state} here")
