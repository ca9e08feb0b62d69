"""Who may cancel, bump or restart a build through the API (one rule, ``auth/ownership.py``):
a client acts on the builds it created, an admin on all. Every action is recorded with its
actor in the build's history (``GET /api/v1/builds/{id}`` ``events``); a refusal changes
nothing, records nothing and is logged with the would-be actor."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest

from bigtent.config import Role
from tests.integration.runner.conftest import (
    Drvs,
    MakeRunner,
    Nix,
    RunnerHarness,
    upload_closure,
)

pytestmark = pytest.mark.nix


async def stored_client(runner: RunnerHarness, name: str, *, trusted: bool) -> httpx.AsyncClient:
    resp = await runner.client(Role.ADMIN).post(
        "/api/v1/tokens", json={"role": "client", "name": name, "trusted": trusted}
    )
    assert resp.status_code == 201, resp.text
    return runner.client(None, token=resp.json()["token"])


async def build_json(runner: RunnerHarness, build_id: int) -> dict[str, Any]:
    resp = await runner.client(Role.ADMIN).get(f"/api/v1/builds/{build_id}")
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


async def test_only_the_creator_or_an_admin_acts_on_a_build(
    make_runner: MakeRunner, nix: Nix, drvs: Drvs, caplog: pytest.LogCaptureFixture
) -> None:
    runner = await make_runner()
    await upload_closure(runner, nix, drvs.closure)
    main = await stored_client(runner, "ci-main", trusted=True)
    pull_request = await stored_client(runner, "ci-pr-7", trusted=False)
    other = await stored_client(runner, "ci-other", trusted=True)
    admin = runner.client(Role.ADMIN)

    resp = await main.post(
        "/api/v1/builds", json={"drvs": [drvs.top], "ref": "refs/heads/main", "priority": 1}
    )
    assert resp.status_code == 201, resp.text
    build = resp.json()
    build_id = build["id"]
    assert (build["trusted"], build["created_by"]) == (True, "ci-main")
    before = await build_json(runner, build_id)
    assert before["events"] == []

    # The untrusted pull-request token on the trusted main-branch build, and another client:
    # 403, nothing changes, nothing is recorded; the refusal is logged with its actor.
    attacks = [
        (pull_request, "cancel", None),
        (pull_request, "bump", {"priority": 1000}),
        (pull_request, "restart", None),
        (other, "cancel", None),
        (other, "bump", {"priority": 1000}),
        (other, "restart", None),
    ]
    with caplog.at_level(logging.WARNING, logger="bigtent"):
        for client, action, body in attacks:
            resp = await client.post(f"/api/v1/builds/{build_id}/{action}", json=body)
            assert resp.status_code == 403, (action, resp.text)
            assert f"may not {action} build {build_id}" in resp.json()["error"]
    after = await build_json(runner, build_id)
    assert {k: after[k] for k in ("state", "priority", "counts", "events")} == {
        k: before[k] for k in ("state", "priority", "counts", "events")
    }
    refusals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused")]
    assert len(refusals) == len(attacks)
    assert sum("ci-pr-7" in m for m in refusals) == 3
    assert sum("ci-other" in m for m in refusals) == 3
    assert all("created by ci-main" in m for m in refusals)
    # An unknown build stays a 404 for everyone (no hint about whose it would be).
    resp = await pull_request.post("/api/v1/builds/999/cancel")
    assert resp.status_code == 404

    # The owner may.
    resp = await main.post(f"/api/v1/builds/{build_id}/bump", json={"priority": 5})
    assert resp.status_code == 200, resp.text
    assert resp.json()["priority"] == 5
    # An admin may (on a build it did not create).
    resp = await admin.post(f"/api/v1/builds/{build_id}/cancel")
    assert resp.status_code == 200 and resp.json()["state"] == "cancelled"
    resp = await main.post(f"/api/v1/builds/{build_id}/restart")
    assert resp.status_code == 200 and resp.json()["state"] == "queued"
    # A cancel of a build that already ended records nothing (nothing happened).
    events = (await build_json(runner, build_id))["events"]
    assert [(e["kind"], e["actor"]) for e in events] == [
        ("bumped", "ci-main"),
        ("cancelled", "admin-token"),
        ("restarted", "ci-main"),
    ]
    assert events[0]["detail"] == "priority 1 -> 5"
    assert events[2]["detail"] == "2 steps queued again"
    assert all(e["at"] is not None for e in events)
    assert [e["id"] for e in events] == sorted(e["id"] for e in events)


async def test_a_pull_request_token_acts_on_its_own_build(
    make_runner: MakeRunner, nix: Nix, drvs: Drvs
) -> None:
    runner = await make_runner()
    await upload_closure(runner, nix, drvs.closure)
    pull_request = await stored_client(runner, "ci-pr-8", trusted=False)
    resp = await pull_request.post(
        "/api/v1/builds", json={"drvs": [drvs.top], "ref": "refs/pull/8/merge"}
    )
    assert resp.status_code == 201, resp.text
    build_id = resp.json()["id"]
    assert resp.json()["trusted"] is False
    resp = await pull_request.post(f"/api/v1/builds/{build_id}/cancel")
    assert resp.status_code == 200 and resp.json()["state"] == "cancelled"
    events = (await build_json(runner, build_id))["events"]
    assert [(e["kind"], e["actor"]) for e in events] == [("cancelled", "ci-pr-8")]


async def test_a_retried_submission_finds_its_build(
    make_runner: MakeRunner, nix: Nix, drvs: Drvs
) -> None:
    """The same submission key and token: the same build (200); another token's key names
    another submission; a key that does not fit is a 400."""
    runner = await make_runner()
    await upload_closure(runner, nix, drvs.closure)
    main = await stored_client(runner, "ci-main", trusted=True)
    other = await stored_client(runner, "ci-other", trusted=True)
    body = {"drvs": [drvs.top], "submission": "k" * 32}
    first = await main.post("/api/v1/builds", json=body)
    assert first.status_code == 201, first.text
    again = await main.post("/api/v1/builds", json=body)
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"]
    theirs = await other.post("/api/v1/builds", json=body)
    assert theirs.status_code == 201 and theirs.json()["id"] != first.json()["id"]
    for bad in ("short", "x" * 65, "k" * 31 + "/"):
        resp = await main.post("/api/v1/builds", json={"drvs": [drvs.top], "submission": bad})
        assert resp.status_code == 400, bad
    listed = (await main.get("/api/v1/builds")).json()["builds"]
    assert len(listed) == 2
    assert (await build_json(runner, first.json()["id"]))["events"] == []
