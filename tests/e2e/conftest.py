"""The ``farm`` fixture factory: a real runner and real agents as subprocesses.

Each farm has its own state dir, free port, tokens, signing key, per-agent Nix store roots and
``XDG_CACHE_HOME``; teardown stops every process by pid and prints their logs on failure.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from bigtent.nix.keys import generate_key
from bigtent.runner.auth.tokens import generate_token, token_digest
from tests.conftest import HOST_TOOLS, have_nix, wait_until
from tests.integration.runner.oidc_issuer import TlsFiles
from tests.s3 import Bucket, s3_bucket, s3_endpoint

__all__ = ["HOST_TOOLS", "s3_bucket", "s3_endpoint"]  # fixtures: a farm may store its NARs in S3
from tests.databases import MakeDatabase

REPO = Path(__file__).resolve().parents[2]
DAG_NIX = REPO / "examples" / "dag.nix"

pytestmark = pytest.mark.skipif(not have_nix(), reason="needs Nix")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml_list(items: Sequence[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int | None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)


@dataclass
class Farm:
    root: Path
    port: int
    client_token: str
    agent_token: str
    admin_token: str
    public_key: str
    database_url: str
    runner_extra: str = ""
    tls: TlsFiles | None = None
    """Serve the runner over https with this test CA's certificate (clients trust the CA)."""
    storage: Bucket | None = None
    """Store NARs in this bucket (``[cache] storage = "s3"``) instead of the state dir."""
    cache_extra: str = ""
    """More ``[cache]`` keys (TOML lines)."""
    scheduler_extra: str = ""
    """More ``[scheduler]`` keys (TOML lines)."""
    runner: Proc | None = None
    agents: dict[str, Proc] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def verify(self) -> ssl.SSLContext | bool:
        """How httpx checks the runner's certificate."""
        return ssl.create_default_context(cafile=str(self.tls.ca_file)) if self.tls else True

    @property
    def cache_url(self) -> str:
        return f"{self.url}/cache"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BIGTENT_", "NIX_"))}
        env.update(
            BIGTENT_URL=self.url,
            BIGTENT_TOKEN=self.client_token,
            BIGTENT_AGENT_TOKEN=self.agent_token,
            XDG_CACHE_HOME=str(self.root / "xdg-client"),
            NIX_CONFIG="substituters =\n",
        )
        if self.tls:
            env.update(
                BIGTENT_CA_FILE=str(self.tls.ca_file), NIX_SSL_CERT_FILE=str(self.tls.ca_file)
            )
        env.update(extra)
        return env

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> Proc:
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            popen = subprocess.Popen(
                [sys.executable, "-m", "bigtent", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.root,
                start_new_session=True,
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def start_runner(self) -> Proc:
        cfg = self.root / "runner.toml"
        cfg.write_text(self._runner_config(self.port))
        self.runner = self._spawn("runner", ["-v", "runner", "--config", str(cfg)], self.env())
        wait_until(self._runner_up, timeout=30, what="runner to answer")
        return self.runner

    def start_peer_runner(self, name: str = "runner-2") -> tuple[Proc, str]:
        """Another runner process on the same database and state dir (PostgreSQL only);
        returns it and its URL."""
        port = free_port()
        cfg = self.root / f"{name}.toml"
        cfg.write_text(self._runner_config(port))
        proc = self._spawn(name, ["-v", "runner", "--config", str(cfg)], self.env())
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            if not proc.alive():
                raise AssertionError(f"{name} exited:\n" + proc.log.read_text()[-3000:])
            try:
                return httpx.get(f"{url}/cache/nix-cache-info", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, timeout=30, what=f"{name} to answer")
        return proc, url

    def _runner_config(self, port: int) -> str:
        tls = (
            f'[runner.tls]\ncert_file = "{self.tls.cert_file}"\nkey_file = "{self.tls.key_file}"\n'
            if self.tls
            else ""
        )
        return f"""
[runner]
listen = "127.0.0.1:{port}"
state_dir = "{self.root / "runner"}"
allow_plaintext = true
{tls}
[database]
url = "{self.database_url}"

[cache]
signing_key_file = "{self.root / "cache.sk"}"
{'storage = "s3"' if self.storage else ""}
{self.cache_extra}

[scheduler]
heartbeat_secs = 1.0
lease_secs = 6.0
retry_base_secs = 0.2
agent_backoff_base_secs = 0.5
{self.scheduler_extra}

[[auth.tokens]]
name = "client"
role = "client"
sha256 = "{token_digest(self.client_token)}"
trusted = true

[[auth.tokens]]
name = "agent"
role = "agent"
sha256 = "{token_digest(self.agent_token)}"

[[auth.tokens]]
name = "admin"
role = "admin"
sha256 = "{token_digest(self.admin_token)}"
{self.runner_extra}
{self.storage.toml() if self.storage else ""}
"""

    def _runner_up(self) -> bool:
        assert self.runner is not None
        if not self.runner.alive():
            raise AssertionError("runner exited:\n" + self.runner.log.read_text()[-3000:])
        try:
            resp = httpx.get(f"{self.url}/cache/nix-cache-info", timeout=1, verify=self.verify)
            return resp.status_code == 200
        except httpx.HTTPError:
            return False

    def start_agent(
        self,
        name: str,
        *,
        max_jobs: int = 2,
        supported_features: Sequence[str] = (),
        mandatory_features: Sequence[str] = (),
        extra_args: Sequence[str] = (),
        wait: bool = True,
        runner_url: str | None = None,
        token: str | None = None,
        sandbox_paths: Sequence[str] = (),
        agent_extra: str = "",
        ca_flag: bool = False,
        store: str | None = None,
    ) -> Proc:
        """Start agent ``name``; ``runner_url`` dials the runner another way (e.g. a proxy);
        ``token`` is another credential (e.g. a CI job's OIDC ID token); ``sandbox_paths`` are
        mapped into the build sandbox besides the host tools; ``agent_extra`` are more
        ``[agent]`` keys (TOML lines); ``store`` is another store URI. With TLS the agent gets
        the test CA as ``ca_file`` in its config, or as ``--ca-file`` with ``ca_flag``."""
        work = self.root / "agents" / name
        work.mkdir(parents=True, exist_ok=True)
        cfg = work / "agent.toml"
        cfg.write_text(
            f"""
[agent]
runner_url = "{runner_url or self.url}"
name = "{name}"
max_jobs = {max_jobs}
supported_features = {_toml_list(supported_features)}
mandatory_features = {_toml_list(mandatory_features)}
store = "{store or "local?root=" + str(work / "root")}"
work_dir = "{work}"
sandbox_paths = {_toml_list([*HOST_TOOLS, *sandbox_paths])}
{f'ca_file = "{self.tls.ca_file}"' if self.tls and not ca_flag else ""}
{agent_extra}
"""
        )
        if self.tls and ca_flag:
            extra_args = ["--ca-file", str(self.tls.ca_file), *extra_args]
        env = self.env(**({"BIGTENT_AGENT_TOKEN": token} if token is not None else {}))
        # The agent hands its ca_file to Nix itself: nothing from the environment helps it.
        for var in ("NIX_SSL_CERT_FILE", "SSL_CERT_FILE"):
            env.pop(var, None)
        proc = self._spawn(f"agent-{name}", ["-v", "agent", "--config", str(cfg), *extra_args], env)
        self.agents[name] = proc
        if wait:
            wait_until(
                lambda: self.agent_connected(name), timeout=30, what=f"agent {name} to connect"
            )
        return proc

    def api(self, token: str | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token or self.admin_token}"},
            timeout=30,
            verify=self.verify,
        )

    def agent_connected(self, name: str) -> bool:
        with self.api() as c:
            agents = c.get("/api/v1/agents").json()["agents"]
        return any(a["name"] == name and a["connected"] for a in agents)

    def bigtent(
        self,
        *args: str,
        timeout: float = 240,
        check: bool = False,
        token: str | None = None,
        columns: int | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run the CLI as the client (``token``: another client token; ``columns``: the
        terminal width its tables fit, instead of the inherited ``COLUMNS``)."""
        extra = {"BIGTENT_TOKEN": token} if token is not None else {}
        if columns is not None:
            extra["COLUMNS"] = str(columns)
        proc = subprocess.run(
            [sys.executable, "-m", "bigtent", *args],
            capture_output=True,
            text=True,
            env=self.env(**extra),
            cwd=self.root,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"bigtent {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def build_json(
        self, *args: str, timeout: float = 240, token: str | None = None
    ) -> tuple[int, dict[str, Any]]:
        proc = self.bigtent("build", "--json", *args, timeout=timeout, token=token)
        try:
            data = json.loads(proc.stdout)
        except json.JSONDecodeError as exc:
            raise AssertionError(
                f"bigtent build printed no JSON (exit {proc.returncode}):\n"
                f"{proc.stdout}\n{proc.stderr}"
            ) from exc
        return proc.returncode, data

    def dag_file(self, salt: str | None = None, **args: Any) -> Path:
        return write_dag_file(self.root, salt, **args)

    def logs(self) -> str:
        out = []
        for proc in self.procs:
            if proc.log.exists():
                out.append(f"==== {proc.name} ====\n{proc.log.read_text()[-6000:]}")
        return "\n".join(out)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(timeout=10)


def write_dag_file(root: Path, salt: str | None = None, **args: Any) -> Path:
    """A .nix file calling examples/dag.nix with these arguments and a unique salt."""
    params = {"salt": salt or uuid.uuid4().hex, **args}
    body = " ".join(f"{k} = {_nix_value(v)};" for k, v in params.items())
    path = root / f"dag-{uuid.uuid4().hex[:8]}.nix"
    path.write_text(f"import {DAG_NIX} {{ {body} }}\n")
    return path


def _nix_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list | tuple):
        return "[ " + " ".join(_nix_value(x) for x in v) + " ]"
    raise TypeError(v)


@pytest.fixture
def farm_factory(
    tmp_path: Path, request: pytest.FixtureRequest, make_database: MakeDatabase
) -> Iterator[Callable[..., Farm]]:
    """``farm_factory(agents=N, runner_extra=TOML)``: a farm with its own migrated database
    (SQLite, or PostgreSQL in that pass)."""
    farms: list[Farm] = []

    def make(
        agents: int = 0,
        runner_extra: str = "",
        tls: TlsFiles | None = None,
        port: int | None = None,
        storage: Bucket | None = None,
        cache_extra: str = "",
        scheduler_extra: str = "",
        **agent_kwargs: Any,
    ) -> Farm:
        root = tmp_path / f"farm{len(farms)}"
        root.mkdir()
        key = generate_key(f"test-{uuid.uuid4().hex[:6]}-1")
        (root / "cache.sk").write_text(key.to_text())
        farm = Farm(
            root=root,
            port=port or free_port(),
            client_token=generate_token(),
            agent_token=generate_token(),
            admin_token=generate_token(),
            public_key=key.public_key().to_text(),
            database_url=make_database(),
            runner_extra=runner_extra,
            tls=tls,
            storage=storage,
            cache_extra=cache_extra,
            scheduler_extra=scheduler_extra,
        )
        farms.append(farm)
        farm.start_runner()
        for i in range(agents):
            farm.start_agent(f"a{i}", **agent_kwargs)
        return farm

    yield make
    failed = getattr(request.node, "rep_call", None)
    for farm in farms:
        farm.stop()
        if failed is not None and failed.failed:
            print(farm.logs())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{rep.when}", rep)
