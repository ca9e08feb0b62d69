"""End to end: ephemeral agents (architecture §4) as real processes against a real runner.

Each agent stops by one of its limits and must exit 0; the runner's API says what ran where.
"""

from __future__ import annotations

import subprocess
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_until
from tests.e2e.conftest import Farm, Proc

pytestmark = [pytest.mark.e2e, pytest.mark.nix]

EXIT_TIMEOUT_SECS = 120
FINAL = {"succeeded", "failed", "dependency_failed", "cancelled"}


def _builds(farm: Farm) -> list[dict[str, Any]]:
    with farm.api() as c:
        builds: list[dict[str, Any]] = c.get("/api/v1/builds").json()["builds"]
    return builds


def _steps(farm: Farm, build_id: int) -> list[dict[str, Any]]:
    with farm.api() as c:
        steps: list[dict[str, Any]] = c.get(f"/api/v1/builds/{build_id}/steps").json()["steps"]
    return steps


def _agents(farm: Farm) -> list[dict[str, Any]]:
    with farm.api() as c:
        agents: list[dict[str, Any]] = c.get("/api/v1/agents").json()["agents"]
    return agents


def _submit(farm: Farm, dag: Path, n_steps: int) -> tuple[Proc, int]:
    """Start ``bigtent build`` in the background; return it and its build id once the runner
    holds all ``n_steps`` steps. (Uses the farm's spawner so teardown stops it by pid.)"""
    proc = farm._spawn("build", ["build", str(dag), "-A", "top", "--no-download"], farm.env())

    def queued() -> bool:
        if proc.popen.poll() is not None:
            raise AssertionError("bigtent build exited early:\n" + proc.log.read_text()[-3000:])
        builds = _builds(farm)
        return bool(builds) and len(_steps(farm, builds[0]["id"])) == n_steps

    wait_until(queued, timeout=60, what=f"the build's {n_steps} steps to be queued")
    return proc, int(_builds(farm)[0]["id"])


def _start_ephemeral(farm: Farm, name: str, *args: str, max_jobs: int = 1) -> Proc:
    return farm.start_agent(name, max_jobs=max_jobs, extra_args=["--ephemeral", *args], wait=False)


def _exit_code(proc: Proc, timeout: float = EXIT_TIMEOUT_SECS) -> int:
    try:
        return proc.popen.wait(timeout)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(
            f"{proc.name} did not exit within {timeout}s:\n{proc.log.read_text()[-3000:]}"
        ) from exc


def _ephemeral_names(farm: Farm, base: str) -> set[str]:
    """The names ephemeral agents started as ``base`` registered with (``base-…-<8 hex>``)."""
    return {a["name"] for a in _agents(farm) if a["ephemeral"] and a["name"].startswith(base + "-")}


def test_max_builds_1_builds_one_step_and_exits_0_while_work_waits(
    farm_factory: Callable[..., Farm],
) -> None:
    farm = farm_factory()
    _, build_id = _submit(farm, farm.dag_file(layers=1, width=3), n_steps=4)
    agent = _start_ephemeral(farm, "eph", "--max-builds", "1")
    assert _exit_code(agent) == 0, agent.log.read_text()[-3000:]

    [name] = _ephemeral_names(farm, "eph")
    [row] = [a for a in _agents(farm) if a["name"] == name]
    assert row["ephemeral"] is True
    wait_until(
        lambda: not any(a["connected"] for a in _agents(farm)), timeout=30, what="disconnect"
    )
    steps = _steps(farm, build_id)
    done = [s for s in steps if s["state"] in FINAL]
    assert len(done) == 1, steps
    assert done[0]["state"] == "succeeded" and done[0]["agent_name"] == name
    assert done[0]["name"].startswith("dag-0-")
    # The rest still waits for an agent: two layer-0 steps runnable, top waiting.
    rest = {s["name"]: s["state"] for s in steps if s is not done[0]}
    assert rest.pop("dag-top-0") == "waiting"
    assert sorted(rest.values()) == ["runnable", "runnable"], steps
    assert "reached max_builds (1)" in agent.log.read_text()


def test_two_agents_drain_a_21_step_queue_and_exit_0_on_idle(
    farm_factory: Callable[..., Farm],
) -> None:
    farm = farm_factory()
    # One-second steps: the queue outlasts the agents' start-up, so both get work (with
    # instant steps the first agent could drain it before the second one registers).
    build, build_id = _submit(farm, farm.dag_file(layers=2, width=10, sleep=1), n_steps=21)
    agents = [_start_ephemeral(farm, f"idle{i}", "--max-idle-secs", "2") for i in range(2)]
    assert _exit_code(build) == 0, build.log.read_text()[-3000:]
    for agent in agents:
        assert _exit_code(agent) == 0, agent.log.read_text()[-3000:]
        assert "idle for max_idle_secs (2 s)" in agent.log.read_text()

    steps = _steps(farm, build_id)
    assert len(steps) == 21
    assert all(s["state"] == "succeeded" for s in steps), steps
    names = _ephemeral_names(farm, "idle0") | _ephemeral_names(farm, "idle1")
    assert len(names) == 2
    used = Counter(str(s["agent_name"]) for s in steps)
    assert set(used) <= names, used
    assert len(used) == 2, used  # both took work from the queue


def test_lifetime_limit_drains_running_steps_and_exits_0(
    farm_factory: Callable[..., Farm],
) -> None:
    farm = farm_factory()
    _, build_id = _submit(farm, farm.dag_file(layers=1, width=4, sleep=3), n_steps=5)
    agent = _start_ephemeral(farm, "life", "--max-lifetime-secs", "3", max_jobs=2)
    assert _exit_code(agent) == 0, agent.log.read_text()[-3000:]
    assert "reached max_lifetime_secs (3 s)" in agent.log.read_text()

    [name] = _ephemeral_names(farm, "life")
    steps = _steps(farm, build_id)
    ran = [s for s in steps if s["agent_name"] == name and s["state"] in FINAL]
    # It built something, and what it had started it finished (drain, not abort).
    assert ran, steps
    assert all(s["state"] == "succeeded" for s in ran), ran
    # Three-second steps and a three-second life: the DAG (which needs two rounds) is not done.
    top = next(s for s in steps if s["name"] == "dag-top-0")
    assert top["state"] == "waiting", steps
