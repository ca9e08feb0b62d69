"""``bigtent up``: the embedded default farm (architecture §7), a loopback runner and N agents.

First start generates the cache key and tokens into the state dir; later starts reuse them.
Config and env files are rendered by pure functions; ``run_up`` starts the runner and agents as
child processes and supervises them until Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import shlex
import signal
import socket
import sys
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from bigtent.client.api import RunnerClient
from bigtent.config import Role
from bigtent.errors import (
    AgentCannotBuild,
    AuthError,
    BigtentError,
    ConfigError,
    RunnerUnreachable,
)
from bigtent.nix.keys import generate_key, load_secret_key
from bigtent.runner.auth.tokens import generate_token
from bigtent.runner.db.migrate import migrate_database

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
READY_TIMEOUT_SECS = 60.0
"""How long the runner may take to answer ``GET /api/v1/status`` after it was started."""
READY_POLL_SECS = 0.1
STOP_GRACE_SECS = 10.0
"""Between SIGTERM and SIGKILL when stopping the children."""
RESTART_BASE_SECS = 1.0
RESTART_MAX_SECS = 30.0
STABLE_RUN_SECS = 60.0
"""An agent that ran this long before exiting restarts without accumulated backoff."""
LOG_TAIL_LINES = 20
AGENTS_READY_TIMEOUT_SECS = 120.0
"""How long the agents may take to pass their start-up probe and register."""

HOST_TOOL_PATHS: tuple[tuple[str, str], ...] = (
    ("/bin", "/usr/bin"),
    ("/usr", "/usr"),
    ("/lib", "/usr/lib"),
    ("/lib64", "/usr/lib64"),
)
"""(path inside the sandbox, host path) for ``--host-tools``: builders may use the host's
``/bin/sh`` and coreutils, so examples run without nixpkgs."""

TOKEN_ROLES: tuple[Role, ...] = (Role.CLIENT, Role.AGENT, Role.ADMIN)

Say = Callable[[str], None]


# ---- layout and pure rendering ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UpSettings:
    state_dir: Path
    agents: int = 2
    port: int = 8080
    jobs: int = 2
    host_tools: bool = False

    @property
    def runner_url(self) -> str:
        return f"http://{HOST}:{self.port}"


@dataclass(frozen=True, slots=True)
class Layout:
    """Where everything lives under the (absolute) state dir."""

    root: Path

    @property
    def runner_config(self) -> Path:
        return self.root / "runner.toml"

    @property
    def database_url(self) -> str:
        """The embedded SQLite database, which ``bigtent up`` migrates itself."""
        return f"sqlite+aiosqlite:///{self.root / 'bigtent.db'}"

    @property
    def signing_key(self) -> Path:
        return self.root / "cache.sk"

    @property
    def public_key(self) -> Path:
        return self.root / "cache.pk"

    @property
    def tokens_dir(self) -> Path:
        return self.root / "tokens"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def env_file(self) -> Path:
        return self.root / "env"

    @property
    def lock_file(self) -> Path:
        return self.root / "up.lock"

    @property
    def runner_log(self) -> Path:
        return self.logs_dir / "runner.log"

    def token_file(self, role: Role) -> Path:
        return self.tokens_dir / role.value

    def agent_dir(self, index: int) -> Path:
        return self.root / "agents" / str(index)

    def agent_config(self, index: int) -> Path:
        return self.agent_dir(index) / "agent.toml"

    def agent_log(self, index: int) -> Path:
        return self.logs_dir / f"agent-{index}.log"


def _toml_str(value: str | Path) -> str:
    # A JSON string is a valid TOML basic string (same escapes, no "\/" from json.dumps).
    return json.dumps(str(value))


def _toml_list(values: Sequence[str]) -> str:
    return "[" + ", ".join(_toml_str(v) for v in values) + "]"


def render_runner_config(layout: Layout, port: int) -> str:
    """runner.toml: loopback, plaintext allowed (loopback only), tokens read from their files."""
    lines = [
        "# Written by `bigtent up`; rewritten on every start (edit the flags, not this file).",
        "[runner]",
        f"listen = {_toml_str(f'{HOST}:{port}')}",
        f"state_dir = {_toml_str(layout.root)}",
        "allow_plaintext = true",
        "",
        "[database]",
        f"url = {_toml_str(layout.database_url)}",
        "",
        "[cache]",
        f"signing_key_file = {_toml_str(layout.signing_key)}",
    ]
    for role in TOKEN_ROLES:
        lines += [
            "",
            "[[auth.tokens]]",
            f"name = {_toml_str(f'local-{role.value}')}",
            f"role = {_toml_str(role.value)}",
            f"token_file = {_toml_str(layout.token_file(role))}",
        ]
        if role is Role.CLIENT:
            # The local client's builds are trusted ones (architecture §6): its outputs go to the
            # main cache, built by the local (trusted) agents.
            lines.append("trusted = true")
    return "\n".join(lines) + "\n"


def render_agent_config(
    layout: Layout, index: int, runner_url: str, jobs: int, sandbox_paths: Sequence[str]
) -> str:
    """agent.toml for local agent ``index``: its own chroot store and work dir (architecture §4)."""
    agent_dir = layout.agent_dir(index)
    store = f"local?root={agent_dir / 'root'}"
    lines = [
        "# Written by `bigtent up`; rewritten on every start.",
        "[agent]",
        f"runner_url = {_toml_str(runner_url)}",
        f"name = {_toml_str(f'local-{index}')}",
        f"max_jobs = {jobs}",
        f"store = {_toml_str(store)}",
        f"work_dir = {_toml_str(agent_dir)}",
        f"token_file = {_toml_str(layout.token_file(Role.AGENT))}",
    ]
    if sandbox_paths:
        lines.append(f"sandbox_paths = {_toml_list(sandbox_paths)}")
    return "\n".join(lines) + "\n"


def render_env(runner_url: str, client_token: str, agent_token: str, cache_public_key: str) -> str:
    """The shell-sourceable env file: ``. STATE/env`` sets up the client."""
    values = {
        "BIGTENT_URL": runner_url,
        "BIGTENT_TOKEN": client_token,
        "BIGTENT_AGENT_TOKEN": agent_token,
        "BIGTENT_CACHE_URL": f"{runner_url}/cache",
        "BIGTENT_CACHE_PUBLIC_KEY": cache_public_key,
    }
    body = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in values.items())
    return "# Written by `bigtent up`: source it with `. THIS_FILE`.\n" + body


def host_sandbox_paths(exists: Callable[[str], bool] = os.path.exists) -> list[str]:
    """``--host-tools``: the host tool directories as sandbox paths, those that exist."""
    out = []
    for inside, host in HOST_TOOL_PATHS:
        if exists(host):
            out.append(inside if inside == host else f"{inside}={host}")
    return out


def key_name(hostname: str) -> str:
    """``bigtent-<hostname>-1``; a key name may not contain ':'."""
    clean = hostname.split(".")[0].replace(":", "-") or "localhost"
    return f"bigtent-{clean}-1"


def restart_delay_secs(failures: int) -> float:
    """Exponential backoff for the ``failures``-th consecutive agent restart (1-based)."""
    return float(min(RESTART_MAX_SECS, RESTART_BASE_SECS * 2 ** max(0, failures - 1)))


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


# ---- state preparation ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UpState:
    layout: Layout
    tokens: dict[Role, str]
    cache_public_key: str
    sandbox_paths: list[str]


def _write_secret(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _write_file(path: Path, text: str, mode: int = 0o644) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    tmp.chmod(mode)
    tmp.replace(path)


def prepare_state(settings: UpSettings) -> UpState:
    """Create the state dir; generate key and tokens only when missing; write the configs."""
    layout = Layout(settings.state_dir)
    try:
        for d in (layout.root, layout.tokens_dir, layout.logs_dir):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o700)
        if not layout.signing_key.exists():
            key = generate_key(key_name(socket.gethostname()))
            _write_secret(layout.signing_key, key.to_text() + "\n")
            log.info("generated cache signing key %s", key.name)
        try:
            public_key = load_secret_key(layout.signing_key).public_key().to_text()
        except ValueError as exc:
            raise ConfigError(f"bad cache signing key: {exc}") from exc
        _write_file(layout.public_key, public_key + "\n")
        tokens: dict[Role, str] = {}
        for role in TOKEN_ROLES:
            path = layout.token_file(role)
            if not path.exists():
                _write_secret(path, generate_token() + "\n")
                log.info("generated %s token in %s", role.value, path)
            tokens[role] = path.read_text().strip()
            if not tokens[role]:
                raise ConfigError(f"token file {path} is empty; delete it to get a new token")
        sandbox = host_sandbox_paths() if settings.host_tools else []
        _write_file(layout.runner_config, render_runner_config(layout, settings.port))
        for index in range(1, settings.agents + 1):
            layout.agent_dir(index).mkdir(parents=True, exist_ok=True)
            text = render_agent_config(layout, index, settings.runner_url, settings.jobs, sandbox)
            _write_file(layout.agent_config(index), text)
    except OSError as exc:
        raise ConfigError(f"cannot prepare state dir {layout.root}: {exc}") from exc
    return UpState(layout, tokens, public_key, sandbox)


# ---- children --------------------------------------------------------------------------------


@dataclass(slots=True)
class _Child:
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


def _child_env(xdg_cache: Path) -> dict[str, str]:
    # BIGTENT_* from the user's shell (e.g. a sourced env file) must not override the
    # generated config files.
    env = {k: v for k, v in os.environ.items() if not k.startswith("BIGTENT_")}
    env["XDG_CACHE_HOME"] = str(xdg_cache)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _signal(child: _Child, sig: signal.Signals, *, group: bool) -> None:
    if child.proc is None or child.proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(child.proc.pid, sig)
        else:
            child.proc.send_signal(sig)


async def _stop_children(children: Sequence[_Child], grace_secs: float = STOP_GRACE_SECS) -> None:
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


async def _check_port(port: int) -> None:
    if await _port_in_use(port):
        raise BigtentError(f"port {port} on {HOST} is already in use; choose another with --port")


def schema_line(before: str | None, after: str) -> str:
    """The one line `bigtent up` says when it created or upgraded its database (pure)."""
    if before is None:
        return f"database created (schema {after})"
    return f"database schema upgraded from {before} to {after}"


async def _wait_ready(runner: _Child, url: str, token: str) -> None:
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


def _agent_exited(child: _Child) -> BigtentError:
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


async def _wait_agents(agents: Sequence[_Child], url: str, token: str) -> None:
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


async def _until_stopped(op: asyncio.Task[None], stop: asyncio.Event) -> bool:
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


@contextlib.contextmanager
def _state_lock(layout: Layout) -> Iterator[None]:
    """One ``bigtent up`` per state dir at a time."""
    with layout.lock_file.open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise BigtentError(
                f"another `bigtent up` is running with state dir {layout.root}"
            ) from exc
        yield


async def run_up(settings: UpSettings, say: Say) -> int:
    """Start the farm and supervise it until Ctrl-C or SIGTERM; return the exit code."""
    if settings.agents < 0:
        raise ConfigError(f"--agents must not be negative (got {settings.agents})")
    if settings.jobs < 1:
        raise ConfigError(f"--jobs must be at least 1 (got {settings.jobs})")
    # Before anything is written: a busy port must not leave a new state dir with keys and
    # tokens behind (checked again under the lock, where another `bigtent up` may have won).
    await _check_port(settings.port)
    state = prepare_state(settings)
    layout = state.layout
    with _state_lock(layout):
        await _check_port(settings.port)
        # The embedded database is ours: create or upgrade its schema before the runner
        # checks it (a runner never migrates by itself; docs/operations.md).
        before, after = await migrate_database(layout.database_url)
        if before != after:
            say(schema_line(before, after))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        runner = _Child(
            "runner",
            [sys.executable, "-m", "bigtent", "runner", "--config", str(layout.runner_config)],
            layout.runner_log,
            _child_env(layout.root / "xdg-cache"),
        )
        agents = [
            _Child(
                f"agent local-{i}",
                [sys.executable, "-m", "bigtent", "agent", "--config", str(layout.agent_config(i))],
                layout.agent_log(i),
                _child_env(layout.agent_dir(i) / "xdg-cache"),
                agent_name=f"local-{i}",
            )
            for i in range(1, settings.agents + 1)
        ]
        client_token = state.tokens[Role.CLIENT]
        try:
            await runner.start()
            say(f"starting runner at {settings.runner_url} (log: {layout.runner_log})")
            ready = asyncio.create_task(_wait_ready(runner, settings.runner_url, client_token))
            if await _until_stopped(ready, stop):
                say("stopping")
                return 0
            for agent in agents:
                await agent.start()
            if agents:
                say(f"starting {len(agents)} agent(s): each proves it can build, then registers")
            registered = asyncio.create_task(
                _wait_agents(agents, settings.runner_url, client_token)
            )
            if await _until_stopped(registered, stop):
                say("stopping")
                return 0
            env = render_env(
                settings.runner_url,
                state.tokens[Role.CLIENT],
                state.tokens[Role.AGENT],
                state.cache_public_key,
            )
            _write_file(layout.env_file, env, mode=0o600)
            _announce(settings, state, say)
            return await _supervise(runner, agents, stop, say)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            await _stop_children([*agents, runner])


def _announce(settings: UpSettings, state: UpState, say: Say) -> None:
    layout = state.layout
    tools = "" if settings.host_tools else " (add --host-tools for /bin/sh builders)"
    say(
        f"bigtent is up: runner {settings.runner_url} with {settings.agents} local agent(s)"
        f"{tools}\n"
        f"  dashboard:   {settings.runner_url}/ (actions: sign in with the token in "
        f"{shlex.quote(str(layout.token_file(Role.ADMIN)))})\n"
        f"  cache:       {settings.runner_url}/cache\n"
        f"  environment: . {shlex.quote(str(layout.env_file))}\n"
        f"  then try:    bigtent build FILE.nix -A ATTR; bigtent status\n"
        f"  logs:        {layout.logs_dir}/\n"
        "Press Ctrl-C to stop."
    )


async def _supervise(runner: _Child, agents: list[_Child], stop: asyncio.Event, say: Say) -> int:
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
