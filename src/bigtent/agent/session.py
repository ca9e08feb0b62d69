"""The agent's session with the runner (architecture §2, §4): connect, register, heartbeat, take
assignments, report results, reconnect with backoff, drain.

Steps outlive connections: a step keeps running while the agent reconnects, its result waits
in ``pending`` until the runner acknowledges it, and ``register`` lists every step the agent
still holds so the runner keeps their leases. Log lines a step prints while the agent has no
session wait in a bounded ``LogBacklog`` and are sent after the reconnect, before the step's
result, for the steps the runner kept.

An ephemeral agent (``limits`` given) has one session only: it never reconnects, drains when a
limit of ``agent/limits.py`` says so, and exits 0 after a limit or a drain, non-zero when its
session failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol, assert_never

from bigtent import __version__
from bigtent.agent import limits as lim
from bigtent.agent.abortable import first_completed
from bigtent.agent.connection import Connection, Connector, Disconnected
from bigtent.agent.credentials import CredentialSource, as_credential_source
from bigtent.agent.held import Held, HeldStep
from bigtent.agent.hostmetrics import read_host_metrics
from bigtent.agent.identity import AgentIdentity
from bigtent.agent.link import EXIT_OK, RunnerLink, once, reconnecting
from bigtent.agent.logbatch import LOG_BATCH_CHARS, LOG_BATCH_LINES
from bigtent.agent.stepstore import CacheSettings
from bigtent.config import AgentSection
from bigtent.errors import (
    BigtentError,
    ConfigError,
    ProtocolError,
)
from bigtent.nix.store import NixStore
from bigtent.protocol import (
    MAX_ERROR_CHARS,
    PROTOCOL_VERSION,
    Abort,
    Accepted,
    Assign,
    Drain,
    Error,
    Heartbeat,
    Log,
    Outcome,
    Refused,
    Register,
    Registered,
    Result,
    ResultAck,
    StepId,
    encode,
    parse_runner_message,
)
from bigtent.storebudget import (
    StoreCollector,
    free_disk_bytes,
)

log = logging.getLogger(__name__)

REGISTER_TIMEOUT_SECS = 30.0
"""How long to wait for ``registered`` after sending ``register``."""
FORCED_ACK_GRACE_SECS = 5.0
"""After a second SIGTERM: how long to wait for the runner to acknowledge the aborted results."""
MIN_HEARTBEAT_SECS = 0.05


class StepRunner(Protocol):
    """Runs one assignment to a result (``Executor`` in production; a fake in unit tests)."""

    async def run(
        self,
        assign: Assign,
        cache: CacheSettings,
        *,
        send_log: Callable[[Log], Awaitable[object]],
        abort: asyncio.Event,
    ) -> Result: ...


# ---- the session ------------------------------------------------------------------------
class AgentSession:
    """One agent's life: sessions with the runner, reconnects, and the steps it holds.

    Slot accounting: a step takes a slot from the moment its ``assign`` is accepted until its
    result exists; a result then waits in ``pending`` (no slot) until the runner's
    ``result_ack``. Both running and pending steps are *held* (``agent/held.py``): ``register``
    and heartbeats name them so the runner keeps their leases.
    """

    def __init__(
        self,
        section: AgentSection,
        identity: AgentIdentity,
        *,
        token: str | CredentialSource | None,
        connect: Connector,
        executor: StepRunner,
        rand: Callable[[], float] = random.random,
        store_dir: Path | None = None,
        limits: lim.Limits | None = None,
        clock: Callable[[], float] = time.monotonic,
        collector: StoreCollector | None = None,
    ) -> None:
        """``limits`` makes the agent ephemeral (architecture §4): one session, no reconnect, and
        drained by its limits; ``clock`` gives monotonic seconds (injected in tests).
        ``token``: the credential, or where to get a fresh one at every connect."""
        self._section = section
        self._identity = identity
        self._link = RunnerLink(section.runner_url, connect, as_credential_source(token))
        self._executor = executor
        self._rand = rand
        self._store_dir = store_dir or NixStore(store=section.store).real_path("/nix/store")
        self._held = Held()
        self._cache: CacheSettings | None = None
        self._conn: Connection | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._draining = False
        self._drain_reason: str | None = None
        """Why an ephemeral agent is draining, when a limit made it."""
        self._limits = limits
        self._clock = clock
        self._limit_state = lim.start(clock())
        self._limits_changed = asyncio.Event()
        """Wakes the limit watcher after an assignment or completion."""
        self._shutdown_requests = 0
        self._sessions = 0
        """How many sessions have been registered (resets the reconnect backoff)."""
        self._stop = asyncio.Event()
        """Set when the agent should close its session and exit."""
        self._idle = asyncio.Event()
        """Set while no step is running."""
        self._settled = asyncio.Event()
        """Set while no result waits for its acknowledgement."""
        self.registered = asyncio.Event()
        """Set while a session is registered (tests and ``bigtent up`` wait on it)."""
        self._collector = collector
        """Collects the store when its free disk falls below the budget (docs/agents.md)."""
        self._look_at_disk = asyncio.Event()
        """Wakes the store collector after a step ended."""
        self._beat_now = asyncio.Event()
        """Sends the next heartbeat at once (after a collection: the free disk changed)."""
        self._update()

    # ---- public -------------------------------------------------------------------------
    @property
    def running(self) -> list[StepId]:
        return sorted(self._held.running)

    @property
    def pending_results(self) -> list[StepId]:
        return sorted(self._held.pending)

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def ephemeral(self) -> bool:
        return self._limits is not None

    @property
    def builds_taken(self) -> int:
        """How many assignments this agent accepted (the ``max_builds`` budget used)."""
        return self._limit_state.reserved

    def check_limits(self) -> bool:
        """Judge the ephemeral limits now; True when the agent is draining (for any reason).

        The watcher calls this at every deadline and event; tests with an injected clock call
        it after moving the clock."""
        if self._limits is None or self._draining:
            return self._draining
        reason = lim.drain_reason(self._limits, self._limit_state, self._clock())
        if reason is not None:
            log.info(
                "ephemeral agent %s: %s; draining (%d step(s) running, %d build(s) taken)",
                self._identity.name,
                reason,
                len(self._held.running),
                self._limit_state.reserved,
            )
            self._draining = True
            self._drain_reason = reason
            self._update()
        self._limits_changed.set()
        return self._draining

    async def run(self) -> int:
        """Serve until drained, stopped or refused; returns the process exit status."""
        code = EXIT_OK
        failure: BigtentError | None = None
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            gc_task = (
                tg.create_task(self._collect_loop(self._collector), name="store-gc")
                if self._collector is not None and self._collector.budget.enabled
                else None
            )
            try:
                code = await self._serve()
            except BigtentError as exc:
                failure = exc  # re-raised below, not wrapped in the task group's ExceptionGroup
            finally:
                # Only non-empty when leaving early (auth refused, an error, cancellation).
                self._held.abort_all("the agent is stopping")
                self._tg = None
                if gc_task is not None:
                    gc_task.cancel()
        if failure is not None:
            raise failure
        return code

    def request_shutdown(self) -> None:
        """SIGTERM: first drain (finish running steps, take no more); then abort them."""
        self._shutdown_requests += 1
        if self._shutdown_requests == 1:
            log.info(
                "draining: finishing %d running step(s), accepting no more; "
                "signal again to abort them",
                len(self._held.running),
            )
            self._draining = True
            self._update()
        elif self._shutdown_requests == 2:
            log.warning("aborting %d running step(s) and exiting", len(self._held.running))
            self._held.abort_all("the agent was told to stop")
            if self._tg is not None:
                self._tg.create_task(self._stop_after_abort(), name="agent-forced-stop")
            else:
                self._stop.set()

    # ---- connection loop ----------------------------------------------------------------
    async def _serve(self) -> int:
        if self._limits is None:
            return await reconnecting(
                self._link,
                self._session,
                stop=self._stop,
                registrations=lambda: self._sessions,
                rand=self._rand,
            )
        failed = await once(self._link, self._session, stop=self._stop)
        if failed is not None:
            return failed
        log.info(
            "ephemeral agent %s stopped (%s) after %d build(s)",
            self._identity.name,
            self._drain_reason or "drained",
            self._limit_state.reserved,
        )
        return EXIT_OK

    async def _session(self, conn: Connection) -> None:
        """One registered session; returns when the agent should stop, raises on disconnect."""
        await conn.send(encode(self._register_message()))
        raw = await asyncio.wait_for(conn.recv(), REGISTER_TIMEOUT_SECS)
        first = parse_runner_message(raw)
        if isinstance(first, Error):
            raise ProtocolError(f"the runner refused the registration: {first.message}")
        if not isinstance(first, Registered):
            raise ProtocolError(f"expected 'registered' from the runner, got {first.type!r}")
        if first.proto != PROTOCOL_VERSION:
            raise ProtocolError(
                f"the runner speaks {first.proto!r}, this agent {PROTOCOL_VERSION!r}"
            )
        self._on_registered(first)
        log.info(
            "registered with %s as %s (session %s, %d step(s) held)",
            self._section.runner_url,
            self._identity.name,
            first.session_id,
            self._held.count,
        )
        self._sessions += 1
        self.registered.set()
        try:
            await self._catch_up(conn)
            # No await since _catch_up found nothing left: from here on steps send directly.
            self._conn = conn
            loops = [
                self._receive_loop(conn),
                self._heartbeat_loop(conn, max(first.heartbeat_secs, MIN_HEARTBEAT_SECS)),
                self._stop.wait(),
            ]
            if self._limits is not None:
                self._limit_state = lim.registered(self._limit_state, self._clock())
                loops.append(self._limit_loop(self._limits))
            await first_completed(*loops)
        finally:
            self._conn = None
            self.registered.clear()

    async def _catch_up(self, conn: Connection) -> None:
        """Send what waited for a session: each held step's unsent log lines, then the results
        waiting for their acknowledgement. A step's lines go before its result. Returns once
        nothing is left (steps still running keep adding lines while ``_conn`` is unset)."""
        resent: set[StepId] = set()
        while True:
            backlog = self._held.backlog.steps
            if backlog:
                await self._send_backlog(conn, backlog[0])
                continue
            pending = self._held.pending.items()
            result = next((r for sid, r in pending if sid not in resent), None)
            if result is None:
                return
            log.info("re-sending the result of step %s", result.step_id)
            await conn.send(encode(result))
            resent.add(result.step_id)

    async def _send_backlog(self, conn: Connection, step_id: StepId) -> None:
        """Send ``step_id``'s unsent log lines, oldest first; on a disconnect they stay."""
        backlog = self._held.backlog
        while (taken := backlog.take(step_id, LOG_BATCH_LINES, LOG_BATCH_CHARS)) is not None:
            log.debug(
                "step %s: sending %d log line(s) kept during the outage (%d lost)",
                step_id,
                len(taken.lines),
                taken.lost,
            )
            try:
                await conn.send(encode(taken.message()))
            except Disconnected:
                backlog.put_back(taken)
                raise

    def _register_message(self) -> Register:
        ident = self._identity
        return Register(
            version=__version__,
            machine_id=ident.machine_id,
            name=ident.name,
            hostname=ident.hostname[:256],
            systems=list(ident.systems),
            supported_features=self._section.supported_features,
            mandatory_features=self._section.mandatory_features,
            max_jobs=self._section.max_jobs,
            cpu_count=os.cpu_count() or 1,
            speed_factor=self._section.speed_factor,
            ephemeral=ident.ephemeral or self._limits is not None,
            launch_id=ident.launch_id,
            running=self._held.leases(),
            untrusted=self._section.untrusted,
            free_store_bytes=free_disk_bytes(self._store_dir),
        )

    def _on_registered(self, registered: Registered) -> None:
        """Take the runner's cache settings; drop held steps whose leases it no longer keeps."""
        if self._section.untrusted and not registered.untrusted:
            # A runner that ignored the request would send trusted work to this machine,
            # which must never build it (docs/security.md): stop rather than serve.
            raise ConfigError(
                "the runner did not accept this agent as untrusted (config key "
                "agent.untrusted): it may be too old to know untrusted agents"
            )
        if registered.untrusted:
            log.info("registered as an untrusted venue: only steps of untrusted builds")
        self._cache = CacheSettings.from_registered(registered, self._section.runner_url)
        self._held.keep_only(set(registered.keep_running))
        self._update()

    async def _receive_loop(self, conn: Connection) -> None:
        while True:
            message = parse_runner_message(await conn.recv())
            log.debug("received %s", message.type)
            match message:
                case Assign():
                    await self._on_assign(conn, message)
                case Abort():
                    self._held.runner_abort(message)
                case Drain():
                    log.info("the runner asked the agent to drain: %s", message.reason or "-")
                    self._draining = True
                    self._update()
                case ResultAck():
                    if self._held.acknowledged(message):
                        self._update()
                case Error():
                    raise ProtocolError(f"the runner reported an error: {message.message}")
                case Registered():
                    log.warning("ignoring an unexpected 'registered' from the runner")
                case _:
                    assert_never(message)

    async def _limit_loop(self, limits: lim.Limits) -> None:
        """Drain when a limit is reached: look at every deadline and after every event."""
        while True:
            self._limits_changed.clear()
            if self.check_limits():
                break
            self._limits_changed.clear()
            deadline = lim.next_deadline(limits, self._limit_state, self._clock())
            timeout = None if deadline is None else max(0.0, deadline - self._clock())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._limits_changed.wait(), timeout)
        await self._stop.wait()

    async def _collect_loop(self, collector: StoreCollector) -> None:
        """Look at the store's free disk every ``gc_check_secs`` and after every step, and
        collect when it is below the budget. A failure is logged, never fatal."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._look_at_disk.wait(), self._section.gc_check_secs)
            self._look_at_disk.clear()
            try:
                if await collector.maybe_collect() is not None:
                    self._beat_now.set()  # the runner learns of the room at once
            except OSError as exc:
                log.warning("store collection failed: %s", exc)

    async def _heartbeat_loop(self, conn: Connection, interval_secs: float) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._beat_now.wait(), interval_secs)
            self._beat_now.clear()
            metrics = read_host_metrics(self._store_dir, self._section.work_dir)
            beat = Heartbeat(
                load=metrics.load,
                memory_used_bytes=metrics.memory_used_bytes,
                memory_total_bytes=metrics.memory_total_bytes,
                free_store_bytes=metrics.free_store_bytes,
                free_build_bytes=metrics.free_build_bytes,
                psi_cpu_some_avg10=metrics.psi_cpu_some_avg10,
                running=self._held.ids(),
                draining=self._draining,
            )
            await conn.send(encode(beat))

    # ---- messages -----------------------------------------------------------------------
    def _refusal(self, assign: Assign) -> str | None:
        return self._held.refusal(
            assign,
            draining=self._draining,
            drain_reason=self._drain_reason,
            max_jobs=self._section.max_jobs,
        )

    def _reserve(self, assign: Assign) -> str | None:
        """Take a slot and, for an ephemeral agent, one build of its budget: None when both
        are taken, else why not. Never awaits, so concurrent assigns cannot both take the
        last build (architecture §4: ``max_builds`` is reserved atomically at assign time)."""
        assert self._cache is not None  # set before receiving
        reason = self._refusal(assign)
        if reason is not None:
            return reason
        if self._limits is not None:
            state, reason = lim.reserve(self._limits, self._limit_state, self._clock())
            if reason is not None:
                self.check_limits()  # a limit passed since the last look: drain now
                return self._refusal(assign) or reason
            self._limit_state = state
        self._held.running[assign.step_id] = HeldStep(assign, self._cache)
        self._update()
        return None

    async def _on_assign(self, conn: Connection, assign: Assign) -> None:
        reason = self._reserve(assign)
        if reason is not None:
            log.info("refusing step %s (%s): %s", assign.step_id, assign.drv_path, reason)
            await conn.send(
                encode(Refused(step_id=assign.step_id, lease_id=assign.lease_id, reason=reason))
            )
            return
        # The slot (and build) was reserved before any await, so no second assign can take it.
        assert self._tg is not None  # set before receiving
        step = self._held.running[assign.step_id]
        if self._limits is not None:
            self.check_limits()  # the last build of max_builds starts the drain at once
        try:
            await conn.send(encode(Accepted(step_id=assign.step_id, lease_id=assign.lease_id)))
        finally:
            # Even if the acceptance was lost, run it: after reconnecting the runner decides
            # (keep_running) whether the lease still stands.
            self._tg.create_task(self._run_step(step), name=f"step-{assign.step_id}")

    # ---- steps --------------------------------------------------------------------------
    async def _run_step(self, step: HeldStep) -> None:
        assign = step.assign
        kept = False
        try:
            try:
                result = await self._executor.run(
                    assign, step.cache, send_log=self._send_log, abort=step.abort
                )
            except Exception as exc:
                # Supervisor of one step: a bug here must not take the other steps down.
                log.exception("step %s: the executor failed", assign.step_id)
                result = Result(
                    step_id=assign.step_id,
                    lease_id=assign.lease_id,
                    outcome=Outcome.PREPARE_FAILURE,
                    error=f"agent error: {exc!r}"[:MAX_ERROR_CHARS],
                )
            kept = self._held.finished(step, result)
        finally:
            self._held.running.pop(assign.step_id, None)  # cancelled too
            self._look_at_disk.set()
            if self._limits is not None:
                self._limit_state = lim.complete(self._limit_state, self._clock())
                self._limits_changed.set()
            self._update()
        if kept and assign.step_id not in self._held.backlog:
            # Else its log lines wait for a session: the result follows them (_catch_up).
            await self._send(result)

    async def _send_log(self, batch: Log) -> bool:
        """Send a step's log batch, or (persistent agents) keep it for the next session: True
        when sent now. Queued behind the step's earlier unsent lines, never ahead of them."""
        if self._limits is not None:
            return await self._send(batch)  # ephemeral: a lost session ends the agent anyway
        if batch.step_id not in self._held.backlog and await self._send(batch):
            return True
        if self._held.holds(batch.step_id):
            self._held.backlog.add(batch)
        return False

    async def _send(self, message: Log | Result) -> bool:
        """Send if a session is up; False (message not sent) otherwise. Never raises."""
        conn = self._conn
        if conn is None:
            return False
        try:
            await conn.send(encode(message))
        except Disconnected:
            return False
        return True

    async def _stop_after_abort(self) -> None:
        """Second SIGTERM: wait for the aborted steps, give their results a moment, stop."""
        await self._idle.wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._settled.wait(), FORCED_ACK_GRACE_SECS)
        self._stop.set()

    def _update(self) -> None:
        """Recompute the derived events after the running/pending sets or draining changed."""
        _set_to(self._idle, not self._held.running)
        _set_to(self._settled, not self._held.pending)
        if self._draining and not self._held.count:
            self._stop.set()


def _set_to(event: asyncio.Event, value: bool) -> None:
    if value:
        event.set()
    else:
        event.clear()


__all__ = [
    "AgentSession",
    "StepRunner",
]
