"""A pass of the loop: expire leases, release due retries, fill free slots
(claimed, leased, written, then sent, a chunk at a time)."""

from __future__ import annotations

import heapq
import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace

from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncConnection

from bigtent import protocol as p
from bigtent.runner.scheduler import persist, reads
from bigtent.runner.scheduler.carried import Carried, carried
from bigtent.runner.scheduler.health import allowed_jobs
from bigtent.runner.scheduler.leases import new_lease_id
from bigtent.runner.scheduler.matching import Requirement, VenueView, can_run, has_room
from bigtent.runner.scheduler.model import SSH, Kind, Venue, try_send
from bigtent.runner.scheduler.steps import Dispatch, StepNode, plan_dispatch
from bigtent.runner.scheduler.venues import Venues
from bigtent.states import BuildState, StepState

log = logging.getLogger(__name__)

DISPATCH_CHUNK = 256
"""Decisions leased, written and sent together (one transaction per chunk)."""


class Dispatching(Venues):
    """A pass of the loop: expire leases, release due retries, fill free slots
    (claimed, leased, written, then sent, a chunk at a time)."""

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
        # None: alone with the database, every due lease expired.
        checked = await self._expired_in_database(list(due.values()), now) if due else None
        for node in due.values():
            if node.lease_id is None or not node.state.is_leased:
                continue
            if checked is not None and node.id not in checked and node.id not in self._lost_here:
                self._watch_lease(node)  # renewed elsewhere, or read again: still watched
                continue
            venue = self.venues.get(node.venue or "")
            log.warning("lease of step %d on %s expired", node.id, node.venue)
            if venue is not None:
                try_send(venue, p.Abort(step_id=p.StepId(node.id), reason="lease expired"))
            await self._finish_attempt(
                node,
                venue,
                p.Outcome.AGENT_LOST,
                "lease expired: the agent stopped reporting it",
                None,
                now,
                expired_by=now if checked is not None and node.id in checked else None,
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
                holders_of=self._inputs_on,
            )
            if ssh and len(decisions) < DISPATCH_CHUNK and len(self.index):
                decisions += plan_dispatch(
                    self.index,
                    ssh,
                    limit=DISPATCH_CHUNK - len(decisions),
                    repositories_of=self._repositories_of,
                    holders_of=self._inputs_on,
                )
            if not decisions:
                break
            lost = await self._assign(decisions, now) or lost
            if len(decisions) < DISPATCH_CHUNK:
                break
        return lost

    def _inputs_on(self, step_id: int) -> Mapping[str, int] | None:
        """Where the step's inputs were built (``StepNode.inputs_on``), for locality."""
        node = self.nodes.get(step_id)
        return node.inputs_on if node is not None else None

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

    def _kind_fits(self, kind: Kind, members: dict[str, Venue], req: Requirement) -> bool:
        fits = self._fits.get((kind, req))
        if fits is None:
            fits = self._fits[(kind, req)] = can_run(next(iter(members.values())).view(), req)
        return fits

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
        async with self._begin() as conn:
            # Only steps still runnable in the database, and not being claimed by another
            # runner right now, are assigned; the others go back to be read again.
            claimed = await self.database.claim(conn, [n.id for n, _, _ in ready])
            sent = [(node, venue, msg) for node, venue, msg in ready if node.id in claimed]
            sent = await self._carry_derivations(conn, sent)
            started = sorted(
                {
                    bid
                    for node, _, _ in sent
                    for bid in node.builds
                    if (build := self.builds.get(bid)) is not None
                    and build.state is BuildState.QUEUED
                }
            )
            await persist.assignments(
                conn,
                [
                    (node.id, msg.lease_id, venue.machine_id, venue.name)
                    for node, venue, msg in sent
                ],
                started,
                expires,
                now,
            )
        # Committed: memory follows.
        lost = [node.id for node, _, _ in ready if node.id not in claimed]
        self._stale_steps.update(lost)
        for node, venue, msg in sent:
            node.state = StepState.ASSIGNED
            node.lease_id = msg.lease_id
            node.lease_expires_at = expires
            node.venue = venue.machine_id
            self.leases[msg.lease_id] = node.id
            self._watch_lease(node)
            venue.running.add(node.id)
            self.metrics.step_assigned(node, now)
            self._stored_expiry[node.id] = expires
        for bid in started:
            self.builds[bid].state = BuildState.RUNNING
        for node, venue, msg in sent:
            if node.attempts:
                self.logs.append(
                    node.id, [f"[bigtent: attempt {node.attempts + 1} on {venue.name}]"]
                )
            if not try_send(venue, msg):
                log.warning("could not send step %d to %s; cooling it down", node.id, venue.name)
                await self._give_back(node, venue, now)
        if lost:
            log.debug("another runner claimed steps %s first", lost)
        return bool(lost)

    async def _carry_derivations(
        self, conn: AsyncConnection, sent: list[tuple[StepNode, Venue, p.Assign]]
    ) -> list[tuple[StepNode, Venue, p.Assign]]:
        """The agents' messages with their step's .drv text and inputs where those are
        recorded and fit (``carried``): one read for the chunk. SSH builders get none."""
        paths = [node.drv_path for node, venue, _ in sent if venue.kind != SSH]
        if not paths:
            return sent
        found = await reads.assignment_derivations(conn, paths)
        out = []
        for node, venue, msg in sent:
            # An SSH builder's step was not read: ``found`` has nothing for it.
            extra = carried(found.drvs.get(node.drv_path), found.outputs)
            if extra is not None:
                msg = with_derivation(msg, extra)
            out.append((node, venue, msg))
        return out

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


def with_derivation(msg: p.Assign, extra: Carried) -> p.Assign:
    """``msg`` carrying its derivation; ``msg`` as it is should the result not validate."""
    try:
        return p.Assign.model_validate(
            {**msg.model_dump(), "drv_text": extra.drv_text, "inputs": extra.inputs}
        )
    except ValidationError as exc:
        log.warning("step %d: the assignment goes without its derivation: %s", msg.step_id, exc)
        return msg
