"""S3 storage against a real S3 HTTP API on loopback (moto's threaded server), with real
leases, real built outputs and the real Nix client judging the cache.

Presigned uploads: only the holder of a current lease gets a URL, only for the step's
outputs; what it uploads is read back, decompressed with a hard stop and verified as a PUT to
the runner is, and on any mismatch the object is deleted and nothing is published. NARs are
served by redirect to a presigned GET (or by proxy), and Nix substitutes them either way.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import zstandard
from websockets.asyncio.client import ClientConnection

from bigtent import protocol as p
from bigtent.agent.presigned import PreparedFile, prepare_from_iter
from bigtent.config import Role
from bigtent.nix import base32
from bigtent.nix.compression import Compression
from bigtent.nix.nar import dump_path
from tests.integration.runner.conftest import (
    Drvs,
    MakeRunner,
    Nix,
    RunnerHarness,
    Upload,
    agent_socket,
    nix_copy_from,
    receive_until,
    register,
    upload_closure,
    verify_signed,
)
from tests.s3 import Bucket

pytestmark = pytest.mark.nix


@dataclass
class S3Leased:
    """A served runner storing NARs in ``bucket``, ``drvs`` uploaded, a build of ``drvs.top``,
    and an agent holding the lease of the first runnable step (``drvs.dep``)."""

    runner: RunnerHarness
    bucket: Bucket
    ws: ClientConnection
    assign: p.Assign
    registered: p.Registered
    drvs: Drvs
    build_id: int
    agent: httpx.AsyncClient
    tmp: Path

    def url(self, suffix: str = "", assign: p.Assign | None = None) -> str:
        return (assign or self.assign).upload_urls["out"] + suffix

    async def prepare(self, path: str, compression: Compression | None = None) -> PreparedFile:
        comp = compression or Compression(self.registered.compression)
        return await prepare_from_iter(dump_path(path), comp, 3, self.tmp / "uploads")

    async def presign(self, declaration: dict[str, Any], url: str | None = None) -> httpx.Response:
        return await self.agent.post((url or self.url()) + p.PRESIGN_SUFFIX, json=declaration)

    async def complete(self, declaration: dict[str, Any], url: str | None = None) -> httpx.Response:
        return await self.agent.post((url or self.url()) + p.COMPLETE_SUFFIX, json=declaration)

    async def put_to_bucket(self, plan: p.UploadPlan, body: bytes) -> httpx.Response:
        # Whatever the signed length says: moto checks no signature, so what a real S3 would
        # refuse up front reaches the runner's verification here.
        headers = {**plan.headers, "Content-Length": str(len(body))}
        async with httpx.AsyncClient(timeout=30) as bucket_client:
            return await bucket_client.put(plan.url, content=body, headers=headers)

    async def upload(
        self,
        prepared: PreparedFile,
        body: bytes | None = None,
        assign: p.Assign | None = None,
        **declared: Any,
    ) -> httpx.Response:
        """Presign, PUT ``body`` (default: the prepared file) and complete, as an agent does."""
        declaration = {**prepared.declaration().model_dump(mode="json"), **declared}
        url = self.url(assign=assign)
        resp = await self.presign(declaration, url)
        assert resp.status_code == 200, resp.text
        plan = p.UploadPlan.model_validate_json(resp.content)
        assert plan.method is p.UploadMethod.PRESIGNED, plan
        put = await self.put_to_bucket(plan, _file_bytes(prepared) if body is None else body)
        assert put.status_code == 200, put.text
        return await self.complete(declaration, url)


def _nar_headers(up: Upload) -> dict[str, str]:
    return {"X-Nar-Hash": up.nar_hash, "X-Nar-Size": str(len(up.nar))}


def _file_bytes(prepared: PreparedFile) -> bytes:
    if prepared.data is not None:
        return prepared.data
    assert prepared.path is not None
    return prepared.path.read_bytes()


async def _s3_runner(
    make_runner: MakeRunner, bucket: Bucket, compression: str = "zstd", **s3: Any
) -> RunnerHarness:
    return await make_runner(
        serve=True,
        cache={"storage": "s3", "compression": compression, "s3": bucket.config(**s3)},
    )


MakeLeased = Callable[..., Awaitable[S3Leased]]


@pytest.fixture
async def make_leased(
    make_runner: MakeRunner,
    nix: Nix,
    drvs: Drvs,
    nix_system: str,
    s3_bucket: Bucket,
    tmp_path: Path,
) -> AsyncIterator[MakeLeased]:
    sockets: list[Any] = []

    async def make(compression: str = "zstd", **s3: Any) -> S3Leased:
        runner = await _s3_runner(make_runner, s3_bucket, compression, **s3)
        await upload_closure(runner, nix, drvs.closure)
        resp = await runner.client(Role.CLIENT).post("/api/v1/builds", json={"drvs": [drvs.top]})
        assert resp.status_code == 201, resp.text
        cm = agent_socket(runner)
        ws = await cm.__aenter__()
        sockets.append(cm)
        registered = await register(runner, ws, nix_system)
        assign = await receive_until(ws, p.Assign)
        assert assign.drv_path == drvs.dep
        await ws.send(p.encode(p.Accepted(step_id=assign.step_id, lease_id=assign.lease_id)))
        return S3Leased(
            runner,
            s3_bucket,
            ws,
            assign,
            registered,
            drvs,
            resp.json()["id"],
            runner.client(Role.AGENT),
            tmp_path,
        )

    yield make
    for cm in reversed(sockets):
        await cm.__aexit__(None, None, None)


async def _finish(leased: S3Leased, assign: p.Assign, out: Upload) -> p.ResultAck:
    output = p.OutputInfo(name="out", path=out.path, nar_hash=out.nar_hash, nar_size=len(out.nar))
    await leased.ws.send(
        p.encode(
            p.Result(
                step_id=assign.step_id,
                lease_id=assign.lease_id,
                outcome=p.Outcome.SUCCESS,
                outputs=[output],
            )
        )
    )
    return await receive_until(leased.ws, p.ResultAck)


async def _nix_store(*argv: str, env: dict[str, str]) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "nix-store",
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


async def _substitute(runner: RunnerHarness, paths: list[str], root: Path) -> tuple[int, str]:
    """A fresh Nix store realises ``paths`` from the runner's cache, trusting its key."""
    assert runner.url is not None
    return await _nix_store(
        "--store",
        f"local?root={root}",
        "--realise",
        *paths,
        "--option",
        "substituters",
        f"{runner.url}/cache",
        "--option",
        "trusted-public-keys",
        runner.key.public_key().to_text(),
        env={"PATH": "/usr/bin:/bin", "XDG_CACHE_HOME": str(root.parent / f"xdg-{root.name}")},
    )


def _incoming(bucket: Bucket) -> list[str]:
    return bucket.list_keys("incoming/")


async def _nothing_published(leased: S3Leased, path: str, keys_before: list[str]) -> None:
    """No narinfo for ``path``, and the bucket as it was: the uploaded object is deleted."""
    assert (await leased.runner.narinfo(path)).status_code == 404
    assert await leased.runner.present([path]) == set()
    assert leased.bucket.list_keys() == keys_before
    assert _incoming(leased.bucket) == []


# ---- presigned uploads -------------------------------------------------------------------------
@pytest.mark.parametrize("compression", ["zstd", "xz", "none"])
async def test_presigned_outputs_are_verified_published_and_substituted_by_nix(
    make_leased: MakeLeased, nix: Nix, tmp_path: Path, compression: str
) -> None:
    leased = await make_leased(compression)
    runner, bucket, drvs = leased.runner, leased.bucket, leased.drvs
    assert leased.registered.presigned_uploads is True
    assert leased.registered.compression == compression
    (dep_out,) = nix.realise(drvs.dep)
    dep = nix.upload(dep_out)
    prepared = await leased.prepare(dep_out)
    resp = await leased.upload(prepared)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {
        "path": dep_out,
        "nar_hash": dep.nar_hash,
        "nar_size": len(dep.nar),
        "references": [dep_out],
    }
    info = verify_signed(runner, (await runner.narinfo(dep_out)).text)
    assert info.compression == compression
    assert info.file_hash == prepared.file_hash and info.file_size == prepared.file_size
    # The object moved to its content-addressed key; nothing is left in incoming/.
    assert info.url in bucket.list_keys() and _incoming(bucket) == []
    assert bucket.read(info.url) == _file_bytes(prepared)
    # /cache/nar/... redirects to a short-lived presigned GET of exactly that object.
    nar_resp = await runner.client(None).get(f"/cache/{info.url}")
    assert nar_resp.status_code == 302
    location = nar_resp.headers["location"]
    assert location.startswith(bucket.endpoint_url) and "X-Amz-Signature=" in location
    async with httpx.AsyncClient() as plain:
        assert (await plain.get(location)).content == _file_bytes(prepared)
    # Completing again (a retry) answers the record and stores nothing new.
    again = await leased.complete(prepared.declaration().model_dump(mode="json"))
    assert again.status_code == 200 and again.json() == resp.json()
    assert _incoming(bucket) == []

    assert (await _finish(leased, leased.assign, dep)).recorded is True
    top_assign = await receive_until(leased.ws, p.Assign)
    (top_out,) = nix.realise(drvs.top)
    top = nix.upload(top_out)
    resp = await leased.upload(await leased.prepare(top_out), assign=top_assign)
    assert resp.status_code == 200, resp.text
    assert resp.json()["references"] == [dep_out]
    assert (await _finish(leased, top_assign, top)).recorded is True

    code, output = await _substitute(runner, [top_out], tmp_path / "fresh")
    assert code == 0, output
    root = tmp_path / "fresh"
    assert (root / top_out.lstrip("/")).read_bytes() == Path(top_out).read_bytes()
    assert (root / dep_out.lstrip("/")).read_bytes() == Path(dep_out).read_bytes()


async def test_presign_is_refused_without_a_current_lease_for_that_output(
    make_leased: MakeLeased, nix: Nix
) -> None:
    leased = await make_leased()
    (dep_out,) = nix.realise(leased.drvs.dep)
    declaration = (await leased.prepare(dep_out)).declaration().model_dump(mode="json")
    bogus = f"/api/v1/agent/upload/{uuid.uuid4().hex}/out"
    for url, status, says in [
        (bogus, 409, "lease is not current"),
        (leased.url().removesuffix("/out") + "/dev", 400, "not an output"),
    ]:
        for suffix in (p.PRESIGN_SUFFIX, p.COMPLETE_SUFFIX):
            resp = await leased.agent.post(url + suffix, json=declaration)
            assert resp.status_code == status, resp.text
            assert says in resp.json()["error"]
    # No credential, or a client's: refused before anything else.
    for client in (leased.runner.client(None), leased.runner.client(Role.CLIENT)):
        resp = await client.post(leased.url(p.PRESIGN_SUFFIX), json=declaration)
        assert resp.status_code in (401, 403), resp.text
    # Declarations the runner will not sign for.
    refusals: list[tuple[dict[str, Any], int, str]] = [
        ({"compression": "xz"}, 400, "stores zstd"),
        ({"nar_hash": "md5:" + "0" * 32}, 400, "bad nar_hash"),
        ({"nar_size": leased.runner.comps.config.cache.max_nar_bytes + 1}, 413, "max_nar_bytes"),
        ({"file_size": 10 * declaration["nar_size"] + 100_000}, 413, "compresses to"),
    ]
    for override, status, says in refusals:
        resp = await leased.presign({**declaration, **override})
        assert resp.status_code == status, resp.text
        assert says in resp.json()["error"], resp.json()
    # A step whose lease has ended (the dep step, once finished) gets no URL either.
    dep = nix.upload(dep_out)
    resp = await leased.upload(await leased.prepare(dep_out))
    assert resp.status_code == 200, resp.text
    assert (await _finish(leased, leased.assign, dep)).recorded is True
    resp = await leased.presign(declaration)
    assert resp.status_code == 409, resp.text
    assert _incoming(leased.bucket) == []


async def _refused(
    leased: S3Leased,
    prepared: PreparedFile,
    body: bytes,
    status: int,
    says: str,
    **declared: Any,
) -> float:
    """Upload ``body`` under ``prepared``'s declaration (with ``declared`` overrides): refused
    with ``status``, the object deleted, nothing published. Returns the completion's time."""
    keys_before = leased.bucket.list_keys()
    started = time.monotonic()
    resp = await leased.upload(prepared, body, **declared)
    elapsed = time.monotonic() - started
    assert resp.status_code == status, resp.text
    assert says.lower() in resp.json()["error"].lower(), resp.json()
    await _nothing_published(leased, leased.assign.outputs["out"], keys_before)
    return elapsed


def _zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(data)


def _hash(data: bytes) -> str:
    return base32.format_hash("sha256", hashlib.sha256(data).digest())


async def test_uploads_that_are_not_what_they_declare_are_deleted_and_not_published(
    make_leased: MakeLeased, nix: Nix
) -> None:
    leased = await make_leased()
    (dep_out,) = nix.realise(leased.drvs.dep)
    prepared = await leased.prepare(dep_out)
    real = _file_bytes(prepared)
    other = _zstd(b"".join(dump_path(leased.drvs.source)))

    # Another NAR's file than the one declared: its hash is not the declared file hash.
    await _refused(leased, prepared, other, 400, "file hash mismatch", file_size=len(other))
    # ... declared honestly as a file, but holding another NAR than the declared one: a
    # well-formed NAR of the same size whose file says something else.
    dep_nar = b"".join(dump_path(dep_out))
    assert dep_nar.count(b"hi\n") == 1
    forged = _zstd(dep_nar.replace(b"hi\n", b"ho\n"))
    await _refused(
        leased,
        prepared,
        forged,
        400,
        "NAR hash mismatch",
        file_size=len(forged),
        file_hash=_hash(forged),
    )
    # Another path's NAR altogether (shorter than the declared one).
    await _refused(
        leased, prepared, other, 400, "shorter than", file_size=len(other), file_hash=_hash(other)
    )
    # A larger file than declared (extra bytes after the frame).
    await _refused(leased, prepared, real + b"\0" * 64, 400, "not its declared")
    # A NAR larger than declared: the file decompresses past the declared NAR size.
    bigger = nix.upload(leased.drvs.source).nar + b"\0" * 4096
    big_file = _zstd(bigger)
    await _refused(
        leased,
        prepared,
        big_file,
        413,
        "decompresses to more than its declared NAR size",
        file_size=len(big_file),
        file_hash=_hash(big_file),
    )
    # Not zstd at all, and a truncated stream.
    await _refused(leased, prepared, b"x" * 100, 400, "not valid zstd", file_size=100,
                   file_hash=_hash(b"x" * 100))  # fmt: skip
    cut = real[:-3]
    await _refused(
        leased, prepared, cut, 400, "truncated", file_size=len(cut), file_hash=_hash(cut)
    )
    # Nothing uploaded at all: completing is refused.
    resp = await leased.complete(prepared.declaration().model_dump(mode="json"))
    assert resp.status_code == 409 and "PUT it" in resp.json()["error"]

    # The lease is still good after all that: the real output goes in.
    resp = await leased.upload(prepared)
    assert resp.status_code == 200, resp.text


async def test_a_decompression_bomb_is_stopped_at_the_declared_size(
    make_leased: MakeLeased, nix: Nix
) -> None:
    """A 32 KiB zstd file that expands to 1 GiB, declared as the small real NAR: refused as
    soon as the output passes the declared size, without expanding the rest."""
    leased = await make_leased()
    (dep_out,) = nix.realise(leased.drvs.dep)
    prepared = await leased.prepare(dep_out)
    compressor = zstandard.ZstdCompressor(level=3).compressobj()
    zeros = bytes(1 << 20)
    bomb = b"".join([*(compressor.compress(zeros) for _ in range(1024)), compressor.flush()])
    assert len(bomb) < 64 * 1024
    elapsed = await _refused(
        leased,
        prepared,
        bomb,
        413,
        "decompresses to more than its declared NAR size",
        file_size=len(bomb),
        file_hash=_hash(bomb),
    )
    assert elapsed < 10, f"verification of the bomb took {elapsed:.1f} s"
    # Even an agent that reports success anyway fails the step as an infrastructure failure
    # (the output is not in the cache): it is retried under a new lease, never cached.
    dep = nix.upload(dep_out)
    assert (await _finish(leased, leased.assign, dep)).recorded is True
    retry = await receive_until(leased.ws, p.Assign)
    assert retry.step_id == leased.assign.step_id and retry.lease_id != leased.assign.lease_id
    step = (await leased.runner.client(Role.CLIENT).get(f"/api/v1/steps/{retry.step_id}")).json()
    assert step["outcome"] == "upload_failure" and "outputs not uploaded" in step["error"]
    assert step["state"] in ("assigned", "building")
    assert (await leased.runner.narinfo(dep_out)).status_code == 404


@pytest.mark.parametrize(
    ("moment", "compression"),
    [("move", "zstd"), ("move", "none"), ("open_object", "zstd")],
)
async def test_a_re_put_during_complete_never_reaches_what_is_signed(
    make_leased: MakeLeased,
    nix: Nix,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    moment: str,
    compression: str,
) -> None:
    """A hostile agent holding the lease PUTs other bytes of the same size with its still
    valid URL while the runner completes its upload: just before the runner reads it back
    (``open_object``), or after it verified it and before the copy to the published key
    (``move``). What is published and signed is what was verified, and Nix substitutes it."""
    leased = await make_leased(compression)
    (dep_out,) = nix.realise(leased.drvs.dep)
    dep = nix.upload(dep_out)
    prepared = await leased.prepare(dep_out)
    good = _file_bytes(prepared)
    # Same size, other bytes; uncompressed, a well-formed NAR of other contents.
    contents = Path(dep_out).read_bytes()
    at = good.find(contents) if compression == "none" else -1
    hostile = bytearray(good)
    hostile[at + len(contents) // 2 if at >= 0 else len(good) // 2] ^= 0x01
    declaration = prepared.declaration().model_dump(mode="json")
    resp = await leased.presign(declaration)
    assert resp.status_code == 200, resp.text
    plan = p.UploadPlan.model_validate_json(resp.content)
    assert plan.method is p.UploadMethod.PRESIGNED
    assert plan.expires_secs == 120  # short-lived by default
    assert (await leased.put_to_bucket(plan, good)).status_code == 200
    (incoming,) = _incoming(leased.bucket)

    storage = leased.runner.comps.cache.storage
    from bigtent.runner.cache.s3 import S3Storage

    assert isinstance(storage, S3Storage)
    real = getattr(storage, moment)
    attacked: list[int] = []

    def attack_then(*args: Any) -> Any:
        # Runs in the runner's worker thread, at exactly the moment under attack.
        if not attacked:
            headers = {**plan.headers, "Content-Length": str(len(hostile))}
            put = httpx.put(plan.url, content=bytes(hostile), headers=headers, timeout=30)
            attacked.append(put.status_code)
            assert leased.bucket.read(incoming) == bytes(hostile)
        return real(*args)

    monkeypatch.setattr(storage, moment, attack_then)
    resp = await leased.complete(declaration)
    assert attacked == [200], "the hostile PUT did not happen"
    assert resp.status_code == 200, resp.text
    assert resp.json()["nar_hash"] == dep.nar_hash
    info = verify_signed(leased.runner, (await leased.runner.narinfo(dep_out)).text)
    # Nix is the judge: a fresh store trusting only the runner's key substitutes the path
    # from the bucket and gets the real output.
    root = tmp_path / "judge"
    code, output = await _substitute(leased.runner, [dep_out], root)
    assert code == 0, output
    assert (root / dep_out.lstrip("/")).read_bytes() == Path(dep_out).read_bytes()
    assert info.file_hash == prepared.file_hash
    assert leased.bucket.read(info.url) == good
    # The hostile bytes sit at the upload's key, which nothing reads any more; a repeated
    # complete answers the record and deletes them.
    assert _incoming(leased.bucket) == [incoming]
    again = await leased.complete(declaration)
    assert again.status_code == 200 and again.json() == resp.json()
    assert _incoming(leased.bucket) == []
    assert leased.bucket.read(info.url) == good

    # The path counts as built, and rightly.
    assert (await _finish(leased, leased.assign, dep)).recorded is True
    assert await leased.runner.present([dep_out]) == {dep_out}


async def test_presign_answers_cached_for_a_path_already_in_the_cache(
    make_leased: MakeLeased, nix: Nix
) -> None:
    leased = await make_leased()
    (dep_out,) = nix.realise(leased.drvs.dep)
    prepared = await leased.prepare(dep_out)
    # Published through the runner (a direct PUT, compressed by the runner into the bucket).
    dep = nix.upload(dep_out)
    put = await leased.agent.put(leased.url(), content=dep.nar, headers=_nar_headers(dep))
    assert put.status_code == 200, put.text
    info = verify_signed(leased.runner, (await leased.runner.narinfo(dep_out)).text)
    assert info.url in leased.bucket.list_keys()
    resp = await leased.presign(prepared.declaration().model_dump(mode="json"))
    assert resp.status_code == 200, resp.text
    plan = p.UploadPlan.model_validate_json(resp.content)
    assert plan.method is p.UploadMethod.CACHED
    assert (plan.path, plan.nar_hash, plan.references) == (dep_out, dep.nar_hash, [dep_out])


async def test_local_storage_answers_put_to_the_runner(
    make_runner: MakeRunner, nix: Nix, drvs: Drvs, nix_system: str, tmp_path: Path
) -> None:
    runner = await make_runner(serve=True)
    await upload_closure(runner, nix, drvs.closure)
    resp = await runner.client(Role.CLIENT).post("/api/v1/builds", json={"drvs": [drvs.top]})
    assert resp.status_code == 201
    async with agent_socket(runner) as ws:
        registered = await register(runner, ws, nix_system)
        assert registered.presigned_uploads is False
        assign = await receive_until(ws, p.Assign)
        (dep_out,) = nix.realise(drvs.dep)
        prepared = await prepare_from_iter(dump_path(dep_out), Compression.ZSTD, 3, tmp_path)
        resp = await runner.client(Role.AGENT).post(
            assign.upload_urls["out"] + p.PRESIGN_SUFFIX,
            json=prepared.declaration().model_dump(mode="json"),
        )
        assert resp.status_code == 200, resp.text
        plan = p.UploadPlan.model_validate_json(resp.content)
        assert plan.method is p.UploadMethod.PUT and plan.url == assign.upload_urls["out"]


# ---- serving and client uploads ----------------------------------------------------------------
@pytest.mark.parametrize("serve", ["redirect", "proxy"])
async def test_client_paths_go_to_the_bucket_and_nix_substitutes_them(
    make_runner: MakeRunner, nix: Nix, drvs: Drvs, s3_bucket: Bucket, tmp_path: Path, serve: str
) -> None:
    runner = await _s3_runner(make_runner, s3_bucket, serve=serve, prefix="farm/one")
    await upload_closure(runner, nix, drvs.closure)
    info = verify_signed(runner, (await runner.narinfo(drvs.source)).text)
    assert f"farm/one/{info.url}" in s3_bucket.list_keys()
    assert all(k.startswith("farm/one/nar/") for k in s3_bucket.list_keys())
    assert runner.temp_files() == []
    resp = await runner.client(None).get(f"/cache/{info.url}")
    head = await runner.client(None).head(f"/cache/{info.url}")
    if serve == "redirect":
        assert resp.status_code == head.status_code == 302
    else:
        assert resp.status_code == head.status_code == 200
        assert resp.content == s3_bucket.read(f"farm/one/{info.url}")
        assert int(head.headers["content-length"]) == info.file_size
    # Names that are not NAR files are never signed or fetched.
    for name in ["nar/..%2Fincoming%2Fx", "nar/" + "e" * 52 + ".nar", "nar/abc.nar.gz"]:
        assert (await runner.client(None).get(f"/cache/{name}")).status_code == 404
    code, output = await nix_copy_from(runner, [drvs.top], tmp_path / "fresh")
    assert code == 0, output
    for path in drvs.closure:
        assert (tmp_path / "fresh" / path.lstrip("/")).exists()


async def test_runner_refuses_to_start_without_a_usable_bucket(
    make_runner: MakeRunner, s3_bucket: Bucket
) -> None:
    from bigtent.errors import ConfigError

    with pytest.raises(ConfigError, match="cannot use bucket 'no-such-bucket'"):
        await make_runner(cache={"storage": "s3", "s3": s3_bucket.config(bucket="no-such-bucket")})


async def test_sweeper_deletes_only_old_incoming_objects(
    make_runner: MakeRunner, s3_bucket: Bucket
) -> None:
    runner = await _s3_runner(make_runner, s3_bucket, incoming_ttl_secs=60)
    storage = runner.comps.cache.storage
    from bigtent.runner.cache.s3 import S3Storage

    assert isinstance(storage, S3Storage)
    s3_bucket.put("incoming/lease/abc.nar.zst", b"left behind")
    s3_bucket.put("nar/keep.nar", b"published")
    # What a runner stopped while verifying leaves: its own copy of an upload.
    s3_bucket.put(f"incoming/lease/verifying-{'0' * 32}-abc.nar.zst", b"left behind")
    assert await storage.sweep_incoming(time.time()) == 0
    assert await storage.sweep_incoming(time.time() + 120) == 2
    assert s3_bucket.list_keys() == ["nar/keep.nar"]


async def test_outputs_put_to_the_runner_land_in_the_bucket(
    make_leased: MakeLeased, nix: Nix
) -> None:
    """An agent that does not use presigned uploads still works against S3 storage."""
    leased = await make_leased(presigned_uploads=False)
    assert leased.registered.presigned_uploads is False
    (dep_out,) = nix.realise(leased.drvs.dep)
    dep = nix.upload(dep_out)
    plan = await leased.presign(
        (await leased.prepare(dep_out)).declaration().model_dump(mode="json")
    )
    assert p.UploadPlan.model_validate_json(plan.content).method is p.UploadMethod.PUT
    resp = await leased.agent.put(leased.url(), content=dep.nar, headers=_nar_headers(dep))
    assert resp.status_code == 200, resp.text
    info = verify_signed(leased.runner, (await leased.runner.narinfo(dep_out)).text)
    assert info.url in leased.bucket.list_keys()
    assert leased.runner.temp_files() == []
    assert (await _finish(leased, leased.assign, dep)).recorded is True
