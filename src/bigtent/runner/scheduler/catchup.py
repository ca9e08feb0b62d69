"""Several runners on one database (PostgreSQL; docs/architecture.md): notes of
what the others changed, checks that a transition's rows are as memory has them, lease
renewals stored for the others, and catching up with their changes."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from bigtent import protocol as p
from bigtent.graphs import dependencies_first
from bigtent.runner.db.notify import Change
from bigtent.runner.scheduler import persist, reads
from bigtent.runner.scheduler.model import ActiveBuild, node_from_row, try_send
from bigtent.runner.scheduler.state import SchedulerState
from bigtent.runner.scheduler.steps import StepNode, note_built, raise_heights
from bigtent.runner.scheduler.sync import (
    LostRace,
    Seen,
    Settling,
    Stored,
    catch_up,
    settle_waiting,
)
from bigtent.runner.scheduler.transitions import build_endings
from bigtent.states import BuildState, StepState

log = logging.getLogger(__name__)


class CatchUp(SchedulerState):
    """Several runners on one database (PostgreSQL; docs/architecture.md): notes of
    what the others changed, checks that a transition's rows are as memory has them, lease
    renewals stored for the others, and catching up with their changes."""

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
        if self._to_settle or self._to_end:
            await self._settle_caught_up()

    async def _expect(
        self,
        conn: AsyncConnection,
        nodes: Sequence[StepNode],
        *,
        expired_by: float | None = None,
    ) -> None:
        """The steps' rows must still say what the working copy does (state and lease;
        ``expired_by``: and the lease expired by then): otherwise LostRace. The rows stay
        locked until the transaction ends, so no other runner changes them under this
        transition. Alone on its database (SQLite) the runner's memory is the record's exact
        copy: no check (``shared``)."""
        rows = await self.database.rows_to_check(conn, [n.id for n in nodes])
        if rows is None:
            return
        for node in nodes:
            row = rows.get(node.id)
            if (
                row is None
                or row.state != node.state
                or row.lease_id != node.lease_id
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
        if not self.database.stores_renewals():
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
            await persist.renewals(conn, renewals)
        for sid, _, expires in renewals:
            self._stored_expiry[sid] = expires

    async def _expired_in_database(self, due: Sequence[StepNode], now: float) -> set[int] | None:
        """Of the leases due here, those the database also says expired (None: alone with
        the database, all of them). A lease another runner renewed gets its expiry from the
        database; a step another runner moved on is read again."""
        check = [n for n in due if n.id not in self._lost_here]
        rows = await self.database.expiry_rows(self.engine, [n.id for n in check])
        if rows is None:
            return None
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
        read those rows again (and, for builds new here, their members and roots; for steps
        new here or waiting again, their edges), then copy them into memory (``sync.catch_up``
        decides the side effects). The rows are committed, so the copy is safe; memory changes
        only once every read is done, and a failed read leaves it as it was (the rows are read
        again at the next catch-up). The waiting steps and builds it touched are settled next
        (``_settle_caught_up``)."""
        try:
            async with self._begin() as conn:
                build_rows = await reads.builds(conn, build_ids)
                new = [
                    int(b.id)
                    for b in build_rows
                    if int(b.id) not in self.builds and not BuildState(b.state).is_final
                ]
                parts = await reads.build_parts(conn, new)
                new_roots = parts.root_steps()
                wanted = step_ids | new_roots | {s for m in parts.members.values() for s in m}
                rows = await reads.steps(conn, wanted)
                fresh = [int(r.id) for r in rows if self._reads_edges(r, new_roots)]
                pairs = await reads.edges(conn, fresh, both_ends=True) if fresh else []
        except BaseException:
            self._stale_steps |= step_ids
            self._stale_builds |= build_ids
            raise
        self._copy(build_rows, parts, rows, pairs, new_roots)
        log.debug("caught up with %d steps and %d builds", len(rows), len(build_rows))

    def _reads_edges(self, row: Any, new_roots: set[int]) -> bool:
        """Is the step of ``row`` new here, or waiting again? Then its edges are read."""
        node = self.nodes.get(int(row.id))
        stored = StepState(row.state)
        if node is None:
            return not stored.is_final or int(row.id) in new_roots
        changed = stored is not node.state or row.lease_id != node.lease_id
        return changed and stored is StepState.WAITING

    def _copy(
        self,
        build_rows: Sequence[Any],
        parts: reads.BuildParts,
        rows: Sequence[Any],
        pairs: Sequence[tuple[int, int]],
        new_roots: set[int],
    ) -> None:
        """Copy committed rows into memory (no I/O). The waiting steps among them and their
        dependents, and the builds they touched, are left to ``_settle_caught_up``."""
        now = self.clock()
        fresh: dict[int, StepNode] = {}
        """Steps new here, or waiting again: their edges were read."""
        moved: list[StepNode] = []
        """Steps whose state or lease changed."""
        seen: list[StepNode] = []
        for row in rows:
            node = self.nodes.get(int(row.id))
            if node is None:
                if StepState(row.state).is_final and int(row.id) not in new_roots:
                    continue
                node = node_from_row(row)
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
        for s, d in pairs:
            dependent, dep = self.nodes.get(s), self.nodes.get(d)
            if dependent is None or dep is None:
                continue
            dep.dependents.add(s)
            if dependent.state is StepState.WAITING and dep.state is not StepState.SUCCEEDED:
                dependent.deps.add(d)
        for node in moved:
            if node.state is StepState.SUCCEEDED:
                note_built(self.nodes, node)  # another runner's success: locality still holds
                for d in node.dependents:
                    if d in self.nodes:
                        self.nodes[d].deps.discard(node.id)
        waiting = {
            w.id: w
            for n in moved
            for w in [n, *(self.nodes[d] for d in n.dependents if d in self.nodes)]
            if w.state is StepState.WAITING
        }
        touched = {b for n in [*moved, *waiting.values()] for b in n.builds}
        for b in build_rows:
            bid = int(b.id)
            touched |= self._catch_up_build(b, parts.roots.get(bid), parts.members.get(bid))
        rekey: set[int] = set()
        if fresh:
            rekey = raise_heights(
                self.nodes, dependencies_first({i: n.dependents for i, n in fresh.items()})
            )
        for node in [*seen, *(self.nodes[i] for i in sorted(rekey))]:
            if node.state is StepState.RUNNABLE:
                self._make_runnable(node, now)
        for bid in sorted(touched):
            build = self.builds.get(bid)
            if build is not None:
                build.unfinished = sum(
                    1
                    for sid in build.steps
                    if sid in self.nodes and not self.nodes[sid].state.is_final
                )
        self._to_settle |= waiting.keys()
        self._to_end |= touched

    async def _settle_caught_up(self) -> None:
        """Waiting steps a catch-up copied whose dependencies are all done (as the database
        says): runnable or dependency-failed, each only if still waiting (another runner may
        be first); then the builds that end with them, or with the steps other runners
        finished. Decided (``sync.settle_waiting``, ``transitions.build_endings``), written in
        one transaction, and applied to memory only after it commits: if it fails, memory is
        as it was and the same steps and builds are settled at the next catch-up."""
        waiting = [
            self.nodes[i]
            for i in sorted(self._to_settle)
            if i in self.nodes and self.nodes[i].state is StepState.WAITING
        ]
        ends = {b for b in self._to_end if b in self.builds}
        self._to_settle, self._to_end = set(), set()
        if not waiting and not build_endings(self.builds, self.nodes, {}, self._incomplete, ends):
            return
        now = self.clock()
        try:
            async with self._begin() as conn:
                settling, changed, endings, recorded = await self._write_settling(
                    conn, waiting, ends, now
                )
        except BaseException:
            self._to_settle |= {n.id for n in waiting}
            self._to_end |= ends
            raise
        for s in settling:
            node = self.nodes.get(s.step_id)
            if node is None:
                continue
            if s.state is StepState.WAITING:
                node.deps = set(s.waits_on)
            elif s.step_id not in changed:
                self._stale_steps.add(node.id)
                self.wake()
            else:
                if s.state.is_final:
                    self._count_final(node)
                node.state = s.state
                node.deps.clear()
                if node.state is StepState.RUNNABLE:
                    self._make_runnable(node, now)
        self._end_builds(endings, recorded)

    async def _write_settling(
        self, conn: AsyncConnection, waiting: Sequence[StepNode], ends: set[int], now: float
    ) -> tuple[list[Settling], set[int], dict[int, BuildState], set[int]]:
        """Read the waiting steps' dependencies, decide and write: returns the decisions, the
        steps whose row changed (the others moved on elsewhere first), the builds that end and
        those whose end was recorded here."""
        deps: dict[int, list[int]] = {n.id: [] for n in waiting}
        if deps:
            for s, d in await reads.edges(conn, deps):
                deps[s].append(d)
        stored = await reads.step_states(conn, {d for ds in deps.values() for d in ds})
        states = {d: (StepState(state), drv) for d, (state, drv) in stored.items()}
        settling = settle_waiting(deps, states, self.nodes)
        changed: set[int] = set()
        for decision in settling:
            if decision.state is StepState.WAITING:
                continue
            values: dict[str, Any] = {}
            if decision.error is not None:
                values.update(finished_at=now, error=decision.error)
            if await persist.settled(conn, decision.step_id, decision.state, **values):
                changed.add(decision.step_id)
        finished = {d.step_id: d.state for d in settling if d.step_id in changed}
        final = {sid: state for sid, state in finished.items() if state.is_final}
        endings = build_endings(self.builds, self.nodes, final, self._incomplete, ends)
        return settling, changed, endings, await persist.build_endings(conn, endings, now)

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
            try_send(venue, p.Abort(step_id=p.StepId(node.id), reason=f"{stored} elsewhere"))
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
