"""How a step's attempt ends: accepted, refused, a result, a failed send, an
expiry or a cancellation; the venue's health and backoff; dependents and builds that
end with it."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from bigtent import protocol as p
from bigtent.runner.db import queries
from bigtent.runner.scheduler.health import became_unhealthy
from bigtent.runner.scheduler.leases import (
    Disposition,
    attempt_retry_at,
    backoff_secs,
    classify,
    next_retry_at,
)
from bigtent.runner.scheduler.model import MAX_LAST_ERROR_CHARS, ActiveBuild, Venue
from bigtent.runner.scheduler.shared import SharedDatabase
from bigtent.runner.scheduler.steps import StepNode, dependents_closure
from bigtent.runner.scheduler.sync import LostRace
from bigtent.states import BuildState, StepState

log = logging.getLogger(__name__)


class Results(SharedDatabase):
    """How a step's attempt ends: accepted, refused, a result, a failed send, an
    expiry or a cancellation; the venue's health and backoff; dependents and builds that
    end with it."""

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
