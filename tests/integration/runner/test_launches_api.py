"""Launches through the runner's surface: an OIDC agent registering over a real WebSocket with
its launch id claims the launch (the sessions hook), ``GET /api/v1/launches`` (admin) shows
pools, counters and launches, and a runner whose pool no issuer admits does not start."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect

from bigtent import protocol as p
from bigtent.config import Role, load_runner_config
from bigtent.errors import ConfigError
from bigtent.runner.components import build_components
from bigtent.runner.db import queries
from bigtent.states import LaunchState
from tests.integration.runner.conftest import (
    WAIT_SECS,
    MakeRunner,
    eventually,
    receive,
    register_message,
)
from tests.integration.runner.oidc_issuer import (
    LocalIssuer,
    SigningKey,
    TlsFiles,
    make_tls,
    mint,
    running_issuer,
)

WORKFLOW_REPO = "acme/bigtent-agents"
WORKFLOW_REF = f"{WORKFLOW_REPO}/.github/workflows/bigtent-agent.yml@refs/heads/main"
SYSTEM = "x86_64-linux"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("launches-tls"))


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.generate("launches-key")


@pytest.fixture
def issuer(tls: TlsFiles, key: SigningKey) -> Iterator[LocalIssuer]:
    yield from running_issuer(tls, [key])


def sections(issuer_url: str, ca_file: Path | None, **pool: Any) -> dict[str, Any]:
    return {
        "auth": {
            "oidc": [
                {
                    "issuer": issuer_url,
                    "audiences": ["bigtent"],
                    "ca_file": str(ca_file) if ca_file else None,
                    "repositories": [WORKFLOW_REPO],
                    "workflow_refs": [WORKFLOW_REF],
                }
            ]
        },
        "autoscale": {
            "github": [
                {
                    "name": "gha",
                    "systems": [SYSTEM],
                    "allowed_build_repositories": ["acme/widgets"],
                    "workflow_repository": WORKFLOW_REPO,
                    "token": "ghs_never_used",
                    "runner_url": "https://ci.example.org:8443",
                    "audience": "bigtent",
                    # Nothing in these tests is runnable, so nothing is dispatched; should
                    # that change, a refused loopback port is all it reaches.
                    "api_url": "https://127.0.0.1:9",
                    **pool,
                }
            ]
        },
    }


def job_token(issuer: LocalIssuer, key: SigningKey, repository: str = WORKFLOW_REPO) -> str:
    now = int(time.time())
    return mint(
        key,
        {
            "iss": issuer.url,
            "aud": "bigtent",
            "sub": f"repo:{repository}:ref:refs/heads/main",
            "repository": repository,
            "ref": "refs/heads/main",
            "job_workflow_ref": WORKFLOW_REF,
            "iat": now,
            "nbf": now,
            "exp": now + 300,
        },
    )


async def test_an_oidc_agent_with_its_launch_id_claims_the_launch(
    make_runner: MakeRunner, issuer: LocalIssuer, tls: TlsFiles, key: SigningKey
) -> None:
    runner = await make_runner(serve=True, **sections(issuer.url, tls.ca_file))
    scaler = runner.comps.autoscaler
    assert scaler is not None and scaler.enabled
    launch_id = uuid.uuid4().hex
    async with runner.comps.engine.begin() as conn:
        await queries.insert_launch(conn, launch_id, "gha", LaunchState.PENDING, time.time())
    await scaler.load()
    assert set(scaler.pending) == {launch_id}

    machine_id = uuid.uuid4().hex
    name = f"gha-gh42.1-{machine_id[:8]}"
    async with connect(
        runner.ws_url,
        additional_headers={"Authorization": f"Bearer {job_token(issuer, key)}"},
        open_timeout=WAIT_SECS,
        proxy=None,
    ) as ws:
        reg = register_message(SYSTEM, machine_id=machine_id, name=name, launch_id=launch_id)
        await ws.send(p.encode(reg))
        assert isinstance(await receive(ws), p.Registered)
        await eventually(lambda: launch_id not in scaler.pending)
        assert runner.comps.scheduler.venues[machine_id].launch_id == launch_id

    admin = runner.client(Role.ADMIN)
    resp = await admin.get("/api/v1/launches")
    assert resp.status_code == 200, resp.text
    data = resp.json()
    (launch,) = data["launches"]
    assert launch["launch_id"] == launch_id and launch["pool"] == "gha"
    assert launch["state"] == "registered"
    assert (launch["agent_machine_id"], launch["agent_name"]) == (machine_id, name)
    (pool,) = data["pools"]
    assert (
        pool["name"] == "gha" and pool["workflow"] == "acme/bigtent-agents/bigtent-agent.yml@main"
    )
    assert pool["pending"] == 0 and pool["counters"]["registrations"] == 1
    assert data["counters"] == {
        "launches": 0,
        "registrations": 1,
        "expiries": 0,
        "dispatch_failures": 0,
    }
    # Filters; and only an admin may look.
    assert (await admin.get("/api/v1/launches", params={"pool": "other"})).json()["launches"] == []
    assert (await admin.get("/api/v1/launches", params={"limit": 0})).status_code == 400
    assert (await runner.client(Role.CLIENT).get("/api/v1/launches")).status_code == 403


async def test_an_agent_of_another_repository_does_not_claim_it(
    make_runner: MakeRunner, issuer: LocalIssuer, tls: TlsFiles, key: SigningKey
) -> None:
    config = sections(issuer.url, tls.ca_file)
    config["auth"]["oidc"][0]["repositories"].append("acme/widgets")
    runner = await make_runner(serve=True, **config)
    launch_id = uuid.uuid4().hex
    async with runner.comps.engine.begin() as conn:
        await queries.insert_launch(conn, launch_id, "gha", LaunchState.PENDING, time.time())
    async with connect(
        runner.ws_url,
        additional_headers={"Authorization": f"Bearer {job_token(issuer, key, 'acme/widgets')}"},
        open_timeout=WAIT_SECS,
        proxy=None,
    ) as ws:
        await ws.send(p.encode(register_message(SYSTEM, launch_id=launch_id)))
        assert isinstance(await receive(ws), p.Registered)  # it is an agent, not the pool's
    async with runner.comps.engine.connect() as conn:
        row = await queries.fetch_launch(conn, launch_id)
    assert row is not None and row.state == LaunchState.PENDING and row.agent_machine_id is None


async def test_without_pools_the_route_answers_empty(make_runner: MakeRunner) -> None:
    runner = await make_runner()
    data = (await runner.client(Role.ADMIN).get("/api/v1/launches")).json()
    assert data["pools"] == [] and data["launches"] == []
    assert data["counters"]["launches"] == 0


async def test_a_pool_no_issuer_admits_stops_the_runner_at_start(tmp_path: Path) -> None:
    config = load_runner_config(
        None,
        runner={"state_dir": str(tmp_path), "listen": "127.0.0.1:0", "allow_plaintext": True},
        **sections("https://token.actions.githubusercontent.com", None, audience="elsewhere"),
    )
    with pytest.raises(ConfigError, match=r"autoscale\.github\.0\.audience: 'elsewhere'"):
        await build_components(config)
