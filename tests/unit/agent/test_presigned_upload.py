"""The agent's presigned uploads without Nix or S3: a mock runner and a mock bucket.

Each output's NAR is compressed as the runner asked, declared (NAR and file hashes and sizes),
PUT to the presigned URL without the runner's credential, then completed; retries start over
with a fresh URL; a runner that answers "PUT" gets the NAR the old way."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import httpx
import pytest
import zstandard

from bigtent.agent import presigned
from bigtent.agent.stepstore import CacheSettings
from bigtent.nix.base32 import format_hash
from bigtent.nix.compression import Compression, decompress_all
from bigtent.nix.nar import dump_path
from bigtent.protocol import Outcome, Registered
from tests.unit.agent.test_executor import DEV, OUT, nar_hash, run_step

PRESIGNED = CacheSettings(
    "http://r/cache", "r-1:KEY", upload_compression=Compression.ZSTD, compression_level=3
)


def _sha(data: bytes) -> str:
    return format_hash("sha256", hashlib.sha256(data).digest())


async def test_outputs_go_to_the_bucket_compressed_and_declared(tmp_path: Path) -> None:
    bucket: dict[str, bytes] = {}
    calls: list[tuple[str, str, str | None]] = []
    declared: dict[str, dict[str, Any]] = {}

    async def handler(request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        calls.append((request.method, request.url.host, request.headers.get("authorization")))
        if request.url.host == "bucket":
            assert request.method == "PUT"
            assert int(request.headers["content-length"]) == len(body)
            bucket[request.url.path] = body
            return httpx.Response(200)
        name = request.url.path.split("/")[-2]
        if request.url.path.endswith("/presign"):
            declared[name] = json.loads(body)
            return httpx.Response(
                200,
                json={
                    "method": "presigned",
                    "url": f"http://bucket/incoming/{name}?X-Amz-Signature=s",
                    "headers": {"Content-Length": str(declared[name]["file_size"])},
                    "complete_url": f"/api/v1/agent/upload/lease-5/{name}/complete",
                },
            )
        assert request.url.path.endswith("/complete")
        assert json.loads(body) == declared[name]
        return httpx.Response(200, json={"path": "p", "references": [DEV]})

    result, _ = await run_step(tmp_path, handler, cache=PRESIGNED)
    assert result.outcome is Outcome.SUCCESS, result.error
    root = tmp_path / "root"
    for name, path in (("out", OUT), ("dev", DEV)):
        nar = b"".join(dump_path(root / path.lstrip("/")))
        file = bucket[f"/incoming/{name}"]
        expected_hash, expected_size = nar_hash(root / path.lstrip("/"))
        assert declared[name] == {
            "nar_hash": expected_hash,
            "nar_size": expected_size,
            "compression": "zstd",
            "file_hash": _sha(file),
            "file_size": len(file),
        }
        assert decompress_all(file, Compression.ZSTD, len(nar)) == nar
        assert file.startswith(b"\x28\xb5\x2f\xfd")  # a zstd frame
    # The runner's credential goes to the runner only, never to the bucket.
    assert all(auth == "Bearer tok" for method, host, auth in calls if host == "runner")
    assert all(auth is None for method, host, auth in calls if host == "bucket")
    assert {o.name: o.references for o in result.outputs} == {"out": [DEV], "dev": [DEV]}
    # Nothing is left of the files uploaded.
    uploads = tmp_path / "uploads"
    assert not uploads.exists() or list(uploads.iterdir()) == []


async def test_a_failed_bucket_put_starts_over_with_a_fresh_url(
    tmp_path: Path, fast_retries: None
) -> None:
    presigns = 0
    puts = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal presigns, puts
        await request.aread()
        if request.url.path.endswith("/presign"):
            presigns += 1
            return httpx.Response(
                200,
                json={
                    "method": "presigned",
                    "url": f"http://bucket/k{presigns}",
                    "complete_url": request.url.path.replace("/presign", "/complete"),
                },
            )
        if request.url.host == "bucket":
            puts += 1
            # The first URL has expired (403), the second meets a broken connection.
            if request.url.path == "/k1":
                return httpx.Response(403, text="<Error><Code>AccessDenied</Code></Error>")
            if request.url.path == "/k2":
                raise httpx.ConnectError("connection reset")
            return httpx.Response(200)
        return httpx.Response(200, json={"path": "p", "references": []})

    result, _ = await run_step(tmp_path, handler, cache=PRESIGNED)
    assert result.outcome is Outcome.SUCCESS, result.error
    assert presigns == 4  # three for the first output (two failed tries), one for the second
    assert puts == 4


@pytest.mark.parametrize("status", [400, 409, 413])
async def test_a_refused_completion_is_a_final_upload_failure(
    tmp_path: Path, status: int, fast_retries: None
) -> None:
    completes = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal completes
        await request.aread()
        if request.url.path.endswith("/presign"):
            return httpx.Response(
                200,
                json={
                    "method": "presigned",
                    "url": "http://bucket/k",
                    "complete_url": request.url.path.replace("/presign", "/complete"),
                },
            )
        if request.url.host == "bucket":
            return httpx.Response(200)
        completes += 1
        return httpx.Response(status, json={"error": "NAR hash mismatch"})

    result, _ = await run_step(tmp_path, handler, cache=PRESIGNED)
    assert result.outcome is Outcome.UPLOAD_FAILURE
    assert "NAR hash mismatch" in result.error and f"HTTP {status}" in result.error
    assert completes == 1


async def test_put_and_cached_answers(tmp_path: Path) -> None:
    """``put``: the NAR goes to the runner as before; ``cached``: nothing is uploaded."""
    direct: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        await request.aread()
        assert request.url.host == "runner"
        name = request.url.path.split("/")[6]
        if request.url.path.endswith("/presign"):
            if name == "out":
                return httpx.Response(200, json={"method": "put", "url": "x"})
            return httpx.Response(200, json={"method": "cached", "path": DEV, "references": [DEV]})
        assert request.method == "PUT"
        assert request.headers["x-nar-hash"].startswith("sha256:")
        direct.append(name)
        return httpx.Response(200, json={"path": OUT, "references": []})

    result, _ = await run_step(tmp_path, handler, cache=PRESIGNED)
    assert result.outcome is Outcome.SUCCESS, result.error
    assert direct == ["out"]
    assert {o.name: o.references for o in result.outputs} == {"out": [], "dev": [DEV]}


@pytest.mark.parametrize(
    ("presigned_uploads", "compression", "expected"),
    [
        (True, "zstd", Compression.ZSTD),
        (True, "xz", Compression.XZ),
        (True, "none", Compression.NONE),
        (True, "brotli", None),  # one this agent cannot write: PUT to the runner
        (False, "zstd", None),
    ],
)
def test_cache_settings_follow_registered(
    presigned_uploads: bool, compression: str, expected: Compression | None
) -> None:
    registered = Registered(
        session_id="s",
        heartbeat_secs=1,
        lease_secs=6,
        cache_url="/cache",
        cache_public_key="k",
        presigned_uploads=presigned_uploads,
        compression=compression,
        compression_level=7,
    )
    settings = CacheSettings.from_registered(registered, "http://r:1")
    assert settings.upload_compression is expected
    assert settings.compression_level == 7


def test_an_older_runner_gets_puts() -> None:
    """A ``registered`` without the new fields (an older runner) means PUT to the runner."""
    registered = Registered.model_validate(
        {
            "type": "registered",
            "session_id": "s",
            "heartbeat_secs": 1,
            "lease_secs": 6,
            "cache_url": "/cache",
            "cache_public_key": "k",
        }
    )
    assert CacheSettings.from_registered(registered, "http://r:1").upload_compression is None


@pytest.mark.parametrize("compression", list(Compression))
async def test_prepared_file_matches_its_declaration(
    tmp_path: Path, compression: Compression
) -> None:
    data = os.urandom(3 * 1024 * 1024)  # incompressible: the file spills to disk
    src = tmp_path / "f"
    src.write_bytes(data)
    nar = b"".join(dump_path(src))
    prepared = await presigned.prepare_from_iter(dump_path(src), compression, 3, tmp_path / "up")
    assert prepared.path is not None and prepared.data is None
    file = prepared.path.read_bytes()
    assert prepared.nar_hash == _sha(nar) and prepared.nar_size == len(nar)
    assert prepared.file_hash == _sha(file) and prepared.file_size == len(file)
    assert decompress_all(file, compression, len(nar)) == nar
    if compression is Compression.ZSTD:
        assert zstandard.ZstdDecompressor().decompressobj().decompress(file) == nar
    prepared.remove()
    assert list((tmp_path / "up").iterdir()) == []


def test_complete_timeout_grows_with_the_nar() -> None:
    assert presigned.complete_timeout_secs(0) == presigned.COMPLETE_BASE_SECS
    gib = 1024**3
    assert presigned.complete_timeout_secs(32 * gib) > 8000
