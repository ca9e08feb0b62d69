"""A protocol-speaking hostile agent sends numbers out of every range (issue: unbounded
integers from agents). The runner refuses the message with an ``error`` and closes that
session; viewers keep getting pages, the scheduler does not reload, and a step the hostile
agent held goes to another agent at once rather than at its lease's expiry."""

from __future__ import annotations

import json
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from bigtent import protocol as p
from bigtent.config import Role
from tests.integration.runner.conftest import (
    Drvs,
    MakeRunner,
    Nix,
    RunnerHarness,
    agent_socket,
    eventually,
    receive,
    receive_until,
    register,
    register_message,
    upload_closure,
)

LONG_LEASE = {"lease_secs": 600.0, "retry_base_secs": 0.0}
"""A lease that cannot expire during a test: a step freed early was freed by the refusal."""


def _count_recoveries(runner: RunnerHarness, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    scheduler = runner.comps.scheduler
    real = scheduler.recover
    calls: list[int] = []

    async def counting(*, quiet: bool = False) -> None:
        if not quiet:  # a reload after a failure (a quiet one follows the listener connecting)
            calls.append(1)
        await real(quiet=quiet)

    monkeypatch.setattr(scheduler, "recover", counting)
    return calls


async def _refused_then_closed(ws: ClientConnection, names: str) -> None:
    msg = await receive_until(ws, p.Error)
    assert names in msg.message, msg.message
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await receive(ws)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


async def _pages_answer(runner: RunnerHarness) -> None:
    viewer = runner.client(Role.CLIENT)
    page = await viewer.get("/agents")
    assert page.status_code == 200, page.text
    api = await viewer.get("/api/v1/agents")
    assert api.status_code == 200, api.text


_HOSTILE_HEARTBEATS: dict[str, tuple[dict[str, Any], str]] = {
    "memory-10**400": ({"memory_used_bytes": 10**400}, "memory_used_bytes"),
    "memory-negative": ({"memory_total_bytes": -1}, "memory_total_bytes"),
    "free-store-2**64": ({"free_store_bytes": 2**64}, "free_store_bytes"),
    "load-1e400": ({"load": 1e400}, "load"),
    "psi-huge": ({"psi_cpu_some_avg10": 1e300}, "psi_cpu_some_avg10"),
    "running-10**30": ({"running": [10**30]}, "running"),
}


@pytest.mark.parametrize("case", sorted(_HOSTILE_HEARTBEATS))
async def test_a_heartbeat_out_of_range_is_refused_and_viewers_still_see_pages(
    make_runner: MakeRunner,
    nix_system: str,
    monkeypatch: pytest.MonkeyPatch,
    case: str,
) -> None:
    runner = await make_runner(serve=True)
    recoveries = _count_recoveries(runner, monkeypatch)
    fields, names = _HOSTILE_HEARTBEATS[case]
    async with agent_socket(runner) as good:
        await register(runner, good, nix_system)
        await good.send(p.encode(p.Heartbeat(memory_used_bytes=2**30, memory_total_bytes=2**34)))
        async with agent_socket(runner) as ws:
            await register(runner, ws, nix_system)
            # Python's json writes 1e400 as "Infinity"; send the number as JSON text.
            text = json.dumps({"type": "heartbeat", **fields}).replace("Infinity", "1e400")
            await ws.send(text)
            await _refused_then_closed(ws, names)
            await _pages_answer(runner)
        await eventually(lambda: len(runner.comps.sessions.live) == 1)
        await _pages_answer(runner)
    assert recoveries == []
    assert runner.comps.scheduler.recovery is None


_HOSTILE_RESULTS: dict[str, tuple[dict[str, Any], str]] = {
    "exit-code-10**30": ({"exit_code": 10**30}, "exit_code"),
    "build-secs-negative": ({"timings": {"build_secs": -5}}, "build_secs"),
    "nar-size-2**70": (
        {"outputs": [{"name": "out", "path": "/nix/store/x-y", "nar_size": 2**70}]},
        "nar_size",
    ),
}


@pytest.mark.nix
@pytest.mark.parametrize("case", sorted(_HOSTILE_RESULTS))
async def test_a_result_out_of_range_is_refused_and_its_step_goes_elsewhere_at_once(
    make_runner: MakeRunner,
    nix: Nix,
    drvs: Drvs,
    nix_system: str,
    monkeypatch: pytest.MonkeyPatch,
    case: str,
) -> None:
    runner = await make_runner(serve=True, scheduler=LONG_LEASE)
    recoveries = _count_recoveries(runner, monkeypatch)
    await upload_closure(runner, nix, drvs.closure)
    client = runner.client(Role.CLIENT)
    build = (await client.post("/api/v1/builds", json={"drvs": [drvs.top]})).json()
    fields, names = _HOSTILE_RESULTS[case]
    async with agent_socket(runner) as ws:
        await register(runner, ws, nix_system)
        assign = await receive_until(ws, p.Assign)
        await ws.send(p.encode(p.Accepted(step_id=assign.step_id, lease_id=assign.lease_id)))
        await eventually(lambda: runner.comps.scheduler.nodes[assign.step_id].state == "building")
        result = {
            "type": "result",
            "step_id": assign.step_id,
            "lease_id": assign.lease_id,
            "outcome": "build_failure",
            **fields,
        }
        await ws.send(json.dumps(result))
        await _refused_then_closed(ws, names)
        await _pages_answer(runner)
    # Another agent gets the same step now, not after the 600 s lease.
    async with agent_socket(runner) as good:
        await good.send(p.encode(register_message(nix_system)))
        assert isinstance(await receive(good), p.Registered)
        again = await receive_until(good, p.Assign)
        assert again.step_id == assign.step_id
        assert again.lease_id != assign.lease_id
    attempts = (await client.get(f"/api/v1/builds/{build['id']}/attempts")).json()
    (first,) = [a for a in attempts["attempts"] if a["step_id"] == assign.step_id]
    assert first["outcome"] == "agent_lost"
    assert recoveries == []
    assert runner.comps.scheduler.recovery is None
