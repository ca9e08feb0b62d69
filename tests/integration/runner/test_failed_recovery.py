"""The scheduler's reload from the database fails (the database is unavailable while it
reloads): the runner says so on /healthz (503, so a supervisor restarts it), /api/v1/status,
/metrics and the dashboard, refuses new builds with a reason instead of taking them silently,
retries the reload with backoff, and works again once the database is back."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.exc import OperationalError

from bigtent import protocol as p
from bigtent.config import Role
from bigtent.runner.db import queries
from bigtent.runner.scheduler import recovery
from tests.integration.runner.conftest import (
    WAIT_SECS,
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


def _gauge(body: str, name: str) -> float:
    for family in text_string_to_metric_families(body):
        if family.name == name:
            (sample,) = family.samples
            return float(sample.value)
    raise AssertionError(f"{name} not exposed")


async def _status(runner: RunnerHarness) -> dict[str, Any]:
    resp = await runner.client(Role.CLIENT).get("/api/v1/status")
    assert resp.status_code == 200, resp.text
    scheduler: dict[str, Any] = resp.json()["scheduler"]
    return scheduler


@pytest.mark.nix
async def test_a_failed_reload_is_retried_reported_and_fails_the_health_check(
    make_runner: MakeRunner,
    nix: Nix,
    drvs: Drvs,
    nix_system: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runner = await make_runner(serve=True)
    scheduler = runner.comps.scheduler
    await upload_closure(runner, nix, drvs.closure)
    anonymous = runner.client(None)
    client = runner.client(Role.CLIENT)
    healthy = await anonymous.get("/healthz")
    assert (healthy.status_code, healthy.json()) == (200, {"status": "ok"})
    assert (await _status(runner))["healthy"] is True

    # The database goes away while the scheduler reloads: a failed pass makes it reload.
    down = True
    tries = 0
    real_fetch = queries.fetch_active_steps

    async def fetch_active_steps(*args: Any, **kwargs: Any) -> Any:
        nonlocal tries
        if down:
            tries += 1
            raise OperationalError("SELECT steps", {}, ConnectionRefusedError("db is down"))
        return await real_fetch(*args, **kwargs)

    monkeypatch.setattr(queries, "fetch_active_steps", fetch_active_steps)
    real_tick = scheduler.tick
    failed_once = False

    async def tick(now: float) -> float | None:
        nonlocal failed_once
        if not failed_once:
            failed_once = True
            raise OperationalError("UPDATE steps", {}, ConnectionRefusedError("db is down"))
        return await real_tick(now)

    monkeypatch.setattr(scheduler, "tick", tick)
    scheduler.wake()

    async def unhealthy() -> bool:
        return (await anonymous.get("/healthz")).status_code == 503

    await eventually(unhealthy)
    # Retried with backoff, not given up and not spinning.
    # (The reload's read fails before the scheduler counts the failure: wait for the count.)
    await eventually(lambda: scheduler.recovery is not None and scheduler.recovery.failures >= 3)
    assert tries < 50
    body = (await anonymous.get("/healthz")).json()
    assert body["status"] == "unhealthy" and "db is down" not in str(body)
    status = await _status(runner)
    assert status["healthy"] is False
    assert status["recovery_failures"] >= 3 and "db is down" in status["problem"]
    metrics = (await anonymous.get("/metrics")).text
    assert _gauge(metrics, "bigtent_scheduler_recovery_failures") >= 3
    page = await client.get("/agents")  # a page that does not read the steps table
    assert page.status_code == 200 and "Not dispatching" in page.text
    # A new build is refused with the reason rather than accepted into an empty scheduler.
    refused = await client.post("/api/v1/builds", json={"drvs": [drvs.top]})
    assert refused.status_code == 503, refused.text
    assert "reloading" in refused.json()["error"]

    down = False
    # The next retry is due within the backoff's cap (the failures kept counting meanwhile).
    await eventually(
        lambda: scheduler.recovery is None, timeout=recovery.RECOVERY_MAX_SECS + WAIT_SECS
    )
    assert (await anonymous.get("/healthz")).status_code == 200
    assert (await _status(runner))["healthy"] is True
    metrics = (await anonymous.get("/metrics")).text
    assert _gauge(metrics, "bigtent_scheduler_recovery_failures") == 0
    assert "Not dispatching" not in (await client.get("/agents")).text
    build = await client.post("/api/v1/builds", json={"drvs": [drvs.top]})
    assert build.status_code == 201, build.text
    async with agent_socket(runner) as ws:
        await register(runner, ws, nix_system)
        assign = await receive_until(ws, p.Assign)
        assert assign.drv_path == drvs.dep
