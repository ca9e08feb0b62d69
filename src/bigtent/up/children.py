"""The children of ``bigtent up``: the runner and agent processes, started in their own process
groups, waited for until ready, restarted with backoff, stopped with a grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from bigtent.backoff import Backoff
from bigtent.client.api import RunnerClient
from bigtent.errors import AgentCannotBuild, AuthError, BigtentError, RunnerUnreachable
from bigtent.up.state import HOST

log = logging.getLogger(__name__)


READY_TIMEOUT_SECS = 60.0
"""How long the runner may take to answer ``GET /api/v1/status`` after it was started."""


READY_POLL_SECS = 0.1


STOP_GRACE_SECS = 10.0
"""Between SIGTERM and SIGKILL when stopping the children."""


RESTART_BACKOFF = Backoff(base=1.0, cap=30.0)
"""Delays between an agent's consecutive restarts (no jitter: one machine, a few agents)."""


STABLE_RUN_SECS = 60.0
"""An agent that ran this long before exiting restarts without accumulated backoff."""


LOG_TAIL_LINES = 20


AGENTS_READY_TIMEOUT_SECS = 120.0
"""How long the agents may take to pass their start-up probe and register."""


Say = Callable[[str], None]


def restart_delay_secs(failures: int) -> float:
    """Exponential backoff for the ``failures``-th consecutive agent restart (1-based)."""
    return RESTART_BACKOFF.delay(failures - 1)


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def agent_error(log_text: str, lines: int = LOG_TAIL_LINES) -> str:
    """What an agent that exited said last: from its last ``Error:`` line on (the CLI prints
    the start-up probe's error and hint that way), else the tail of its log (pure)."""
    all_lines = log_text.rstrip("\n").splitlines()
    for i in range(len(all_lines) - 1, -1, -1):
        if all_lines[i].startswith("Error: "):
            return "\n".join(all_lines[i:][:lines])
    return "\n".join(all_lines[-lines:])


def pending_agents(expected: Sequence[str], connected: Collection[str]) -> list[str]:
    """The expected agent names not yet connected, in order (pure)."""
    return [name for name in expected if name not in connected]


@dataclass(slots=True)
class Child:
    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str]
    agent_name: str = ""
    """The name an agent child registers with (``local-N``); "" for the runner."""
    proc: asyncio.subprocess.Process | None = None
    waiter: asyncio.Task[int] | None = None
    started_mono: float = 0.0
    failures: int = 0
    restart_at_mono: float | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)

    async def start(self) -> None:
        if self._log is None:
            self._log = self.log_path.open("ab")
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self._log.write(f"--- bigtent up: starting {self.name} at {stamp} ---\n".encode())
        self._log.flush()
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            env=self.env,
            start_new_session=True,  # Ctrl-C reaches only us; we stop the children in order
        )
        self.waiter = asyncio.create_task(self.proc.wait(), name=f"wait-{self.name}")
        self.started_mono = time.monotonic()
        self.restart_at_mono = None
        log.info("started %s (pid %d)", self.name, self.proc.pid)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def close(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.cancel()
        if self._log is not None:
            self._log.close()
            self._log = None


def child_env(xdg_cache: Path) -> dict[str, str]:
    # BIGTENT_* from the user's shell (e.g. a sourced env file) must not override the
    # generated config files.
    env = {k: v for k, v in os.environ.items() if not k.startswith("BIGTENT_")}
    env["XDG_CACHE_HOME"] = str(xdg_cache)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _signal(child: Child, sig: signal.Signals, *, group: bool) -> None:
    if child.proc is None or child.proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(child.proc.pid, sig)
        else:
            child.proc.send_signal(sig)


async def stop_children(children: Sequence[Child], grace_secs: float = STOP_GRACE_SECS) -> None:
    """SIGTERM every child (agents drain), then SIGKILL the process groups of stragglers."""
    live = [c for c in children if c.running]
    for child in live:
        _signal(child, signal.SIGTERM, group=False)
    waiters = [c.waiter for c in live if c.waiter is not None]
    if waiters:
        _, pending = await asyncio.wait(waiters, timeout=grace_secs)
        for child in live:
            if child.waiter in pending:
                log.warning("%s did not stop within %.0fs; killing it", child.name, grace_secs)
                _signal(child, signal.SIGKILL, group=True)
        if pending:
            await asyncio.wait(pending, timeout=grace_secs)
    for child in children:
        child.close()


async def _port_in_use(port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), timeout=1.0)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def check_port(port: int) -> None:
    if await _port_in_use(port):
        raise BigtentError(f"port {port} on {HOST} is already in use; choose another with --port")


def schema_line(before: str | None, after: str) -> str:
    """The one line `bigtent up` says when it created or upgraded its database (pure)."""
    if before is None:
        return f"database created (schema {after})"
    return f"database schema upgraded from {before} to {after}"


async def wait_ready(runner: Child, url: str, token: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECS
    async with RunnerClient(url, token=token, timeout_secs=2.0) as client:
        while True:
            if not runner.running:
                code = runner.proc.returncode if runner.proc else None
                raise BigtentError(
                    f"the runner exited (status {code}) while starting; last lines of "
                    f"{runner.log_path}:\n{log_tail(runner.log_path)}"
                )
            try:
                await client.fetch_status()
                return
            except RunnerUnreachable:
                pass
            except AuthError as exc:
                raise BigtentError(
                    f"the runner at {url} refused the generated client token ({exc}); is "
                    "another runner using this port?"
                ) from exc
            if time.monotonic() > deadline:
                raise BigtentError(
                    f"the runner did not answer at {url} within {READY_TIMEOUT_SECS:.0f}s; last "
                    f"lines of {runner.log_path}:\n{log_tail(runner.log_path)}"
                )
            await asyncio.sleep(READY_POLL_SECS)


def _agent_exited(child: Child) -> BigtentError:
    code = child.proc.returncode if child.proc else None
    try:
        text = child.log_path.read_text(errors="replace")
    except OSError:
        text = ""
    # Only this start's lines: the log is appended to across starts.
    text = text.rsplit(f"--- bigtent up: starting {child.name} at ", 1)[-1]
    text = text.split("\n", 1)[1] if "\n" in text else ""
    return BigtentError(
        f"{child.name} exited (status {code}) before registering; stopping. "
        f"It said (log: {child.log_path}):\n{agent_error(text)}"
    )


async def wait_agents(agents: Sequence[Child], url: str, token: str) -> None:
    """Until every agent has registered (its start-up probe passed); raise when one exits
    first or they take longer than ``AGENTS_READY_TIMEOUT_SECS``."""
    names = [c.agent_name for c in agents]
    deadline = time.monotonic() + AGENTS_READY_TIMEOUT_SECS
    async with RunnerClient(url, token=token, timeout_secs=2.0) as client:
        while True:
            for child in agents:
                if not child.running:
                    raise _agent_exited(child)
            try:
                connected = {a.name for a in await client.fetch_agents() if a.connected}
            except RunnerUnreachable:
                connected = set()
            pending = pending_agents(names, connected)
            if not pending:
                return
            if time.monotonic() > deadline:
                raise BigtentError(
                    f"agent(s) {', '.join(pending)} did not register within "
                    f"{AGENTS_READY_TIMEOUT_SECS:.0f}s; see their logs in "
                    f"{agents[0].log_path.parent}/"
                )
            await asyncio.sleep(READY_POLL_SECS)


async def until_stopped(op: asyncio.Task[None], stop: asyncio.Event) -> bool:
    """Wait for ``op`` or ``stop``; True when stopped first (``op`` is cancelled)."""
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({op, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not op.done():
            op.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await op
    if stop.is_set():
        return True
    op.result()
    return False


async def supervise(runner: Child, agents: list[Child], stop: asyncio.Event, say: Say) -> int:
    """Wait for stop; report children that die; restart agents with backoff."""
    stopped = asyncio.create_task(stop.wait())
    try:
        while not stop.is_set():
            waits = {c.waiter: c for c in (runner, *agents) if c.running and c.waiter}
            now = time.monotonic()
            restarts = [c.restart_at_mono for c in agents if c.restart_at_mono is not None]
            timeout = max(0.0, min(restarts) - now) if restarts else None
            done, _ = await asyncio.wait(
                {stopped, *waits}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if stop.is_set():
                break
            for task in done:
                child = waits.get(task)
                if child is None:
                    continue
                code = task.result()
                if child is runner:
                    say(
                        f"the runner exited unexpectedly (status {code}); stopping the agents. "
                        f"Last lines of {runner.log_path}:\n{log_tail(runner.log_path)}"
                    )
                    return 1
                ran = time.monotonic() - child.started_mono
                child.failures = 1 if ran >= STABLE_RUN_SECS else child.failures + 1
                delay = restart_delay_secs(child.failures)
                child.restart_at_mono = time.monotonic() + delay
                said = ""
                if code == AgentCannotBuild.exit_code:
                    said = f"; it cannot build:\n{agent_error(log_tail(child.log_path))}"
                say(
                    f"{child.name} exited unexpectedly (status {code}); restarting in "
                    f"{delay:.0f}s (log: {child.log_path}){said}"
                )
            now = time.monotonic()
            for child in agents:
                if child.restart_at_mono is not None and child.restart_at_mono <= now:
                    await child.start()
        say("stopping")
        return 0
    finally:
        stopped.cancel()
