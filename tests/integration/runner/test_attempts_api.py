"""Attempts over HTTP: ``GET /api/v1/builds/{id}/attempts``, the attempt records of
``GET /api/v1/steps/{id}``, and the dashboard's build and step pages listing every attempt,
with a runner whose only agent (a WebSocket driven by the test) fails every step."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from bigtent import protocol as p
from bigtent.config import Role
from tests.integration.runner.conftest import (
    Drvs,
    MakeRunner,
    Nix,
    agent_socket,
    eventually,
    receive_until,
    register_message,
    upload_closure,
)
from tests.integration.runner.test_api_models import ATTEMPT_FIELDS

REASON = "error: the group 'nixbld' specified in 'build-users-group' does not exist"


@pytest.mark.nix
async def test_every_attempt_is_listed_by_the_api_and_the_dashboard(
    make_runner: MakeRunner, nix: Nix, drvs: Drvs, nix_system: str
) -> None:
    runner = await make_runner(
        serve=True,
        scheduler={
            "max_infra_attempts": 2,
            "retry_base_secs": 0.6,
            "retry_max_secs": 0.6,
            "agent_backoff_base_secs": 0,
            "agent_backoff_max_secs": 0,
        },
    )
    await upload_closure(runner, nix, drvs.closure)
    api = runner.client(Role.CLIENT)
    resp = await api.post("/api/v1/builds", json={"drvs": [drvs.top]})
    assert resp.status_code == 201, resp.text
    build_id = resp.json()["id"]

    async def attempts(after: int = 0) -> list[dict[str, Any]]:
        got = await api.get(f"/api/v1/builds/{build_id}/attempts", params={"after": after})
        assert got.status_code == 200, got.text
        found: list[dict[str, Any]] = got.json()["attempts"]
        return found

    hello = register_message(nix_system, name="agent-broken")
    async with agent_socket(runner) as ws:
        await ws.send(p.encode(hello))
        for n in (1, 2):
            assign = await receive_until(ws, p.Assign)
            assert assign.drv_path == drvs.dep
            await ws.send(
                p.encode(
                    p.Result(
                        step_id=assign.step_id,
                        lease_id=assign.lease_id,
                        outcome=p.Outcome.PREPARE_FAILURE,
                        exit_code=1,
                        error=f"{REASON}\nattempt {n}",
                    )
                )
            )
            await eventually(_has_attempts(attempts, n))
    first, second = await attempts()
    step_id = int(assign.step_id)
    for record, n in ((first, 1), (second, 2)):
        assert list(record) == ATTEMPT_FIELDS
        assert record["step_id"] == step_id and record["drv_path"] == drvs.dep
        assert (record["name"], record["attempt"], record["max_attempts"]) == ("dep", n, 2)
        assert (record["agent_name"], record["outcome"]) == ("agent-broken", "prepare_failure")
        assert record["error"] == f"{REASON}\nattempt {n}"
        assert record["started_at"] is not None and record["finished_at"] is not None
    assert first["retry_at"] is not None and first["retry_at"] >= first["finished_at"]
    assert second["retry_at"] is None  # the last allowed attempt: final
    assert second["id"] > first["id"]
    assert await attempts(after=first["id"]) == [second]
    assert await attempts(after=second["id"]) == []

    # The step failed with the last reason; its own answer lists the same attempts.
    step = (await api.get(f"/api/v1/steps/{step_id}")).json()
    assert step["state"] == "failed" and step["attempts"] == 2
    assert REASON in step["error"] and "after 2 attempts" in step["error"]
    assert step["attempt_records"] == [first, second]
    build = (await api.get(f"/api/v1/builds/{build_id}")).json()
    assert build["state"] == "failed"

    # The dashboard's build and step pages list both attempts with agent, outcome, reason
    # and what came next.
    admin = runner.client(Role.ADMIN)
    for page in (f"/builds/{build_id}", f"/steps/{step_id}"):
        html = (await admin.get(page)).text
        section = html[html.index('id="attempts"') :]
        assert section.count('data-outcome="prepare_failure"') == 2, page
        assert "agent-broken" in section and "1/2" in section and "2/2" in section
        assert "the group &#39;nixbld&#39; specified" in section
        assert "retry after" in section and "final" in section


def _has_attempts(
    attempts: Callable[[], Awaitable[list[dict[str, Any]]]], n: int
) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return len(await attempts()) >= n

    return check


@pytest.mark.parametrize("ident", [999, 0, -1, 2**70])
async def test_attempts_of_an_unknown_build_are_404(make_runner: MakeRunner, ident: int) -> None:
    runner = await make_runner()
    resp = await runner.client(Role.CLIENT).get(f"/api/v1/builds/{ident}/attempts")
    assert resp.status_code == 404 and "no build" in resp.json()["error"]
    anonymous = await runner.client(None).get("/api/v1/builds/1/attempts")
    assert anonymous.status_code == 401
