"""The scheduler service: applies the pure decisions of ``steps``/``matching``/``leases`` to
the database, the connected venues and the build records.

Every transition is written to the database before its effect is sent, so a runner restart
rebuilds the same state (DESIGN §3). All methods run on the event loop; none blocks.

TODO(auth issue, trust scoping, DESIGN §6 "Trust"): an OIDC-authenticated agent
(``AgentSession.identity``, ``auth_kind = "oidc"``) is matched like any other venue, so it may
take a step of any build. It must only get steps of builds whose repository its issuer rule
allows (and never outputs bound for the main signed cache from untrusted builds); the venue
will need the identity and matching a per-build repository check. See docs/oidc.md.
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
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from bigtent import protocol as p
from bigtent.config import SchedulerSection
from bigtent.runner.db import queries
from bigtent.runner.logs import LogStore
from bigtent.runner.scheduler.leases import (
    Disposition,
    backoff_secs,
    classify,
    is_cached_failure,
    new_lease_id,
    next_retry_at,
)
from bigtent.runner.scheduler.matching import Requirement, VenueView, can_run
from bigtent.runner.scheduler.steps import (
    Dispatch,
    RunnableIndex,
    StepNode,
    build_outcome,
    dependents_closure,
    plan_dispatch,
    plan_heights,
    raise_heights,
)
from bigtent.states import BuildState, StepState

log = logging.getLogger(__name__)

_ACTIVE_STATES = [StepState.WAITING, StepState.RUNNABLE, StepState.ASSIGNED, StepState.BUILDING]
_REDO_STATES = frozenset({StepState.FAILED, StepState.DEPENDENCY_FAILED, StepState.CANCELLED})
"""Finished without succeeding: a new build (outside the failure cache) or a restart queues
these again."""
_CACHED_MARK = "cached failure: "
_FIRST_ERROR = "; first error: "
_ERROR_PAUSE_SECS = 1.0
"""After a failed loop pass, wait this long (or until woken) before the next one."""
DISPATCH_CHUNK = 256
"""Decisions leased, written and sent together (one transaction per chunk)."""
ADMIT_CHUNK_FIRST = 500
ADMIT_CHUNK_MAX = 8000
"""A new build's steps are written in chunks growing from the first size to the largest
(one transaction each): the first is small, so its steps are dispatched soon; later ones
amortise their transaction."""
_EXPIRY_SLACK = 1024
"""Stale lease-expiry entries tolerated beyond twice the live leases before a rebuild."""
_T = TypeVar("_T")


AGENT = "agent"
"""``Venue.kind`` of a connected agent."""
SSH = "ssh"
"""``Venue.kind`` of an SSH remote builder (``bigtent.runner.sshvenue``): used only for steps
no agent slot takes in the same pass."""


_Kind = tuple[frozenset[str], frozenset[str], frozenset[str]]
"""What a venue can run: its systems, supported and mandatory features."""


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
    draining: bool = False
    kind: str = AGENT
    """``AGENT`` or ``SSH``: agents are served first (DESIGN §1 venues)."""

    def view(self) -> VenueView:
        return VenueView(
            self.machine_id,
            self.systems,
            self.supported_features,
            self.mandatory_features,
            self.max_jobs,
            len(self.running),
            self.speed_factor,
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
    ) -> None:
        self.engine = engine
        self.config = config
        self.logs = logs
        self._outputs_present = outputs_present
        self.clock = clock
        self.rand = rand
        self.nodes: dict[int, StepNode] = {}
        self.by_drv: dict[str, int] = {}
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
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._admission = asyncio.Lock()
        """One admission (or restart) at a time: steps are shared by .drv between builds."""
        self._incomplete: set[int] = set()
        """Builds being admitted: not over before all their steps are in."""

    # ---- start-up ----------------------------------------------------------------------------
    async def load(self, *, fresh_start: bool = True) -> None:
        """Rebuild the working state from the database (DESIGN §3: a restart loses nothing).

        Leased steps keep their leases for one more lease period, so agents that reconnect
        keep their work; the rest expire into infrastructure retries. On a fresh start no
        agent is connected yet, so every agent row is marked disconnected.
        """
        now = self.clock()
        async with self.engine.begin() as conn:
            if fresh_start:
                await queries.mark_all_agents_disconnected(conn)
            rows = await queries.fetch_active_steps(conn, list(_ACTIVE_STATES))
            for row in rows:
                node = _node_from_row(row)
                if node.state.is_leased:
                    node.lease_expires_at = now + self.config.lease_secs
                    if node.lease_id:
                        self.leases[node.lease_id] = node.id
                        self._watch_lease(node)
                self.nodes[node.id] = node
                self.by_drv[node.drv_path] = node.id
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
            build = ActiveBuild(b.id, b.priority, roots[b.id], members[b.id], BuildState(b.state))
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
            len(self.by_drv),
            len(self.index),
            len(self.leases),
            len(self.builds),
        )
        # Builds whose roots all finished while the runner was down are closed now. A build
        # without roots was being admitted when the runner stopped: it is cancelled (its
        # client never got its id).
        async with self.engine.begin() as conn:
            for build in list(self.builds.values()):
                if not build.roots and build.id not in self._incomplete:
                    log.warning("build %d was cut short while being admitted: cancelled", build.id)
                    await self._cancel(conn, build, now)
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
    ) -> int:
        """Create a build whose root .drvs map to the planned step of that drv (None: cached),
        from a whole plan (``admit_build`` takes one in parts)."""

        async def whole() -> AsyncIterator[PlanPart]:
            heights = plan_heights([(s.drv.drv_path, s.deps) for s in planned])
            yield PlanPart(planned, heights, roots)

        return await self.admit_build(priority=priority, created_by=created_by, parts=whole())

    async def admit_build(
        self, *, priority: int, created_by: str, parts: AsyncIterable[PlanPart]
    ) -> int:
        """Create a build from a plan that arrives in parts (``runner.builds.plan_parts``).

        One drv, one step: planned derivations that already have an active step join it.
        A derivation whose build failure is within the failure cache's TTL fails at once (its
        dependents with it); other finished steps that did not succeed are queued again.

        Steps are admitted in chunks, each in its own transaction, as the parts arrive: the
        first steps are dispatched while later ones are still being planned and written, so
        a build of 100,000 steps starts at once. The build's roots are written last; until
        then the build cannot end. If the plan fails part way (an unknown derivation deep in
        the graph), the steps no other build needs are cancelled and the build is deleted. A
        build without roots is one whose admission was cut short by a stop of the runner: the
        next start cancels it (``load``).
        """
        async with self._admission:
            now = self.clock()
            build_id: int | None = None
            ids: dict[str, int] = {}
            roots: dict[str, str | None] | None = None
            fresh = 0
            size = ADMIT_CHUNK_FIRST
            try:
                async for part in parts:
                    if build_id is None:
                        build_id = await self._create_build(priority, created_by, now)
                    if part.roots is not None:
                        roots = part.roots
                    start = 0
                    while start < len(part.steps):
                        chunk = part.steps[start : start + size]
                        start += len(chunk)
                        async with self._lock:

                            async def stage(
                                build_id: int = build_id,
                                chunk: Sequence[PlannedStep] = chunk,
                                heights: Mapping[str, int] = part.heights,
                            ) -> int:
                                async with self.engine.begin() as conn:
                                    return await self._admit(
                                        conn, build_id, chunk, ids, heights, now, new_members=True
                                    )

                            fresh += await self._guard(stage())
                        self.wake()
                        size = min(2 * size, ADMIT_CHUNK_MAX)
                if roots is None:
                    raise ValueError("a build plan without roots")
                if build_id is None:
                    build_id = await self._create_build(priority, created_by, now)
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

    async def _create_build(self, priority: int, created_by: str, now: float) -> int:
        """The build row, without roots yet (``_finish_admission`` writes them)."""
        async with self._lock:

            async def create() -> int:
                async with self.engine.begin() as conn:
                    build_id = await queries.insert_build(
                        conn,
                        state=BuildState.QUEUED,
                        priority=priority,
                        created_at=now,
                        created_by=created_by,
                        trusted=True,
                    )
                self.builds[build_id] = ActiveBuild(
                    build_id, priority, {}, set(), BuildState.QUEUED
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
                async with self.engine.begin() as conn:
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
                async with self.engine.begin() as conn:
                    build = self.builds.get(build_id)
                    if build is not None:
                        await self._cancel(conn, build, now)
                    await queries.delete_build(conn, build_id)
                log.info("build %d discarded: its plan failed", build_id)

            await self._guard(discard())

    async def restart_build(self, build_id: int) -> bool:
        """Queue a build's failed, dependency-failed and cancelled steps again, clearing the
        cached failures of its failed steps, so they are rebuilt (``bigtent restart``).

        The build becomes queued (running once a step is dispatched) until its steps end
        again. False when there is no such build.
        """
        async with self._admission, self._lock:

            async def body() -> bool:
                now = self.clock()
                async with self.engine.begin() as conn:
                    row = await queries.fetch_build(conn, build_id)
                    if row is None:
                        return False
                    members = await queries.fetch_build_steps(conn, build_id)
                    redo = [m for m in members if m.state in _REDO_STATES]
                    if not redo:
                        return True
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
                    roots = await queries.fetch_all_build_roots(conn, [build_id])
                    root_ids = {r.drv_path: r.step_id for r in roots}
                    build = self.builds.get(build_id)
                    if build is None:
                        await queries.update_build(
                            conn, build_id, state=BuildState.QUEUED, finished_at=None
                        )
                        build = ActiveBuild(
                            build_id,
                            int(row.priority),
                            root_ids,
                            {int(m.id) for m in members},
                            BuildState.QUEUED,
                        )
                        self.builds[build_id] = build
                    heights = plan_heights([(s.drv.drv_path, s.deps) for s in planned])
                    await self._admit(conn, build_id, planned, {}, heights, now, new_members=False)
                    self._recount(build)
                    await self._maybe_finish_build(conn, build, now)
                log.info("build %d restarted: %d steps queued again", build_id, len(redo))
                self.wake()
                return True

            return await self._guard(body())

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
    ) -> int:
        """Make ``planned`` (dependencies first) work of the active build ``build_id``: join
        active steps, fail cached failures at once, queue the rest. Dependencies outside
        ``planned`` were admitted by an earlier call of the same admission: ``ids`` maps
        their .drv paths to step ids, and gains this call's. ``heights`` are the steps'
        heights within the whole plan (``plan_heights``). ``new_members``: write the
        build's membership rows (a new build); otherwise they exist (a restart).

        Returns how many steps were queued. Other active builds holding a finished step that
        is queued again are not over after all: their counts are redone."""
        ttl = self.config.failure_cache_ttl_secs
        existing = await queries.fetch_steps_by_drv(conn, [s.drv.drv_path for s in planned])
        fresh: list[StepNode] = []
        """Steps this build queues: new ones and finished ones queued again."""
        cached: list[StepNode] = []
        """Steps that fail at once as cached failures and were not in memory."""
        touched: list[StepNode] = []
        reopened: set[int] = set()
        inserts: list[queries.DrvInfo] = []
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
            sid = self.by_drv.get(drv.drv_path)
            node = self.nodes.get(sid) if sid is not None else None
            row = existing.get(drv.drv_path)
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
                error = cached_failure_error(row.outcome, float(row.failed_at), ttl, row.error)
                await queries.update_step(conn, sid, error=error)
                log.info("step %d (%s) is a cached failure", sid, drv.drv_path)
                if node is None:
                    cached.append(
                        StepNode(
                            id=sid,
                            drv_path=drv.drv_path,
                            req=Requirement(drv.system, drv.required_features),
                            state=StepState.FAILED,
                            created_at=float(row.created_at),
                            outputs=dict(drv.outputs),
                        )
                    )
                else:
                    touched.append(node)
                continue
            if row is None:
                inserts.append(drv)
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
                node = _new_node(sid, drv, now)
            fresh.append(node)
        await queries.update_steps_each(conn, resets)
        if inserts:
            new_ids = await queries.insert_steps(
                conn, [{"drv_path": d.drv_path, **values} for d in inserts]
            )
            for new in inserts:
                ids[new.drv_path] = new_ids[new.drv_path]
                fresh.append(_new_node(new_ids[new.drv_path], new, now))
            # Dependencies first, as planned: failures below fail what is above.
            position = {item.drv.drv_path: i for i, item in enumerate(planned)}
            fresh.sort(key=lambda n: position[n.drv_path])
        pairs = [(ids[item.drv.drv_path], ids[d]) for item in planned for d in item.deps]
        await queries.insert_step_deps(conn, pairs)
        chunk_ids = [ids[item.drv.drv_path] for item in planned]
        if new_members:
            await queries.insert_build_steps(conn, build_id, chunk_ids)
        for node in fresh + cached:
            self.nodes[node.id] = node
            self.by_drv[node.drv_path] = node.id
        # A dependency admitted earlier may have finished and left memory meanwhile (only
        # after a reload): its row says whether it succeeded.
        gone = sorted({d for _, d in pairs if d not in self.nodes})
        for row in await queries.fetch_steps_by_ids(conn, gone):
            node = _node_from_row(row)
            self.nodes[node.id] = node
            self.by_drv.setdefault(node.drv_path, node.id)
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

    async def cancel_build(self, build_id: int) -> bool:
        """Cancel a build: its steps that no other active build needs stop or never start."""
        async with self._lock:

            async def body() -> bool:
                build = self.builds.get(build_id)
                if build is None or build_id in self._incomplete:
                    return False
                now = self.clock()
                async with self.engine.begin() as conn:
                    await self._cancel(conn, build, now)
                self.wake()
                return True

            return await self._guard(body())

    async def _cancel(self, conn: AsyncConnection, build: ActiveBuild, now: float) -> None:
        for sid in sorted(build.steps):
            node = self.nodes.get(sid)
            if node is None or node.state.is_final:
                continue
            if any(b != build.id for b in node.builds if b in self.builds):
                continue
            if node.state.is_leased:
                venue = self.venues.get(node.venue or "")
                if venue is not None:
                    _try_send(venue, p.Abort(step_id=p.StepId(sid), reason="cancelled"))
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
        await queries.update_build(conn, build.id, state=build.state, finished_at=now)
        self._forget_build(build)

    async def bump_build(self, build_id: int, priority: int) -> bool:
        async with self._lock:

            async def body() -> bool:
                build = self.builds.get(build_id)
                if build is None:
                    return False
                build.priority = priority
                async with self.engine.begin() as conn:
                    await queries.update_build(conn, build_id, priority=priority)
                now = self.clock()
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
            self._watch_lease(node)
        self.wake()
        return kept

    def detach(self, venue: Venue) -> None:
        """A venue's connection ended. Its leases live on until they expire (it may return)."""
        if self.venues.get(venue.machine_id) is venue:
            del self.venues[venue.machine_id]

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
                await self._give_back(node, venue, now)
            if unaccepted:
                self.wake()

    def drain(self, machine_id: str) -> bool:
        venue = self.venues.get(machine_id)
        if venue is None:
            return False
        venue.draining = True
        _try_send(venue, p.Drain(reason="drain requested"))
        return True

    def heartbeat(self, venue: Venue, running: Iterable[int]) -> None:
        """DESIGN §3: heartbeats renew the leases of the steps the agent reports running."""
        expires = self.clock() + self.config.lease_secs
        for sid in running:
            node = self.nodes.get(sid)
            if node is not None and node.state.is_leased and node.venue == venue.machine_id:
                node.lease_expires_at = expires

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
                node.state = StepState.BUILDING
                async with self.engine.begin() as conn:
                    await queries.update_step(
                        conn, node.id, state=node.state, started_at=self.clock()
                    )

            return await self._guard(body())

    async def refused(self, venue: Venue, msg: p.Refused) -> None:
        async with self._lock:
            await self._guard(self._refused(venue, msg))

    async def _refused(self, venue: Venue, msg: p.Refused) -> None:
        node = self.nodes.get(msg.step_id)
        if node is None or node.lease_id != msg.lease_id or not node.state.is_leased:
            return
        log.info("%s refused step %d: %s", venue.name, node.id, msg.reason)
        await self._give_back(node, venue, self.clock())
        self.wake()

    async def _give_back(self, node: StepNode, venue: Venue, now: float) -> None:
        """DESIGN §5: a refusal or a failed send releases the slot, cools the venue down and
        makes the step runnable again, as if it had never been assigned."""
        venue.cooldown_until = now + self.config.refuse_cooldown_secs
        self._cooled(venue)
        self._release(node)
        node.state = StepState.RUNNABLE
        async with self.engine.begin() as conn:
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
        result is acknowledged and ignored, so a step finishes exactly once (DESIGN §3)."""
        async with self._lock:

            async def body() -> bool:
                node = self.nodes.get(msg.step_id)
                if node is None or node.lease_id != msg.lease_id or not node.state.is_leased:
                    log.info("ignoring result for step %s with a stale lease", msg.step_id)
                    return False
                outcome, error = msg.outcome, msg.error
                if outcome is p.Outcome.SUCCESS:
                    present = await self._outputs_present(list(node.outputs.values()))
                    missing = sorted(set(node.outputs.values()) - set(present))
                    if missing:
                        outcome = p.Outcome.UPLOAD_FAILURE
                        error = "outputs not uploaded: " + ", ".join(missing)
                await self._finish_attempt(node, venue, outcome, error, msg, self.clock())
                return True

            return await self._guard(body())

    # ---- the loop --------------------------------------------------------------------------
    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Dispatch forever: one ``tick`` at a time, then sleep until woken or until the
        next deadline. A failed pass is logged and retried: one database error must not stop
        all dispatching (leases assigned in a failed pass simply expire)."""
        while True:
            self._wake.clear()
            try:
                wake_at = await self.tick(self.clock())
            except Exception:
                log.exception("scheduler pass failed; trying again in %.0f s", _ERROR_PAUSE_SECS)
                wake_at = self.clock() + _ERROR_PAUSE_SECS
                with contextlib.suppress(Exception):
                    async with self._lock:
                        await self.recover()
            timeout = None if wake_at is None else max(0.0, wake_at - self.clock())
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation
            # that arrives as the event is set, and the loop would not stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    async def recover(self) -> None:
        """Rebuild the working state from the database, as at start (the caller holds the
        lock). After a failed transaction memory may be ahead of the database; the database
        is the record, so memory is thrown away and reloaded. Connected venues stay."""
        venues = self.venues
        self.nodes, self.by_drv, self.leases, self.builds = {}, {}, {}, {}
        self._expiries = []
        self.index, self.delayed = RunnableIndex(), []
        self._open = {}
        for connected in venues.values():
            connected.running.clear()
            self._reopen(connected)
        await self.load(fresh_start=False)
        for node in self._leased():
            holder = venues.get(node.venue or "")
            if holder is not None:
                holder.running.add(node.id)
        log.warning("scheduler state reloaded from the database")
        self.wake()

    async def _guard(self, coro: Awaitable[_T]) -> _T:
        """Run a transition (lock held); if it fails, reload from the database and re-raise."""
        try:
            return await coro
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError | GeneratorExit):
                raise
            log.exception("scheduler transition failed; reloading state from the database")
            await self.recover()
            raise

    async def tick(self, now: float) -> float | None:
        """One pass of the loop at time ``now``: expire leases, release due retries, match
        work to free slots. Returns when the next pass is due (None: only when woken)."""
        async with self._lock:
            await self._expire_leases(now)
            self._promote_delayed(now)
            await self._dispatch(now)
            return self._next_deadline(now)

    def _next_deadline(self, now: float) -> float | None:
        self._file_expiries()
        times = [self._expiries[0][0]] if self._expiries else []
        if self.delayed:
            times.append(self.delayed[0][0])
        if len(self.index) and self._cooling_until is not None and self._cooling_until > now:
            times.append(self._cooling_until)
        return min(times) if times else None

    def _leased(self) -> list[StepNode]:
        return [self.nodes[s] for s in self.leases.values() if s in self.nodes]

    def _watch_lease(self, node: StepNode) -> None:
        """File a lease's expiry (after it was granted, or moved earlier)."""
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
        """Expire the leases due by ``now``: only the due end of the heap is looked at."""
        due: list[StepNode] = []
        while True:
            self._file_expiries()
            if not self._expiries or self._expiries[0][0] > now:
                break
            _, sid, _ = heapq.heappop(self._expiries)
            due.append(self.nodes[sid])
        for node in due:
            if node.lease_id is None or not node.state.is_leased:
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

    async def _dispatch(self, now: float) -> None:
        """Fill free slots, in chunks of at most ``DISPATCH_CHUNK`` decisions: each chunk's
        leases are written in one transaction and its ``assign`` messages sent before the
        next chunk is planned, so the first agents start while later decisions are made."""
        while len(self.index):
            agents, ssh = self._free_views(now)
            if not agents and not ssh:
                return
            # Agents first (DESIGN §5's order among them); SSH builders only get the steps
            # that no free agent slot takes.
            decisions = plan_dispatch(self.index, agents, limit=DISPATCH_CHUNK)
            if ssh and len(decisions) < DISPATCH_CHUNK and len(self.index):
                decisions += plan_dispatch(self.index, ssh, limit=DISPATCH_CHUNK - len(decisions))
            if not decisions:
                return
            await self._assign(decisions, now)
            if len(decisions) < DISPATCH_CHUNK:
                return

    def _free_views(self, now: float) -> tuple[list[VenueView], list[VenueView]]:
        """Views of the available agents and SSH builders that could run some runnable step.

        Only kinds of venues (systems and features) that fit a waiting step are looked at:
        a pass costs the number of kinds plus the free venues that could take work, not the
        number of venues."""
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
                if (
                    self.venues.get(machine_id) is not venue
                    or venue.draining
                    or len(venue.running) >= venue.max_jobs
                ):
                    del members[machine_id]  # back when a slot is released or it attaches
                    continue
                until = max(venue.cooldown_until, venue.backoff_until)
                if until > now:
                    cooling = until if cooling is None else min(cooling, until)
                    continue
                (ssh if venue.kind == SSH else agents).append(venue.view())
        self._cooling_until = cooling
        return agents, ssh

    def _kind_fits(self, kind: _Kind, members: dict[str, Venue], req: Requirement) -> bool:
        fits = self._fits.get((kind, req))
        if fits is None:
            fits = self._fits[(kind, req)] = can_run(next(iter(members.values())).view(), req)
        return fits

    def _cooled(self, venue: Venue) -> None:
        """The venue's cooldown or backoff was set: the loop wakes when it ends."""
        until = max(venue.cooldown_until, venue.backoff_until)
        if until > 0 and (self._cooling_until is None or until < self._cooling_until):
            self._cooling_until = until

    def _reopen(self, venue: Venue) -> None:
        """The venue may have a free slot (again)."""
        if self.venues.get(venue.machine_id) is venue:
            kind = (venue.systems, venue.supported_features, venue.mandatory_features)
            self._open.setdefault(kind, {})[venue.machine_id] = venue

    async def _assign(self, decisions: Sequence[Dispatch], now: float) -> None:
        """Lease, record and send one chunk of decisions."""
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
            return
        expires = now + self.config.lease_secs
        rows: list[dict[str, Any]] = []
        started: set[int] = set()
        for node, venue, msg in ready:
            lease = msg.lease_id
            node.state = StepState.ASSIGNED
            node.lease_id = lease
            node.lease_expires_at = expires
            node.venue = venue.machine_id
            self.leases[lease] = node.id
            self._watch_lease(node)
            venue.running.add(node.id)
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
            for bid in node.builds:
                build = self.builds.get(bid)
                if build is not None and build.state is BuildState.QUEUED:
                    build.state = BuildState.RUNNING
                    started.add(bid)
        async with self.engine.begin() as conn:
            await queries.update_steps_each(conn, rows)
            for bid in sorted(started):
                await queries.update_build(conn, bid, state=BuildState.RUNNING)
        for node, venue, msg in ready:
            if node.attempts:
                self.logs.append(
                    node.id, [f"[bigtent: attempt {node.attempts + 1} on {venue.name}]"]
                )
            if not _try_send(venue, msg):
                log.warning("could not send step %d to %s; cooling it down", node.id, venue.name)
                await self._give_back(node, venue, now)

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

    async def _finish_attempt(
        self,
        node: StepNode,
        venue: Venue | None,
        outcome: p.Outcome,
        error: str,
        msg: p.Result | None,
        now: float,
    ) -> None:
        policy = classify(outcome)
        self._release(node)
        self.logs.close(node.id)
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
        async with self.engine.begin() as conn:
            if venue is not None:
                # The agent's row keeps its counters and backoff in step with memory, so a
                # reconnect cannot shed the backoff (DESIGN §4).
                await queries.record_agent_attempt(
                    conn,
                    venue.machine_id,
                    succeeded=int(policy.disposition is Disposition.SUCCEED),
                    failed=int(policy.disposition is Disposition.FAIL),
                    infra=int(policy.counts_against_venue),
                    consecutive_failures=venue.consecutive_failures,
                    backoff_until=venue.backoff_until or None,
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
                            dep.state = StepState.RUNNABLE
                            ready.append(dep)
                    await queries.update_steps(
                        conn, [n.id for n in ready], state=StepState.RUNNABLE
                    )
                    for dep in ready:
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
                    await queries.update_step(conn, node.id, state=node.state, **values)
                    self._make_runnable(node, now)
            for bid in sorted({b for n in newly_final for b in n.builds}):
                build = self.builds.get(bid)
                if build is not None:
                    await self._maybe_finish_build(conn, build, now)
        self.wake()

    async def _fail_dependents(
        self, conn: AsyncConnection, node: StepNode, now: float
    ) -> list[StepNode]:
        """DESIGN: a failure fails only what depends on it; unrelated steps go on."""
        failed = []
        for sid in dependents_closure(self.nodes, node.id):
            dep = self.nodes[sid]
            if dep.state in (StepState.WAITING, StepState.RUNNABLE):
                self.index.discard(dep.id)
                dep.state = StepState.DEPENDENCY_FAILED
                self._count_final(dep)
                failed.append(dep)
        await queries.update_steps(
            conn,
            [d.id for d in failed],
            state=StepState.DEPENDENCY_FAILED,
            finished_at=now,
            error=f"dependency {node.drv_path} failed",
        )
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
        await queries.update_build(conn, build.id, state=outcome, finished_at=now)
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
                if self.by_drv.get(node.drv_path) == sid:
                    del self.by_drv[node.drv_path]
                for d in node.deps:
                    if d in self.nodes:
                        self.nodes[d].dependents.discard(sid)

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


def _new_node(sid: int, drv: queries.DrvInfo, now: float) -> StepNode:
    return StepNode(
        id=sid,
        drv_path=drv.drv_path,
        req=Requirement(drv.system, drv.required_features),
        state=StepState.WAITING,
        created_at=now,
        outputs=dict(drv.outputs),
    )


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
        req=Requirement(row.system, frozenset(json.loads(row.required_features))),
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
