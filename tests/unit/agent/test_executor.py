"""The executor without Nix: a whole step with a fake store and a mock runner."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from bigtent.agent.executor import Executor
from bigtent.agent.stepstore import CacheSettings
from bigtent.config import AgentSection
from bigtent.nix.base32 import format_hash
from bigtent.nix.nar import dump_path
from bigtent.nix.store import NixStore, RealiseResult, RealiseStatus
from bigtent.protocol import (
    Assign,
    LeaseId,
    Log,
    Outcome,
    StepId,
)

WAIT = 5.0
OUT = f"/nix/store/{'b' * 32}-hello"
DEV = f"/nix/store/{'c' * 32}-hello-dev"


# ---- a whole step with a fake store and a mock runner ------------------------------------
class FakeStore(NixStore):
    """Stands in for Nix: realise prints a log and reports ``status``; paths live under root."""

    def __init__(self, root: Path, status: RealiseStatus, lines: Sequence[str]) -> None:
        super().__init__(store=f"local?root={root}")
        self.status = status
        self.lines = lines

    async def realise(self, paths: Sequence[str], **kwargs: Any) -> RealiseResult:
        on_line = kwargs["on_line"]
        for line in self.lines:
            res = on_line(line)
            if res is not None:
                await res
        code = {RealiseStatus.SUCCESS: 0, RealiseStatus.BUILD_FAILURE: 100}.get(self.status, 1)
        return RealiseResult(self.status, code, error="" if code == 0 else "error: it failed")


class FakeExecutor(Executor):
    def __init__(self, store: FakeStore, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.store = store

    def nix_store(self, cache: CacheSettings, slot: int = 0) -> NixStore:
        return self.store


def make_outputs(root: Path) -> None:
    out = root / OUT.lstrip("/")
    (out / "bin").mkdir(parents=True)
    (out / "bin" / "hello").write_bytes(b"#!/bin/sh\necho hi\n")
    (out / "bin" / "hello").chmod(0o755)
    (out / "big").write_bytes(bytes(range(256)) * 8192)  # 2 MiB: the threaded, streamed path
    dev = root / DEV.lstrip("/")
    dev.parent.mkdir(parents=True, exist_ok=True)
    dev.write_text("headers")


def nar_hash(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    for chunk in dump_path(path):
        h.update(chunk)
        size += len(chunk)
    return format_hash("sha256", h.digest()), size


ASSIGN = Assign(
    step_id=StepId(5),
    lease_id=LeaseId("lease-5"),
    drv_path=f"/nix/store/{'a' * 32}-hello.drv",
    outputs={"out": OUT, "dev": DEV},
    upload_urls={
        "out": "/api/v1/agent/upload/lease-5/out",
        "dev": "/api/v1/agent/upload/lease-5/dev",
    },
    timeout_secs=60,
    max_silent_secs=60,
    max_log_bytes=1 << 20,
)
CACHE = CacheSettings("http://r/cache", "r-1:KEY")
QUICK_RETRY = CacheSettings("http://r/cache", "r-1:KEY", lease_secs=2.0)
"""Upload retries bounded to 4 s (with ``fast_retries``: delays of 10 ms up to 80 ms)."""


async def run_step(
    tmp_path: Path,
    handler: Any,
    status: RealiseStatus = RealiseStatus.SUCCESS,
    lines: Sequence[str] = ("copying path", "building '/nix/store/x.drv'...", "hello"),
    cache: CacheSettings = CACHE,
    abort: asyncio.Event | None = None,
    token: Any = "tok",
) -> tuple[Any, list[Log]]:
    root = tmp_path / "root"
    make_outputs(root)
    section = AgentSection(runner_url="http://runner:1", work_dir=tmp_path, executor="realise")
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        ex = FakeExecutor(FakeStore(root, status, lines), section, http=http, token=token)
        logs: list[Log] = []

        async def send_log(message: Log) -> bool:
            logs.append(message)
            return True

        result = await ex.run(ASSIGN, cache, send_log=send_log, abort=abort or asyncio.Event())
    return result, logs


@pytest.mark.parametrize(
    ("status", "outcome", "exit_code"),
    [
        (RealiseStatus.BUILD_FAILURE, Outcome.BUILD_FAILURE, 100),
        (RealiseStatus.OTHER_FAILURE, Outcome.PREPARE_FAILURE, 1),
    ],
)
async def test_failed_realise_uploads_nothing(
    tmp_path: Path, status: RealiseStatus, outcome: Outcome, exit_code: int
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError("nothing may be uploaded")

    result, logs = await run_step(tmp_path, handler, status, lines=["oops"])
    assert (result.outcome, result.exit_code, result.error) == (
        outcome,
        exit_code,
        "error: it failed",
    )
    assert result.outputs == []
    assert [b.lines for b in logs] == [["oops"]]


async def test_missing_nix_is_a_prepare_failure(tmp_path: Path) -> None:
    section = AgentSection(runner_url="http://runner:1", work_dir=tmp_path, executor="realise")

    def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError("nothing may be uploaded")

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        ex = Executor(section, http=http, token=None, nix_bin_dir=str(tmp_path / "no-nix"))

        async def send_log(message: Log) -> bool:
            return True

        result = await ex.run(ASSIGN, CACHE, send_log=send_log, abort=asyncio.Event())
    assert result.outcome is Outcome.PREPARE_FAILURE
    assert "not found" in result.error
