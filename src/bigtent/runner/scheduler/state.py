"""The working copy: the step DAG, the active builds, the connected venues, the
leases and their expiries, the runnable index, and the bookkeeping every transition shares."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import random
import time
from collections.abc import (
    AsyncIterator,
    Callable,
    Collection,
    Coroutine,
    Iterable,
    Mapping,
    Sequence,
)
from typing import Any, TypeVar

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from bigtent import protocol as p
from bigtent.config import SchedulerSection
from bigtent.runner.buildwatch import BuildWatch
from bigtent.runner.db.notify import ChangeFeed, LocalFeed, is_conflict, take_pending
from bigtent.runner.logs.store import LogStore
from bigtent.runner.metrics import Metrics
from bigtent.runner.scheduler import persist, recovery
from bigtent.runner.scheduler.matching import Requirement, VenueView, has_room
from bigtent.runner.scheduler.model import AGENT, ActiveBuild, Kind, Venue
from bigtent.runner.scheduler.shared import DatabaseMode, database_mode
from bigtent.runner.scheduler.snapshot import Overview, RunnableStep, VenueInfo
from bigtent.runner.scheduler.steps import RunnableIndex, Scope, StepNode
from bigtent.runner.scheduler.sync import LostRace
from bigtent.runner.scheduler.transitions import build_ending, holds_lease
from bigtent.states import BuildState, StepState

log = logging.getLogger(__name__)

_EXPIRY_SLACK = 1024
"""Stale lease-expiry entries tolerated beyond twice the live leases before a rebuild."""
_T = TypeVar("_T")


class SchedulerState:
    """The working copy: the step DAG, the active builds, the connected venues, the
    leases and their expiries, the runnable index, and the bookkeeping every transition shares."""

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
        self._open: dict[Kind, dict[str, Venue]] = {}
        """Venues that may have a free slot, by kind: a venue enters when it attaches or a
        slot is released, and leaves when a pass finds it full, draining or gone. A pass
        looks only at kinds that fit some waiting step, so idle venues cost nothing."""
        self._fits: dict[tuple[Kind, Requirement], bool] = {}
        self._cooling_until: float | None = None
        """When the first venue that could take waiting work comes out of its cooldown or
        backoff (as of the last pass)."""
        self.builds: dict[int, ActiveBuild] = {}
        self.build_watch = BuildWatch()
        """Wakes the requests waiting for a build to change (``GET /builds/{id}?wait=``)."""
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
        self.database: DatabaseMode = database_mode(self.feed.shared)
        """Alone with the database, or sharing it with other runners (``shared``)."""
        self._stale_steps: set[int] = set()
        self._stale_builds: set[int] = set()
        """Rows other runners changed (or claims this runner lost): read them again."""
        self._resync = False
        """Anything may have changed: reload everything."""
        self._to_settle: set[int] = set()
        self._to_end: set[int] = set()
        """Waiting steps and builds a catch-up copied: settle and end them (if their rows say
        so) in a transaction of their own, again at the next catch-up if it failed."""
        self._stored_expiry: dict[int, float] = {}
        """Per leased step, the lease expiry the database has; renewals are stored once they
        are ``lease_secs / 3`` ahead of it (shared databases only)."""
        self._lost_here: set[int] = set()
        """Leases an agent here gave up when it reconnected: they expire now, whatever the
        database says."""
        self._accepts: list[p.Accepted] = []
        """``accepted`` messages waiting for the lock: the first to get it writes them all."""
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

    def _recount(self, build: ActiveBuild) -> None:
        """Count the build's member steps that are not final yet."""
        build.unfinished = self._unfinished(build)

    def _unfinished(self, build: ActiveBuild) -> int:
        """The build's member steps in memory that are not final yet."""
        return sum(
            1 for sid in build.steps if sid in self.nodes and not self.nodes[sid].state.is_final
        )

    def step_active(self, step_id: int) -> bool:
        """Whether a step is in the working copy and not final (its log may still grow)."""
        node = self.nodes.get(step_id)
        return node is not None and not node.state.is_final

    def lease_holder(self, lease_id: str) -> StepNode | None:
        """The step a current lease is for, or None when the lease is unknown or over."""
        sid = self.leases.get(lease_id)
        node = self.nodes.get(sid) if sid is not None else None
        return node if node is not None and holds_lease(node, lease_id) else None

    def queue_depth(self) -> dict[str, int]:
        return self.index.count_by_system()

    def agents_without_room(self) -> int:
        """Connected venues held back by ``scheduler.min_free_store_bytes`` (a metric)."""
        minimum = self.config.min_free_store_bytes
        return sum(not has_room(v.free_store_bytes, minimum) for v in self.venues.values())

    def wake(self) -> None:
        self._wake.set()

    # ---- the read model (snapshot.py): plain values for the API, dashboard, autoscaler ----
    def overview(self) -> Overview:
        return Overview(
            queue=self.queue_depth(),
            agents_connected=sum(1 for v in self.venues.values() if v.kind == AGENT),
            builds_active=len(self.builds),
            steps_waiting_for_capacity=len(self.capacity_waiting()),
            recovery=self.recovery,
            shared_database=self.database.shared,
        )

    def venue_infos(self) -> dict[str, VenueInfo]:
        """Every connected venue, by machine id."""
        return {machine_id: VenueInfo.of(v) for machine_id, v in self.venues.items()}

    def venue_info(self, machine_id: str) -> VenueInfo | None:
        venue = self.venues.get(machine_id)
        return VenueInfo.of(venue) if venue is not None else None

    def runnable_steps(self) -> list[RunnableStep]:
        """The steps in the runnable queue (not those waiting for a retry's backoff)."""
        return [
            RunnableStep(n.id, n.req, frozenset(n.builds))
            for n in self.nodes.values()
            if n.id in self.index
        ]

    def step_state(self, step_id: int) -> StepState | None:
        """The state of a step the working copy holds (None: not held, ask the database)."""
        node = self.nodes.get(step_id)
        return node.state if node is not None else None

    def on_work(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` whenever a step enters the runnable queue."""
        self.work_listeners.append(listener)

    def add_launchable(self, offers: Callable[[], Iterable[VenueView]]) -> None:
        """Count what ``offers`` could launch as capacity (the autoscaler's pools): register
        before the loop runs, or call ``capacity_changed``."""
        self.launchable.append(offers)

    def capacity_waiting(self) -> dict[int, float]:
        """The runnable steps waiting for capacity and since when (as of the last pass)."""
        return {sid: since for sid, since in self.waiting_for_capacity.items() if sid in self.index}

    def capacity_changed(self) -> None:
        """The venues that count as capacity changed (one attached, left, drains, or its
        health changed): the next pass assesses the waiting steps again."""
        self._capacity_epoch += 1
        self.wake()

    def log_lines(self, venue: Venue, msg: p.Log) -> None:
        node = self.nodes.get(msg.step_id)
        if node is not None and node.lease_id == msg.lease_id and node.venue == venue.machine_id:
            self.logs.append(node.id, msg.lines)

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
        outcome = build_ending(build, self.nodes, incomplete=build.id in self._incomplete)
        if outcome is None:
            return
        self._end_builds(
            {build.id: outcome}, await persist.build_endings(conn, {build.id: outcome}, now)
        )

    def _end_builds(self, endings: Mapping[int, BuildState], recorded: Collection[int]) -> None:
        """Builds that ended (``recorded``: their end was written here) leave memory."""
        for bid, outcome in sorted(endings.items()):
            build = self.builds.get(bid)
            if build is None:
                continue
            build.state = outcome
            if bid in recorded:
                log.info("build %d %s", bid, outcome)
            self._forget_build(build)

    def _forget_build(self, build: ActiveBuild) -> None:
        """Drop a finished build and the final steps no other active build needs."""
        self.build_watch.ended((build.id,))
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

    # ---- defined by the service (service.py) -----------------------------------------------
    async def recover(self, *, quiet: bool = False) -> None:
        raise NotImplementedError

    async def _guard(
        self, coro: Coroutine[Any, Any, _T], *, applies_after_commit: bool = False
    ) -> _T:
        raise NotImplementedError

    async def _retrying(
        self, body: Callable[[], Coroutine[Any, Any, _T]], *, applies_after_commit: bool = False
    ) -> _T:
        raise NotImplementedError
