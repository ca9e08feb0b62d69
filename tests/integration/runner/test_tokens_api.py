"""Tokens stored through the API (create, list, revoke: admin only; revocation is immediate)
and the per-address limit on credential failures, over HTTP and the agent WebSocket."""

from __future__ import annotations

import json

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from bigtent.config import Role
from bigtent.errors import AuthError
from bigtent.runner.auth.tokens import TokenRegistry, TokenStore, token_digest
from tests.integration.runner.conftest import WAIT_SECS, MakeRunner, RunnerHarness


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def from_address(runner: RunnerHarness, host: str, token: str | None) -> httpx.AsyncClient:
    """An in-process client whose requests come from ``host``."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=runner.app, client=(host, 40000)),
        base_url="http://runner.test",
        headers=headers,
        timeout=WAIT_SECS,
    )
    runner._clients.append(client)
    return client


# ---- /api/v1/tokens ---------------------------------------------------------------------------
async def test_create_list_revoke(make_runner: MakeRunner) -> None:
    runner = await make_runner()
    admin = runner.client(Role.ADMIN)
    resp = await admin.post(
        "/api/v1/tokens", json={"role": "client", "name": "ci", "trusted": True}
    )
    assert resp.status_code == 201, resp.text
    created = resp.json()
    secret = created.pop("token")
    assert secret.startswith("bt_")
    assert created["name"] == "ci" and created["role"] == "client" and created["trusted"]
    assert created["created_by"] == "admin-token" and created["revoked_at"] is None

    # The new token works at once, as a trusted client.
    ci = runner.client(token=secret)
    assert (await ci.get("/api/v1/status")).status_code == 200
    assert runner.comps.tokens.authenticate(secret).trusted

    resp = await admin.post("/api/v1/tokens", json={"role": "agent"})
    assert resp.status_code == 201
    generated = resp.json()["name"]
    assert generated.startswith("agent-")

    listed = await admin.get("/api/v1/tokens")
    assert listed.status_code == 200
    assert [t["name"] for t in listed.json()["tokens"]] == sorted(["ci", generated])
    for t in listed.json()["tokens"]:
        assert set(t) == {"name", "role", "trusted", "created_by", "created_at", "revoked_at"}
    assert token_digest(secret) not in listed.text and secret not in listed.text

    resp = await admin.delete("/api/v1/tokens/ci")
    assert resp.status_code == 200
    assert resp.json()["revoked_at"] is not None
    # Revoked: 401 on the very next request, and the gate answers it (not a stale copy).
    refused = await ci.get("/api/v1/status")
    assert refused.status_code == 401
    assert refused.json() == {"error": "invalid token", "detail": None}
    assert secret not in refused.text

    listed = (await admin.get("/api/v1/tokens")).json()["tokens"]
    assert {t["name"]: t["revoked_at"] is not None for t in listed} == {
        "ci": True,
        generated: False,
    }
    # Revoking again changes nothing; the name stays taken.
    again = await admin.delete("/api/v1/tokens/ci")
    assert again.status_code == 200 and again.json()["revoked_at"] == resp.json()["revoked_at"]
    dup = await admin.post("/api/v1/tokens", json={"role": "client", "name": "ci"})
    assert dup.status_code == 409 and "taken" in dup.json()["error"]


@pytest.mark.parametrize("role", [Role.CLIENT, Role.AGENT])
async def test_token_endpoints_are_admin_only(make_runner: MakeRunner, role: Role) -> None:
    runner = await make_runner()
    made = await runner.client(Role.ADMIN).post("/api/v1/tokens", json={"role": "client"})
    name = made.json()["name"]
    c = runner.client(role)
    for resp in (
        await c.post("/api/v1/tokens", json={"role": "admin"}),
        await c.get("/api/v1/tokens"),
        await c.delete(f"/api/v1/tokens/{name}"),
    ):
        assert resp.status_code == 403, resp.text
        assert set(resp.json()) == {"error", "detail"}
    assert runner.comps.tokens.authenticate(made.json()["token"]).name == name


async def test_a_stored_token_may_hold_any_role(make_runner: MakeRunner) -> None:
    runner = await make_runner()
    admin = runner.client(Role.ADMIN)
    secret = (await admin.post("/api/v1/tokens", json={"role": "admin"})).json()["token"]
    assert (await runner.client(token=secret).get("/api/v1/tokens")).status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/api/v1/tokens", {"role": "client", "name": "client-token"}, 409),  # config
        ("POST", "/api/v1/tokens", {"role": "agent", "trusted": True}, 400),
        ("POST", "/api/v1/tokens", {"role": "king"}, 400),
        ("POST", "/api/v1/tokens", {"role": "client", "name": "a b"}, 400),
        ("POST", "/api/v1/tokens", {"role": "client", "name": "x" * 129}, 400),
        ("DELETE", "/api/v1/tokens/nobody", None, 404),
        ("DELETE", "/api/v1/tokens/agent-token", None, 409),  # configured: edit runner.toml
    ],
)
async def test_refusals(
    make_runner: MakeRunner, method: str, path: str, body: object, status: int
) -> None:
    runner = await make_runner()
    resp = await runner.client(Role.ADMIN).request(method, path, json=body)
    assert resp.status_code == status, resp.text
    assert set(resp.json()) == {"error", "detail"}
    assert runner.comps.tokens.authenticate(runner.tokens[Role.AGENT]).name == "agent-token"


async def test_stored_tokens_are_loaded_at_start(make_runner: MakeRunner) -> None:
    runner = await make_runner()
    admin = runner.client(Role.ADMIN)
    kept = (await admin.post("/api/v1/tokens", json={"role": "client"})).json()["token"]
    gone = (await admin.post("/api/v1/tokens", json={"role": "client", "name": "gone"})).json()
    await admin.delete("/api/v1/tokens/gone")
    # A second registry over the same database, as a restarted runner builds it.
    fresh = TokenRegistry.from_config([])
    await TokenStore(runner.comps.engine, fresh, runner.comps.config).load()
    assert fresh.authenticate(kept).role is Role.CLIENT
    with pytest.raises(AuthError, match="invalid token"):
        fresh.authenticate(gone["token"])


# ---- the credential-failure limit ---------------------------------------------------------------
async def test_repeated_failures_from_one_address_are_limited(make_runner: MakeRunner) -> None:
    runner = await make_runner()
    clock = FakeClock()
    runner.comps.auth_throttle.clock = clock
    limit = runner.comps.config.auth.max_failures_per_address
    window = runner.comps.config.auth.failure_window_secs
    bad = from_address(runner, "192.0.2.7", "bt_guess")
    statuses = []
    for _ in range(limit + 5):
        statuses.append((await bad.get("/api/v1/status")).status_code)
        clock.now += 0.1
    assert statuses == [401] * limit + [429] * 5
    limited = await bad.get("/api/v1/builds")
    assert limited.status_code == 429
    retry_after = int(limited.headers["Retry-After"])
    assert 0 < retry_after <= window
    assert limited.json()["detail"] == {"retry_after_secs": retry_after}
    assert "WWW-Authenticate" not in limited.headers

    # A limited address is limited for every attempt, a good credential included ...
    good_same = from_address(runner, "192.0.2.7", runner.tokens[Role.CLIENT])
    assert (await good_same.get("/api/v1/status")).status_code == 429
    # ... while other addresses are not: good credentials work, bad ones get 401.
    other = from_address(runner, "198.51.100.3", runner.tokens[Role.CLIENT])
    assert (await other.get("/api/v1/status")).status_code == 200
    other_bad = from_address(runner, "198.51.100.3", "bt_guess")
    assert (await other_bad.get("/api/v1/status")).status_code == 401

    # The limit lifts when the window has passed (429s did not extend it).
    clock.now += retry_after
    assert (await good_same.get("/api/v1/status")).status_code == 200
    assert (await bad.get("/api/v1/status")).status_code == 401


async def test_successes_and_wrong_roles_are_not_limited(make_runner: MakeRunner) -> None:
    runner = await make_runner()
    limit = runner.comps.config.auth.max_failures_per_address
    client = runner.client(Role.CLIENT)
    for _ in range(limit + 5):
        assert (await client.get("/api/v1/status")).status_code == 200
        assert (await client.get("/api/v1/tokens")).status_code == 403
    assert (await client.get("/api/v1/status")).status_code == 200


async def test_the_websocket_upgrade_is_limited(make_runner: MakeRunner) -> None:
    runner = await make_runner(serve=True)
    limit = runner.comps.config.auth.max_failures_per_address

    async def attempt(token: str) -> int:
        headers = {"Authorization": f"Bearer {token}"}
        try:
            async with connect(
                runner.ws_url, additional_headers=headers, open_timeout=WAIT_SECS, proxy=None
            ):
                return 101
        except InvalidStatus as exc:
            if exc.response.status_code == 429:
                assert int(exc.response.headers["Retry-After"]) > 0
                body = json.loads(exc.response.body or b"{}")
                assert set(body) == {"error", "detail"}
            return exc.response.status_code

    assert [await attempt("bt_guess") for _ in range(limit)] == [401] * limit
    assert await attempt("bt_guess") == 429
    assert await attempt(runner.tokens[Role.AGENT]) == 429
    # The same address over HTTP shares the limit.
    async with httpx.AsyncClient(base_url=runner.url or "", timeout=WAIT_SECS) as c:
        resp = await c.get(
            "/api/v1/status", headers={"Authorization": f"Bearer {runner.tokens[Role.CLIENT]}"}
        )
    assert resp.status_code == 429 and "Retry-After" in resp.headers
    assert runner.comps.sessions.live == {}
