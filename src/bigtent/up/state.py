"""The state dir of ``bigtent up``: its layout, the cache key and tokens generated on first
start (reused later), and the config and env files, rendered by pure functions.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bigtent.config import Role
from bigtent.errors import ConfigError
from bigtent.nix.keys import generate_key, load_secret_key
from bigtent.runner.auth.tokens import generate_token

log = logging.getLogger(__name__)


HOST = "127.0.0.1"


HOST_TOOL_PATHS: tuple[tuple[str, str], ...] = (
    ("/bin", "/usr/bin"),
    ("/usr", "/usr"),
    ("/lib", "/usr/lib"),
    ("/lib64", "/usr/lib64"),
)
"""(path inside the sandbox, host path) for ``--host-tools``: builders may use the host's
``/bin/sh`` and coreutils, so examples run without nixpkgs."""


TOKEN_ROLES: tuple[Role, ...] = (Role.CLIENT, Role.AGENT, Role.ADMIN)


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


def write_file(path: Path, text: str, mode: int = 0o644) -> None:
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
        write_file(layout.public_key, public_key + "\n")
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
        write_file(layout.runner_config, render_runner_config(layout, settings.port))
        for index in range(1, settings.agents + 1):
            layout.agent_dir(index).mkdir(parents=True, exist_ok=True)
            text = render_agent_config(layout, index, settings.runner_url, settings.jobs, sandbox)
            write_file(layout.agent_config(index), text)
    except OSError as exc:
        raise ConfigError(f"cannot prepare state dir {layout.root}: {exc}") from exc
    return UpState(layout, tokens, public_key, sandbox)
