"""``bigtent builds``, ``cancel``, ``bump``, ``restart`` and ``log`` against the runner's
routes (``fake_runner``)."""

from __future__ import annotations

import json

import httpx

from tests.unit.cli.helpers import run_cli

run = run_cli


def test_builds_cancel_bump_log(fake_runner: list[httpx.Request]) -> None:
    result = run(["builds", "--limit", "5"])
    assert result.exit_code == 0 and "hello" in result.stdout and "1/3" in result.stdout
    assert run(["builds", "--json"]).stdout.count('"id": "12"') == 1
    result = run(["cancel", "12"])
    assert result.exit_code == 0 and "cancelled" in result.stdout
    result = run(["bump", "12", "--priority", "20"])
    assert "priority 20" in result.stdout
    assert json.loads(fake_runner[-1].content) == {"priority": 20}
    result = run(["log", "4"])
    assert result.stdout == "building\ndone\n"


def test_restart(fake_runner: list[httpx.Request]) -> None:
    result = run(["restart", "12"])
    assert result.exit_code == 0, result.output
    assert "build 12: queued" in result.stdout
    request = fake_runner[-1]
    assert (request.method, request.url.path) == ("POST", "/api/v1/builds/12/restart")
    result = run(["restart", "12", "--json"])
    assert json.loads(result.stdout)["state"] == "queued"
    result = run(["restart", "404"])
    assert result.exit_code == 1 and result.stderr == "Error: no build 404\n"


def test_not_found(fake_runner: list[httpx.Request]) -> None:
    result = run(["cancel", "404", "--json"])
    assert result.exit_code == 1 and result.stderr == "Error: no build 404\n"
