"""The scheduler service: applies the pure decisions of ``steps``/``matching``/``leases`` to
the database, the connected venues and the build records.

``Scheduler`` is built in layers, one module each, every layer using only those below it:
``state`` (the working copy and its bookkeeping), ``catchup`` (several runners on one
database: what the others changed), ``results`` (how an attempt ends: decided in
``transitions``, written by ``persist``, then applied), ``venues`` (attach, detach,
heartbeats, capacity), ``dispatch`` (a pass: expiries, retries, assignments), ``admission``
(new builds), ``controls`` (cancel, bump, restart) and this module (start-up, the loop,
recovery after a failed transaction). ``model`` holds the values they share,
``shared`` the strategy for a database shared with other runners or not, and ``snapshot``
the read model the API, the dashboard and the autoscaler use.

Every transition is written to the database before its effect is sent, so a runner restart
rebuilds the same state (architecture §3). All methods run on the event loop; none blocks.

Trust (architecture §6, docs/security.md): every step is trusted or untrusted. A trusted build makes
and joins trusted steps only; an untrusted build makes untrusted steps, sharing live trusted
ones (``trust.untrusted_work``). One derivation has at most one active step of each trust
(``by_drv`` and ``untrusted_by_drv``). Matching sends trusted steps to trusted venues only and
untrusted steps to untrusted venues only, and a venue scoped to repositories (an OIDC agent)
only steps with a live build of one of them (the repositories of a step are those of its
builds, looked up when a scoped venue is free).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from bigtent.errors import Conflict, Unavailable
from bigtent.graphs import dependencies_first
from bigtent.runner.scheduler import persist, reads, recovery
from bigtent.runner.scheduler.controls import Controls
from bigtent.runner.scheduler.model import (
    ACTIVE_STATES,
    INTERRUPTED_ADMISSION,
    RUNNER_ACTOR,
    ActiveBuild,
    node_from_row,
)
from bigtent.runner.scheduler.steps import RunnableIndex, raise_heights, tally_built_inputs
from bigtent.runner.scheduler.sync import LostRace
from bigtent.states import BuildEventKind, BuildState, StepState

log = logging.getLogger(__name__)

_ERROR_PAUSE_SECS = 1.0
"""After a failed loop pass, wait this long (or until woken) before the next one."""
_RACE_ATTEMPTS = 5
"""How often a new build is tried when other runners keep changing the rows it needs."""
_CLAIM_ROUNDS = 4
"""Dispatch rounds per pass when another runner keeps claiming the chosen steps first."""
_T = TypeVar("_T")


class Scheduler(Controls):
    """Owns the working copy of the step DAG and the connected venues."""

    async def load(self, *, fresh_start: bool = True) -> None:
        """Rebuild the working state from the database (architecture §3: a restart loses nothing).

        Leased steps keep their leases for one more lease period, so agents that reconnect
        keep their work; the rest expire into infrastructure retries. On a fresh start no
        agent is connected yet, so every agent row is marked disconnected.
        """
        now = self.clock()
        async with self._begin() as conn:
            if fresh_start:
                await persist.agents_disconnected(conn)
            stored = await reads.active(conn, ACTIVE_STATES)
            for row in stored.steps:
                node = node_from_row(row)
                if node.state.is_leased:
                    self._stored_expiry[node.id] = float(row.lease_expires_at or 0.0)
                    node.lease_expires_at = now + self.config.lease_secs
                    if node.lease_id:
                        self.leases[node.lease_id] = node.id
                        self._watch_lease(node)
                self.nodes[node.id] = node
                self._by_drv(node.req.trusted)[node.drv_path] = node.id
            for sid, dep in stored.deps:
                if dep in self.nodes:
                    self.nodes[sid].deps.add(dep)
                    self.nodes[dep].dependents.add(sid)
            tally_built_inputs(self.nodes, stored.built_inputs)
            active, roots, members = stored.builds, stored.parts.roots, stored.parts.members
            # Final roots of active builds must be known to decide when those builds end.
            for row in await reads.steps(conn, stored.parts.root_steps() - set(self.nodes)):
                node = node_from_row(row)
                self.nodes[node.id] = node
        for b in active:
            build = ActiveBuild(
                b.id,
                b.priority,
                roots[b.id],
                members[b.id],
                BuildState(b.state),
                repository=b.repository,
                trusted=bool(b.trusted),
            )
            self.builds[b.id] = build
            for sid in build.steps:
                member = self.nodes.get(sid)
                if member is not None:
                    member.builds.add(b.id)
                    member.priority = max(member.priority, build.priority)
                    build.unfinished += not member.state.is_final
        raise_heights(
            self.nodes, dependencies_first({i: n.dependents for i, n in self.nodes.items()})
        )
        for node in self.nodes.values():
            if node.state is StepState.RUNNABLE:
                self._make_runnable(node, now)
        log.info(
            "scheduler loaded %d active steps (%d runnable, %d leased), %d active builds",
            len(self.by_drv) + len(self.untrusted_by_drv),
            len(self.index),
            len(self.leases),
            len(self.builds),
        )
        # Builds whose roots all finished while the runner was down are closed now. A build
        # without roots was being admitted in stages when the runner stopped: it is cancelled
        # (its client never got its id). Staged admission is only for a runner alone with its
        # database, so no other runner is admitting it.
        async with self._begin() as conn:
            for build in list(self.builds.values()):
                if (
                    not build.roots
                    and build.id not in self._incomplete
                    and self.database.cancels_rootless_builds()
                ):
                    log.warning(
                        "build %d was cut short while being admitted (the runner stopped): "
                        "cancelled as an interrupted admission",
                        build.id,
                    )
                    self._apply_cancel(await self._cancel(conn, build, now))
                    await persist.build_event(
                        conn,
                        build.id,
                        at=now,
                        kind=BuildEventKind.ADMISSION_INTERRUPTED,
                        actor=RUNNER_ACTOR,
                        detail=INTERRUPTED_ADMISSION,
                    )
                    continue
                await self._maybe_finish_build(conn, build, now)

    async def run(self) -> None:
        """Dispatch forever: one ``tick`` at a time, then sleep until woken or until the
        next deadline. A failed pass is logged and retried: one database error must not stop
        all dispatching (leases assigned in a failed pass simply expire)."""
        while True:
            self._wake.clear()
            wake_at: float | None
            try:
                if self.recovery is not None:
                    # The working copy is empty: no pass until a reload succeeds.
                    if recovery.due(self.recovery, self.clock()):
                        async with self._lock:
                            await self.recover()
                    wake_at = self.clock() if self.recovery is None else self.recovery.retry_at
                else:
                    wake_at = await self.tick(self.clock())
            except LostRace as exc:
                # Memory may be ahead of the database (the pass changed it before the check
                # failed): the database is the record.
                log.info("another runner changed a step first (%s); reloading", exc)
                wake_at = self.clock()
                with contextlib.suppress(Exception):  # a failure is in self.recovery
                    async with self._lock:
                        await self.recover(quiet=True)
            except Exception:
                if self.recovery is not None:
                    wake_at = self.recovery.retry_at  # recover logged it
                else:
                    log.exception(
                        "scheduler pass failed; trying again in %.0f s", _ERROR_PAUSE_SECS
                    )
                    wake_at = self.clock() + _ERROR_PAUSE_SECS
                    with contextlib.suppress(Exception):  # a failure is in self.recovery
                        async with self._lock:
                            await self.recover()
                if self.recovery is not None:
                    wake_at = self.recovery.retry_at
            timeout = None if wake_at is None else max(0.0, wake_at - self.clock())
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation
            # that arrives as the event is set, and the loop would not stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    async def recover(self, *, quiet: bool = False) -> None:
        """Rebuild the working state from the database, as at start (the caller holds the
        lock). After a failed transaction memory may be ahead of the database; the database
        is the record, so memory is thrown away and reloaded. Connected venues stay.
        ``quiet``: an expected reload (another runner's changes may have been missed).

        If the reload fails, the failure is kept in ``self.recovery`` (and re-raised): ``run``
        tries again with backoff, and transitions are refused meanwhile."""
        try:
            await self._reload(quiet=quiet)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError | GeneratorExit):
                raise
            self.recovery = recovery.failed(self.recovery, recovery.describe(exc), self.clock())
            self.metrics.scheduler_recovery(self.recovery)
            log.error(
                "scheduler state could not be reloaded from the database (failure %d); "
                "trying again in %.1f s: %s",
                self.recovery.failures,
                self.recovery.retry_at - self.clock(),
                self.recovery.error,
            )
            self.wake()  # the loop now waits for the retry, not for work
            raise
        if self.recovery is not None:
            log.warning(
                "scheduler state reloaded from the database after %d failed attempts",
                self.recovery.failures,
            )
            self.recovery = None
            self.metrics.scheduler_recovery(None)

    async def _reload(self, *, quiet: bool) -> None:
        venues = self.venues
        self.nodes, self.by_drv, self.leases, self.builds = {}, {}, {}, {}
        self.untrusted_by_drv = {}
        self._expiries = []
        self.index, self.delayed = RunnableIndex(), []
        self._open = {}
        self._nothing_for = {}
        self._stored_expiry, self._lost_here = {}, set()
        self._stale_steps, self._stale_builds, self._resync = set(), set(), False
        self._to_settle, self._to_end = set(), set()
        self._capacity_seen = None  # a new index: look again (the waits keep their starts)
        for connected in venues.values():
            connected.running.clear()
            self._reopen(connected)
        await self.load(fresh_start=False)
        for node in self._leased():
            holder = venues.get(node.venue or "")
            if holder is not None:
                holder.running.add(node.id)
        if quiet:
            log.info("scheduler state reloaded from the database")
        else:
            log.warning("scheduler state reloaded from the database")
        self.wake()

    async def _guard(
        self, coro: Coroutine[Any, Any, _T], *, applies_after_commit: bool = False
    ) -> _T:
        """Run a transition (lock held), after catching up with other runners; if it fails,
        reload from the database and re-raise. A transition that ``applies_after_commit``
        (it changes memory only once its transaction committed) leaves memory as it was when
        it fails: nothing to reload; so does a catch-up with other runners that fails before
        the transition (what it did not do is done at the next one). While reloading fails
        (``self.recovery``) the working copy is empty: the transition is refused (503) before
        it starts."""
        if self.recovery is not None:
            coro.close()
            raise Unavailable(
                "the scheduler is reloading its state from the database; try again later",
                detail=recovery.problem(self.recovery),
            )
        caught_up = False
        try:
            await self._catch_up()
            caught_up = True
            return await coro
        except BaseException as exc:
            coro.close()  # never started if catching up failed
            if isinstance(exc, asyncio.CancelledError | GeneratorExit):
                raise
            lost = isinstance(exc, LostRace)
            if not caught_up and self.recovery is None:
                # A catch-up changes memory only after its reads or writes committed; what
                # it did not do is done at the next one.
                if lost:
                    log.info("another runner changed a step first (%s)", exc)
                else:
                    log.exception("catching up with other runners failed; memory is as it was")
                raise
            if caught_up and applies_after_commit:
                # The step another runner moved on is read again at the next catch-up.
                if lost:
                    log.info("another runner changed a step first (%s)", exc)
                else:
                    log.exception("scheduler transition failed; nothing of it was applied")
                raise
            if lost:
                log.info("another runner changed a step first (%s); reloading", exc)
            else:
                log.exception("scheduler transition failed; reloading state from the database")
            try:
                await self.recover(quiet=lost)
            except Exception as failed:
                raise Unavailable(
                    "the scheduler is reloading its state from the database; try again later",
                    detail=recovery.problem(self.recovery),
                ) from failed
            raise

    async def _retrying(
        self, body: Callable[[], Coroutine[Any, Any, _T]], *, applies_after_commit: bool = False
    ) -> _T:
        """``_guard(body())``, again (after catching up) when another runner won a race."""
        for _attempt in range(_RACE_ATTEMPTS - 1):
            with contextlib.suppress(LostRace):
                return await self._guard(body(), applies_after_commit=applies_after_commit)
        try:
            return await self._guard(body(), applies_after_commit=applies_after_commit)
        except LostRace as exc:
            raise Conflict("other runners kept changing the same steps; try again") from exc

    async def _caught_up(self) -> bool:
        """Catch up with other runners in a pass; False when that failed (memory is as it
        was, and the same rows are read again at the next catch-up: no reload). A failed
        reload (``_resync``) is raised: the loop retries it."""
        try:
            await self._catch_up()
        except LostRace as exc:
            log.info("another runner changed a step first (%s)", exc)
            return False
        except Exception:
            if self.recovery is not None:
                raise
            log.exception("catching up with other runners failed; memory is as it was")
            return False
        return True

    async def tick(self, now: float) -> float | None:
        """One pass of the loop at time ``now``: expire leases, release due retries, match
        work to free slots. Returns when the next pass is due (None: only when woken)."""
        async with self._lock:
            if not await self._caught_up():
                return now + _ERROR_PAUSE_SECS
            await self._store_renewals()
            await self._expire_leases(now)
            self._promote_delayed(now)
            for _round in range(_CLAIM_ROUNDS):
                if not await self._dispatch(now):
                    break
                # Claims lost to another runner: read, then plan again.
                if not await self._caught_up():
                    break
            await self._assess_capacity(now)
            return self._next_deadline(now)
