"""Each answer of the build, step and status routes against its ``bigtent.apimodels``
model: read with the model the client parses with and written back, it is the same JSON,
field for field and in order (no field the model lacks, no type it changes, the same nulls),
and its fields are the ones the API has always answered."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel

from bigtent import protocol as p
from bigtent.apimodels import AttemptList, Build, BuildList, RunnerStatus, Step, StepList
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

BUILD_FIELDS = [
    "id",
    "state",
    "priority",
    "created_at",
    "finished_at",
    "created_by",
    "repository",
    "ref",
    "trusted",
    "roots",
    "counts",
    "waiting_for_capacity_count",
]
BUILD_DETAILS = [*BUILD_FIELDS, "events", "waiting_for_capacity", "failed_steps"]
STEP_FIELDS = [
    "log_expired",
    "id",
    "drv_path",
    "name",
    "system",
    "required_features",
    "state",
    "outcome",
    "error",
    "exit_code",
    "attempts",
    "agent_name",
    "trusted",
    "created_at",
    "assigned_at",
    "started_at",
    "finished_at",
    "outputs",
    "waiting_reason",
]
FAILED_STEP_FIELDS = ["id", "drv_path", "state", "outcome", "error", "log_tail"]
CACHED_FAILURE_FIELDS = [
    "hit_at",
    "failed_at",
    "outcome",
    "cached_until",
    "attempt_id",
    "agent_name",
    "ran_in_build",
]
ATTEMPT_FIELDS = [
    "id",
    "step_id",
    "drv_path",
    "name",
    "attempt",
    "max_attempts",
    "agent_name",
    "started_at",
    "finished_at",
    "outcome",
    "error",
    "retry_at",
]
STATUS_FIELDS = [
    "version",
    "cache_url",
    "cache_public_key",
    "untrusted_cache_url",
    "untrusted_cache_public_key",
    "upstreams",
    "steps",
    "queue",
    "agents_connected",
    "ssh_builders",
    "builds_active",
    "steps_waiting_for_capacity",
    "cache_paths",
    "cache_bytes",
    "scheduler",
]


def same_through(model: type[BaseModel], answer: Any) -> bool:
    """Whether ``answer`` read with ``model`` and written back is the same JSON text."""
    again = model.model_validate(answer).model_dump(mode="json", exclude_unset=True)
    return json.dumps(again) == json.dumps(answer)


@pytest.mark.nix
async def test_answers_are_their_models(
    make_runner: MakeRunner, nix: Nix, drvs: Drvs, nix_system: str
) -> None:
    runner = await make_runner(serve=True, scheduler={"max_infra_attempts": 1})
    await upload_closure(runner, nix, drvs.closure)
    api = runner.client(Role.CLIENT)

    async def get(path: str) -> Any:
        resp = await api.get(path)
        assert resp.status_code == 200, resp.text
        return resp.json()

    created = await api.post("/api/v1/builds", json={"drvs": [drvs.top], "ref": "refs/x"})
    assert created.status_code == 201, created.text
    first = created.json()
    assert list(first) == BUILD_FIELDS and same_through(Build, first)
    assert isinstance(first["id"], int) and isinstance(first["roots"][0]["step_id"], int)
    bumped = await api.post(f"/api/v1/builds/{first['id']}/bump", json={"priority": 3})
    assert bumped.status_code == 200 and same_through(Build, bumped.json())

    # The dependency fails as a build failure: the build fails, and the failure is cached.
    async with agent_socket(runner) as ws:
        await ws.send(p.encode(register_message(nix_system, name="agent-failing")))
        assign = await receive_until(ws, p.Assign)
        await ws.send(
            p.encode(
                p.Result(
                    step_id=assign.step_id,
                    lease_id=assign.lease_id,
                    outcome=p.Outcome.BUILD_FAILURE,
                    exit_code=100,
                    error="builder for 'dep' failed",
                )
            )
        )

        async def failed() -> bool:
            return bool((await get(f"/api/v1/builds/{first['id']}"))["state"] == "failed")

        await eventually(failed)
    # A second build of the same derivation fails at once from the failure cache.
    again = await api.post("/api/v1/builds", json={"drvs": [drvs.top]})
    assert again.status_code == 201, again.text
    second = again.json()["id"]

    listed = await get("/api/v1/builds")
    assert [list(b) for b in listed["builds"]] == [BUILD_FIELDS, BUILD_FIELDS]
    assert same_through(BuildList, listed)

    for build_id in (first["id"], second):
        build = await get(f"/api/v1/builds/{build_id}")
        assert list(build) == BUILD_DETAILS and same_through(Build, build)
        (failed_step,) = build["failed_steps"]
        steps = await get(f"/api/v1/builds/{build_id}/steps")
        assert same_through(StepList, steps)
        attempts = await get(f"/api/v1/builds/{build_id}/attempts")
        assert same_through(AttemptList, attempts)
        assert all(list(a) == ATTEMPT_FIELDS for a in attempts["attempts"])
        failing = next(s for s in steps["steps"] if s["state"] == "failed")
        if build_id == second:  # the hit: the failure it reused says so
            assert list(failed_step) == [*FAILED_STEP_FIELDS, "cached_failure"]
            assert list(failed_step["cached_failure"]) == CACHED_FAILURE_FIELDS
            assert list(failing) == [*STEP_FIELDS, "cached_failure"]
            assert attempts["attempts"] == []
        else:
            assert list(failed_step) == FAILED_STEP_FIELDS
            assert list(failing) == STEP_FIELDS
            assert len(attempts["attempts"]) == 1
            assert [e["kind"] for e in build["events"]] == ["bumped"]

    step = await get(f"/api/v1/steps/{assign.step_id}")
    assert list(step) == [*STEP_FIELDS, "attempt_records"] and same_through(Step, step)
    assert step["exit_code"] == 100 and len(step["attempt_records"]) == 1

    status = await get("/api/v1/status")
    assert list(status) == STATUS_FIELDS and same_through(RunnerStatus, status)
    assert status["scheduler"] == {"healthy": True, "problem": None}
