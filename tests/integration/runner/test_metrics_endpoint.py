"""``GET /metrics`` on an in-process runner: who may read it, and the counters that the API,
the agent WebSocket, uploads and the cache routes feed (each refusal counted exactly once)."""

from __future__ import annotations

import hashlib

import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from bigtent.config import Role
from bigtent.nix import base32
from tests.integration.runner.conftest import Drvs, MakeRunner, Nix, RunnerHarness, upload_path

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(runner: RunnerHarness) -> Samples:
    resp = await runner.client(Role.CLIENT).get("/metrics")
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    out: Samples = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            out[s.name, frozenset(s.labels.items())] = s.value
    return out


async def auth_failures(runner: RunnerHarness) -> dict[str, float]:
    return {
        dict(labels)["reason"]: v
        for (name, labels), v in (await scrape(runner)).items()
        if name == "bigtent_auth_failures_total"
    }


async def test_metrics_are_public_on_loopback_by_default(make_runner: MakeRunner) -> None:
    runner = await make_runner()
    resp = await runner.client(None).get("/metrics")
    assert resp.status_code == 200
    names = {f.name for f in text_string_to_metric_families(resp.text)}
    assert {"bigtent_queue_depth", "bigtent_agents_connected", "process_cpu_seconds"} <= names
    # Not an API route: not in the OpenAPI document.
    openapi = (await runner.client().get("/api/v1/openapi.json")).json()
    assert "/metrics" not in openapi["paths"]


async def test_metrics_behind_a_token(
    make_runner: MakeRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BIGTENT_RUNNER__METRICS_AUTH", "token")
    runner = await make_runner()
    anonymous = await runner.client(None).get("/metrics")
    assert anonymous.status_code == 401
    assert anonymous.json() == {"error": "missing bearer token", "detail": None}
    assert (await runner.client(Role.AGENT).get("/metrics")).status_code == 403
    assert (await runner.client(Role.ADMIN).get("/metrics")).status_code == 200
    failures = await auth_failures(runner)  # as a client: allowed
    assert failures["missing_credential"] == 1
    assert failures["forbidden"] == 1
    assert sum(failures.values()) == 2


async def test_each_refused_credential_counts_once_with_its_reason(
    make_runner: MakeRunner,
) -> None:
    runner = await make_runner(serve=True)
    assert set((await auth_failures(runner)).values()) == {0}
    # The credential gate (every /api/v1 route).
    assert (await runner.client(None).get("/api/v1/status")).status_code == 401
    assert (await runner.client(token="bt_guess").get("/api/v1/status")).status_code == 401
    # A route's role check (the gate let the valid token through).
    assert (await runner.client(Role.AGENT).get("/api/v1/status")).status_code == 403
    # A JWT on the upload route, with no OIDC issuer configured.
    upload = runner.client(token="aaa.bbb.ccc")
    assert (await upload.put("/api/v1/agent/upload/lease/out", content=b"")).status_code == 401
    # The agent WebSocket, before the upgrade.
    with pytest.raises(InvalidStatus):
        async with connect(
            runner.ws_url, additional_headers={"Authorization": "Bearer bt_guess"}, proxy=None
        ):
            pass
    failures = await auth_failures(runner)
    assert failures == {
        "missing_credential": 1,
        "invalid_token": 2,
        "forbidden": 1,
        "oidc_rejected": 1,
        "oidc_unavailable": 0,
        "rate_limited": 0,
    }


async def test_rate_limited_addresses_count_as_such(make_runner: MakeRunner) -> None:
    runner = await make_runner(auth={"max_failures_per_address": 2})
    for _ in range(3):
        await runner.client(token="bt_guess").get("/api/v1/status")
    failures = await auth_failures(runner)
    assert failures["invalid_token"] == 2
    assert failures["rate_limited"] == 1


@pytest.mark.nix
async def test_uploads_and_narinfo_lookups(make_runner: MakeRunner, nix: Nix, drvs: Drvs) -> None:
    runner = await make_runner()
    client = runner.client(Role.CLIENT)
    up = nix.upload(drvs.source)
    other = base32.format_hash("sha256", hashlib.sha256(b"something else").digest())
    bad = await upload_path(client, up, headers={"X-Nar-Hash": other})
    assert bad.status_code == 400
    assert "hash mismatch" in bad.json()["error"]
    short = await upload_path(client, up, body=up.nar[:-8])
    assert short.status_code == 400
    assert (await upload_path(client, up)).status_code == 201
    assert (await runner.narinfo(drvs.source)).status_code == 200
    assert (await runner.narinfo(drvs.source)).status_code == 200
    assert (await runner.narinfo(drvs.dep)).status_code == 404  # not uploaded
    assert (await runner.client(None).get("/cache/short.narinfo")).status_code == 404
    s = await scrape(runner)
    source = frozenset({("kind", "source")})
    assert s["bigtent_uploads_verified_total", source] == 1
    assert s["bigtent_upload_nar_bytes_total", source] == len(up.nar)
    mismatch = frozenset({("kind", "source"), ("reason", "nar_mismatch")})
    assert s["bigtent_upload_failures_total", mismatch] == 2
    assert s["bigtent_uploads_verified_total", frozenset({("kind", "output")})] == 0
    assert s["bigtent_cache_narinfo_requests_total", frozenset({("result", "hit")})] == 2
    assert s["bigtent_cache_narinfo_requests_total", frozenset({("result", "miss")})] == 2
