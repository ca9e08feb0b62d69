"""Uploading a step's outputs by PUT (``agent/upload.py``), driven through the executor with a
fake store and a mock runner."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bigtent.agent import upload
from bigtent.agent.stepstore import CacheSettings
from bigtent.agent.upload import (
    upload_error_is_retried,
    upload_retry_secs,
    upload_status_is_retried,
)
from bigtent.config import AgentSection
from bigtent.errors import CredentialUnavailable
from bigtent.nix.base32 import format_hash
from bigtent.nix.nar import dump_path
from bigtent.nix.store import RealiseStatus
from bigtent.protocol import Log, Outcome
from tests.unit.agent.test_executor import (
    ASSIGN,
    CACHE,
    DEV,
    OUT,
    QUICK_RETRY,
    FakeExecutor,
    FakeStore,
    make_outputs,
    nar_hash,
    run_step,
)


class RotatingSource:
    """Hands out ``up-1``, ``up-2``, ... to uploads; its first answer may be a failure."""

    refusal_hint = "check the test source"

    def __init__(self, fail_first: bool = False) -> None:
        self.calls: list[bool] = []
        self.fail_first = fail_first

    async def credential(self, *, fresh: bool) -> str | None:
        self.calls.append(fresh)
        if self.fail_first and len(self.calls) == 1:
            raise CredentialUnavailable("ID token request failed: HTTP 502")
        return f"up-{len(self.calls)}"


async def test_each_upload_asks_the_source_for_a_usable_credential(tmp_path: Path) -> None:
    auth: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        auth.append(request.headers["authorization"])
        return httpx.Response(200, json={"path": "p", "references": []})

    source = RotatingSource()
    result, _ = await run_step(tmp_path, handler, token=source)
    assert result.outcome is Outcome.SUCCESS, result.error
    assert auth == ["Bearer up-1", "Bearer up-2"]  # dev, then out
    assert source.calls == [False, False]  # never forces a new one: it may still be good


@pytest.mark.usefixtures("fast_retries")
async def test_an_unavailable_credential_is_retried_like_a_network_error(tmp_path: Path) -> None:
    auth: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        auth.append(request.headers["authorization"])
        return httpx.Response(200, json={"path": "p", "references": []})

    result, _ = await run_step(
        tmp_path, handler, token=RotatingSource(fail_first=True), cache=QUICK_RETRY
    )
    assert result.outcome is Outcome.SUCCESS, result.error
    assert auth == ["Bearer up-2", "Bearer up-3"]


async def test_success_uploads_every_output_with_its_nar_hash(tmp_path: Path) -> None:
    seen: dict[str, dict[str, Any]] = {}

    async def handler(request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        name = request.url.path.rsplit("/", 1)[1]
        seen[name] = {
            "method": request.method,
            "host": request.url.host,
            "auth": request.headers["authorization"],
            "hash": request.headers["x-nar-hash"],
            "size": request.headers["x-nar-size"],
            "length": request.headers["content-length"],
            "body_hash": format_hash("sha256", hashlib.sha256(body).digest()),
            "body_size": len(body),
        }
        return httpx.Response(200, json={"path": "p", "references": [DEV.rsplit("/", 1)[1]]})

    result, logs = await run_step(tmp_path, handler)
    assert result.outcome is Outcome.SUCCESS, result.error
    assert [line for b in logs for line in b.lines][-1] == "hello"
    root = tmp_path / "root"
    by_name = {o.name: o for o in result.outputs}
    for name, path in (("out", OUT), ("dev", DEV)):
        expected_hash, expected_size = nar_hash(root / path.lstrip("/"))
        got = seen[name]
        assert got["method"] == "PUT" and got["host"] == "runner"
        assert got["auth"] == "Bearer tok"
        assert got["hash"] == got["body_hash"] == expected_hash
        assert int(got["size"]) == int(got["length"]) == got["body_size"] == expected_size
        assert (by_name[name].path, by_name[name].nar_hash) == (path, expected_hash)
        assert by_name[name].nar_size == expected_size
        assert by_name[name].references == [DEV]
    assert result.timings.build_secs >= 0 and result.timings.upload_secs >= 0


@pytest.mark.parametrize("status", [400, 409, 413])
async def test_upload_refusal_is_a_final_upload_failure(
    tmp_path: Path, status: int, fast_retries: None
) -> None:
    tries = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal tries
        tries += 1
        await request.aread()
        return httpx.Response(status, json={"error": "lease lease-5 is not current"})

    result, _ = await run_step(tmp_path, handler, cache=QUICK_RETRY)
    assert result.outcome is Outcome.UPLOAD_FAILURE
    assert f"HTTP {status}" in result.error and "lease lease-5 is not current" in result.error
    assert "gave up" not in result.error
    assert tries == 1  # not retried, and the other output is not tried either


async def test_upload_is_retried_until_it_succeeds(tmp_path: Path, fast_retries: None) -> None:
    """A connection error, then a proxy's 502, then success: each try streams the whole NAR."""
    tries: dict[str, int] = {}
    bodies: dict[str, list[bytes]] = {}

    async def handler(request: httpx.Request) -> httpx.Response:
        name = request.url.path.rsplit("/", 1)[1]
        tries[name] = tries.get(name, 0) + 1
        if tries[name] == 1:
            raise httpx.ConnectError("connection refused", request=request)
        bodies.setdefault(name, []).append(await request.aread())
        if tries[name] == 2:
            return httpx.Response(502, text="bad gateway")
        return httpx.Response(200, json={"references": []})

    result, _ = await run_step(tmp_path, handler, cache=QUICK_RETRY)
    assert result.outcome is Outcome.SUCCESS, result.error
    assert tries == {"out": 3, "dev": 3}
    root = tmp_path / "root"
    for output in result.outputs:
        whole = b"".join(dump_path(root / output.path.lstrip("/")))
        assert bodies[output.name] == [whole, whole]  # re-streamed from the start
        assert output.nar_hash == nar_hash(root / output.path.lstrip("/"))[0]


@pytest.mark.parametrize(
    "failure",
    [
        httpx.ConnectError("connection refused"),
        httpx.ReadTimeout("timed out"),
        httpx.Response(503, json={"error": "database is busy"}),
    ],
)
async def test_upload_retries_are_bounded(
    tmp_path: Path, fast_retries: None, failure: Exception | httpx.Response
) -> None:
    tries = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal tries
        tries += 1
        await request.aread()
        if isinstance(failure, Exception):
            raise failure
        return failure

    cache = CacheSettings("http://r/cache", "r-1:KEY", lease_secs=0.1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    result, _ = await run_step(tmp_path, handler, cache=cache)
    assert loop.time() - started < 2.0
    assert result.outcome is Outcome.UPLOAD_FAILURE
    assert "gave up after" in result.error and "in 0.2 s" in result.error
    assert tries >= 3


async def test_abort_ends_upload_retries(tmp_path: Path, fast_retries: None) -> None:
    abort = asyncio.Event()
    tries = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal tries
        tries += 1
        if tries == 3:
            abort.set()
        raise httpx.ConnectError("connection refused", request=request)

    result, _ = await run_step(tmp_path, handler, cache=CACHE, abort=abort)
    assert result.outcome is Outcome.ABORTED
    assert result.error == "aborted during upload"


@pytest.mark.parametrize(
    ("status", "retried"),
    [
        (500, True),
        (502, True),
        (503, True),
        (504, True),
        (507, True),
        (408, True),
        (429, True),
        (400, False),
        (401, False),
        (403, False),
        (404, False),
        (409, False),
        (413, False),
    ],
)
def test_upload_status_is_retried(status: int, retried: bool) -> None:
    assert upload_status_is_retried(status) is retried


@pytest.mark.parametrize(
    ("exc", "retried"),
    [
        (httpx.ConnectError("refused"), True),
        (httpx.ReadError("reset"), True),
        (httpx.WriteError("broken pipe"), True),
        (httpx.ConnectTimeout("slow"), True),
        (httpx.WriteTimeout("slow"), True),
        (httpx.PoolTimeout("busy"), True),
        (httpx.RemoteProtocolError("peer closed"), True),
        (httpx.UnsupportedProtocol("ftp"), False),
        (httpx.LocalProtocolError("bad header"), False),
        (httpx.InvalidURL("bad"), False),
        (ValueError("x"), False),
    ],
)
def test_upload_error_is_retried(exc: Exception, retried: bool) -> None:
    assert upload_error_is_retried(exc) is retried


def test_upload_retry_secs_follows_the_lease() -> None:
    assert upload_retry_secs(60.0) == 120.0
    assert upload_retry_secs(6.0) == 12.0


def test_error_text_of_non_json_body() -> None:
    response = httpx.Response(502, text="bad gateway")
    assert upload._error_text(response) == "bad gateway"


class UnreadableStore(FakeStore):
    """A store whose paths this filesystem cannot read: NARs come from ``dump``."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.dumped: list[str] = []

    def real_path(self, store_path: str) -> Path:
        return Path("/nonexistent") / store_path.lstrip("/")

    async def dump(self, path: str, chunk_size: int = 256 * 1024) -> AsyncIterator[bytes]:
        self.dumped.append(path)
        for chunk in dump_path(super().real_path(path)):
            yield chunk


async def test_unreadable_store_falls_back_to_nix_store_dump(tmp_path: Path) -> None:
    root = tmp_path / "root"
    make_outputs(root)
    store = UnreadableStore(root, RealiseStatus.SUCCESS, ["hi"])
    bodies: dict[str, bytes] = {}

    async def handler(request: httpx.Request) -> httpx.Response:
        bodies[request.url.path.rsplit("/", 1)[1]] = await request.aread()
        return httpx.Response(200, json={})

    section = AgentSection(runner_url="http://runner:1", work_dir=tmp_path, executor="realise")
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        ex = FakeExecutor(store, section, http=http, token=None)

        async def send_log(message: Log) -> bool:
            return True

        result = await ex.run(ASSIGN, CACHE, send_log=send_log, abort=asyncio.Event())
    assert result.outcome is Outcome.SUCCESS, result.error
    assert sorted(store.dumped) == sorted([OUT, OUT, DEV, DEV])  # hash pass, upload pass
    for output in result.outputs:
        assert output.nar_hash == nar_hash(root / output.path.lstrip("/"))[0]
        assert b"".join(dump_path(root / output.path.lstrip("/"))) == bodies[output.name]
