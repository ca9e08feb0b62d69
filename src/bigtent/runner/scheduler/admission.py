"""New builds: a whole plan in one transaction (``add_build``) or in parts, a
chunk per transaction (``admit_build``); steps joined, queued, or failed from the failure
cache."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections import ChainMap
from collections.abc import AsyncIterable, Mapping, Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from bigtent.runner.scheduler import persist, reads
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
from bigtent.runner.scheduler.reads import DrvInfo
from bigtent.runner.scheduler.steps import StepNode, plan_heights, raise_heights
from bigtent.runner.scheduler.sync import LostRace
from bigtent.runner.scheduler.transitions import (
    AdmissionPlan,
    Admit,
    Cancellation,
    StoredStep,
    admit_verdict,
    admitted,
    build_ending,
)
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
                async with self._begin() as conn:
                    build_id = await persist.new_build(
                        conn, priority, created_by, now, repository, ref, submission_key, trusted
                    )
                    plan = await self._admit(
                        conn,
                        build_id,
                        work,
                        {},
                        heights,
                        now,
                        new_members=True,
                        trust=trust,
                        shared=shared,
                    )
                    root_ids = {
                        drv: plan.ids[step_drv] if step_drv is not None else None
                        for drv, step_drv in roots.items()
                    }
                    await persist.build_roots(conn, build_id, root_ids)
                    build = ActiveBuild(
                        build_id,
                        priority,
                        root_ids,
                        set(),
                        BuildState.QUEUED,
                        repository=repository,
                        trusted=trusted,
                    )
                    ending = self._ending_after(build, plan)
                    endings = {build_id: ending} if ending is not None else {}
                    recorded = await persist.build_endings(conn, endings, now)
                self.builds[build_id] = build
                fresh = self._apply_admission(plan, now)
                self._recount(build)
                self._end_builds(endings, recorded)
                log.info(
                    "build %d: %d roots, %d steps (%d queued)",
                    build_id,
                    len(roots),
                    len(build.steps),
                    fresh,
                )
                self.wake()
                return build_id

            return await self._retrying(body, applies_after_commit=True)

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
                                    plan = await self._admit(
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
                                return self._apply_admission(plan, now)

                            fresh += await self._guard(stage(), applies_after_commit=True)
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

            return await self._guard(create(), applies_after_commit=True)

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
                build = self.builds.get(build_id)
                endings: dict[int, BuildState] = {}
                async with self._begin() as conn:
                    await persist.build_roots(conn, build_id, root_ids)
                    if build is not None:
                        ending = build_ending(
                            dataclasses.replace(
                                build, roots=root_ids, unfinished=self._unfinished(build)
                            ),
                            self.nodes,
                        )
                        endings = {build_id: ending} if ending is not None else {}
                    recorded = await persist.build_endings(conn, endings, now)
                self._incomplete.discard(build_id)
                if build is not None:
                    build.roots = root_ids
                    self._recount(build)
                    self._end_builds(endings, recorded)

            await self._guard(finish(), applies_after_commit=True)

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
                    await persist.build_deleted(conn, build_id)
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
    ) -> AdmissionPlan:
        """Decide and write how ``planned`` (dependencies first) becomes work of the build
        ``build_id``: join active steps, fail cached failures at once, queue the rest. Memory
        is not changed: ``_apply_admission`` applies the returned plan once the transaction
        committed. Dependencies outside ``planned`` were admitted by an earlier call of the
        same admission: ``ids`` (the admission's own map) maps their .drv paths to step ids,
        and gains this call's. ``heights`` are the steps' heights within the whole plan
        (``plan_heights``). ``new_members``: write the build's membership rows (a new build);
        otherwise they exist (a restart). ``trust`` says which step (trusted or untrusted)
        each derivation uses; the ``shared`` ones are live trusted steps of an untrusted
        build, which get no new dependencies."""
        ttl = self.config.failure_cache_ttl_secs
        # Locked until commit: another runner cannot change these steps under this decision.
        existing = {
            tr: await reads.steps_by_drv(
                conn, [s.drv.drv_path for s in planned if trust[s.drv.drv_path] is tr], trusted=tr
            )
            for tr in (True, False)
        }
        plan = AdmissionPlan(build_id, heights, ids)
        inserts: dict[bool, list[DrvInfo]] = {True: [], False: []}
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
            try:
                verdict = admit_verdict(
                    drv.drv_path, node.state if node is not None else None, stored, now, ttl
                )
            except LostRace:
                self._resync = True  # another runner's build: read everything again, then retry
                raise
            if verdict is Admit.JOIN:
                assert node is not None
                plan.ids[drv.drv_path] = node.id
                plan.touched.append(node.id)
                continue
            if verdict is Admit.CREATE:
                inserts[tr].append(drv)
                continue
            assert row is not None
            sid = int(row.id)
            plan.ids[drv.drv_path] = sid
            if verdict is Admit.CACHED:
                await persist.cached_failure_hit(conn, build_id, row, ttl, now)
                log.info("step %d (%s) is a cached failure", sid, drv.drv_path)
                if node is None:
                    plan.new.append(
                        StepNode(
                            id=sid,
                            drv_path=drv.drv_path,
                            req=Requirement(drv.system, drv.required_features, tr),
                            state=StepState.FAILED,
                            created_at=float(row.created_at),
                            outputs=dict(drv.outputs),
                        )
                    )
                    plan.cached.append(sid)
                else:
                    plan.touched.append(node.id)
                continue
            plan.resets.append({"id": sid, **values})
            if node is not None:
                # A finished step still held by an active build runs again in place.
                plan.requeued.append(node)
            else:
                plan.new.append(new_node(sid, drv, tr, now))
            plan.fresh.append(sid)
        await persist.steps_queued_again(conn, plan.resets)
        for tr, new in inserts.items():
            if not new:
                continue
            new_ids = await persist.new_steps(conn, new, tr, values)
            for drv in new:
                sid_new = new_ids.get(drv.drv_path)
                if sid_new is None:
                    self._resync = True
                    raise LostRace(f"another runner created the step of {drv.drv_path}")
                plan.ids[drv.drv_path] = sid_new
                plan.new.append(new_node(sid_new, drv, tr, now))
                plan.fresh.append(sid_new)
        # Dependencies first, as planned: failures below fail what is above.
        position = {ids[item.drv.drv_path]: i for i, item in enumerate(planned)}
        plan.fresh.sort(key=position.__getitem__)
        plan.pairs = [
            (ids[item.drv.drv_path], ids[d])
            for item in planned
            if item.drv.drv_path not in shared
            for d in item.deps
            # architecture §6: a trusted step never waits for (or uses) an untrusted one.
            if not (trust[item.drv.drv_path] and not trust[d])
        ]
        plan.chunk = [ids[item.drv.drv_path] for item in planned]
        view = plan.view(self.nodes)
        # A dependency admitted earlier may have finished and left memory meanwhile (only
        # after a reload): its row says whether it succeeded.
        for row in await reads.steps(conn, {d for _, d in plan.pairs if d not in view}):
            plan.known.append(node_from_row(row))
        view = plan.view(self.nodes)
        involved = {i for pair in plan.pairs for i in pair}
        states = {sid: view[sid].state for sid in involved}
        states.update(dict.fromkeys(plan.fresh, StepState.WAITING))
        plan.decided = admitted(
            plan.pairs, plan.fresh, states.__getitem__, lambda sid: view[sid].drv_path
        )
        await persist.admitted(
            conn,
            build_id if new_members else None,
            plan.chunk,
            plan.pairs,
            [
                {
                    "id": sid,
                    "state": StepState.DEPENDENCY_FAILED,
                    "finished_at": now,
                    "error": error,
                }
                for sid, error in plan.decided.failed.items()
            ],
            plan.decided.runnable,
        )
        return plan

    def _ending_after(
        self,
        build: ActiveBuild,
        plan: AdmissionPlan,
        extra: Sequence[StepNode] = (),
        roots: dict[str, int | None] | None = None,
    ) -> BuildState | None:
        """How ``build`` ends once ``plan`` (and ``roots``, when they come with it) is
        applied, decided before it is: memory has the ``extra`` nodes only then too."""
        view = ChainMap({n.id: n for n in extra}, plan.view(self.nodes))
        after = plan.states()
        steps = build.steps | set(plan.chunk)
        unfinished = sum(
            1 for sid in steps if sid in view and not after.get(sid, view[sid].state).is_final
        )
        return build_ending(
            dataclasses.replace(
                build, roots=build.roots if roots is None else roots, unfinished=unfinished
            ),
            view,
            after,
            incomplete=build.id in self._incomplete,
        )

    def _apply_admission(self, plan: AdmissionPlan, now: float) -> int:
        """Apply an admission whose transaction committed (``_admit``); returns how many
        steps it queued. Other active builds holding a finished step that is queued again
        are not over after all: their counts are redone."""
        reopened: set[int] = set()
        for node in plan.requeued:
            reopened |= node.builds
            node.state = StepState.WAITING
            node.created_at = now
            node.deps.clear()
            node.not_before = None
            node.attempts = 0
            node.venue = None
        for row in plan.resets:
            self.logs.reset(row["id"])  # a fresh run, not a retry: a fresh log
        for node in plan.new:
            self.nodes[node.id] = node
            self._by_drv(node.req.trusted)[node.drv_path] = node.id
        for node in plan.known:
            self.nodes[node.id] = node
            self._by_drv(node.req.trusted).setdefault(node.drv_path, node.id)
        decided = plan.decided
        for s, d in decided.links:
            self.nodes[d].dependents.add(s)
        for s, deps in decided.waits.items():
            self.nodes[s].deps |= deps
        build = self.builds[plan.build_id]
        build.steps.update(plan.chunk)
        for sid in plan.chunk:
            member = self.nodes.get(sid)
            if member is not None:
                member.builds.add(plan.build_id)
                member.priority = max(member.priority, build.priority)
        for sid in decided.failed:
            self.nodes[sid].state = StepState.DEPENDENCY_FAILED
        for sid in decided.runnable:
            node = self.nodes[sid]
            node.state = StepState.RUNNABLE
            self.metrics.step_runnable(node, now)
        # Heights within the plan first (so dependents admitted later count already), for
        # these steps and their dependencies (a leaf admitted early had only an estimate);
        # then with every active build's dependents.
        raised: list[StepNode] = []
        for sid in sorted(set(plan.chunk).union(d for _, d in plan.pairs)):
            member = self.nodes.get(sid)
            if member is not None and plan.heights.get(member.drv_path, 0) > member.height:
                member.height = plan.heights[member.drv_path]
                raised.append(member)
        order = (
            list(reversed(plan.fresh))
            + plan.touched
            + plan.cached
            + [d for n in raised for d in sorted(n.deps)]
        )
        rekey = raise_heights(self.nodes, order) | {
            *plan.fresh,
            *plan.touched,
            *(n.id for n in raised),
        }
        for sid in sorted(rekey):
            node = self.nodes[sid]
            if node.state is StepState.RUNNABLE:
                self._make_runnable(node, now)
        for bid in sorted(reopened - {plan.build_id}):
            other = self.builds.get(bid)
            if other is not None:
                self._recount(other)
        return len(plan.fresh)
