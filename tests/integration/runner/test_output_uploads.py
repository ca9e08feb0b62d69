"""``PUT /api/v1/agent/upload/{lease}/{output}`` with real leases, real built outputs and a
real Nix client judging the cache: only the current lease holder may publish, only the step's
outputs, only NARs that are what they declare; whatever is published is signed, has the right
references, and is substituted by Nix with the runner's key and refused with another."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import ClientConnection

from bigtent import protocol as p
from bigtent.config import Role
from bigtent.nix import base32
from bigtent.nix.keys import generate_key
from bigtent.nix.store_path import StorePath
from tests.integration.runner.conftest import (
    Drvs,
    MakeRunner,
    Nix,
    RunnerHarness,
    Upload,
    agent_socket,
    eventually,
    nothing_stored,
    receive_until,
    register,
    upload_closure,
    verify_signed,
)

pytestmark = pytest.mark.nix


@dataclass
class Leased:
    """A served runner with ``drvs`` uploaded, a build of ``drvs.top``, and an agent holding
    the lease of the first runnable step (``drvs.dep``)."""

    runner: RunnerHarness
    ws: ClientConnection
    assign: p.Assign
    drvs: Drvs
    build_id: int
    agent: httpx.AsyncClient


@pytest.fixture
async def leased(
    make_runner: MakeRunner, nix: Nix, drvs: Drvs, nix_system: str
) -> AsyncIterator[Leased]:
    runner = await make_runner(serve=True)
    await upload_closure(runner, nix, drvs.closure)
    resp = await runner.client(Role.CLIENT).post("/api/v1/builds", json={"drvs": [drvs.top]})
    assert resp.status_code == 201, resp.text
    async with agent_socket(runner) as ws:
        await register(runner, ws, nix_system)
        assign = await receive_until(ws, p.Assign)
        assert assign.drv_path == drvs.dep
        await ws.send(p.encode(p.Accepted(step_id=assign.step_id, lease_id=assign.lease_id)))
        yield Leased(runner, ws, assign, drvs, resp.json()["id"], runner.client(Role.AGENT))


def _headers(up: Upload, **overrides: str) -> dict[str, str]:
    h = {"X-Nar-Hash": up.nar_hash, "X-Nar-Size": str(len(up.nar))}
    h.update({k.replace("_", "-"): v for k, v in overrides.items()})
    return h


async def _put(
    client: httpx.AsyncClient, url: str, up: Upload, body: bytes | None = None, **headers: str
) -> httpx.Response:
    return await client.put(
        url, content=up.nar if body is None else body, headers=_headers(up, **headers)
    )


async def _finish(leased: Leased, assign: p.Assign, out: Upload) -> p.ResultAck:
    """Report success for ``assign`` as an agent would, after uploading ``out``."""
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


async def _build_through(leased: Leased, nix: Nix) -> tuple[Upload, Upload]:
    """Build ``dep`` then ``top`` on the host and upload both through their leases."""
    (dep_out,) = nix.realise(leased.drvs.dep)
    assert dep_out == leased.assign.outputs["out"]
    dep = nix.upload(dep_out)
    resp = await _put(leased.agent, leased.assign.upload_urls["out"], dep)
    assert resp.status_code == 200, resp.text
    return await _build_through_rest(leased, nix, dep)


async def test_output_upload_is_signed_with_correct_references(leased: Leased, nix: Nix) -> None:
    runner, drvs = leased.runner, leased.drvs
    (dep_out,) = nix.realise(drvs.dep)
    dep = nix.upload(dep_out)
    resp = await _put(leased.agent, leased.assign.upload_urls["out"], dep)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {
        "path": dep_out,
        "nar_hash": dep.nar_hash,
        "nar_size": len(dep.nar),
        "references": [dep_out],  # it names itself
    }
    info = verify_signed(runner, (await runner.narinfo(dep_out)).text)
    assert info.references == (StorePath.parse(dep_out).basename,)
    assert info.deriver == StorePath.parse(drvs.dep).basename
    assert info.nar_hash == dep.nar_hash and info.nar_size == len(dep.nar)
    assert runner.temp_files() == []
    # Uploading it again under the same lease stores nothing new and answers the same.
    with nothing_stored(runner):
        again = await _put(leased.agent, leased.assign.upload_urls["out"], dep)
    assert again.status_code == 200 and again.json() == resp.json()

    _, top = await _build_through_rest(leased, nix, dep)
    top_info = verify_signed(runner, (await runner.narinfo(top.path)).text)
    assert top_info.references == (StorePath.parse(dep_out).basename,)
    assert top_info.deriver == StorePath.parse(drvs.top).basename
    client = runner.client(Role.CLIENT)

    async def succeeded() -> bool:
        build = (await client.get(f"/api/v1/builds/{leased.build_id}")).json()
        return bool(build["state"] == "succeeded")

    await eventually(succeeded)


async def test_output_recorded_only_in_the_database_keeps_its_first_record(
    leased: Leased, nix: Nix
) -> None:
    """A trusted output is looked up in memory only before its NAR is received: a record this
    runner does not remember (another runner's, or one its memory let go) is found by the
    insert, which keeps it and answers it, exactly as the database has it."""
    runner = leased.runner
    (dep_out,) = nix.realise(leased.drvs.dep)
    dep = nix.upload(dep_out)
    url = leased.assign.upload_urls["out"]
    first = await _put(leased.agent, url, dep)
    assert first.status_code == 200, first.text
    served = (await runner.narinfo(dep_out)).text
    cache = runner.comps.cache
    hash_part = StorePath.parse(dep_out).hash_part
    cache.evicted([hash_part])  # the record leaves memory; the database keeps it
    assert await cache.remembered_narinfo(dep_out) is None
    again = await _put(leased.agent, url, dep)
    assert again.status_code == 200, again.text
    assert again.json() == first.json()
    assert (await runner.narinfo(dep_out)).text == served
    cache.evicted([hash_part])
    assert (await runner.narinfo(dep_out)).text == served  # from the database
    assert runner.temp_files() == []


async def _build_through_rest(leased: Leased, nix: Nix, dep: Upload) -> tuple[Upload, Upload]:
    assert (await _finish(leased, leased.assign, dep)).recorded is True
    assign = await receive_until(leased.ws, p.Assign)
    assert assign.drv_path == leased.drvs.top
    (top_out,) = nix.realise(leased.drvs.top)
    top = nix.upload(top_out)
    resp = await _put(leased.agent, assign.upload_urls["out"], top)
    assert resp.status_code == 200, resp.text
    assert resp.json()["references"] == [dep.path]
    assert (await _finish(leased, assign, top)).recorded is True
    return dep, top


async def _assert_refused(
    leased: Leased,
    status: int,
    url: str,
    up: Upload,
    body: bytes | None = None,
    client: httpx.AsyncClient | None = None,
    says: str = "",
    **headers: str,
) -> None:
    runner = leased.runner
    expected = leased.assign.outputs["out"]
    before = await runner.present([expected, up.path])
    with nothing_stored(runner):
        resp = await _put(client or leased.agent, url, up, body, **headers)
    assert resp.status_code == status, resp.text
    err = resp.json()
    assert set(err) == {"error", "detail"}
    assert says.lower() in err["error"].lower(), err
    assert await runner.present([expected, up.path]) == before
    for path in {expected, up.path} - before:
        assert (await runner.narinfo(path)).status_code == 404


def _nar_hash(data: bytes) -> str:
    return base32.format_hash("sha256", hashlib.sha256(data).digest())


async def test_refused_uploads_store_nothing(leased: Leased, nix: Nix) -> None:
    runner, drvs, assign = leased.runner, leased.drvs, leased.assign
    url = assign.upload_urls["out"]
    (dep_out,) = nix.realise(drvs.dep)
    dep = nix.upload(dep_out)
    other = nix.upload(drvs.source)

    await _assert_refused(
        leased,
        409,
        f"/api/v1/agent/upload/{uuid.uuid4().hex}/out",
        dep,
        says="lease is not current",
    )
    await _assert_refused(
        leased, 400, f"/api/v1/agent/upload/{assign.lease_id}/dev", dep, says="not an output"
    )
    # Another path's NAR in place of the output: it is not what was declared.
    await _assert_refused(
        leased,
        400,
        url,
        dep,
        body=other.nar,
        X_Nar_Size=str(len(other.nar)),
        says="hash mismatch",
    )
    await _assert_refused(
        leased, 400, url, dep, X_Nar_Hash=_nar_hash(b"other"), says="hash mismatch"
    )
    await _assert_refused(
        leased, 400, url, dep, X_Nar_Hash="md5:" + "0" * 32, says="bad X-Nar-Hash"
    )
    await _assert_refused(leased, 400, url, dep, X_Nar_Size="12abc", says="bad X-Nar-Size")
    # Oversized: declared over max_nar_bytes, or longer than declared.
    too_big = str(runner.comps.config.cache.max_nar_bytes + 1)
    await _assert_refused(leased, 413, url, dep, X_Nar_Size=too_big, says="max_nar_bytes")
    await _assert_refused(leased, 413, url, dep, body=dep.nar + b"\0" * 8, says="longer")
    garbage = b"\0" * len(dep.nar)
    await _assert_refused(
        leased, 400, url, dep, body=garbage, X_Nar_Hash=_nar_hash(garbage), says="malformed NAR"
    )
    # Wrong credentials: a client token may not upload outputs; no token is 401.
    await _assert_refused(leased, 403, url, dep, client=runner.client(Role.CLIENT))
    await _assert_refused(leased, 401, url, dep, client=runner.client(None))

    # The lease is still good after all that: the real output goes in.
    resp = await _put(leased.agent, url, dep)
    assert resp.status_code == 200, resp.text


async def test_stale_lease_is_refused(leased: Leased, nix: Nix) -> None:
    runner, drvs, assign = leased.runner, leased.drvs, leased.assign
    (dep_out,) = nix.realise(drvs.dep)
    dep = nix.upload(dep_out)
    assert (await _put(leased.agent, assign.upload_urls["out"], dep)).status_code == 200
    assert (await _finish(leased, assign, dep)).recorded is True
    top_assign = await receive_until(leased.ws, p.Assign)
    (top_out,) = nix.realise(drvs.top)
    top = nix.upload(top_out)
    # The finished step's lease is stale: neither its own output nor another goes in.
    await _assert_refused(leased, 409, assign.upload_urls["out"], dep, says="not current")
    await _assert_refused(leased, 409, assign.upload_urls["out"], top, says="not current")
    # A result under the stale lease is acknowledged and ignored.
    ack = await _finish(leased, assign, dep)
    assert ack.recorded is False and ack.lease_id == assign.lease_id
    bogus = p.Assign.model_validate(top_assign.model_dump() | {"lease_id": "never-issued"})
    assert (await _finish(leased, bogus, top)).recorded is False
    steps = (await runner.client(Role.CLIENT).get(f"/api/v1/builds/{leased.build_id}/steps")).json()
    state = {s["drv_path"]: s["state"] for s in steps["steps"]}
    assert state == {drvs.dep: "succeeded", drvs.top: "assigned"}


async def _nix_store(*argv: str) -> tuple[int, str]:
    """Run ``nix-store`` without blocking the loop that serves the runner it talks to."""
    proc = await asyncio.create_subprocess_exec(
        "nix-store",
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


async def test_nix_substitutes_from_the_cache_and_checks_the_key(
    leased: Leased, nix: Nix, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = leased.runner
    dep, top = await _build_through(leased, nix)
    cache_url = f"{runner.url}/cache"

    def args(root: Path, key: str) -> list[str]:
        return [
            "--store",
            f"local?root={root}",
            "--realise",
            top.path,
            "--option",
            "substituters",
            cache_url,
            "--option",
            "trusted-public-keys",
            key,
        ]

    # Another key (same name, even): Nix refuses the unsigned-for-it paths.
    wrong = generate_key(runner.key.name).public_key().to_text()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-wrong"))
    code, output = await _nix_store(*args(tmp_path / "wrong", wrong))
    assert code != 0, output
    assert "is not signed by any of the keys" in output
    assert not (tmp_path / "wrong" / top.path.lstrip("/")).exists()

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-right"))
    code, output = await _nix_store(*args(tmp_path / "right", runner.key.public_key().to_text()))
    assert code == 0, output
    root = tmp_path / "right"
    assert (root / top.path.lstrip("/")).read_bytes() == Path(top.path).read_bytes()
    assert (root / dep.path.lstrip("/")).read_bytes() == Path(dep.path).read_bytes()
