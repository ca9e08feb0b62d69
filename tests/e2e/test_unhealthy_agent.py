"""An agent that registers fine and then fails every step (its store breaks after
registering) becomes unhealthy: shown so, with its last error, in the API, ``bigtent agents``
(table and ``--json``) and the dashboard, and it receives no more steps while it backs off;
the build's steps go to a healthy agent."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from typing import Any

import pytest

from tests.e2e.conftest import Farm
from tests.e2e.test_faults import _only_build_id, _start_build, _steps, _wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.nix]

BACKOFF_BASE_SECS = 15.0
"""The first infrastructure failure backs the agent off this long, the second twice that:
time enough for the healthy agent to build everything meanwhile."""


@pytest.fixture
def strict_runner(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unhealthy after 2 consecutive infrastructure failures; steps are retried, not failed."""
    spawn = Farm._spawn

    def _spawn(self: Farm, name: str, args: list[str], env: dict[str, str]) -> Any:
        if name == "runner":
            env = {
                **env,
                "BIGTENT_SCHEDULER__UNHEALTHY_AFTER_FAILURES": "2",
                "BIGTENT_SCHEDULER__MAX_INFRA_ATTEMPTS": "100",
                "BIGTENT_SCHEDULER__AGENT_BACKOFF_BASE_SECS": str(BACKOFF_BASE_SECS),
            }
        return spawn(self, name, args, env)

    monkeypatch.setattr(Farm, "_spawn", _spawn)


def _agent(farm: Farm, name: str) -> dict[str, Any]:
    with farm.api() as c:
        agents = c.get("/api/v1/agents").json()["agents"]
    return next(a for a in agents if a["name"] == name)


def test_agent_whose_store_breaks_becomes_unhealthy_and_gets_no_more_steps(
    farm_factory: Callable[..., Farm], strict_runner: None, request: pytest.FixtureRequest
) -> None:
    farm = farm_factory()
    farm.start_agent("flaky", max_jobs=2)  # its start-up probe passes: it registers
    assert _agent(farm, "flaky")["unhealthy"] is False
    # Its store breaks: the Nix store directory becomes a file.
    root = farm.root / "agents" / "flaky" / "root"
    shutil.move(root / "nix", root / "nix.broken")
    (root / "nix").write_text("not a directory\n")

    client = _start_build(farm, farm.dag_file(layers=1, width=2), "top", request)
    # The agents API reads the failure count from the database and health from memory: wait
    # for both (the second failure's row may land a moment after the venue turned unhealthy).
    flaky = _wait_for(
        lambda: (a := _agent(farm, "flaky"))["unhealthy"] and a["infra_failures"] >= 2 and a,
        60,
        "flaky to be unhealthy",
    )
    assert flaky["connected"] is True
    assert flaky["consecutive_failures"] == 2
    assert flaky["infra_failures"] >= 2
    assert flaky["last_error"], flaky
    assert flaky["backoff_until"] is not None

    table = farm.bigtent("agents", check=True).stdout
    assert re.search(r"flaky.*unhealthy: ", table), table
    [shown] = [a for a in json.loads(farm.bigtent("agents", "--json", check=True).stdout)
               if a["name"] == "flaky"]  # fmt: skip
    assert shown["unhealthy"] is True and shown["last_error"] == flaky["last_error"]
    with farm.api() as c:
        page = c.get("/agents").text
    assert re.search(r'data-name="flaky"[^>]*data-unhealthy="true"', page), page
    assert "data-last-error" in page

    # A healthy agent takes every step while flaky backs off; flaky gets none.
    farm.start_agent("good", max_jobs=2)
    code, out = client.result(timeout=120)
    assert code == 0, out
    build_id = _only_build_id(farm)
    assert build_id is not None
    steps = _steps(farm, build_id)
    assert {s["agent_name"] for s in steps} == {"good"}, steps
    after = _agent(farm, "flaky")
    assert after["unhealthy"] is True
    assert after["infra_failures"] == 2, after  # no step reached it since it became unhealthy
    assert after["running"] == 0
