"""Trust scoping through the API and the agent WebSocket under a real uvicorn (architecture §6):
who gets a trusted build; untrusted venues; the untrusted cache under ``/cache/untrusted``
(its own key, judged by a real Nix client, and never the main cache); OIDC agents (a loopback
issuer minting real tokens) receive only steps of their repositories, and of untrusted builds
only when their rule allows it."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from bigtent import protocol as p
from bigtent.config import Role
from bigtent.nix import narinfo
from bigtent.nix.keys import parse_public_key, verify_narinfo
from bigtent.nix.store_path import StorePath
from bigtent.runner.metrics import UploadKind
from tests.integration.runner.conftest import (
    WAIT_SECS,
    Drvs,
    MakeRunner,
    Nix,
    RunnerHarness,
    agent_socket,
    eventually,
    receive,
    receive_until,
    register_message,
    upload_closure,
)
from tests.integration.runner.oidc_issuer import (
    LocalIssuer,
    SigningKey,
    TlsFiles,
    mint,
)

pytestmark = pytest.mark.nix

REPO = "acme/widgets"


async def untrusted_client(runner: RunnerHarness) -> httpx.AsyncClient:
    """A client token not marked trusted, made through the admin API."""
    resp = await runner.client(Role.ADMIN).post(
        "/api/v1/tokens", json={"role": "client", "name": f"pr-{uuid.uuid4().hex[:6]}"}
    )
    assert resp.status_code == 201, resp.text
    assert resp.json()["trusted"] is False
    return runner.client(None, token=resp.json()["token"])


async def create_build(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    resp = await client.post("/api/v1/builds", json=body)
    assert resp.status_code == 201, resp.text
    data: dict[str, Any] = resp.json()
    return data


# ---- which builds are trusted ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("who", "extra", "trusted"),
    [
        pytest.param("admin", {}, True, id="admin"),
        pytest.param("trusted-client", {"ref": "refs/heads/main"}, True, id="trusted-client"),
        pytest.param("untrusted-client", {"ref": "refs/heads/main"}, False, id="plain-client"),
        pytest.param("trusted-client", {"ref": "refs/pull/7/merge"}, False, id="pull-request"),
        pytest.param("admin", {"trusted": False}, False, id="asks-untrusted"),
    ],
)
async def test_build_trust_through_the_api(
    make_runner: MakeRunner, nix: Nix, drvs: Drvs, who: str, extra: dict[str, Any], trusted: bool
) -> None:
    runner = await make_runner()
    await upload_closure(runner, nix, drvs.closure)
    clients = {
        "admin": runner.client(Role.ADMIN),
        "trusted-client": runner.client(Role.CLIENT),
        "untrusted-client": await untrusted_client(runner),
    }
    build = await create_build(clients[who], drvs=[drvs.top], repository=REPO, **extra)
    assert (build["trusted"], build["repository"], build["ref"]) == (
        trusted,
        REPO,
        extra.get("ref"),
    )
    got = (await clients[who].get(f"/api/v1/builds/{build['id']}")).json()
    assert (got["trusted"], got["repository"], got["ref"]) == (trusted, REPO, extra.get("ref"))
    steps = (await clients[who].get(f"/api/v1/builds/{build['id']}/steps")).json()["steps"]
    assert {s["trusted"] for s in steps} == {trusted}


@pytest.mark.parametrize(
    "body",
    [
        {"repository": ""},
        {"repository": "acme widgets"},
        {"repository": "*"},
        {"repository": "x" * 257},
        {"ref": "refs/heads/a b"},
    ],
)
async def test_bad_repository_or_ref_is_a_bad_request(
    make_runner: MakeRunner, body: dict[str, Any]
) -> None:
    runner = await make_runner()
    resp = await runner.client(Role.CLIENT).post(
        "/api/v1/builds", json={"drvs": ["/nix/store/" + "a" * 32 + "-x.drv"], **body}
    )
    assert resp.status_code == 400, resp.text


# ---- the untrusted cache -----------------------------------------------------------------------
async def register_as(
    runner: RunnerHarness, ws: ClientConnection, system: str, **overrides: Any
) -> p.Registered:
    await ws.send(p.encode(register_message(system, **overrides)))
    msg = await receive(ws)
    assert isinstance(msg, p.Registered), msg
    return msg


async def nix_fetch(root: Path, path: str, caches: list[tuple[str, str]]) -> bool:
    """Substitute ``path`` into a fresh chroot store ``root`` from ``caches`` (url, key) with
    a real Nix (its own lookup cache); True when it worked."""
    proc = await asyncio.create_subprocess_exec(
        "nix-store",
        "--store",
        f"local?root={root}",
        "--realise",
        path,
        "--option",
        "substituters",
        " ".join(url for url, _ in caches),
        "--option",
        "trusted-public-keys",
        " ".join(key for _, key in caches),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "XDG_CACHE_HOME": str(root) + "-xdg"},
    )
    await asyncio.wait_for(proc.wait(), 60)
    return proc.returncode == 0 and (root / path.lstrip("/")).exists()


async def test_untrusted_outputs_live_only_in_the_untrusted_cache(
    make_runner: MakeRunner, nix: Nix, drvs: Drvs, nix_system: str, tmp_path: Path
) -> None:
    runner = await make_runner(serve=True)
    await upload_closure(runner, nix, drvs.closure)
    status = (await runner.client(Role.CLIENT).get("/api/v1/status")).json()
    main_key, untrusted_key = status["cache_public_key"], status["untrusted_cache_public_key"]
    assert status["untrusted_cache_url"] == f"{runner.url}/cache/untrusted"
    assert parse_public_key(untrusted_key).name != parse_public_key(main_key).name
    build = await create_build(await untrusted_client(runner), drvs=[drvs.top], repository=REPO)
    assert build["trusted"] is False
    out = nix.outputs(drvs.dep)["out"]
    hash_part = StorePath.parse(out).hash_part
    async with agent_socket(runner) as trusted_ws, agent_socket(runner) as untrusted_ws:
        trusted_reg = await register_as(runner, trusted_ws, nix_system)
        assert trusted_reg.untrusted is False
        assert all("untrusted" not in u.url for u in trusted_reg.upstreams)
        untrusted_reg = await register_as(runner, untrusted_ws, nix_system, untrusted=True)
        assert untrusted_reg.untrusted is True
        assert untrusted_reg.upstreams[0] == p.Substituter(
            url=f"{runner.url}/cache/untrusted", public_key=untrusted_key
        )
        assign = await receive_until(untrusted_ws, p.Assign)
        assert assign.drv_path == drvs.dep
        sched = runner.comps.scheduler
        trusted_mid = next(v for v in sched.venues.values() if v.trusted).machine_id
        assert sched.venues[trusted_mid].running == set()  # idle and capable, given nothing
        await untrusted_ws.send(
            p.encode(p.Accepted(step_id=assign.step_id, lease_id=assign.lease_id))
        )
        nix.realise(drvs.dep)
        up = nix.upload(out)
        resp = await runner.client(Role.AGENT).put(
            assign.upload_urls["out"],
            content=up.nar,
            headers={"X-Nar-Hash": up.nar_hash, "X-Nar-Size": str(len(up.nar))},
        )
        assert resp.status_code == 200, resp.text
        await untrusted_ws.send(
            p.encode(
                p.Result(
                    step_id=assign.step_id, lease_id=assign.lease_id, outcome=p.Outcome.SUCCESS
                )
            )
        )
        ack = await receive_until(untrusted_ws, p.ResultAck)
        assert ack.recorded
        # Served and signed by the untrusted cache only.
        anon = runner.client(None)
        assert (await anon.get(f"/cache/{hash_part}.narinfo")).status_code == 404
        resp = await anon.get(f"/cache/untrusted/{hash_part}.narinfo")
        assert resp.status_code == 200, resp.text
        info = narinfo.parse(resp.text)
        assert verify_narinfo(info, [parse_public_key(untrusted_key)])
        assert not verify_narinfo(info, [parse_public_key(main_key)])
        info_text = (await anon.get("/cache/untrusted/nix-cache-info")).text
        assert "StoreDir: /nix/store" in info_text
        # A real Nix client: from the untrusted cache with its key, yes; the main cache
        # alone, or the untrusted cache under the main key, no.
        assert runner.url is not None
        main = (f"{runner.url}/cache", main_key)
        untrusted = (f"{runner.url}/cache/untrusted", untrusted_key)
        assert not await nix_fetch(tmp_path / "s1", out, [main])
        assert not await nix_fetch(tmp_path / "s2", out, [(untrusted[0], main_key)])
        assert await nix_fetch(tmp_path / "s3", out, [main, untrusted])
        # A trusted build of the same derivation builds it again, on the trusted venue.
        trusted_build = await create_build(runner.client(Role.CLIENT), drvs=[drvs.top])
        assert trusted_build["trusted"] is True
        again = await receive_until(trusted_ws, p.Assign)
        assert again.drv_path == drvs.dep and again.step_id != assign.step_id


async def test_an_untrusted_build_reuses_the_untrusted_cache(
    make_runner: MakeRunner, nix: Nix, drvs: Drvs
) -> None:
    """Planning: an untrusted build counts outputs in the untrusted cache as built; a trusted
    build of the same derivation does not."""
    runner = await make_runner()
    await upload_closure(runner, nix, drvs.closure)
    out = nix.outputs(drvs.dep)["out"]
    nix.realise(drvs.dep)
    up = nix.upload(out)
    # Publish dep's output into the untrusted cache as an untrusted step would have.
    cache = runner.comps.untrusted_cache
    assert cache is not None
    got, temp = await cache.receive(
        _chunks(up.nar),
        kind=UploadKind.OUTPUT,
        declared_size=len(up.nar),
        declared_hash=bytes.fromhex(_sha256(up.nar)),
    )
    await cache.publish(temp, StorePath.parse(out), got, up.references, deriver=drvs.dep)
    untrusted = await create_build(await untrusted_client(runner), drvs=[drvs.dep])
    assert untrusted["roots"][0]["state"] == "cached"
    trusted = await create_build(runner.client(Role.CLIENT), drvs=[drvs.dep])
    assert trusted["roots"][0]["state"] == "runnable"


async def _chunks(data: bytes) -> Any:
    yield data


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- OIDC agents -------------------------------------------------------------------------------
def oidc_auth(issuer: LocalIssuer, tls: TlsFiles, **rule: Any) -> dict[str, Any]:
    base = {
        "issuer": issuer.url,
        "audiences": ["bigtent"],
        "ca_file": str(tls.ca_file),
        "repositories": [REPO],
    }
    return {"oidc": [base | rule]}


def job_token(issuer: LocalIssuer, key: SigningKey) -> str:
    now = int(time.time())
    return mint(
        key,
        {
            "iss": issuer.url,
            "aud": "bigtent",
            "sub": f"repo:{REPO}:ref:refs/heads/main",
            "repository": REPO,
            "ref": "refs/heads/main",
            "iat": now,
            "nbf": now,
            "exp": now + 300,
        },
    )


def oidc_socket(runner: RunnerHarness, token: str) -> connect:
    return connect(
        runner.ws_url,
        additional_headers={"Authorization": f"Bearer {token}"},
        open_timeout=WAIT_SECS,
        proxy=None,
    )


async def graph_build(
    runner: RunnerHarness, nix: Nix, tmp: Path, client: httpx.AsyncClient, **body: Any
) -> Drvs:
    g = nix.graph(tmp)
    await upload_closure(runner, nix, g.closure)
    await create_build(client, drvs=[g.top], **body)
    return g


async def test_an_oidc_agent_gets_only_trusted_steps_of_its_repositories(
    make_runner: MakeRunner,
    issuer: LocalIssuer,
    tls: TlsFiles,
    key: SigningKey,
    nix: Nix,
    nix_system: str,
    tmp_path: Path,
) -> None:
    runner = await make_runner(serve=True, auth=oidc_auth(issuer, tls))
    sched = runner.comps.scheduler
    trusted_client = runner.client(Role.CLIENT)
    async with oidc_socket(runner, job_token(issuer, key)) as oidc_ws:
        reg = await register_as(runner, oidc_ws, nix_system, max_jobs=4)
        assert reg.untrusted is False
        assert all("untrusted" not in u.url for u in reg.upstreams)
        (oidc_venue,) = sched.venues.values()
        assert oidc_venue.repositories == frozenset({REPO})
        # Another repository's build, a build without a repository and an untrusted build of
        # its own repository: the OIDC agent stays idle, the work waits.
        other = await graph_build(runner, nix, tmp_path, trusted_client, repository="evil/corp")
        anon = await graph_build(runner, nix, tmp_path, trusted_client)
        untrusted = await graph_build(
            runner, nix, tmp_path, await untrusted_client(runner), repository=REPO
        )
        await eventually(lambda: len(sched.index) == 3)
        assert oidc_venue.running == set()
        # Token agents (trusted and untrusted) take them.
        async with agent_socket(runner) as token_ws, agent_socket(runner) as untrusted_ws:
            await register_as(runner, token_ws, nix_system, max_jobs=4)
            await register_as(runner, untrusted_ws, nix_system, max_jobs=4, untrusted=True)
            got = {(await receive_until(token_ws, p.Assign)).drv_path for _ in range(2)}
            assert got == {other.dep, anon.dep}
            assert (await receive_until(untrusted_ws, p.Assign)).drv_path == untrusted.dep
            assert oidc_venue.running == set()
            # Its own repository's trusted build: the first assign it ever receives.
            mine = await graph_build(runner, nix, tmp_path, trusted_client, repository=REPO)
            assert (await receive_until(oidc_ws, p.Assign)).drv_path == mine.dep


async def test_an_oidc_agent_of_a_rule_allowing_untrusted_builds_is_an_untrusted_venue(
    make_runner: MakeRunner,
    issuer: LocalIssuer,
    tls: TlsFiles,
    key: SigningKey,
    nix: Nix,
    nix_system: str,
    tmp_path: Path,
) -> None:
    runner = await make_runner(serve=True, auth=oidc_auth(issuer, tls, allow_untrusted=True))
    sched = runner.comps.scheduler
    async with oidc_socket(runner, job_token(issuer, key)) as oidc_ws:
        reg = await register_as(runner, oidc_ws, nix_system, max_jobs=4)
        assert reg.untrusted is True
        assert reg.upstreams[0].url == f"{runner.url}/cache/untrusted"
        (oidc_venue,) = sched.venues.values()
        trusted = await graph_build(
            runner, nix, tmp_path, runner.client(Role.CLIENT), repository=REPO
        )
        await eventually(lambda: len(sched.index) == 1)
        assert oidc_venue.running == set()  # never a trusted step
        untrusted = await graph_build(
            runner, nix, tmp_path, await untrusted_client(runner), repository=REPO
        )
        assert (await receive_until(oidc_ws, p.Assign)).drv_path == untrusted.dep
        async with agent_socket(runner) as token_ws:
            await register_as(runner, token_ws, nix_system)
            assert (await receive_until(token_ws, p.Assign)).drv_path == trusted.dep
        agents = (await runner.client(Role.CLIENT).get("/api/v1/agents")).json()["agents"]
        oidc_row = next(a for a in agents if a["auth_kind"] == "oidc")
        assert (oidc_row["trusted"], oidc_row["build_repositories"]) == (False, [REPO])


async def test_an_oidc_agent_may_not_ask_for_untrusted_work_its_rule_forbids(
    make_runner: MakeRunner, issuer: LocalIssuer, tls: TlsFiles, key: SigningKey, nix_system: str
) -> None:
    runner = await make_runner(serve=True, auth=oidc_auth(issuer, tls))
    async with oidc_socket(runner, job_token(issuer, key)) as oidc_ws:
        await oidc_ws.send(p.encode(register_message(nix_system, untrusted=True)))
        answer = await receive(oidc_ws)
        assert isinstance(answer, p.Error) and "allow_untrusted" in answer.message
    assert runner.comps.scheduler.venues == {}
