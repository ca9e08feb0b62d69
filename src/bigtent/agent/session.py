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
import json
import logging
import os
import random
import signal
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, assert_never
from urllib.parse import urlsplit, urlunsplit

import httpx
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI, WebSocketException

from bigtent import __version__
from bigtent.agent import limits as lim
from bigtent.agent.backlog import LogBacklog
from bigtent.agent.credentials import CredentialSource, as_credential_source
from bigtent.agent.executor import (
    LOG_BATCH_CHARS,
    LOG_BATCH_LINES,
    CacheSettings,
    Executor,
    step_store,
)
from bigtent.agent.identity import AgentIdentity, ephemeral_identity, persistent_identity
from bigtent.agent.probe import run_probe
from bigtent.config import AgentConfig, AgentSection
from bigtent.errors import (
    AgentCannotBuild,
    AuthError,
    BigtentError,
    ConfigError,
    CredentialUnavailable,
    Forbidden,
    ProtocolError,
    RunnerUnreachable,
)
from bigtent.nix.store import NixStore
from bigtent.protocol import (
    MAX_ERROR_CHARS,
    MAX_MESSAGE_BYTES,
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
    RunningStep,
    StepId,
    encode,
    parse_runner_message,
)
from bigtent.storebudget import (
    StepRoots,
    StoreBudget,
    StoreCollector,
    free_disk_bytes,
    gc_roots_dir,
)
from bigtent.tlsctx import ca_context

log = logging.getLogger(__name__)

WS_PATH = "/api/v1/agent/ws"
EXIT_OK = 0
EXIT_AUTH_REFUSED = AuthError.exit_code
"""Exit status when the runner refuses the agent's credentials at the upgrade (3)."""
EXIT_RUNNER_UNREACHABLE = RunnerUnreachable.exit_code
"""Ephemeral agents: the runner could not be reached, or the session dropped (4)."""
EXIT_PROTOCOL_ERROR = ProtocolError.exit_code
"""Ephemeral agents: the runner refused the registration or broke the protocol (1)."""
EXIT_CANNOT_BUILD = AgentCannotBuild.exit_code
"""The start-up probe failed (raised as ``AgentCannotBuild``; the CLI exits with it: 6)."""
PROBE_CACHE_DIR = "probe"
"""``WORK/xdg-cache/probe``: the start-up probe's ``XDG_CACHE_HOME``."""
BACKOFF_START_SECS = 0.5
BACKOFF_CAP_SECS = 30.0
CONNECT_TIMEOUT_SECS = 10.0
"""TCP, TLS and the WebSocket upgrade together."""
REGISTER_TIMEOUT_SECS = 30.0
"""How long to wait for ``registered`` after sending ``register``."""
FORCED_ACK_GRACE_SECS = 5.0
"""After a second SIGTERM: how long to wait for the runner to acknowledge the aborted results."""
MIN_HEARTBEAT_SECS = 0.05


class Disconnected(Exception):
    """The session's WebSocket closed or broke."""


class Connection(Protocol):
    """One WebSocket session as the agent uses it; ``send``/``recv`` raise ``Disconnected``."""

    async def send(self, message: str) -> None: ...

    async def recv(self) -> str | bytes: ...


Connector = Callable[[str, Mapping[str, str]], contextlib.AbstractAsyncContextManager[Connection]]
"""Opens a session: ``(ws_url, headers)``. Raises ``AuthError`` when the runner refuses the
credentials at the upgrade (401/403), ``RunnerUnreachable`` for anything it may retry."""


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


# ---- decisions --------------------------------------------------------------------------
def next_backoff_secs(attempt: int, rand: float) -> float:
    """Reconnect delay: ``0.5 s · 2^attempt`` capped at 30 s, times a jitter in [0.5, 1)."""
    base = min(BACKOFF_CAP_SECS, BACKOFF_START_SECS * 2.0 ** min(attempt, 32))
    return base * (0.5 + rand / 2)


def agent_ws_url(runner_url: str) -> str:
    """``http(s)://host:port[/prefix]`` -> ``ws(s)://host:port[/prefix]/api/v1/agent/ws``."""
    parts = urlsplit(runner_url)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ConfigError(
            f"config key agent.runner_url must be an http:// or https:// URL (got {runner_url!r})"
        )
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + WS_PATH, "", ""))


# ---- host metrics -----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class HostMetrics:
    load: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    free_store_bytes: int | None = None
    free_build_bytes: int | None = None
    psi_cpu_some_avg10: float | None = None


def read_host_metrics(store_dir: Path, work_dir: Path, proc: Path = Path("/proc")) -> HostMetrics:
    """Load, memory, free disk and CPU pressure, each ``None`` where the host does not say."""
    load: float | None
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    used = total = None
    with contextlib.suppress(OSError, ValueError):
        fields = {}
        for line in (proc / "meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            fields[key] = int(rest.split()[0]) * 1024
        total = fields["MemTotal"]
        used = total - fields.get("MemAvailable", fields.get("MemFree", 0))
    psi: float | None = None
    with contextlib.suppress(OSError, ValueError):
        for line in (proc / "pressure" / "cpu").read_text().splitlines():
            if line.startswith("some "):
                values = dict(part.split("=", 1) for part in line.split()[1:])
                psi = float(values["avg10"])
    return HostMetrics(
        load=load,
        memory_used_bytes=used,
        memory_total_bytes=total,
        free_store_bytes=free_disk_bytes(store_dir),
        free_build_bytes=free_disk_bytes(work_dir),
        psi_cpu_some_avg10=psi,
    )


# ---- the session ------------------------------------------------------------------------
@dataclass(slots=True)
class _Step:
    assign: Assign
    cache: CacheSettings
    abort: asyncio.Event = field(default_factory=asyncio.Event)
    lease_lost: bool = False


class AgentSession:
    """One agent's life: sessions with the runner, reconnects, and the steps it holds.

    Slot accounting: a step takes a slot from the moment its ``assign`` is accepted until its
    result exists; a result then waits in ``pending`` (no slot) until the runner's
    ``result_ack``. Both running and pending steps are *held*: ``register`` and heartbeats name
    them so the runner keeps their leases.
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
        self._credentials = as_credential_source(token)
        self._connect = connect
        self._executor = executor
        self._rand = rand
        self._store_dir = store_dir or NixStore(store=section.store).real_path("/nix/store")
        self._ws_url = agent_ws_url(section.runner_url)
        self._running: dict[StepId, _Step] = {}
        self._pending: dict[StepId, Result] = {}
        self._runner_aborted: dict[str, str] = {}
        """Leases of steps the runner told to abort (a cancel, say), with its reason: their
        results are expected to be ignored."""
        self._backlog = LogBacklog()
        """Log batches of held steps not sent for want of a session (persistent agents)."""
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
        return sorted(self._running)

    @property
    def pending_results(self) -> list[StepId]:
        return sorted(self._pending)

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
                len(self._running),
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
                self._abort_all("the agent is stopping")
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
                len(self._running),
            )
            self._draining = True
            self._update()
        elif self._shutdown_requests == 2:
            log.warning("aborting %d running step(s) and exiting", len(self._running))
            self._abort_all("the agent was told to stop")
            if self._tg is not None:
                self._tg.create_task(self._stop_after_abort(), name="agent-forced-stop")
            else:
                self._stop.set()

    # ---- connection loop ----------------------------------------------------------------
    async def _serve(self) -> int:
        if self._limits is not None:
            return await self._serve_once()
        attempt = 0
        while not self._stop.is_set():
            sessions_before = self._sessions
            try:
                async with self._connect(self._ws_url, await self._headers()) as conn:
                    await self._session(conn)
            except CredentialUnavailable as exc:
                log.warning("cannot get the agent's credential: %s", exc)
            except AuthError as exc:
                self._log_auth_refused(exc)
                return EXIT_AUTH_REFUSED
            except (RunnerUnreachable, Disconnected, ProtocolError, TimeoutError) as exc:
                log.warning("session with runner %s ended: %s", self._section.runner_url, exc)
            if self._stop.is_set():
                break
            if self._sessions != sessions_before:
                attempt = 0  # it was registered: a fresh outage starts a fresh backoff
            delay = next_backoff_secs(attempt, self._rand())
            attempt += 1
            log.info("reconnecting in %.1f s (attempt %d)", delay, attempt)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
        log.info("agent stopped")
        return EXIT_OK

    def _log_auth_refused(self, exc: AuthError) -> None:
        """One clear line; never the token itself."""
        hint = (
            self._credentials.refusal_hint
            if self._credentials is not None
            else "the runner wants a credential: give an agent token"
        )
        log.error(
            "the runner at %s refused the agent's credentials (%s); %s",
            self._section.runner_url,
            exc,
            hint,
        )

    async def _serve_once(self) -> int:
        """An ephemeral agent's one session: 0 once drained or stopped, else why it failed."""
        try:
            async with self._connect(self._ws_url, await self._headers()) as conn:
                await self._session(conn)
        except CredentialUnavailable as exc:
            log.error("cannot get the agent's credential: %s", exc)
            return EXIT_AUTH_REFUSED
        except AuthError as exc:
            self._log_auth_refused(exc)
            return EXIT_AUTH_REFUSED
        except ProtocolError as exc:
            log.error("session with runner %s failed: %s", self._section.runner_url, exc)
            return EXIT_PROTOCOL_ERROR
        except (RunnerUnreachable, Disconnected, TimeoutError) as exc:
            log.error(
                "session with runner %s failed: %s; an ephemeral agent does not reconnect",
                self._section.runner_url,
                exc or "timed out",
            )
            return EXIT_RUNNER_UNREACHABLE
        if not self._stop.is_set():  # defensive: a session only returns once stopped
            log.error("session with runner %s ended unexpectedly", self._section.runner_url)
            return EXIT_RUNNER_UNREACHABLE
        log.info(
            "ephemeral agent %s stopped (%s) after %d build(s)",
            self._identity.name,
            self._drain_reason or "drained",
            self._limit_state.reserved,
        )
        return EXIT_OK

    async def _headers(self) -> dict[str, str]:
        """The upgrade's headers, with a fresh credential: a CI job's ID token is fetched anew
        for every connect, since the last one may have expired."""
        if self._credentials is None:
            return {}
        token = await self._credentials.credential(fresh=True)
        return {"Authorization": f"Bearer {token}"} if token else {}

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
            len(self._running) + len(self._pending),
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
            await _first_completed(*loops)
        finally:
            self._conn = None
            self.registered.clear()

    async def _catch_up(self, conn: Connection) -> None:
        """Send what waited for a session: each held step's unsent log lines, then the results
        waiting for their acknowledgement. A step's lines go before its result. Returns once
        nothing is left (steps still running keep adding lines while ``_conn`` is unset)."""
        resent: set[StepId] = set()
        while True:
            backlog = self._backlog.steps
            if backlog:
                await self._send_backlog(conn, backlog[0])
                continue
            result = next((r for sid, r in self._pending.items() if sid not in resent), None)
            if result is None:
                return
            log.info("re-sending the result of step %s", result.step_id)
            await conn.send(encode(result))
            resent.add(result.step_id)

    async def _send_backlog(self, conn: Connection, step_id: StepId) -> None:
        """Send ``step_id``'s unsent log lines, oldest first; on a disconnect they stay."""
        while (taken := self._backlog.take(step_id, LOG_BATCH_LINES, LOG_BATCH_CHARS)) is not None:
            log.debug(
                "step %s: sending %d log line(s) kept during the outage (%d lost)",
                step_id,
                len(taken.lines),
                taken.lost,
            )
            try:
                await conn.send(encode(taken.message()))
            except Disconnected:
                self._backlog.put_back(taken)
                raise

    def _register_message(self) -> Register:
        ident = self._identity
        held = [
            RunningStep(step_id=sid, lease_id=step.assign.lease_id)
            for sid, step in self._running.items()
        ] + [
            RunningStep(step_id=sid, lease_id=result.lease_id)
            for sid, result in self._pending.items()
        ]
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
            running=held,
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
        keep = set(registered.keep_running)
        for sid, step in self._running.items():
            if sid not in keep:
                log.warning("step %s: the runner no longer holds its lease; aborting it", sid)
                step.lease_lost = True
                step.abort.set()
        for sid in [sid for sid in self._pending if sid not in keep]:
            log.warning("step %s: the runner no longer holds its lease; dropping its result", sid)
            del self._pending[sid]
        for sid in self._backlog.steps:
            if sid not in keep:
                self._backlog.discard(sid)
        self._update()

    async def _receive_loop(self, conn: Connection) -> None:
        while True:
            message = parse_runner_message(await conn.recv())
            log.debug("received %s", message.type)
            match message:
                case Assign():
                    await self._on_assign(conn, message)
                case Abort():
                    self._on_abort(message)
                case Drain():
                    log.info("the runner asked the agent to drain: %s", message.reason or "-")
                    self._draining = True
                    self._update()
                case ResultAck():
                    self._on_ack(message)
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
                running=sorted({*self._running, *self._pending}),
                draining=self._draining,
            )
            await conn.send(encode(beat))

    # ---- messages -----------------------------------------------------------------------
    def _refusal(self, assign: Assign) -> str | None:
        """Why this assignment cannot be taken now, or None when a slot is free."""
        if self._draining:
            if self._drain_reason is not None:
                return f"the agent is draining: {self._drain_reason}"
            return "the agent is draining"
        if assign.step_id in self._running or assign.step_id in self._pending:
            return f"the agent already holds step {assign.step_id}"
        if len(self._running) >= self._section.max_jobs:
            return f"no free slot ({len(self._running)}/{self._section.max_jobs} running)"
        return None

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
        self._running[assign.step_id] = _Step(assign, self._cache)
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
        step = self._running[assign.step_id]
        if self._limits is not None:
            self.check_limits()  # the last build of max_builds starts the drain at once
        try:
            await conn.send(encode(Accepted(step_id=assign.step_id, lease_id=assign.lease_id)))
        finally:
            # Even if the acceptance was lost, run it: after reconnecting the runner decides
            # (keep_running) whether the lease still stands.
            self._tg.create_task(self._run_step(step), name=f"step-{assign.step_id}")

    def _on_abort(self, abort: Abort) -> None:
        step = self._running.get(abort.step_id)
        if step is None:
            log.debug("abort for step %s, which is not running here", abort.step_id)
            return
        reason = abort.reason or "asked by the runner"
        log.info("aborting step %s: %s", abort.step_id, reason)
        self._runner_aborted[step.assign.lease_id] = reason
        step.abort.set()

    def _on_ack(self, ack: ResultAck) -> None:
        result = self._pending.get(ack.step_id)
        if result is None or result.lease_id != ack.lease_id:
            return
        del self._pending[ack.step_id]
        self._backlog.discard(ack.step_id)
        aborted = self._runner_aborted.pop(ack.lease_id, None)
        if not ack.recorded and aborted is not None:
            # The runner asked for the abort (a cancelled build): nothing went wrong.
            log.info(
                "step %s: aborted (%s); the runner no longer needs its result", ack.step_id, aborted
            )
        elif not ack.recorded:
            log.warning(
                "step %s: the runner ignored its result (lease %s no longer current)",
                ack.step_id,
                ack.lease_id,
            )
        self._update()

    # ---- steps --------------------------------------------------------------------------
    async def _run_step(self, step: _Step) -> None:
        assign = step.assign
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
            if step.lease_lost:
                self._backlog.discard(assign.step_id)
                self._runner_aborted.pop(assign.lease_id, None)
                return
            self._pending[assign.step_id] = result
        finally:
            self._running.pop(assign.step_id, None)
            self._look_at_disk.set()
            if self._limits is not None:
                self._limit_state = lim.complete(self._limit_state, self._clock())
                self._limits_changed.set()
            self._update()
        if assign.step_id not in self._backlog:
            # Else its log lines wait for a session: the result follows them (_catch_up).
            await self._send(result)

    async def _send_log(self, batch: Log) -> bool:
        """Send a step's log batch, or (persistent agents) keep it for the next session: True
        when sent now. Queued behind the step's earlier unsent lines, never ahead of them."""
        if self._limits is not None:
            return await self._send(batch)  # ephemeral: a lost session ends the agent anyway
        if batch.step_id not in self._backlog and await self._send(batch):
            return True
        if batch.step_id in self._running or batch.step_id in self._pending:
            self._backlog.add(batch)
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

    def _abort_all(self, reason: str) -> None:
        for sid, step in self._running.items():
            if not step.abort.is_set():
                log.info("aborting step %s: %s", sid, reason)
                step.abort.set()

    async def _stop_after_abort(self) -> None:
        """Second SIGTERM: wait for the aborted steps, give their results a moment, stop."""
        await self._idle.wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._settled.wait(), FORCED_ACK_GRACE_SECS)
        self._stop.set()

    def _update(self) -> None:
        """Recompute the derived events after the running/pending sets or draining changed."""
        _set_to(self._idle, not self._running)
        _set_to(self._settled, not self._pending)
        if self._draining and not self._running and not self._pending:
            self._stop.set()


def _set_to(event: asyncio.Event, value: bool) -> None:
    if value:
        event.set()
    else:
        event.clear()


async def _first_completed(*coros: Coroutine[Any, Any, object]) -> None:
    """Run ``coros`` until the first finishes; cancel and await the rest; re-raise its error."""
    tasks = [asyncio.create_task(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in done:
        if not task.cancelled() and (exc := task.exception()) is not None:
            raise exc


# ---- the WebSocket edge -----------------------------------------------------------------
class _WebSocketConnection:
    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws

    async def send(self, message: str) -> None:
        try:
            await self._ws.send(message)
        except ConnectionClosed as exc:
            raise Disconnected(f"connection closed ({exc})") from exc

    async def recv(self) -> str | bytes:
        try:
            return await self._ws.recv()
        except ConnectionClosed as exc:
            raise Disconnected(f"connection closed ({exc})") from exc


def websocket_connector(ssl_context: ssl.SSLContext | None = None) -> Connector:
    """The production connector: a ``websockets`` client; TLS with ``ssl_context`` for wss."""

    @contextlib.asynccontextmanager
    async def connect(url: str, headers: Mapping[str, str]) -> AsyncIterator[Connection]:
        try:
            ws = await ws_connect(
                url,
                additional_headers=dict(headers),
                ssl=ssl_context if url.startswith("wss:") else None,
                max_size=MAX_MESSAGE_BYTES,
                open_timeout=CONNECT_TIMEOUT_SECS,
                close_timeout=2,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            reason = _reason(exc.response.body)
            if status == 401:
                raise AuthError(f"HTTP 401: {reason}") from exc
            if status == 403:
                raise Forbidden(f"HTTP 403: {reason}") from exc
            raise RunnerUnreachable(f"the runner answered HTTP {status}: {reason}") from exc
        except InvalidURI as exc:
            raise ConfigError(f"config key agent.runner_url is not usable: {exc}") from exc
        except (OSError, TimeoutError, WebSocketException) as exc:
            raise RunnerUnreachable(f"cannot reach the runner at {url}: {exc}") from exc
        try:
            yield _WebSocketConnection(ws)
        finally:
            await ws.close()

    return connect


def _reason(body: bytes | bytearray | None) -> str:
    """One line of the runner's refusal body (``{"error": ...}`` or text)."""
    text = (body or b"").decode(errors="replace").strip()
    with contextlib.suppress(ValueError):
        data = json.loads(text)
        if isinstance(data, dict) and isinstance(data.get("error"), str):
            text = data["error"]
    return " ".join(text.split())[:300] or "no reason given"


def ssl_context_for(section: AgentSection) -> ssl.SSLContext | None:
    """TLS settings for wss/https: ``ca_file`` when given, else the system roots; plus the
    agent's client certificate for mTLS when ``client_cert_file`` is set."""
    if section.client_key_file is not None and section.client_cert_file is None:
        raise ConfigError("config key agent.client_key_file needs agent.client_cert_file")
    if section.ca_file is None and section.client_cert_file is None:
        return None
    ctx = ca_context(section.ca_file, "agent.ca_file")
    if section.client_cert_file is not None:
        key = section.client_key_file
        try:
            ctx.load_cert_chain(str(section.client_cert_file), str(key) if key else None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"config key agent.client_cert_file: cannot load {section.client_cert_file}"
                f"{f' with {key}' if key else ''}: {exc}"
            ) from exc
    return ctx


@contextlib.contextmanager
def _signal_handlers(session: AgentSession) -> Iterator[None]:
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, session.request_shutdown)
        except (NotImplementedError, RuntimeError, ValueError):
            continue  # not the main thread, or not supported here
        installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def store_collector(section: AgentSection, executor: Executor) -> StoreCollector | None:
    """The agent's store collector when ``min_free_bytes`` is set (None otherwise); running
    steps' paths are rooted from here on. Raises ConfigError when the roots cannot be kept."""
    budget = StoreBudget(section.min_free_bytes, section.target_free_bytes)
    if not budget.enabled:
        return None
    roots = StepRoots(gc_roots_dir(section.store, section.work_dir))
    try:
        roots.reset()
    except OSError as exc:
        raise ConfigError(
            f"min_free_bytes is set, but this agent cannot keep GC roots in "
            f"{roots.directory} ({exc.strerror or exc}): run it as the store's owner, or "
            "set min_free_bytes = 0"
        ) from exc
    executor.roots = roots
    store = NixStore(store=section.store)
    store_dir = store.real_path("/nix/store")
    log.info(
        "store budget: collect below %d bytes free, up to %d bytes free (roots in %s)",
        budget.min_free_bytes,
        budget.target,
        roots.directory,
    )
    return StoreCollector(
        store,
        budget,
        free_bytes=lambda: free_disk_bytes(store_dir),
        release_idle=executor.release_idle,
    )


async def run_agent(
    cfg: AgentConfig,
    token: str | CredentialSource | None,
    *,
    connect: Connector | None = None,
    http: httpx.AsyncClient | None = None,
    identity: AgentIdentity | None = None,
    install_signal_handlers: bool = True,
) -> int:
    """Run an agent until it is drained, stopped or its session fails; returns the exit status.

    Persistent: 0 after a drain (runner ``drain`` or SIGTERM) or a forced stop (second
    SIGTERM), 3 when the runner refuses the credentials; otherwise it reconnects forever.
    Ephemeral (``[agent.ephemeral]``, architecture §4): one session with a fresh identity; 0 when a
    limit or a drain ended it, 3 (credentials refused), 4 (runner unreachable or the session
    dropped) or 1 (protocol error) when the session failed. Startup problems (work dir, Nix
    missing) raise ``BigtentError`` for the CLI to report. ``connect``/``http``/``identity``
    are seams for tests.
    """
    section = cfg.agent
    limits = None if section.ephemeral is None else lim.Limits.from_section(section.ephemeral)
    ssl_context = ssl_context_for(section)
    if section.probe:
        # Before registering: an agent that cannot build never takes work (AgentCannotBuild).
        await run_probe(step_store(section, CacheSettings("", ""), PROBE_CACHE_DIR))
    else:
        log.warning("start-up probe skipped (agent.probe = false)")
    if identity is None:
        store = NixStore(store=section.store)
        if limits is not None:
            identity = await ephemeral_identity(section, store)
        else:
            identity = await persistent_identity(section, store)
    async with contextlib.AsyncExitStack() as stack:
        if http is None:
            http = await stack.enter_async_context(
                httpx.AsyncClient(
                    verify=ssl_context if ssl_context is not None else True,
                    timeout=httpx.Timeout(300.0, connect=10.0),
                )
            )
        executor = Executor(section, http=http, token=token)
        stack.push_async_callback(executor.aclose)
        collector = store_collector(section, executor)
        session = AgentSession(
            section,
            identity,
            token=token,
            connect=connect or websocket_connector(ssl_context),
            executor=executor,
            limits=limits,
            collector=collector,
        )
        if install_signal_handlers:
            stack.enter_context(_signal_handlers(session))
        log.info(
            "%s agent %s (machine %s) starting: systems %s, %d slot(s), runner %s",
            "ephemeral" if limits is not None else "persistent",
            identity.name,
            identity.machine_id,
            " ".join(identity.systems),
            section.max_jobs,
            section.runner_url,
        )
        return await session.run()


__all__ = [
    "EXIT_AUTH_REFUSED",
    "EXIT_CANNOT_BUILD",
    "EXIT_OK",
    "EXIT_PROTOCOL_ERROR",
    "EXIT_RUNNER_UNREACHABLE",
    "AgentSession",
    "Connection",
    "Connector",
    "Disconnected",
    "HostMetrics",
    "StepRunner",
    "agent_ws_url",
    "next_backoff_secs",
    "read_host_metrics",
    "run_agent",
    "ssl_context_for",
    "websocket_connector",
]
