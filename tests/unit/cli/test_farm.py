"""``bigtent agents`` (and ``agents drain``) and ``bigtent builders``: the fitted tables and
their ``--json``."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.unit.cli.helpers import WIDE, RunnerStub, parse_table, run_cli
from tests.unit.cli.samples import (
    AGENT,
    EPHEMERAL_AGENT,
    OIDC_AGENT,
    OIDC_IDENTITY,
)

run = run_cli


def test_agents_auth_column_names_the_oidc_repository(runner_stub: RunnerStub) -> None:
    routes = {"agents": [AGENT, OIDC_AGENT]}
    runner_stub.answer_json("/api/v1/agents", routes)
    result = run(["agents"], env=WIDE)
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in parse_table(result.stdout)}
    oidc = rows["gha-oidc-7.1-0c0ffee0"]
    assert oidc["auth"] == "oidc:acme/widgets" and oidc["kind"] == "ephemeral"
    assert rows["build-01"]["auth"] == "token"

    data = json.loads(run(["agents", "--json"]).stdout)
    assert data[0]["auth_kind"] == "token" and data[0]["oidc"] is None
    assert data[1]["auth_kind"] == "oidc" and data[1]["oidc"] == OIDC_IDENTITY


def test_agents_shows_the_launch_id(runner_stub: RunnerStub) -> None:
    launched = {**OIDC_AGENT, "launch_id": "gha-x86-00042"}
    routes = {"agents": [AGENT, launched]}
    runner_stub.answer_json("/api/v1/agents", routes)
    result = run(["agents"], env=WIDE)
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in parse_table(result.stdout)}
    assert rows["gha-oidc-7.1-0c0ffee0"]["launch"] == "gha-x86-00042"
    assert rows["build-01"]["launch"] == "-"
    data = json.loads(run(["agents", "--json"]).stdout)
    assert [a["launch_id"] for a in data] == [None, "gha-x86-00042"]


def test_agents_table_shows_kind_auth_connection_jobs_and_backoff(
    runner_stub: RunnerStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(AGENT, "last_seen", "2024-05-01T11:00:00+00:00")
    routes = {"agents": [AGENT, EPHEMERAL_AGENT]}
    runner_stub.answer_json("/api/v1/agents", routes)
    result = run(["agents"], env=WIDE)
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in parse_table(result.stdout)}
    persistent = rows["build-01"]
    assert persistent["kind"] == "persistent" and persistent["auth"] == "token"
    assert persistent["connected"] == "yes" and persistent["jobs"] == "1/4"
    assert persistent["last seen"] == "2024-05-01 11:00"  # long ago: the date, to the minute
    ephemeral = rows["gha-x86-123.1-0a1b2c3d"]
    assert ephemeral["kind"] == "ephemeral" and ephemeral["connected"] == "no"
    assert ephemeral["jobs"] == "0/2"
    assert ephemeral["backoff"] == "until 2024-05-01 10:05 (2 failures)"

    result = run(["agents", "--json"])
    data = json.loads(result.stdout)
    assert [a["name"] for a in data] == ["build-01", "gha-x86-123.1-0a1b2c3d"]
    assert data[1]["ephemeral"] is True and data[1]["backoff_until"].startswith("2024")
    assert data[0]["auth_kind"] == "token" and data[0]["backoff_until"] is None


def test_agents_drain(fake_runner: list[httpx.Request]) -> None:
    result = run(["agents", "drain", "build-01"], env={"BIGTENT_TOKEN": "admin"})
    assert result.exit_code == 0, result.output
    assert result.stdout == "agent build-01 is draining\n"
    request = fake_runner[-1]
    assert (request.method, request.url.path) == ("POST", "/api/v1/agents/build-01/drain")
    assert request.headers["authorization"] == "Bearer admin"
    result = run(["agents", "drain", "build-01", "--json"])
    assert json.loads(result.stdout) == {"drained": "build-01"}
    assert run(["agents", "drain"]).exit_code == 2  # NAME is required


def test_agents_drain_forbidden_for_a_client_token(runner_stub: RunnerStub) -> None:
    runner_stub.answer_status(403, {"error": "token role client may not do this"})
    result = run(["agents", "drain", "build-01"])
    assert result.exit_code == 3, result.output
    assert result.stderr == "Error: token role client may not do this\n"


def test_builders_table_shows_usable_and_skipped_builders(runner_stub: RunnerStub) -> None:
    body = {
        "builders": [
            {
                "machine_id": "ssh:1",
                "uri": "ssh://nix@b1.example.org",
                "usable": True,
                "systems": ["x86_64-linux"],
                "supported_features": ["kvm"],
                "mandatory_features": [],
                "max_jobs": 4,
                "running": 1,
                "speed_factor": 2.0,
                "consecutive_failures": 1,
                "backoff_until": "2024-05-01T10:05:00+00:00",
            },
            {
                "machine_id": "ssh:2",
                "uri": "ssh://nix@b2.example.org",
                "usable": False,
                "reason": "no pinned host_key",
            },
        ]
    }
    runner_stub.answer_json("/api/v1/builders", body)
    result = run(["builders"], env=WIDE)
    assert result.exit_code == 0, result.output
    rows = {row["uri"]: row for row in parse_table(result.stdout)}
    b1 = rows["ssh://nix@b1.example.org"]
    assert b1["state"] == "usable" and b1["jobs"] == "1/4" and b1["features"] == "kvm"
    assert b1["backoff until"] == "2024-05-01 10:05"
    assert rows["ssh://nix@b2.example.org"]["state"] == "skipped: no pinned host_key"
    data = json.loads(run(["builders", "--json"]).stdout)
    assert [b["usable"] for b in data] == [True, False]
