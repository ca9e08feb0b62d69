"""``bigtent launches`` through the real entry point in CliRunner, against a runner answered
in-process; and ``bigtent runner`` refusing a pool no issuer admits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.unit.cli.helpers import ADMIN_ENV, WIDE, RunnerStub, admin_only, parse_table, run_cli

LAUNCHES: dict[str, Any] = {
    "pools": [
        {
            "name": "gha-x86",
            "workflow": "acme/bigtent-agents/bigtent-agent.yml@main",
            "systems": ["x86_64-linux"],
            "max_jobs": 2,
            "max_inflight": 4,
            "pending": 1,
            "demand": 3,
            "covered": 2,
            "deficit": 1,
            "cooldown_until": "2026-12-16T10:02:00+00:00",
            "counters": {
                "launches": 5,
                "registrations": 3,
                "expiries": 1,
                "dispatch_failures": 2,
            },
        }
    ],
    "counters": {"launches": 5, "registrations": 3, "expiries": 1, "dispatch_failures": 2},
    "ticks": 40,
    "launches": [
        {
            "launch_id": "a" * 32,
            "pool": "gha-x86",
            "state": "registered",
            "created_at": "2026-12-16T10:00:00+00:00",
            "updated_at": "2026-12-16T10:01:00+00:00",
            "agent_machine_id": "m1",
            "agent_name": "gha-x86-gh7.1-0a1b2c3d",
            "error": None,
        },
        {
            "launch_id": "b" * 32,
            "pool": "gha-x86",
            "state": "failed",
            "created_at": "2026-12-16T09:59:00+00:00",
            "updated_at": "2026-12-16T09:59:00+00:00",
            "agent_machine_id": None,
            "agent_name": None,
            "error": "workflow_dispatch of acme/bigtent-agents/bigtent-agent.yml@main: HTTP 500",
        },
    ],
}


run = run_cli


@pytest.fixture
def launches_runner(runner_stub: RunnerStub) -> list[httpx.Request]:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/api/v1/launches"
        return httpx.Response(200, json=LAUNCHES)

    return runner_stub.answer(admin_only(handler))


def test_launches_table(launches_runner: list[httpx.Request]) -> None:
    result = run(["launches"], env={**ADMIN_ENV, **WIDE})
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "pool gha-x86 (acme/bigtent-agents/bigtent-agent.yml@main): 1/4 pending" in out
    assert "cooling down until 2026-12-16T10:02:00+00:00" in out
    assert "launched 5, registered 3, expired 1, dispatch failures 2" in out
    rows = {row["launch"]: row for row in parse_table(out)}
    assert rows["a" * 32]["state"] == "registered"
    assert rows["a" * 32]["agent"] == "gha-x86-gh7.1-0a1b2c3d"
    assert rows["b" * 32]["state"] == "failed" and "HTTP 500" in rows["b" * 32]["error"]
    assert launches_runner[0].url.params["limit"] == "50"


def test_launches_json_and_filters(launches_runner: list[httpx.Request]) -> None:
    result = run(["launches", "--json", "--limit", "5", "--pool", "gha-x86"], env=ADMIN_ENV)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["counters"] == LAUNCHES["counters"]
    assert [x["state"] for x in data["launches"]] == ["registered", "failed"]
    assert data["pools"][0]["deficit"] == 1 and data["ticks"] == 40
    params = launches_runner[0].url.params
    assert (params["limit"], params["pool"]) == ("5", "gha-x86")


def test_launches_needs_an_admin_token(launches_runner: list[httpx.Request]) -> None:
    result = run(["launches"], env={"BIGTENT_TOKEN": "client"})
    assert result.exit_code == 3
    assert result.output.strip().startswith("Error: ") and "Traceback" not in result.output


def test_runner_refuses_a_pool_no_issuer_admits(tmp_path: Path) -> None:
    conf = tmp_path / "runner.toml"
    conf.write_text(
        f"""
[runner]
listen = "127.0.0.1:0"
state_dir = "{tmp_path / "state"}"

[[autoscale.github]]
name = "gha"
systems = ["x86_64-linux"]
allowed_build_repositories = ["acme/widgets"]
workflow_repository = "acme/bigtent-agents"
token = "ghp_x"
runner_url = "https://ci.example.org"
audience = "bigtent"
"""
    )
    result = run(["runner", "--config", str(conf)])
    assert result.exit_code == 2, result.output
    assert (
        result.output.strip()
        .splitlines()[-1]
        .startswith(
            "Error: config key autoscale.github.0.audience: 'bigtent' is not an audience of any"
        )
    )
    assert "Traceback" not in result.output
