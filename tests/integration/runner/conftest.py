"""Fixtures for the runner's HTTP and WebSocket surface: an in-process runner over a temporary
state dir (driven through httpx's ASGI transport, or served by a real uvicorn on a loopback
port), and real Nix derivations, outputs and NARs made by the host's Nix."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import shutil
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine
from websockets.asyncio.client import ClientConnection, connect

from bigtent import protocol as p
from bigtent.config import Role, load_runner_config
from bigtent.nix import base32, narinfo
from bigtent.nix.keys import SecretKey, generate_key, verify_narinfo
from bigtent.nix.nar import dump_path
from bigtent.nix.store_path import StorePath
from bigtent.runner.auth.tokens import generate_token, token_digest
from bigtent.runner.components import Components, build_components, close_components
from bigtent.runner.db.migrate import create_engine
from bigtent.runner.http.app import create_app, uvicorn_config
from tests.conftest import HOST_TOOLS_OPTION, current_system
from tests.conftest import eventually as _eventually
from tests.s3 import s3_bucket, s3_endpoint

__all__ = ["s3_bucket", "s3_endpoint"]  # fixtures for the tests of S3 storage
from tests.databases import MakeDatabase

NO_SUBSTITUTERS = ["--option", "substituters", ""]
WAIT_SECS = 10.0
T = TypeVar("T")


@pytest.fixture(autouse=True)
def own_nix_cache(clean_environ: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Nix caches binary-cache lookups by URL: every test gets its own (NIX-TESTING)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


async def eventually(
    predicate: Callable[[], bool | Awaitable[bool]], timeout: float = WAIT_SECS
) -> None:
    """Wait until ``predicate`` holds, failing the test after ``timeout`` seconds."""
    await _eventually(predicate, timeout=timeout, interval=0.01)


# ---- the runner --------------------------------------------------------------------------------
@dataclass(eq=False)
class RunnerHarness:
    """One runner: its components, app, tokens per role, signing key and (when served) URL."""

    comps: Components
    app: FastAPI
    tokens: dict[Role, str]
    key: SecretKey
    state_dir: Path
    url: str | None = None
    _clients: list[httpx.AsyncClient] = field(default_factory=list)

    def client(
        self, role: Role | None = Role.CLIENT, *, token: str | None = None
    ) -> httpx.AsyncClient:
        """An HTTP client for the app, authenticated as ``role`` (None: no credential)."""
        headers = {}
        secret = token if token is not None else (self.tokens[role] if role else None)
        if secret is not None:
            headers["Authorization"] = f"Bearer {secret}"
        if self.url is not None:
            c = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=WAIT_SECS)
        else:
            c = httpx.AsyncClient(
                transport=httpx.ASGITransport(app=self.app),
                base_url="http://runner.test",
                headers=headers,
                timeout=WAIT_SECS,
            )
        self._clients.append(c)
        return c

    @property
    def ws_url(self) -> str:
        assert self.url is not None, "the runner is not served (make_runner(serve=True))"
        return self.url.replace("http", "ws", 1) + "/api/v1/agent/ws"

    async def narinfo(self, path: str) -> httpx.Response:
        hash_part = StorePath.parse(path).hash_part
        return await self.client(None).get(f"/cache/{hash_part}.narinfo")

    async def present(self, paths: list[str]) -> set[str]:
        return await self.comps.cache.present(paths)

    def temp_files(self) -> list[Path]:
        """Leftovers of uploads in ``STATE/cache/tmp`` (there must be none)."""
        return sorted((self.state_dir / "cache" / "tmp").iterdir())

    def nar_files(self) -> list[Path]:
        return sorted((self.state_dir / "cache" / "nar").iterdir())

    async def aclose(self) -> None:
        for c in self._clients:
            await c.aclose()


MakeRunner = Callable[..., Awaitable[RunnerHarness]]


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on a migrated test database (SQLite, or PostgreSQL in that pass)."""
    engine = create_engine(database_url)
    yield engine
    await engine.dispose()


def _free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.set_inheritable(True)
    return sock


@pytest.fixture
async def make_runner(tmp_path: Path, make_database: MakeDatabase) -> AsyncIterator[MakeRunner]:
    """Factory: ``await make_runner(serve=False, cache={...}, auth={"oidc": [...]}, ...)``
    (``auth`` adds to the generated tokens, one per role; ``runner`` to the ``[runner]``
    section).

    With ``serve=True`` the app runs under a real uvicorn server on a loopback port bound
    before the components are built (so the cache URL names the real port), with its
    lifespan (the scheduler loop) running; otherwise it is driven in-process over ASGI.
    Each runner gets a new migrated database (``database={"url": ...}`` names another).
    """
    made: list[tuple[RunnerHarness, uvicorn.Server | None, asyncio.Task[None] | None]] = []

    async def make(
        *,
        serve: bool = False,
        cache: dict[str, Any] | None = None,
        auth: dict[str, Any] | None = None,
        tls: dict[str, Any] | None = None,
        runner: dict[str, Any] | None = None,
        **sections: Any,
    ) -> RunnerHarness:
        state = tmp_path / f"runner{len(made)}"
        state.mkdir()
        key = generate_key(f"test-{len(made)}")
        key_file = state / "cache.sk"
        key_file.write_text(key.to_text())
        tokens = {role: generate_token() for role in Role}
        if "database" not in sections:
            sections["database"] = {"url": make_database()}
        sock = _free_socket() if serve else None
        port = sock.getsockname()[1] if sock else 0
        config = load_runner_config(
            None,
            runner={
                "state_dir": str(state),
                "listen": f"127.0.0.1:{port}",
                "allow_plaintext": True,
                **({"tls": tls} if tls else {}),
                **(runner or {}),
            },
            auth={
                # The client token is trusted, so its builds are trusted (architecture §6); tests
                # of untrusted builds make an untrusted client token of their own.
                "tokens": [
                    {
                        "name": f"{role}-token",
                        "role": str(role),
                        "sha256": token_digest(tok),
                        "trusted": role is Role.CLIENT,
                    }
                    for role, tok in tokens.items()
                ],
                **(auth or {}),
            },
            cache={"signing_key_file": str(key_file), **(cache or {})},
            **sections,
        )
        comps = await build_components(config)
        app = create_app(comps)
        harness = RunnerHarness(comps, app, tokens, key, state)
        server: uvicorn.Server | None = None
        task: asyncio.Task[None] | None = None
        if sock is not None:
            server = uvicorn.Server(uvicorn_config(app, config))
            task = asyncio.create_task(server.serve(sockets=[sock]))
            started = server

            async def up() -> bool:
                if task.done():
                    task.result()  # raises what killed the server
                return started.started

            await eventually(up)
            harness.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
        made.append((harness, server, task))
        return harness

    yield make
    for harness, server, task in reversed(made):
        await harness.aclose()
        if server is not None and task is not None:
            server.should_exit = True
            await asyncio.wait_for(task, WAIT_SECS)
        await close_components(harness.comps)


# ---- Nix ---------------------------------------------------------------------------------------
def _run(*argv: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(argv, capture_output=True, check=False, env=env, text=True)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed:\n{result.stderr}")
    return result.stdout.strip()


@dataclass(frozen=True)
class Upload:
    """One store path as a client or agent uploads it: its NAR and declared headers."""

    path: str
    nar: bytes
    references: tuple[str, ...]

    @property
    def basename(self) -> str:
        return StorePath.parse(self.path).basename

    @property
    def nar_hash(self) -> str:
        return base32.format_hash("sha256", hashlib.sha256(self.nar).digest())

    def headers(self, overrides: dict[str, str] | None = None) -> dict[str, str]:
        h = {
            "X-Nar-Hash": self.nar_hash,
            "X-Nar-Size": str(len(self.nar)),
            "X-Nar-References": " ".join(StorePath.parse(r).basename for r in self.references),
        }
        h.update(overrides or {})
        return {k: v for k, v in h.items() if v != "-"}


@dataclass(frozen=True)
class Drvs:
    """A small real derivation graph: ``top`` depends on ``dep`` and a ``builtins.toFile``
    source; ``dep``'s output refers to itself and ``top``'s output refers to ``dep``'s."""

    top: str
    dep: str
    source: str
    closure: tuple[str, ...]
    """Every path of ``top``'s closure, dependencies first."""


class Nix:
    """The host's Nix (a local store, no daemon, no substituters)."""

    def instantiate(self, expr: str, tmp: Path) -> str:
        f = tmp / f"{uuid.uuid4().hex}.nix"
        f.write_text(expr)
        return _run("nix-instantiate", *NO_SUBSTITUTERS, str(f))

    def references(self, path: str) -> tuple[str, ...]:
        out = _run("nix-store", "-q", "--references", path)
        return tuple(sorted(line for line in out.splitlines() if line))

    def closure(self, path: str) -> tuple[str, ...]:
        """``nix-store -qR``, ordered dependencies first (a topological sort we do ourselves)."""
        paths = [line for line in _run("nix-store", "-qR", path).splitlines() if line]
        refs = {x: set(self.references(x)) - {x} for x in paths}
        order: list[str] = []
        done: set[str] = set()

        def visit(x: str) -> None:
            if x in done:
                return
            done.add(x)
            for r in sorted(refs[x]):
                visit(r)
            order.append(x)

        for x in sorted(paths):
            visit(x)
        return tuple(order)

    def upload(self, path: str) -> Upload:
        nar = b"".join(dump_path(path))
        return Upload(path, nar, self.references(path))

    def outputs(self, drv: str) -> dict[str, str]:
        out = _run("nix", "--extra-experimental-features", "nix-command", "show-derivation", drv)
        data = json.loads(out)
        return {name: o["path"] for name, o in data[drv]["outputs"].items()}

    def realise(self, drv: str) -> list[str]:
        return _run(
            "nix-store", "--realise", *NO_SUBSTITUTERS, *HOST_TOOLS_OPTION, drv
        ).splitlines()

    def graph(self, tmp: Path) -> Drvs:
        nonce = uuid.uuid4().hex
        expr = f"""
let
  src = builtins.toFile "greeting-{nonce[:8]}" "hello";
  dep = derivation {{
    name = "dep"; system = builtins.currentSystem; builder = "/bin/sh"; nonce = "{nonce}";
    args = ["-c" "echo hi > $out; echo $out >> $out"];
  }};
in derivation {{
  name = "top"; system = builtins.currentSystem; builder = "/bin/sh"; nonce = "{nonce}";
  args = ["-c" "read x < ${{src}}; echo $x ${{dep}} > $out"];
}}
"""
        top = self.instantiate(expr, tmp)
        closure = self.closure(top)
        dep = next(p for p in closure if p.endswith("-dep.drv"))
        source = next(p for p in closure if "-greeting-" in p)
        return Drvs(top=top, dep=dep, source=source, closure=closure)


@pytest.fixture(scope="session")
def nix() -> Iterator[Nix]:
    if shutil.which("nix-store") is None:
        pytest.skip("nix-store is not on PATH")
    yield Nix()


@pytest.fixture
def drvs(nix: Nix, tmp_path: Path) -> Drvs:
    return nix.graph(tmp_path)


async def upload_path(
    client: httpx.AsyncClient,
    up: Upload,
    *,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    basename: str | None = None,
) -> httpx.Response:
    """PUT a client path; ``headers`` override the declared ones ("-" removes one)."""
    return await client.put(
        f"/api/v1/paths/{basename or up.basename}",
        content=up.nar if body is None else body,
        # Latin-1, as HTTP header values are read by the server.
        headers=[(k.encode(), v.encode("latin-1")) for k, v in up.headers(headers).items()],
    )


async def upload_closure(runner: RunnerHarness, nix: Nix, paths: tuple[str, ...]) -> None:
    client = runner.client(Role.CLIENT)
    for path in paths:
        resp = await upload_path(client, nix.upload(path))
        assert resp.status_code == 201, resp.text


def verify_signed(runner: RunnerHarness, text: str) -> narinfo.NarInfo:
    info = narinfo.parse(text)
    assert info.sigs, "narinfo is not signed"
    assert verify_narinfo(info, [runner.key.public_key()]), "signature does not verify"
    return info


async def nix_copy_from(runner: RunnerHarness, paths: list[str], root: Path) -> tuple[int, str]:
    """``nix copy --derivation --from`` the runner's cache into a fresh store (the .drv files
    themselves), checking signatures against the runner's key."""
    assert runner.url is not None
    proc = await asyncio.create_subprocess_exec(
        "nix",
        "--extra-experimental-features",
        "nix-command",
        "copy",
        "--derivation",
        "--from",
        f"{runner.url}/cache",
        "--to",
        f"local?root={root}",
        "--option",
        "trusted-public-keys",
        runner.key.public_key().to_text(),
        *paths,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={"PATH": "/usr/bin:/bin", "XDG_CACHE_HOME": str(root.parent / f"xdg-{root.name}")},
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


@contextlib.contextmanager
def statements(engine: AsyncEngine) -> Iterator[list[str]]:
    """The SQL statements ``engine`` executes meanwhile (their text, in order)."""
    seen: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
        seen.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", count)


@contextlib.contextmanager
def nothing_stored(runner: RunnerHarness) -> Iterator[None]:
    """Assert that the block left the cache's files exactly as it found them."""
    nar_before = runner.nar_files()
    yield
    assert runner.temp_files() == []
    assert runner.nar_files() == nar_before


# ---- agents ------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def nix_system(nix: Nix) -> str:
    return current_system()


def register_message(system: str, **overrides: Any) -> p.Register:
    fields: dict[str, Any] = {
        "machine_id": uuid.uuid4().hex,
        "name": "agent-" + uuid.uuid4().hex[:6],
        "systems": [system],
        "max_jobs": 1,
    }
    fields.update(overrides)
    return p.Register(**fields)


@contextlib.asynccontextmanager
async def agent_socket(
    runner: RunnerHarness, role: Role | None = Role.AGENT
) -> AsyncIterator[ClientConnection]:
    headers = {"Authorization": f"Bearer {runner.tokens[role]}"} if role else {}
    async with connect(
        runner.ws_url, additional_headers=headers, open_timeout=WAIT_SECS, proxy=None
    ) as ws:
        yield ws


async def receive(ws: ClientConnection) -> p.RunnerMessage:
    return p.parse_runner_message(await asyncio.wait_for(ws.recv(), WAIT_SECS))


async def receive_until(ws: ClientConnection, kind: type[T]) -> T:
    """The next message of type ``kind``, skipping others (bounded by WAIT_SECS)."""
    async with asyncio.timeout(WAIT_SECS):
        while True:
            msg = await receive(ws)
            if isinstance(msg, kind):
                return msg


async def register(runner: RunnerHarness, ws: ClientConnection, system: str) -> p.Registered:
    await ws.send(p.encode(register_message(system)))
    msg = await receive(ws)
    assert isinstance(msg, p.Registered), msg
    return msg
