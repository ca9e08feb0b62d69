"""Builds, steps and authentication on ``/api/v1``: unknown things are 404 with a JSON error,
credentials are checked per role, and a refused request changes nothing."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from bigtent.config import Role
from tests.integration.runner.conftest import Drvs, MakeRunner, Nix, upload_closure

BIG = 2**70


def _assert_error(resp: httpx.Response, status: int, says: str = "") -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = resp.json()
    assert set(body) == {"error", "detail"}
    assert says.lower() in body["error"].lower(), body
    return body


@pytest.mark.nix
async def test_build_from_unknown_drv_is_404(make_runner: MakeRunner, nix: Nix, drvs: Drvs) -> None:
    runner = await make_runner()
    client = runner.client(Role.CLIENT)
    resp = await client.post("/api/v1/builds", json={"drvs": [drvs.top]})
    body = _assert_error(resp, 404, says=f"unknown derivation {drvs.top}")
    assert "upload" in body["error"]
    # Its dependencies being unknown is the same answer, naming the missing one.
    await upload_closure(runner, nix, (drvs.source,))
    builds = await client.get("/api/v1/builds")
    assert builds.json() == {"builds": []}


@pytest.mark.parametrize(
    ("drvs", "says"),
    [
        ([], "invalid request"),
        (["not-a-path"], "not a store path"),
        (["/nix/store/" + "0" * 32 + "-x"], "not a derivation"),
        (["/tmp/" + "0" * 32 + "-x.drv"], "not a store path"),
    ],
)
async def test_build_with_bad_drv_paths_is_400(
    make_runner: MakeRunner, drvs: list[str], says: str
) -> None:
    runner = await make_runner()
    client = runner.client(Role.CLIENT)
    _assert_error(await client.post("/api/v1/builds", json={"drvs": drvs}), 400, says)
    _assert_error(await client.post("/api/v1/builds", content=b"{nope"), 400, "invalid request")
    assert (await client.get("/api/v1/builds")).json() == {"builds": []}


@pytest.mark.nix
async def test_build_from_uploaded_closure(make_runner: MakeRunner, nix: Nix, drvs: Drvs) -> None:
    runner = await make_runner()
    await upload_closure(runner, nix, drvs.closure)
    client = runner.client(Role.CLIENT)
    resp = await client.post("/api/v1/builds", json={"drvs": [drvs.top], "priority": 5})
    assert resp.status_code == 201, resp.text
    build = resp.json()
    assert build["state"] == "queued"
    assert build["priority"] == 5
    (root,) = build["roots"]
    assert root["drv_path"] == drvs.top
    assert root["outputs"] == nix.outputs(drvs.top)
    assert root["state"] == "waiting"
    assert build["counts"] | {} == {
        "total": 2,
        "waiting": 1,
        "runnable": 1,
        "running": 0,
        "succeeded": 0,
        "failed": 0,
        "cancelled": 0,
    }

    got = await client.get(f"/api/v1/builds/{build['id']}")
    assert got.status_code == 200
    assert got.json()["failed_steps"] == []
    assert got.json()["roots"] == build["roots"]

    steps = (await client.get(f"/api/v1/builds/{build['id']}/steps")).json()["steps"]
    by_drv = {s["drv_path"]: s for s in steps}
    assert set(by_drv) == {drvs.top, drvs.dep}
    assert by_drv[drvs.dep]["state"] == "runnable"
    assert by_drv[drvs.top]["state"] == "waiting"
    assert by_drv[drvs.top]["id"] == root["step_id"]
    assert by_drv[drvs.dep]["outputs"] == nix.outputs(drvs.dep)
    step = await client.get(f"/api/v1/steps/{root['step_id']}")
    assert step.status_code == 200 and step.json()["name"] == "top"
    log = await client.get(f"/api/v1/steps/{root['step_id']}/log")
    assert log.status_code == 200 and log.text == ""

    listed = (await client.get("/api/v1/builds")).json()["builds"]
    assert [b["id"] for b in listed] == [build["id"]]


@pytest.mark.nix
async def test_build_list_filters_in_the_query(
    make_runner: MakeRunner, nix: Nix, drvs: Drvs
) -> None:
    runner = await make_runner()
    await upload_closure(runner, nix, drvs.closure)
    client, admin = runner.client(Role.CLIENT), runner.client(Role.ADMIN)
    made: list[int] = []
    for who, extra in [
        (client, {"repository": "acme/widgets", "ref": "refs/heads/main"}),
        (admin, {"repository": "acme/widgets", "ref": "refs/pull/7/head"}),
        (client, {}),
    ]:
        resp = await who.post("/api/v1/builds", json={"drvs": [drvs.top], **extra})
        assert resp.status_code == 201, resp.text
        made.append(resp.json()["id"])
    first, second, third = made
    assert (await admin.post(f"/api/v1/builds/{second}/cancel")).status_code == 200

    async def ids(**params: Any) -> list[int]:
        resp = await client.get("/api/v1/builds", params=params)
        assert resp.status_code == 200, resp.text
        return [b["id"] for b in resp.json()["builds"]]

    assert await ids() == [third, second, first]
    assert await ids(mine="true") == [third, first]  # the client token's builds
    assert await ids(state="cancelled") == [second]
    assert await ids(state="queued,cancelled", limit=2) == [third, second]
    assert await ids(state=["queued", "running"]) == [third, first]
    assert await ids(repository="acme/widgets") == [second, first]
    assert await ids(repository="acme/widgets", ref="refs/heads/main") == [first]
    assert await ids(repository="acme/other") == []
    assert await ids(mine="true", state="cancelled") == []
    resp = await client.get("/api/v1/builds", params={"state": "done"})
    _assert_error(resp, 400, "unknown build state 'done'")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/v1/builds/{id}"),
        ("GET", "/api/v1/builds/{id}/steps"),
        ("POST", "/api/v1/builds/{id}/cancel"),
        ("POST", "/api/v1/builds/{id}/bump"),
        ("GET", "/api/v1/steps/{id}"),
        ("GET", "/api/v1/steps/{id}/log"),
        ("GET", "/api/v1/steps/{id}/events"),
    ],
)
@pytest.mark.parametrize("ident", [999, 0, -1, 2**31, 2**62, BIG])
async def test_unknown_ids_are_404(
    make_runner: MakeRunner, method: str, path: str, ident: int
) -> None:
    runner = await make_runner()
    client = runner.client(Role.CLIENT)
    resp = await client.request(method, path.format(id=ident))
    _assert_error(resp, 404, says="no ")


async def test_non_numeric_id_is_400(make_runner: MakeRunner) -> None:
    runner = await make_runner()
    client = runner.client(Role.CLIENT)
    _assert_error(await client.get("/api/v1/builds/abc"), 400, "invalid request")
    _assert_error(await client.get("/api/v1/nothing/here"), 404)


Route = tuple[str, str, Any]
_CLIENT_ROUTES: list[Route] = [
    ("GET", "/api/v1/status", None),
    ("POST", "/api/v1/paths/missing", {"paths": []}),
    ("PUT", "/api/v1/paths/" + "0" * 32 + "-x", None),
    ("POST", "/api/v1/builds", {"drvs": ["/nix/store/" + "0" * 32 + "-x.drv"]}),
    ("GET", "/api/v1/builds", None),
    ("GET", "/api/v1/builds/1", None),
    ("GET", "/api/v1/builds/1/steps", None),
    ("POST", "/api/v1/builds/1/cancel", None),
    ("POST", "/api/v1/builds/1/bump", None),
    ("GET", "/api/v1/steps/1", None),
    ("GET", "/api/v1/steps/1/log", None),
    ("GET", "/api/v1/steps/1/events", None),
    ("GET", "/api/v1/agents", None),
]
_AGENT_ROUTES: list[Route] = [("PUT", "/api/v1/agent/upload/some-lease/out", None)]
_ADMIN_ROUTES: list[Route] = [("POST", "/api/v1/agents/someone/drain", None)]


@pytest.mark.parametrize(
    ("method", "path", "body", "role", "status"),
    [(*r, None, 401) for r in _CLIENT_ROUTES + _AGENT_ROUTES + _ADMIN_ROUTES]
    + [(*r, Role.AGENT, 403) for r in _CLIENT_ROUTES + _ADMIN_ROUTES]
    + [(*r, Role.CLIENT, 403) for r in _AGENT_ROUTES + _ADMIN_ROUTES],
)
async def test_auth_is_checked_per_role(
    make_runner: MakeRunner,
    method: str,
    path: str,
    body: Any,
    role: Role | None,
    status: int,
) -> None:
    runner = await make_runner()
    client = runner.client(role)
    resp = await client.request(method, path, json=body)
    err = _assert_error(resp, status)
    for token in runner.tokens.values():
        assert token not in resp.text
    assert err["detail"] is None
    if status == 401:
        assert resp.headers.get("www-authenticate") == "Bearer"
    # Nothing happened: no build was created, nothing was stored.
    admin = runner.client(Role.ADMIN)
    assert (await admin.get("/api/v1/builds")).json() == {"builds": []}
    assert runner.nar_files() == [] and runner.temp_files() == []


@pytest.mark.parametrize(
    "authorization",
    ["Bearer bt_wrong", "Bearer", "Basic dXNlcjpwYXNz", "bt_nobearer", "Bearer  "],
)
async def test_bad_credentials_are_401_and_not_echoed(
    make_runner: MakeRunner, authorization: str
) -> None:
    runner = await make_runner()
    client = runner.client(None)
    resp = await client.get("/api/v1/builds", headers={"Authorization": authorization})
    _assert_error(resp, 401)
    secret = authorization.partition(" ")[2].strip()
    if secret:
        assert secret not in resp.text


async def test_admin_may_do_everything(make_runner: MakeRunner) -> None:
    runner = await make_runner()
    admin = runner.client(Role.ADMIN)
    assert (await admin.get("/api/v1/status")).status_code == 200
    _assert_error(await admin.put("/api/v1/agent/upload/no-lease/out"), 409, "lease")
    _assert_error(await admin.post("/api/v1/agents/nobody/drain"), 404, "no connected agent")


async def test_cache_is_public_and_answers_404_json(make_runner: MakeRunner) -> None:
    runner = await make_runner()
    anon = runner.client(None)
    info = await anon.get("/cache/nix-cache-info")
    assert info.status_code == 200
    assert "StoreDir: /nix/store" in info.text
    _assert_error(await anon.get("/cache/" + "0" * 32 + ".narinfo"), 404)
    _assert_error(await anon.get("/cache/short.narinfo"), 404)
    _assert_error(await anon.get("/cache/nar/nothing.nar.zst"), 404)
    _assert_error(await anon.get("/cache/nar/..%2F..%2Fbigtent.db"), 404)
    _assert_error(await anon.get("/cache/nar/.."), 404)


async def test_anonymous_body_is_refused_before_it_is_read(make_runner: MakeRunner) -> None:
    """No credential, a malformed body: the answer is about the credential (401), not the
    body (400) — the body was never read."""
    runner = await make_runner()
    anon = runner.client(None)
    for path in ("/api/v1/builds", "/api/v1/paths/missing"):
        _assert_error(await anon.post(path, content=b"{not json" * 1000), 401)
    assert (await anon.get("/api/v1/openapi.json")).status_code == 200


@pytest.mark.nix
async def test_a_log_past_retention_says_it_expired(
    make_runner: MakeRunner, nix: Nix, drvs: Drvs
) -> None:
    runner = await make_runner(scheduler={"log_retention_days": 1})
    client = runner.client(Role.CLIENT)
    await upload_closure(runner, nix, drvs.closure)
    build = (await client.post("/api/v1/builds", json={"drvs": [drvs.top]})).json()
    steps = (await client.get(f"/api/v1/builds/{build['id']}/steps")).json()["steps"]
    old, recent = steps[0]["id"], steps[1]["id"]
    runner.comps.logs.append(recent, ["kept"])
    runner.comps.logs.close(recent)
    await client.post(f"/api/v1/builds/{build['id']}/cancel")  # every step final
    async with runner.comps.engine.begin() as conn:
        await conn.execute(
            sa.text("UPDATE steps SET finished_at = :at WHERE id = :id"),
            {"at": runner.comps.scheduler.clock() - 2 * 86400, "id": old},
        )
    log = await client.get(f"/api/v1/steps/{old}/log")
    assert log.status_code == 200 and log.headers["x-bigtent-log-expired"] == "true"
    assert "log expired" in log.text and "1 days" in log.text
    assert (await client.get(f"/api/v1/steps/{old}")).json()["log_expired"] is True
    # A step that finished within the retention keeps its log, and says so.
    log = await client.get(f"/api/v1/steps/{recent}/log")
    assert log.text == "kept\n" and "x-bigtent-log-expired" not in log.headers
    assert (await client.get(f"/api/v1/steps/{recent}")).json()["log_expired"] is False
