"""Waiting for capacity as the API and the dashboard show it, against a real runner (its
scheduler loop running) and a real agent WebSocket: shown while no agent can take the step,
cleared when one that can registers."""

from __future__ import annotations

from typing import Any

import pytest

from bigtent import protocol as p
from bigtent.config import Role
from tests.integration.runner.conftest import (
    Drvs,
    MakeRunner,
    Nix,
    RunnerHarness,
    agent_socket,
    eventually,
    receive_until,
    register,
    upload_closure,
)

pytestmark = pytest.mark.nix


async def _get(runner: RunnerHarness, path: str) -> Any:
    resp = await runner.client(Role.CLIENT).get(path)
    assert resp.status_code == 200, resp.text
    return resp.json()


async def test_api_and_dashboard_show_the_wait_until_an_agent_can_take_it(
    make_runner: MakeRunner, nix: Nix, drvs: Drvs, nix_system: str
) -> None:
    runner = await make_runner(serve=True)
    await upload_closure(runner, nix, drvs.closure)
    resp = await runner.client(Role.CLIENT).post("/api/v1/builds", json={"drvs": [drvs.top]})
    assert resp.status_code == 201, resp.text
    build_id = int(resp.json()["id"])
    reason = f"waiting for capacity: no agent offers {nix_system}"

    async def waiting() -> bool:
        build = await _get(runner, f"/api/v1/builds/{build_id}")
        return bool(build["waiting_for_capacity_count"] == 1)

    await eventually(waiting)
    build = await _get(runner, f"/api/v1/builds/{build_id}")
    [entry] = build["waiting_for_capacity"]
    assert entry["drv_path"] == drvs.dep and entry["name"] == "dep"
    assert entry["system"] == nix_system and entry["reason"] == reason
    assert entry["since"] is not None
    step = await _get(runner, f"/api/v1/steps/{entry['step_id']}")
    assert step["state"] == "runnable" and step["waiting_reason"] == reason
    steps = {
        s["name"]: s for s in (await _get(runner, f"/api/v1/builds/{build_id}/steps"))["steps"]
    }
    assert steps["top"]["waiting_reason"] is None  # waits on its dependency, not capacity
    assert (await _get(runner, "/api/v1/status"))["steps_waiting_for_capacity"] == 1

    page = (await runner.client(None).get(f"/builds/{build_id}")).text
    assert 'id="waiting-for-capacity"' in page and reason in page
    page = (await runner.client(None).get(f"/steps/{entry['step_id']}")).text
    assert 'id="waiting-reason"' in page and reason in page

    # An agent for the system registers: the step is assigned and the wait is over.
    async with agent_socket(runner) as ws:
        await register(runner, ws, nix_system)
        assign = await receive_until(ws, p.Assign)
        assert assign.drv_path == drvs.dep
        build = await _get(runner, f"/api/v1/builds/{build_id}")
        assert build["waiting_for_capacity_count"] == 0
        assert build["waiting_for_capacity"] == []
        assert (await _get(runner, "/api/v1/status"))["steps_waiting_for_capacity"] == 0
        page = (await runner.client(None).get(f"/builds/{build_id}")).text
        assert 'id="waiting-for-capacity"' not in page
