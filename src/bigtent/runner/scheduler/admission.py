"""New builds: a whole plan in one transaction (``add_build``) or in parts, a
chunk per transaction (``admit_build``); steps joined, queued, or failed from the failure
cache."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterable, Mapping, Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from bigtent.runner.db import queries
from bigtent.runner.scheduler import persist
from bigtent.runner.scheduler.dispatch import Dispatching
from bigtent.runner.scheduler.matching import Requirement
from bigtent.runner.scheduler.model import (
    REDO_STATES,
    ActiveBuild,
    PlannedStep,
    PlanPart,
    new_node,
    node_from_row,
    send_aborts,
)
from bigtent.runner.scheduler.steps import StepNode, plan_heights, raise_heights
from bigtent.runner.scheduler.sync import LostRace
from bigtent.runner.scheduler.transitions import Admit, Cancellation, StoredStep, admit_verdict
from bigtent.runner.trust import untrusted_work
from bigtent.states import BuildState, StepState

log = logging.getLogger(__name__)

ADMIT_CHUNK_FIRST = 500
ADMIT_CHUNK_MAX = 8000
"""A new build's steps are written in chunks growing from the first size to the largest
(one transaction each): the first is small, so its steps are dispatched soon; later ones
amortise their transaction."""


class Admission(Dispatching):
    """New builds: a whole plan in one transaction (``add_build``) or in parts, a
    chunk per transaction (``admit_build``); steps joined, queued, or failed from the failure
    cache."""

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
                    build_id = await persist.new_build(
                        conn, priority, created_by, now, repository, ref, submission_key, trusted
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
        if not self.database.stages_admission(trusted):
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
                    build_id = await persist.new_build(
                        conn, priority, created_by, now, repository, ref, submission_key, True
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
                cancelled: Cancellation | None = None
                async with self._begin() as conn:
                    build = self.builds.get(build_id)
                    if build is not None:
                        cancelled = await self._cancel(conn, build, now)
                    await queries.delete_build(conn, build_id)
                if cancelled is not None:
                    send_aborts(self._apply_cancel(cancelled), "cancelled")
                log.info("build %d discarded: its plan failed", build_id)

            await self._guard(discard(), applies_after_commit=True)

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
            and node.state not in REDO_STATES
        }
        work = untrusted_work(
            {s.drv.drv_path: s.deps for s in planned},
            [d for d in roots.values() if d is not None],
            live,
        )
        kept = [s for s in planned if s.drv.drv_path in work.shared | work.own]
        return kept, {s.drv.drv_path: s.drv.drv_path in work.shared for s in kept}, work.shared

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
            stored = (
                None
                if row is None
                else StoredStep(StepState(row.state), row.outcome, row.failed_at)
            )
            verdict = admit_verdict(
                drv.drv_path, node.state if node is not None else None, stored, now, ttl
            )
            if verdict is Admit.JOIN:
                assert node is not None
                ids[drv.drv_path] = node.id
                touched.append(node)
                continue
            if verdict is Admit.CREATE:
                inserts[tr].append(drv)
                continue
            assert row is not None
            if verdict is Admit.CACHED:
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
                node = new_node(sid, drv, tr, now)
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
                    fresh.append(new_node(sid_new, drv, tr, now))
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
            node = node_from_row(row)
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
