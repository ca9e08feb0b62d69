"""The executor against real Nix: a chroot store substitutes the .drv from a signed HTTP binary
cache, builds it in the sandbox, and uploads the output NAR to a fake upload endpoint."""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx
import pytest

from bigtent.agent.executor import Executor
from bigtent.agent.stepstore import CacheSettings
from bigtent.config import AgentSection
from bigtent.nix.base32 import format_hash
from bigtent.protocol import (
    NAR_HASH_HEADER,
    NAR_SIZE_HEADER,
    Assign,
    LeaseId,
    Log,
    Outcome,
    Result,
    StepId,
)
from tests.conftest import HOST_TOOLS

pytestmark = [
    pytest.mark.nix,
    pytest.mark.skipif(shutil.which("nix-store") is None, reason="needs Nix"),
]

SANDBOX_PATHS = HOST_TOOLS
NIX = ["--extra-experimental-features", "nix-command"]


ExecutorKind = Literal["serve", "realise"]


@dataclass
class Upload:
    path: str
    headers: dict[str, str]
    body_hash: str
    body_size: int


@dataclass
class FakeRunnerHttp:
    """Serves ``cache_dir`` under /cache/ and takes NAR uploads under /upload/<name>."""

    cache_dir: Path
    uploads: list[Upload] = field(default_factory=list)
    refuse_with: int | None = None
    url: str = ""

    def handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        runner = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args: object, **kwargs: object) -> None:
                super().__init__(*args, directory=str(runner.cache_dir), **kwargs)  # type: ignore[arg-type]

            def translate_path(self, path: str) -> str:
                return super().translate_path(path.removeprefix("/cache"))

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_PUT(self) -> None:
                size = int(self.headers["Content-Length"])
                h = hashlib.sha256()
                remaining = size
                while remaining:
                    chunk = self.rfile.read(min(remaining, 65536))
                    if not chunk:
                        break
                    h.update(chunk)
                    remaining -= len(chunk)
                got = format_hash("sha256", h.digest())
                runner.uploads.append(
                    Upload(self.path, dict(self.headers.items()), got, size - remaining)
                )
                body: dict[str, object]
                if runner.refuse_with is not None:
                    status, body = runner.refuse_with, {"error": "upload refused by test"}
                elif got != self.headers[NAR_HASH_HEADER]:
                    status, body = 400, {"error": f"NAR hash mismatch: got {got}"}
                else:
                    status, body = 200, {"path": self.path, "nar_hash": got, "references": []}
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler


@pytest.fixture
def fake_runner(tmp_path: Path) -> Iterator[FakeRunnerHttp]:
    runner = FakeRunnerHttp(cache_dir=tmp_path / "cache")
    runner.cache_dir.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), runner.handler())
    runner.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield runner
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@dataclass
class Nix:
    """Runs Nix for the test's own client store and binary cache."""

    tmp: Path
    env: dict[str, str]

    @property
    def client_store(self) -> str:
        return f"local?root={self.tmp / 'client'}"

    def run(self, *argv: str) -> str:
        proc = subprocess.run(argv, capture_output=True, text=True, env=self.env, timeout=120)
        assert proc.returncode == 0, f"{argv} failed: {proc.stderr}"
        return proc.stdout.strip()

    def instantiate(self, name: str, script: str) -> tuple[str, str]:
        expr = (
            f'derivation {{ name = "{name}"; system = builtins.currentSystem; '
            f'builder = "/bin/sh"; PATH = "/usr/bin:/bin"; args = ["-c" {json.dumps(script)}]; }}'
        )
        drv = self.run(
            "nix-instantiate", "--store", self.client_store, "--option", "substituters", "",
            "--expr", expr,
        )  # fmt: skip
        out = self.run("nix-store", "--store", self.client_store, "-q", "--outputs", drv)
        return drv, out

    def publish(self, drv: str, cache_dir: Path, secret_key: Path) -> None:
        """``nix copy --derivation``: the .drv itself (not its outputs) into a signed cache."""
        self.run(
            "nix", *NIX, "copy", "--derivation", "--option", "substituters", "",
            "--from", self.client_store,
            "--to", f"file://{cache_dir}?secret-key={secret_key}&compression=none", drv,
        )  # fmt: skip


@pytest.fixture(params=["serve", "realise"])
def executor_kind(request: pytest.FixtureRequest) -> ExecutorKind:
    """Every test runs with both executors (agent config ``executor``)."""
    kind: ExecutorKind = request.param
    return kind


@pytest.fixture
def nix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Nix:
    xdg = tmp_path / "xdg-test"
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "XDG_CACHE_HOME": str(xdg)}
    return Nix(tmp_path, env)


@pytest.fixture
def cache_key(tmp_path: Path, nix: Nix) -> tuple[Path, str]:
    secret, public = tmp_path / "cache.sk", tmp_path / "cache.pk"
    nix.run("nix-store", "--generate-binary-cache-key", "test-cache-1", str(secret), str(public))
    return secret, public.read_text().strip()


def assign_for(drv: str, out: str, step: int = 1) -> Assign:
    return Assign(
        step_id=StepId(step),
        lease_id=LeaseId(f"lease-{step}"),
        drv_path=drv,
        outputs={"out": out},
        upload_urls={"out": f"/upload/{step}/out"},
        timeout_secs=60,
        max_silent_secs=60,
        max_log_bytes=1 << 20,
    )


async def execute(
    tmp_path: Path,
    runner: FakeRunnerHttp,
    public_key: str,
    assign: Assign,
    abort_on: str | None = None,
    *,
    kind: ExecutorKind,
) -> tuple[Result, list[Log], Path]:
    agent_root = tmp_path / "agent-store"
    section = AgentSection(
        runner_url=runner.url,
        store=f"local?root={agent_root}",
        work_dir=tmp_path / "agent-work",
        sandbox_paths=SANDBOX_PATHS,
        executor=kind,
    )
    cache = CacheSettings(runner.url + "/cache", public_key)
    logs: list[Log] = []
    abort = asyncio.Event()

    async def send_log(message: Log) -> bool:
        logs.append(message)
        if abort_on is not None and abort_on in message.lines:
            abort.set()
        return True

    async with httpx.AsyncClient(timeout=30) as http:
        executor = Executor(section, http=http, token="agent-token")
        try:
            result = await asyncio.wait_for(
                executor.run(assign, cache, send_log=send_log, abort=abort), 120
            )
        finally:
            await executor.aclose()
    return result, logs, agent_root


async def test_builds_substituted_drv_and_uploads_output(
    tmp_path: Path,
    nix: Nix,
    fake_runner: FakeRunnerHttp,
    cache_key: tuple[Path, str],
    executor_kind: ExecutorKind,
) -> None:
    drv, out = nix.instantiate("bt-agent-ok", "echo building-now; echo more; echo hello > $out")
    nix.publish(drv, fake_runner.cache_dir, cache_key[0])

    result, logs, agent_root = await execute(
        tmp_path, fake_runner, cache_key[1], assign_for(drv, out), kind=executor_kind
    )

    assert result.outcome is Outcome.SUCCESS, result.error
    lines = [line for batch in logs for line in batch.lines]
    assert "building-now" in lines
    assert len(logs) < len(lines), "log lines must be batched"
    # Real Nix judges the hash and size of the NAR we computed in Python.
    agent_store = f"local?root={agent_root}"
    expected_hash = nix.run("nix-store", "--store", agent_store, "-q", "--hash", out)
    expected_size = int(nix.run("nix-store", "--store", agent_store, "-q", "--size", out))
    [output] = result.outputs
    assert (output.name, output.path) == ("out", out)
    assert (output.nar_hash, output.nar_size) == (expected_hash, expected_size)
    [upload] = fake_runner.uploads
    assert upload.path == "/upload/1/out"
    assert upload.headers["Authorization"] == "Bearer agent-token"
    assert upload.headers[NAR_HASH_HEADER] == upload.body_hash == expected_hash
    assert int(upload.headers[NAR_SIZE_HEADER]) == upload.body_size == expected_size
    assert result.timings.build_secs > 0
    if executor_kind == "realise":
        # The binary-cache lookup cache is the agent's own (serve: test_serve_executor_nix).
        assert (tmp_path / "agent-work" / "xdg-cache").is_dir()


async def test_failing_builder_is_a_build_failure_with_its_log(
    tmp_path: Path,
    nix: Nix,
    fake_runner: FakeRunnerHttp,
    cache_key: tuple[Path, str],
    executor_kind: ExecutorKind,
) -> None:
    drv, out = nix.instantiate("bt-agent-fail", "echo about-to-fail; exit 3")
    nix.publish(drv, fake_runner.cache_dir, cache_key[0])

    result, logs, _ = await execute(
        tmp_path, fake_runner, cache_key[1], assign_for(drv, out), kind=executor_kind
    )

    assert result.outcome is Outcome.BUILD_FAILURE
    assert result.exit_code == 100
    assert "exit code 3" in result.error
    assert "about-to-fail" in [line for batch in logs for line in batch.lines]
    assert result.outputs == []
    assert fake_runner.uploads == []


async def test_drv_missing_from_the_cache_is_a_prepare_failure(
    tmp_path: Path,
    nix: Nix,
    fake_runner: FakeRunnerHttp,
    cache_key: tuple[Path, str],
    executor_kind: ExecutorKind,
) -> None:
    drv, out = nix.instantiate("bt-agent-unpublished", "echo hi > $out")
    (fake_runner.cache_dir / "nix-cache-info").write_text("StoreDir: /nix/store\n")

    result, _, _ = await execute(
        tmp_path, fake_runner, cache_key[1], assign_for(drv, out), kind=executor_kind
    )

    assert result.outcome is Outcome.PREPARE_FAILURE
    assert result.exit_code == 1
    assert result.error


async def test_refused_upload_is_an_upload_failure(
    tmp_path: Path,
    nix: Nix,
    fake_runner: FakeRunnerHttp,
    cache_key: tuple[Path, str],
    executor_kind: ExecutorKind,
) -> None:
    drv, out = nix.instantiate("bt-agent-refused", "echo hi > $out")
    nix.publish(drv, fake_runner.cache_dir, cache_key[0])
    fake_runner.refuse_with = 409

    result, _, _ = await execute(
        tmp_path, fake_runner, cache_key[1], assign_for(drv, out), kind=executor_kind
    )

    assert result.outcome is Outcome.UPLOAD_FAILURE
    assert "HTTP 409" in result.error and "upload refused by test" in result.error


async def test_abort_kills_the_build(
    tmp_path: Path,
    nix: Nix,
    fake_runner: FakeRunnerHttp,
    cache_key: tuple[Path, str],
    executor_kind: ExecutorKind,
) -> None:
    drv, out = nix.instantiate("bt-agent-slow", "echo started; sleep 60; echo hi > $out")
    nix.publish(drv, fake_runner.cache_dir, cache_key[0])

    result, _, agent_root = await execute(
        tmp_path,
        fake_runner,
        cache_key[1],
        assign_for(drv, out),
        abort_on="started",
        kind=executor_kind,
    )

    assert result.outcome is Outcome.ABORTED
    assert result.timings.build_secs < 30
    assert not (agent_root / out.lstrip("/")).exists()
    assert fake_runner.uploads == []


async def test_timeout_is_timed_out(
    tmp_path: Path,
    nix: Nix,
    fake_runner: FakeRunnerHttp,
    cache_key: tuple[Path, str],
    executor_kind: ExecutorKind,
) -> None:
    drv, out = nix.instantiate("bt-agent-hang", "echo started; sleep 60; echo hi > $out")
    nix.publish(drv, fake_runner.cache_dir, cache_key[0])
    assign = assign_for(drv, out).model_copy(update={"timeout_secs": 1.0})

    result, _, _ = await execute(tmp_path, fake_runner, cache_key[1], assign, kind=executor_kind)

    assert result.outcome is Outcome.TIMED_OUT
    assert result.timings.build_secs < 30
