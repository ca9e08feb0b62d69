"""Connected venues: attach, detach, drain, heartbeats and disk reports; which
venues count as capacity and which steps wait for it."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Sequence

from bigtent import protocol as p
from bigtent.runner.scheduler.capacity import (
    assess,
    unmet_requirements,
    unsupported_error,
    waiting_reason,
)
from bigtent.runner.scheduler.matching import VenueView, has_room
from bigtent.runner.scheduler.model import Kind, Venue, kind_of, try_send
from bigtent.runner.scheduler.results import Results
from bigtent.runner.scheduler.sync import LostRace
from bigtent.runner.scheduler.transitions import reattach
from bigtent.states import StepState

log = logging.getLogger(__name__)

CAPACITY_LOOK_SECS = 1.0
"""While only the runnable steps changed (not the venues, no grace ended), waiting for
capacity is assessed again at most this often: a large queue no venue can take costs a scan
of its steps per look, not per pass."""


class Venues(Results):
    """Connected venues: attach, detach, drain, heartbeats and disk reports; which
    venues count as capacity and which steps wait for it."""

    def attach(self, venue: Venue, running: Sequence[p.RunningStep]) -> list[p.StepId]:
        """A venue (re)connected. Returns the reported running steps whose leases it keeps;
        its other leases are lost at once (it no longer runs them)."""
        now = self.clock()
        self.venues[venue.machine_id] = venue
        self._reopen(venue)
        self._cooled(venue)
        self._capacity_epoch += 1
        back = reattach(
            venue.machine_id,
            [(item.step_id, item.lease_id) for item in running],
            self.nodes,
            self._leased(),
            venue.running,
        )
        for sid in back.kept:
            self.nodes[sid].lease_expires_at = now + self.config.lease_secs
            venue.running.add(sid)
        for sid in back.lost:
            node = self.nodes[sid]
            node.lease_expires_at = now  # expires on the next pass: an infrastructure retry
            self._lost_here.add(node.id)
            self._watch_lease(node)
        self.wake()
        return [p.StepId(sid) for sid in back.kept]

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
                    await self._guard(self._give_back(node, venue, now), applies_after_commit=True)
            if unaccepted:
                self.wake()

    def drain(self, machine_id: str) -> bool:
        venue = self.venues.get(machine_id)
        if venue is None:
            return False
        venue.draining = True
        try_send(venue, p.Drain(reason="drain requested"))
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
        if store and self.database.stores_renewals():
            self.wake()  # the loop stores it, so other runners see the lease is alive

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

    def takes_work(self, venue: Venue) -> bool:
        """Whether a connected venue counts as capacity: one that may be given new work some
        time (not draining). Load, cooldown and backoff do not matter: they pass."""
        return not venue.draining

    def capacity_offers(self) -> list[VenueView]:
        """One view per kind of venue that counts as capacity: connected agents and SSH
        builders that take work (``takes_work``) and what ``launchable`` could launch."""
        if self._offers is not None and self._offers[0] == self._capacity_epoch:
            return self._offers[1]
        kinds: dict[Kind, VenueView] = {}
        for venue in self.venues.values():
            if self.takes_work(venue):
                view = venue.view()
                kinds.setdefault(kind_of(view), view)
        for offers in self.launchable:
            for view in offers():
                kinds.setdefault(kind_of(view), view)
        self._offers = (self._capacity_epoch, list(kinds.values()))
        return self._offers[1]

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
