"""How a step's attempt ends: accepted, refused, a result, a failed send, an
expiry or a cancellation; the venue's health and backoff; dependents and builds that
end with it."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence

from sqlalchemy.ext.asyncio import AsyncConnection

from bigtent import protocol as p
from bigtent.runner.scheduler import persist
from bigtent.runner.scheduler.catchup import CatchUp
from bigtent.runner.scheduler.leases import Disposition
from bigtent.runner.scheduler.model import ActiveBuild, Venue
from bigtent.runner.scheduler.steps import StepNode, note_built
from bigtent.runner.scheduler.sync import LostRace
from bigtent.runner.scheduler.transitions import (
    AttemptEnd,
    Cancellation,
    build_endings,
    cancel,
    end_attempt,
    holds_lease,
)
from bigtent.states import BuildState, StepState

log = logging.getLogger(__name__)


def accepted_nodes(nodes: Mapping[int, StepNode], msgs: Sequence[p.Accepted]) -> list[StepNode]:
    """The steps ``accepted`` messages start: each still assigned under the lease the message
    names, once (a message for a stale lease, or a step already building, changes nothing)."""
    out: dict[int, StepNode] = {}
    for msg in msgs:
        node = nodes.get(msg.step_id)
        if node is not None and node.lease_id == msg.lease_id and node.state is StepState.ASSIGNED:
            out[node.id] = node
    return list(out.values())


class Results(CatchUp):
    """How a step's attempt ends: accepted, refused, a result, a failed send, an
    expiry or a cancellation; the venue's health and backoff; dependents and builds that
    end with it."""

    async def accepted(self, venue: Venue, msg: p.Accepted) -> None:
        """The venue started the step: BUILDING, once written. The messages that arrive while
        another transition holds the lock are written together, in one transaction, by the
        first of them to get it (the others find nothing left to do)."""
        self._accepts.append(msg)
        async with self._lock:
            msgs, self._accepts = self._accepts, []
            if not msgs:
                return
            try:
                with contextlib.suppress(LostRace):
                    await self._guard(self._accept(msgs), applies_after_commit=True)
            except BaseException:
                # Nothing was written: the others' messages go back to their own handlers
                # (still waiting for the lock), each to succeed or fail alone as before.
                self._accepts[:0] = [m for m in msgs if m is not msg]
                raise

    async def _accept(self, msgs: list[p.Accepted]) -> None:
        nodes = accepted_nodes(self.nodes, msgs)
        while nodes:
            now = self.clock()
            try:
                async with self._begin() as conn:
                    await self._expect(conn, nodes)
                    await persist.accepted(conn, [n.id for n in nodes], now)
            except LostRace:
                # Another runner moved one on (it is read again at the next catch-up): the
                # others are written without it.
                rest = [n for n in nodes if n.id not in self._stale_steps]
                if len(rest) == len(nodes):
                    raise
                nodes = rest
                continue
            for node in nodes:  # committed: memory follows
                node.state = StepState.BUILDING
                self.metrics.step_accepted(node, now)
            return

    async def refused(self, venue: Venue, msg: p.Refused) -> None:
        async with self._lock:
            with contextlib.suppress(LostRace):
                await self._guard(self._refused(venue, msg), applies_after_commit=True)

    async def _refused(self, venue: Venue, msg: p.Refused) -> None:
        node = self.nodes.get(msg.step_id)
        if node is None or not holds_lease(node, msg.lease_id):
            return
        log.info("%s refused step %d: %s", venue.name, node.id, msg.reason)
        await self._give_back(node, venue, self.clock())
        self.wake()

    async def _give_back(self, node: StepNode, venue: Venue, now: float) -> None:
        """architecture §5: a refusal or a failed send releases the slot, cools the venue down and
        makes the step runnable again, as if it had never been assigned."""
        async with self._begin() as conn:
            await self._expect(conn, [node])
            await persist.given_back(conn, node.id)
        venue.cooldown_until = now + self.config.refuse_cooldown_secs
        self._cooled(venue)
        self._release(node)
        node.state = StepState.RUNNABLE
        self.metrics.step_requeued(node, now)
        self._make_runnable(node, now)

    async def result(self, venue: Venue, msg: p.Result) -> bool:
        """Record a step's result. Returns False when its lease is no longer current: the
        result is acknowledged and ignored, so a step finishes exactly once (architecture §3)."""
        async with self._lock:

            async def body() -> bool:
                node = self.nodes.get(msg.step_id)
                if node is None or not holds_lease(node, msg.lease_id):
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
                return await self._guard(body(), applies_after_commit=True)
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
        """End the step's current attempt: decide (``transitions.end_attempt``), write it in
        one transaction (``persist``), then apply it to memory, so a failed transaction
        leaves memory as it was. ``expired_by``: only if its lease expired by then in the
        database too (another runner may have renewed it). The step must still be as the
        working copy has it, or nothing happens but a LostRace."""
        end = end_attempt(node, self.nodes, venue, outcome, error, msg, now, self.config, self.rand)
        async with self._begin() as conn:
            await self._expect(conn, [node], expired_by=expired_by)
            promoted, failed = await persist.attempt_end(
                conn,
                end,
                venue.machine_id if venue is not None else None,
                self.config.max_infra_attempts,
                now,
            )
            promote = self._moved_on_elsewhere(promoted, [self.nodes[d] for d in end.promote])
            fail = self._moved_on_elsewhere(failed, [self.nodes[d] for d in end.fail])
            finished = {d.id: StepState.DEPENDENCY_FAILED for d in fail}
            if end.final:
                finished[node.id] = end.state
            endings = build_endings(self.builds, self.nodes, finished, self._incomplete)
            recorded = await persist.build_endings(conn, endings, now)
        # Committed: memory follows.
        self.build_watch.steps_changed(node.builds)
        self._apply_attempt_end(node, venue, end, msg, promote, fail, now)
        self._end_builds(endings, recorded)
        self.wake()

    def _apply_attempt_end(
        self,
        node: StepNode,
        venue: Venue | None,
        end: AttemptEnd,
        msg: p.Result | None,
        promote: list[StepNode],
        fail: list[StepNode],
        now: float,
    ) -> None:
        """Apply a committed attempt end to memory: the slot and lease, the log, the metrics,
        the venue's health, the step, and its dependents."""
        self._release(node)
        if end.note is not None:  # the log tells why this attempt ended (the client shows it)
            self.logs.append(node.id, [end.note])
        self.logs.close(node.id)
        self.metrics.step_finished(node, end.outcome, msg.timings if msg is not None else None)
        if venue is not None and end.venue is not None:
            self._apply_venue_health(venue, end, node.id)
        node.state, node.attempts, node.not_before = end.state, end.attempts, end.not_before
        if end.final:
            self._count_final(node)
        match end.disposition:
            case Disposition.SUCCEED:
                note_built(self.nodes, node)  # locality: where its dependents' inputs are
                for d in node.dependents:
                    dep = self.nodes.get(d)
                    if dep is not None:
                        dep.deps.discard(node.id)
                for dep in promote:
                    dep.state = StepState.RUNNABLE
                    self.metrics.step_runnable(dep, now)
                    self._make_runnable(dep, now)
            case Disposition.RETRY if not end.final:
                self.metrics.step_requeued(node, end.not_before or now)
                self._make_runnable(node, now)
            case Disposition.REQUEUE:
                self.metrics.step_requeued(node, now)
                self._make_runnable(node, now)
        for dep in fail:
            self.index.discard(dep.id)
            dep.state = StepState.DEPENDENCY_FAILED
            self._count_final(dep)

    def _apply_venue_health(self, venue: Venue, end: AttemptEnd, step_id: int) -> None:
        """The venue's health after the attempt (``transitions.venue_health``), said when it
        backs off or just became unhealthy."""
        health = end.venue
        assert health is not None
        venue.consecutive_failures = health.consecutive_failures
        venue.backoff_until = health.backoff_until
        venue.cooldown_until = health.cooldown_until
        venue.last_error = health.last_error
        if end.counts_against_venue or end.disposition is Disposition.REQUEUE:
            self._cooled(venue)  # the loop wakes when it ends
        if health.became_unhealthy:
            log.warning(
                "%s is unhealthy after %d consecutive infrastructure failures (last: %s); "
                "it gets one step at a time after its backoff until one succeeds",
                venue.name,
                venue.consecutive_failures,
                end.error.splitlines()[0] if end.error else "no error text",
            )
        if end.counts_against_venue:
            log.warning(
                "%s: %s on step %d; backing off until %.0f",
                venue.name,
                end.outcome,
                step_id,
                venue.backoff_until,
            )

    async def _cancel(self, conn: AsyncConnection, build: ActiveBuild, now: float) -> Cancellation:
        """Write the cancellation of the build and its steps no other active build needs
        (their rows checked first: ``_expect``); ``_apply_cancel`` once committed."""
        cancelled = cancel(build, self.nodes, self.builds)
        await self._expect(conn, [self.nodes[sid] for sid in cancelled.victims])
        await persist.cancellation(conn, cancelled, self.config.max_infra_attempts, now)
        return cancelled

    def _apply_cancel(self, cancelled: Cancellation) -> list[tuple[Venue, int]]:
        """Apply a committed cancellation to memory. Returns the venues to tell to abort."""
        aborts: list[tuple[Venue, int]] = []
        for sid in cancelled.victims:
            node = self.nodes[sid]
            if sid in cancelled.aborted:
                venue = self.venues.get(node.venue or "")
                if venue is not None:
                    aborts.append((venue, sid))
            self._release(node)
            self.logs.close(sid)
            node.state = StepState.CANCELLED
        build = self.builds.get(cancelled.build_id)
        if build is not None:
            build.state = BuildState.CANCELLED
            self._forget_build(build)
        return aborts
