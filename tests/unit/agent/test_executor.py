"""The executor without Nix: log batching, classification, options, and the NAR upload."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from bigtent.agent import executor as executor_mod
from bigtent.agent.executor import (
    LOG_BATCH_CHARS,
    CacheSettings,
    Executor,
    LogBatcher,
    join_runner_url,
    nix_ca_bundle,
    nix_env,
    nix_options,
    system_ca_file,
    upload_error_is_retried,
    upload_retry_secs,
    upload_status_is_retried,
    write_nix_ca_bundle,
)
from bigtent.backoff import Backoff
from bigtent.config import AgentSection
from bigtent.errors import ConfigError, CredentialUnavailable
from bigtent.nix.base32 import format_hash
from bigtent.nix.nar import dump_path
from bigtent.nix.store import NixStore, RealiseResult, RealiseStatus
from bigtent.protocol import (
    MAX_LOG_LINE_CHARS,
    MAX_LOG_LINES_PER_BATCH,
    MAX_MESSAGE_BYTES,
    Assign,
    LeaseId,
    Log,
    Outcome,
    StepId,
    encode,
)

WAIT = 5.0
OUT = f"/nix/store/{'b' * 32}-hello"
DEV = f"/nix/store/{'c' * 32}-hello-dev"


# ---- log batching -----------------------------------------------------------------------
class Collector:
    def __init__(self) -> None:
        self.batches: list[Log] = []
        self.arrived = asyncio.Event()

    async def send(self, message: Log) -> bool:
        self.batches.append(message)
        self.arrived.set()
        return True


async def test_log_lines_are_batched_not_sent_one_by_one() -> None:
    sink = Collector()
    batcher = LogBatcher(StepId(1), LeaseId("l"), sink.send)
    sender = asyncio.create_task(batcher.run())
    for i in range(1200):
        assert batcher.add(f"line {i}") is None
    batcher.close()
    await asyncio.wait_for(sender, WAIT)
    assert [len(b.lines) for b in sink.batches] == [500, 500, 200]
    assert [line for b in sink.batches for line in b.lines] == [f"line {i}" for i in range(1200)]
    assert all((b.step_id, b.lease_id) == (1, "l") for b in sink.batches)


async def test_log_batch_is_flushed_after_the_interval() -> None:
    sink = Collector()
    batcher = LogBatcher(StepId(1), LeaseId("l"), sink.send, flush_secs=0.01)
    sender = asyncio.create_task(batcher.run())
    try:
        batcher.add("a")
        batcher.add("b")
        await asyncio.wait_for(sink.arrived.wait(), WAIT)
        assert [b.lines for b in sink.batches] == [["a", "b"]]
    finally:
        batcher.close()
        await asyncio.wait_for(sender, WAIT)
    assert len(sink.batches) == 1


async def test_log_batches_respect_protocol_limits() -> None:
    sink = Collector()
    batcher = LogBatcher(StepId(1), LeaseId("l"), sink.send, batch_lines=10_000)
    sender = asyncio.create_task(batcher.run())
    long = "\x01" * (MAX_LOG_LINE_CHARS * 2)  # JSON-escaped 6x
    for _ in range(40):
        batcher.add(long)
    batcher.close()
    await asyncio.wait_for(sender, WAIT)
    assert sum(len(b.lines) for b in sink.batches) == 40
    for batch in sink.batches:
        assert len(batch.lines) <= MAX_LOG_LINES_PER_BATCH
        assert all(len(line) <= MAX_LOG_LINE_CHARS for line in batch.lines)
        assert sum(map(len, batch.lines)) <= LOG_BATCH_CHARS + MAX_LOG_LINE_CHARS
        assert len(encode(batch).encode()) <= MAX_MESSAGE_BYTES


async def test_log_backlog_applies_backpressure() -> None:
    release = asyncio.Event()

    async def slow_send(message: Log) -> bool:
        await release.wait()
        return True

    batcher = LogBatcher(StepId(1), LeaseId("l"), slow_send)
    sender = asyncio.create_task(batcher.run())
    waits = [batcher.add(str(i)) for i in range(executor_mod.LOG_BACKLOG_LINES + 1)]
    pending = [w for w in waits if w is not None]
    assert pending, "a long backlog must make the log reader wait"
    release.set()
    await asyncio.wait_for(asyncio.gather(*pending), WAIT)
    batcher.close()
    await asyncio.wait_for(sender, WAIT)


# ---- classification and options ---------------------------------------------------------
def test_nix_options_order_and_overrides(tmp_path: Path) -> None:
    section = AgentSection(
        work_dir=tmp_path,
        sandbox_paths=["/bin=/usr/bin", "/usr"],
        extra_nix_options={"cores": "2", "narinfo-cache-negative-ttl": "60"},
    )
    cache = CacheSettings(
        "http://r:1/cache", "r-1:KEY", (("https://up1", "up1:K1"), ("https://up2", "up2:K2"))
    )
    assert nix_options(section, cache) == {
        "substituters": "http://r:1/cache https://up1 https://up2",
        "trusted-public-keys": "r-1:KEY up1:K1 up2:K2",
        "narinfo-cache-negative-ttl": "60",
        "builders": "",
        "extra-sandbox-paths": "/bin=/usr/bin /usr",
        "cores": "2",
    }
    store = Executor(section, http=httpx.AsyncClient(), token=None).nix_store(cache)
    assert store.env == {"XDG_CACHE_HOME": str(tmp_path / "xdg-cache" / "slot-0")}


PEM_A = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
PEM_B = "-----BEGIN CERTIFICATE-----\nBBBB\n-----END CERTIFICATE-----"


def test_nix_env_names_the_ca_bundle_only_with_a_ca_file(tmp_path: Path) -> None:
    plain = AgentSection(work_dir=tmp_path)
    assert nix_env(plain, "slot-1") == {"XDG_CACHE_HOME": str(tmp_path / "xdg-cache" / "slot-1")}
    with_ca = AgentSection(work_dir=tmp_path, ca_file=tmp_path / "ca.pem")
    assert nix_env(with_ca, "slot-0") == {
        "XDG_CACHE_HOME": str(tmp_path / "xdg-cache" / "slot-0"),
        "NIX_SSL_CERT_FILE": str(tmp_path / "nix-ca-bundle.pem"),
    }
    # Nix ignores --option ssl-cert-file (2.8): the CA goes only through the environment.
    cache = CacheSettings("https://r/cache", "r-1:KEY", ())
    assert not any("ssl" in k for k in nix_options(with_ca, cache))


def test_nix_ca_bundle_puts_the_runner_ca_first_then_the_system_roots() -> None:
    assert nix_ca_bundle(PEM_A, PEM_B) == PEM_A + "\n" + PEM_B + "\n"
    assert nix_ca_bundle(PEM_A, None) == PEM_A
    assert nix_ca_bundle(PEM_A, "  \n") == PEM_A


def test_system_ca_file_is_what_nix_would_use() -> None:
    assert system_ca_file({"NIX_SSL_CERT_FILE": "/x.pem"}, lambda f: True) == "/x.pem"
    assert system_ca_file({"SSL_CERT_FILE": "/y.pem"}, lambda f: True) == (
        "/etc/ssl/certs/ca-certificates.crt"
    )
    nix_profile = "/nix/var/nix/profiles/default/etc/ssl/certs/ca-bundle.crt"
    assert system_ca_file({}, lambda f: f == nix_profile) == nix_profile
    assert system_ca_file({}, lambda f: False) is None


def test_write_nix_ca_bundle(tmp_path: Path) -> None:
    assert write_nix_ca_bundle(AgentSection(work_dir=tmp_path), {}) is None
    (tmp_path / "ca.pem").write_text(PEM_A)
    (tmp_path / "system.pem").write_text(PEM_B)
    work = tmp_path / "work"
    section = AgentSection(work_dir=work, ca_file=tmp_path / "ca.pem")
    path = write_nix_ca_bundle(section, {"NIX_SSL_CERT_FILE": str(tmp_path / "system.pem")})
    assert path == work / "nix-ca-bundle.pem"
    assert path.read_text() == nix_ca_bundle(PEM_A, PEM_B)
    assert [p.name for p in work.iterdir()] == ["nix-ca-bundle.pem"]
    # The executor writes it when it starts.
    path.unlink()
    Executor(section, http=httpx.AsyncClient(), token=None)
    assert path.exists()


@pytest.mark.parametrize(
    ("content", "why"), [(None, "cannot read"), ("not a certificate", "no PEM certificate")]
)
def test_write_nix_ca_bundle_refuses_a_bad_ca_file(
    tmp_path: Path, content: str | None, why: str
) -> None:
    if content is not None:
        (tmp_path / "ca.pem").write_text(content)
    section = AgentSection(work_dir=tmp_path, ca_file=tmp_path / "ca.pem")
    with pytest.raises(ConfigError, match=f"agent.ca_file: .*{why}"):
        write_nix_ca_bundle(section, {})


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("/api/v1/agent/upload/l/out", "http://r:1/api/v1/agent/upload/l/out"),
        ("api/v1/x", "http://r:1/api/v1/x"),
        ("https://other/x", "https://other/x"),
    ],
)
def test_join_runner_url(url: str, expected: str) -> None:
    assert join_runner_url("http://r:1/", url) == expected


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


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(executor_mod, "UPLOAD_BACKOFF", Backoff(0.01, 0.08, jitter_low=0.5))


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


def test_error_text_of_non_json_body() -> None:
    response = httpx.Response(502, text="bad gateway")
    assert executor_mod._error_text(response) == "bad gateway"


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
