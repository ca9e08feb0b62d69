"""What users do to a build: cancel, bump, restart, and other build events."""

from __future__ import annotations

import logging
from collections.abc import Collection

from bigtent.graphs import dependencies_first
from bigtent.runner.scheduler import persist, reads
from bigtent.runner.scheduler.admission import Admission
from bigtent.runner.scheduler.model import (
    REDO_STATES,
    RUNNER_ACTOR,
    ActiveBuild,
    PlannedStep,
    node_from_row,
    send_aborts,
)
from bigtent.runner.scheduler.steps import plan_heights, restart_selection
from bigtent.states import BuildEventKind, BuildState, StepState

log = logging.getLogger(__name__)


class Controls(Admission):
    """What users do to a build: cancel, bump, restart, and other build events."""

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
                    cancelled = await self._cancel(conn, build, now)
                    await persist.build_event(
                        conn, build_id, at=now, kind=BuildEventKind.CANCELLED, actor=actor
                    )
                send_aborts(self._apply_cancel(cancelled), "cancelled")
                self.wake()
                return True

            return await self._retrying(body, applies_after_commit=True)

    async def record_build_event(
        self, build_id: int, kind: BuildEventKind, *, actor: str, detail: str | None = None
    ) -> None:
        """Record an event of a build that changes nothing in the scheduler's memory."""
        async with self._begin() as conn:
            await persist.build_event(
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
                    await persist.bumped(conn, build_id, priority)
                    await persist.build_event(
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

            return await self._guard(body(), applies_after_commit=True)

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
                    stored = await reads.restart_rows(conn, build_id)
                    if stored is None:
                        return False
                    members, root_ids = stored.members, stored.roots
                    member_ids = [int(m.id) for m in members]
                    if roots is not None:
                        named = [root_ids.get(d) for d in roots]
                        chosen = restart_selection(
                            {int(m.id): StepState(m.state) for m in members},
                            stored.deps,
                            {int(s) for s in named if s is not None},
                        )
                        members = [m for m in members if int(m.id) in chosen]
                    redo = [m for m in members if m.state in REDO_STATES]
                    if not redo:
                        return True
                    await persist.build_event(
                        conn,
                        build_id,
                        at=now,
                        kind=BuildEventKind.RESTARTED,
                        actor=actor,
                        detail=f"{len(redo)} steps queued again",
                    )
                    pending = [m for m in members if m.state != StepState.SUCCEEDED]
                    drvs = await reads.derivations(conn, [m.drv_path for m in pending])
                    by_id = {int(m.id): str(m.drv_path) for m in pending}
                    deps: dict[str, list[str]] = {d: [] for d in by_id.values()}
                    for s, d in stored.deps:
                        if s in by_id and d in by_id:
                            deps[by_id[s]].append(by_id[d])
                    planned = [
                        PlannedStep(drvs[d], tuple(sorted(deps[d])))
                        for d in dependencies_first(deps)
                    ]
                    # Every step keeps its trust: an untrusted build's shared trusted step
                    # runs again as the trusted step it is.
                    trust = {str(m.drv_path): bool(m.trusted) for m in pending}
                    build = self.builds.get(build_id)
                    reopened = build is None
                    if build is None:
                        row = stored.build
                        build = ActiveBuild(
                            build_id,
                            int(row.priority),
                            root_ids,
                            set(member_ids),
                            BuildState.QUEUED,
                            repository=row.repository,
                            trusted=bool(row.trusted),
                        )
                    await persist.restarted(
                        conn,
                        build_id,
                        [int(m.id) for m in redo if m.state == StepState.FAILED],
                        reopen=reopened,
                    )
                    heights = plan_heights([(s.drv.drv_path, s.deps) for s in planned])
                    plan = await self._admit(
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
                    view = plan.view(self.nodes)
                    final_roots = [
                        node_from_row(step_row)
                        for step_row in await reads.steps(
                            conn, {s for s in root_ids.values() if s is not None and s not in view}
                        )
                    ]
                    ending = self._ending_after(build, plan, final_roots)
                    endings = {build_id: ending} if ending is not None else {}
                    recorded = await persist.build_endings(conn, endings, now)
                self.builds[build_id] = build
                self._apply_admission(plan, now)
                for node in final_roots:
                    self.nodes[node.id] = node
                    self._by_drv(node.req.trusted).setdefault(node.drv_path, node.id)
                    node.builds.add(build_id)
                self._recount(build)
                self._end_builds(endings, recorded)
                log.info("build %d restarted: %d steps queued again", build_id, len(redo))
                self.wake()
                return True

            return await self._retrying(body, applies_after_commit=True)
