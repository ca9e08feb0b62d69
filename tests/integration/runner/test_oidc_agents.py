"""OIDC-authenticated agents on the agent WebSocket under a real uvicorn, with a loopback
HTTPS issuer minting real RS256 tokens (architecture §6): a valid JWT registers an ephemeral agent
whose identity the API shows; a refused one is answered before the upgrade and leaves no
row; a JWT is never a credential for the HTTP API."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from bigtent import protocol as p
from bigtent.config import Role
from tests.integration.runner.conftest import (
    WAIT_SECS,
    Drvs,
    MakeRunner,
    Nix,
    RunnerHarness,
    agent_socket,
    receive,
    receive_until,
    register,
    register_message,
    upload_closure,
)
from tests.integration.runner.oidc_issuer import (
    LocalIssuer,
    SigningKey,
    TlsFiles,
    mint,
)

REPO = "acme/widgets"
SUB = "repo:acme/widgets:ref:refs/heads/main"
WORKFLOW = "acme/widgets/.github/workflows/agents.yml@refs/heads/main"
SYSTEM = "x86_64-linux"


def oidc_auth(issuer: LocalIssuer, tls: TlsFiles) -> dict[str, Any]:
    return {
        "oidc": [
            {
                "issuer": issuer.url,
                "audiences": ["bigtent"],
                "ca_file": str(tls.ca_file),
                "repositories": [REPO],
            }
        ]
    }


def job_token(issuer: LocalIssuer, key: SigningKey, **change: Any) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": issuer.url,
        "aud": "bigtent",
        "sub": SUB,
        "repository": REPO,
        "ref": "refs/heads/main",
        "job_workflow_ref": WORKFLOW,
        "iat": now,
        "nbf": now,
        "exp": now + 300,
    }
    return mint(key, claims | change)


def oidc_socket(runner: RunnerHarness, token: str) -> connect:
    return connect(
        runner.ws_url,
        additional_headers={"Authorization": f"Bearer {token}"},
        open_timeout=WAIT_SECS,
        proxy=None,
    )


async def register_persistent(ws: ClientConnection, **overrides: Any) -> p.RunnerMessage:
    """Register claiming ``ephemeral: false``; the runner's first answer."""
    await ws.send(p.encode(register_message(SYSTEM, ephemeral=False, **overrides)))
    return await receive(ws)


async def agents(runner: RunnerHarness) -> list[dict[str, Any]]:
    resp = await runner.client(Role.CLIENT).get("/api/v1/agents")
    assert resp.status_code == 200, resp.text
    rows: list[dict[str, Any]] = resp.json()["agents"]
    return rows


async def test_a_valid_jwt_registers_an_ephemeral_oidc_agent(
    make_runner: MakeRunner, issuer: LocalIssuer, tls: TlsFiles, key: SigningKey
) -> None:
    runner = await make_runner(serve=True, auth=oidc_auth(issuer, tls))
    async with oidc_socket(runner, job_token(issuer, key)) as ws:
        assert isinstance(await register_persistent(ws), p.Registered)
        (agent,) = await agents(runner)
        assert agent["ephemeral"] is True
        assert agent["auth_kind"] == "oidc"
        assert agent["oidc"] == {
            "issuer": issuer.url,
            "repository": REPO,
            "subject": SUB,
            "workflow_ref": WORKFLOW,
            "ref": "refs/heads/main",
        }
        # A token agent next to it keeps auth_kind token and no identity.
        async with agent_socket(runner) as token_ws:
            await register(runner, token_ws, SYSTEM)
            by_kind = {a["auth_kind"]: a for a in await agents(runner)}
            assert by_kind["token"]["oidc"] is None
            assert by_kind["token"]["ephemeral"] is False


@pytest.mark.nix
async def test_an_oidc_agent_receives_an_assign_for_a_runnable_step(
    make_runner: MakeRunner,
    issuer: LocalIssuer,
    tls: TlsFiles,
    key: SigningKey,
    nix: Nix,
    drvs: Drvs,
    nix_system: str,
) -> None:
    runner = await make_runner(serve=True, auth=oidc_auth(issuer, tls))
    await upload_closure(runner, nix, drvs.closure)
    client = runner.client(Role.CLIENT)
    # A build of the repository the issuer rule allows (an OIDC agent serves no other).
    resp = await client.post("/api/v1/builds", json={"drvs": [drvs.top], "repository": REPO})
    assert resp.status_code == 201, resp.text
    async with oidc_socket(runner, job_token(issuer, key)) as ws:
        await ws.send(p.encode(register_message(nix_system, ephemeral=False)))
        assert isinstance(await receive(ws), p.Registered)
        assign = await receive_until(ws, p.Assign)
        assert assign.drv_path == drvs.dep
        # It uploads with the same JWT: the credential passes and the NAR itself is judged
        # (this one is garbage); a JWT for another audience does not get that far.
        url = assign.upload_urls["out"]
        headers = {"X-Nar-Hash": "sha256:" + "0" * 52, "X-Nar-Size": "4"}
        good = runner.client(None, token=job_token(issuer, key))
        resp = await good.put(url, content=b"nope", headers=headers)
        assert resp.status_code == 400, resp.text
        bad = runner.client(None, token=job_token(issuer, key, aud="someone-else"))
        resp = await bad.put(url, content=b"nope", headers=headers)
        assert resp.status_code == 401, resp.text


@pytest.mark.parametrize(
    ("change", "status", "reason"),
    [
        ({"aud": "someone-else"}, 401, "token audience not accepted"),
        ({"repository": "mallory/widgets"}, 403, "repository not allowed"),
    ],
    ids=["wrong audience", "repository not allowed"],
)
async def test_a_refused_jwt_is_rejected_before_the_upgrade(
    make_runner: MakeRunner,
    issuer: LocalIssuer,
    tls: TlsFiles,
    key: SigningKey,
    change: dict[str, Any],
    status: int,
    reason: str,
) -> None:
    runner = await make_runner(serve=True, auth=oidc_auth(issuer, tls))
    token = job_token(issuer, key, **change)
    with pytest.raises(InvalidStatus) as caught:
        async with oidc_socket(runner, token):
            pass
    response = caught.value.response
    assert response.status_code == status
    assert json.loads(response.body or b"{}") == {"error": reason, "detail": None}
    assert token.encode() not in (response.body or b"")
    assert runner.comps.sessions.live == {}
    assert await agents(runner) == []


async def test_a_jwt_without_configured_issuers_is_unauthorized(
    make_runner: MakeRunner, issuer: LocalIssuer, key: SigningKey
) -> None:
    runner = await make_runner(serve=True)
    assert runner.comps.oidc is None
    with pytest.raises(InvalidStatus) as caught:
        async with oidc_socket(runner, job_token(issuer, key)):
            pass
    assert caught.value.response.status_code == 401
    assert await agents(runner) == []


async def test_a_jwt_is_no_credential_for_the_http_api(
    make_runner: MakeRunner, issuer: LocalIssuer, tls: TlsFiles, key: SigningKey
) -> None:
    runner = await make_runner(serve=True, auth=oidc_auth(issuer, tls))
    token = job_token(issuer, key)
    for path in ("/api/v1/builds", "/api/v1/agents", "/api/v1/status"):
        resp = await runner.client(None, token=token).get(path)
        assert resp.status_code == 401, (path, resp.text)
    assert issuer.jwks_fetches == 0  # the HTTP gate never hands a JWT to the verifier


async def test_an_oidc_agent_cannot_take_over_a_token_agents_machine_id(
    make_runner: MakeRunner, issuer: LocalIssuer, tls: TlsFiles, key: SigningKey
) -> None:
    runner = await make_runner(serve=True, auth=oidc_auth(issuer, tls))
    machine_id = uuid.uuid4().hex
    async with agent_socket(runner) as token_ws:
        await token_ws.send(p.encode(register_message(SYSTEM, machine_id=machine_id)))
        assert isinstance(await receive(token_ws), p.Registered)
        async with oidc_socket(runner, job_token(issuer, key)) as ws:
            answer = await register_persistent(ws, machine_id=machine_id)
            assert isinstance(answer, p.Error) and "in use" in answer.message
            with pytest.raises(ConnectionClosed):
                await receive(ws)
        assert runner.comps.sessions.live[machine_id].identity is None
        (agent,) = await agents(runner)
        assert (agent["auth_kind"], agent["ephemeral"], agent["oidc"]) == ("token", False, None)
