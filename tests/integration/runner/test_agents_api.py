"""Agent records, drain and restart over ``/api/v1`` and the agent WebSocket: backoff survives
a reconnect, pruned rows leave the listing (history keeps the name), a pruned agent that is
still connected is recorded again, drain is for admins, restart rebuilds."""

from __future__ import annotations

import hashlib
import time
from typing import Any

from pydantic import BaseModel

from bigtent import protocol as p
from bigtent.config import Role
from bigtent.runner.db import queries
from bigtent.runner.scheduler.model import PlannedStep, Venue
from bigtent.runner.venues.agents import prune_agents
from tests.integration.runner.conftest import (
    MakeRunner,
    RunnerHarness,
    agent_socket,
    eventually,
    receive_until,
    register_message,
)

X86 = "x86_64-linux"


def _drv(name: str) -> queries.DrvInfo:
    h = hashlib.sha256(name.encode()).hexdigest()[:32]
    return queries.DrvInfo(
        drv_path=f"/nix/store/{h}-{name}.drv",
        name=name,
        system=X86,
        required_features=frozenset(),
        outputs={"out": f"/nix/store/{h}-{name}"},
        input_drvs={},
        input_srcs=(),
    )


async def _add_build(runner: RunnerHarness, d: queries.DrvInfo) -> int:
    async with runner.comps.engine.begin() as conn:
        await queries.insert_derivation(conn, d)
    return await runner.comps.scheduler.add_build(
        priority=0, created_by="t", roots={d.drv_path: d.drv_path}, planned=[PlannedStep(d, ())]
    )


async def _seed_agent(
    runner: RunnerHarness, machine_id: str, *, ephemeral: bool, last_seen: float, **extra: Any
) -> None:
    async with runner.comps.engine.begin() as conn:
        await queries.upsert_agent(
            conn,
            machine_id,
            name=f"agent-{machine_id}",
            hostname="h",
            systems=f'["{X86}"]',
            supported_features="[]",
            mandatory_features="[]",
            max_jobs=2,
            speed_factor=1.0,
            ephemeral=ephemeral,
            auth_kind="token",
            launch_id=None,
            version="",
            last_seen=last_seen,
            **{"connected": True, **extra},
        )


def _draining(venue: Venue) -> bool:
    """Read the flag afresh (a plain attribute read after ``assert not`` is narrowed away)."""
    return venue.draining


def _venue(name: str, outbox: list[BaseModel]) -> Venue:
    return Venue(
        machine_id=f"id-{name}",
        name=name,
        systems=frozenset({X86}),
        supported_features=frozenset(),
        mandatory_features=frozenset(),
        max_jobs=1,
        speed_factor=1.0,
        send=outbox.append,
    )


async def test_restart_queues_a_cancelled_build_again(make_runner: MakeRunner) -> None:
    runner = await make_runner()
    build_id = await _add_build(runner, _drv("x"))
    # Added without a creator: only an admin may act on it (runner/auth/ownership.py).
    assert (
        await runner.client(Role.CLIENT).post(f"/api/v1/builds/{build_id}/cancel")
    ).status_code == 403
    client = runner.client(Role.ADMIN)
    resp = await client.post(f"/api/v1/builds/{build_id}/cancel")
    assert resp.json()["state"] == "cancelled"
    resp = await client.post(f"/api/v1/builds/{build_id}/restart")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["state"] == "queued" and body["counts"]["runnable"] == 1
    assert (await client.post("/api/v1/builds/999/restart")).status_code == 404
    assert (await runner.client(None).post(f"/api/v1/builds/{build_id}/restart")).status_code == 401
    assert (
        await runner.client(Role.AGENT).post(f"/api/v1/builds/{build_id}/restart")
    ).status_code == 403


async def test_drain_is_admin_only(make_runner: MakeRunner) -> None:
    runner = await make_runner()
    outbox: list[BaseModel] = []
    venue = _venue("build-01", outbox)
    runner.comps.scheduler.attach(venue, [])
    resp = await runner.client(Role.CLIENT).post("/api/v1/agents/build-01/drain")
    assert resp.status_code == 403, resp.text
    assert not venue.draining and outbox == []
    resp = await runner.client(Role.ADMIN).post("/api/v1/agents/build-01/drain")
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"drained": "build-01"}
    assert _draining(venue) and isinstance(outbox[-1], p.Drain)
    resp = await runner.client(Role.ADMIN).post("/api/v1/agents/nobody/drain")
    assert resp.status_code == 404 and "nobody" in resp.json()["error"]


async def test_pruned_agents_leave_the_listing_and_history_keeps_their_name(
    make_runner: MakeRunner,
) -> None:
    runner = await make_runner()
    ttl = runner.comps.config.scheduler.ephemeral_session_ttl_secs
    now = time.time()
    stale = now - ttl - 10
    await _seed_agent(runner, "eph-connected", ephemeral=True, last_seen=stale)
    await _seed_agent(runner, "eph-gone", ephemeral=True, last_seen=stale, connected=False)
    await _seed_agent(
        runner,
        "old-persistent",
        ephemeral=False,
        last_seen=stale,
        connected=False,
        backoff_until=now + 600,
        consecutive_failures=3,
    )
    build_id = await _add_build(runner, _drv("x"))
    step_id = runner.comps.scheduler.by_drv[_drv("x").drv_path]
    async with runner.comps.engine.begin() as conn:
        await queries.update_step(
            conn, step_id, agent_machine_id="eph-gone", agent_name="agent-eph-gone"
        )
    client = runner.client(Role.CLIENT)
    listed = (await client.get("/api/v1/agents")).json()["agents"]
    assert [a["name"] for a in listed] == [
        "agent-eph-connected",
        "agent-eph-gone",
        "agent-old-persistent",
    ]
    persistent = listed[2]
    # Every agent answers every field, in this order (apimodels.Agent; docs/api.md).
    assert all(list(a) == AGENT_FIELDS for a in listed)
    # A gone agent's backoff is shown from its row (it gets it back when it reconnects).
    assert persistent["connected"] is False and persistent["backoff_until"] is not None
    assert persistent["consecutive_failures"] == 3 and persistent["ephemeral"] is False

    assert await prune_agents(runner.comps.engine, now, ttl) == ["eph-connected", "eph-gone"]
    listed = (await client.get("/api/v1/agents")).json()["agents"]
    assert [a["name"] for a in listed] == ["agent-old-persistent"]
    steps = (await client.get(f"/api/v1/builds/{build_id}/steps")).json()["steps"]
    assert [s["agent_name"] for s in steps] == ["agent-eph-gone"]


async def test_backoff_is_restored_when_the_agent_reconnects(make_runner: MakeRunner) -> None:
    runner = await make_runner(serve=True)
    until = time.time() + 600
    await _seed_agent(
        runner,
        "flappy",
        ephemeral=False,
        last_seen=time.time() - 5,
        connected=False,
        backoff_until=until,
        consecutive_failures=4,
    )
    async with agent_socket(runner) as ws:
        await ws.send(p.encode(register_message(X86, machine_id="flappy", name="flappy")))
        await receive_until(ws, p.Registered)
        venue = runner.comps.scheduler.venues["flappy"]
        assert (venue.consecutive_failures, venue.backoff_until) == (4, until)
        listed = (await runner.client(Role.CLIENT).get("/api/v1/agents")).json()["agents"]
        assert listed[0]["connected"] is True and listed[0]["backoff_until"] is not None


async def test_a_pruned_agent_still_connected_is_recorded_again(make_runner: MakeRunner) -> None:
    runner = await make_runner(serve=True)
    engine = runner.comps.engine

    async def names() -> list[str]:
        async with engine.connect() as conn:
            return [r.name for r in await queries.fetch_agents(conn)]

    async with agent_socket(runner) as ws:
        reg = register_message(X86, name="eph-1", ephemeral=True)
        await ws.send(p.encode(reg))
        await receive_until(ws, p.Registered)
        assert await names() == ["eph-1"]
        ttl = runner.comps.config.scheduler.ephemeral_session_ttl_secs
        assert await prune_agents(engine, time.time() + ttl + 1, ttl) == [reg.machine_id]
        assert await names() == []
        await ws.send(p.encode(p.Heartbeat()))

        async def recorded() -> bool:
            return await names() == ["eph-1"]

        await eventually(recorded)
        async with engine.connect() as conn:
            [row] = await queries.fetch_agents(conn)
        assert (row.ephemeral, row.connected, row.auth_kind) == (True, True, "token")


AGENT_FIELDS = [
    "machine_id",
    "name",
    "hostname",
    "systems",
    "supported_features",
    "mandatory_features",
    "max_jobs",
    "running",
    "speed_factor",
    "ephemeral",
    "trusted",
    "build_repositories",
    "auth_kind",
    "oidc",
    "launch_id",
    "version",
    "connected",
    "draining",
    "free_store_bytes",
    "has_room",
    "first_seen",
    "last_seen",
    "steps_succeeded",
    "steps_failed",
    "infra_failures",
    "consecutive_failures",
    "backoff_until",
    "unhealthy",
    "last_error",
]
"""The fields of ``GET /agents``' agents, as the runner answered them before they had a model."""
