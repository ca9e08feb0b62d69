"""``bigtent up``'s command: prepare the state dir, start the runner, then the agents, say
how to use the farm, and supervise it until Ctrl-C or SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import shlex
import signal
import sys
from collections.abc import Iterator

from bigtent.config import Role
from bigtent.errors import BigtentError, ConfigError
from bigtent.runner.db.migrate import migrate_database
from bigtent.up.children import (
    Child,
    Say,
    check_port,
    child_env,
    schema_line,
    stop_children,
    supervise,
    until_stopped,
    wait_agents,
    wait_ready,
)
from bigtent.up.state import Layout, UpSettings, UpState, prepare_state, render_env, write_file

log = logging.getLogger(__name__)


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
    await check_port(settings.port)
    state = prepare_state(settings)
    layout = state.layout
    with _state_lock(layout):
        await check_port(settings.port)
        # The embedded database is ours: create or upgrade its schema before the runner
        # checks it (a runner never migrates by itself; docs/operations.md).
        before, after = await migrate_database(layout.database_url)
        if before != after:
            say(schema_line(before, after))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        runner = Child(
            "runner",
            [sys.executable, "-m", "bigtent", "runner", "--config", str(layout.runner_config)],
            layout.runner_log,
            child_env(layout.root / "xdg-cache"),
        )
        agents = [
            Child(
                f"agent local-{i}",
                [sys.executable, "-m", "bigtent", "agent", "--config", str(layout.agent_config(i))],
                layout.agent_log(i),
                child_env(layout.agent_dir(i) / "xdg-cache"),
                agent_name=f"local-{i}",
            )
            for i in range(1, settings.agents + 1)
        ]
        client_token = state.tokens[Role.CLIENT]
        try:
            await runner.start()
            say(f"starting runner at {settings.runner_url} (log: {layout.runner_log})")
            ready = asyncio.create_task(wait_ready(runner, settings.runner_url, client_token))
            if await until_stopped(ready, stop):
                say("stopping")
                return 0
            for agent in agents:
                await agent.start()
            if agents:
                say(f"starting {len(agents)} agent(s): each proves it can build, then registers")
            registered = asyncio.create_task(wait_agents(agents, settings.runner_url, client_token))
            if await until_stopped(registered, stop):
                say("stopping")
                return 0
            env = render_env(
                settings.runner_url,
                state.tokens[Role.CLIENT],
                state.tokens[Role.AGENT],
                state.cache_public_key,
            )
            write_file(layout.env_file, env, mode=0o600)
            _announce(settings, state, say)
            return await supervise(runner, agents, stop, say)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            await stop_children([*agents, runner])


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
