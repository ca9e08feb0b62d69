"""Faults on a real farm (architecture §3): an agent killed mid-build, a connection cut and restored
within the lease (while a step builds, as it finishes, as it fails), the runner killed mid-DAG
and started again. Agents dial in through ``TcpProxy`` where the test cuts the network."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.conftest import wait_until
from tests.e2e.conftest import Farm
from tests.e2e.tcpproxy import TcpProxy

pytestmark = [pytest.mark.e2e, pytest.mark.nix]

_T = TypeVar("_T")
LEASE_SECS = 6.0
"""The farm fixture's ``scheduler.lease_secs``."""


# ---- helpers ----------------------------------------------------------------------------------
def _wait_for(fetch: Callable[[], _T | None], timeout: float, what: str) -> _T:
    """Poll ``fetch`` until it returns something truthy (bounded); return that."""
    found: list[_T] = []

    def probe() -> bool:
        value = fetch()
        if value:
            found.append(value)
            return True
        return False

    wait_until(probe, timeout=timeout, interval=0.1, what=what)
    return found[-1]


def _steps(farm: Farm, build_id: int) -> list[dict[str, Any]]:
    with farm.api() as c:
        resp = c.get(f"/api/v1/builds/{build_id}/steps")
        resp.raise_for_status()
        steps: list[dict[str, Any]] = resp.json()["steps"]
    return steps


def _step_log(farm: Farm, step_id: int) -> str:
    with farm.api() as c:
        resp = c.get(f"/api/v1/steps/{step_id}/log")
        resp.raise_for_status()
        return resp.text


def _only_build_id(farm: Farm) -> int | None:
    with farm.api() as c:
        builds = c.get("/api/v1/builds").json()["builds"]
    return int(builds[0]["id"]) if builds else None


@dataclass
class _Client:
    """``bigtent build --json --no-download`` running in the background."""

    popen: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path

    def result(self, timeout: float) -> tuple[int, dict[str, Any]]:
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(10)
            raise AssertionError(
                f"bigtent build still running after {timeout}s:\n{self.stderr.read_text()[-3000:]}"
            ) from None
        out = self.stdout.read_text()
        try:
            return code, json.loads(out)
        except json.JSONDecodeError as exc:
            raise AssertionError(
                f"bigtent build printed no JSON (exit {code}):\n{out}\n{self.stderr.read_text()}"
            ) from exc


def _start_build(farm: Farm, dag: Path, attr: str, request: pytest.FixtureRequest) -> _Client:
    stdout, stderr = farm.root / "client.out", farm.root / "client.err"
    argv = [sys.executable, "-m", "bigtent", "build", "--json", "--no-download", str(dag)]
    with stdout.open("wb") as out, stderr.open("wb") as err:
        popen = subprocess.Popen(
            [*argv, "-A", attr],
            stdout=out,
            stderr=err,
            env=farm.env(),
            cwd=farm.root,
        )
    client = _Client(popen, stdout, stderr)

    def stop() -> None:
        if popen.poll() is None:
            popen.kill()
            popen.wait(10)

    request.addfinalizer(stop)
    return client


def _building_on(farm: Farm, build_id: int, agent: str) -> dict[str, Any] | None:
    for step in _steps(farm, build_id):
        if step["state"] == "building" and step["agent_name"] == agent:
            return step
    return None


def _assert_no_failures(steps: list[dict[str, Any]]) -> None:
    bad = [
        (s["name"], s["state"], s["outcome"], s["error"])
        for s in steps
        if s["state"] in ("failed", "dependency_failed") or s["outcome"] == "build_failure"
    ]
    assert not bad, bad


def _reconnect_within_lease(farm: Farm, proxy: TcpProxy, name: str, cut_at: float) -> str:
    """Restore the proxy, wait for ``name`` to register again; a description of the outage."""
    proxy.restore()
    restored_at = time.monotonic()
    wait_until(lambda: farm.agent_connected(name), timeout=15, what=f"agent {name} to reconnect")
    back_at = time.monotonic()
    outage = f"cut {restored_at - cut_at:.1f}s, reconnected after {back_at - cut_at:.1f}s"
    # The lease was last renewed at most one heartbeat (1 s) before the cut.
    assert back_at - cut_at < LEASE_SECS - 1, f"outage too long for this test: {outage}"
    return outage


# ---- 1. an agent killed mid-build ----------------------------------------------------------
def test_agent_killed_mid_build_its_step_completes_on_the_survivor(
    farm_factory: Callable[..., Farm], request: pytest.FixtureRequest
) -> None:
    """architecture §3: the victim's lease expires into an infrastructure retry, not a failure."""
    farm = farm_factory()
    farm.start_agent("victim", max_jobs=1)
    farm.start_agent("survivor", max_jobs=1)
    dag = farm.dag_file(layers=1, width=2, sleep=3)
    client = _start_build(farm, dag, "top", request)
    build_id = _wait_for(lambda: _only_build_id(farm), 30, "the build to be created")
    step = _wait_for(
        lambda: _building_on(farm, build_id, "victim"), 30, "a step building on the victim"
    )
    assert farm.agent_connected("survivor")

    farm.agents["victim"].kill()  # SIGKILL: no drain, no result, no goodbye

    code, out = client.result(timeout=60)
    assert code == 0, out
    assert out["state"] == "succeeded"
    steps = _steps(farm, build_id)
    _assert_no_failures(steps)
    assert all(s["state"] == "succeeded" for s in steps), steps
    moved = next(s for s in steps if s["id"] == step["id"])
    assert moved["agent_name"] == "survivor", moved
    assert moved["attempts"] == 1, moved  # exactly one infrastructure retry (agent_lost)
    assert moved["outcome"] == "success", moved
    log = _step_log(farm, step["id"])
    assert "[bigtent: attempt 2 on survivor]" in log, log


# ---- 2. a connection cut and restored within the lease -----------------------------------
def test_connection_cut_within_the_lease_loses_no_work(
    farm_factory: Callable[..., Farm], request: pytest.FixtureRequest
) -> None:
    """architecture §3: an agent that reconnects lists the steps it still runs and keeps their
    leases, so a short network cut loses no work: the step runs once, never reassigned."""
    farm = farm_factory()
    proxy = TcpProxy(farm.port)
    request.addfinalizer(proxy.close)
    farm.start_agent("remote", max_jobs=1, runner_url=proxy.url)
    # Long enough that the cut and the reconnect both happen while the builder sleeps: the
    # agent's uploads go through the proxy too.
    dag = farm.dag_file(layers=1, width=1, sleep=6)
    client = _start_build(farm, dag, "nodes.dag-0-0", request)
    build_id = _wait_for(lambda: _only_build_id(farm), 30, "the build to be created")
    step = _wait_for(
        lambda: _building_on(farm, build_id, "remote"), 30, "the step building on the agent"
    )
    wait_until(
        lambda: "building node 0-0" in _step_log(farm, step["id"]),
        timeout=15,
        what="the builder's first log line",
    )

    cut_at = time.monotonic()
    proxy.cut()
    wait_until(
        lambda: not farm.agent_connected("remote"), timeout=10, what="the runner to see the cut"
    )
    # The agent has tried to come back (and been refused) twice: a real outage, not a blip.
    wait_until(lambda: proxy.refused >= 2, timeout=10, what="the agent to retry during the cut")
    outage = _reconnect_within_lease(farm, proxy, "remote", cut_at)
    with farm.api() as c:
        during = c.get(f"/api/v1/steps/{step['id']}").json()
    assert during["state"] == "building", (outage, during)
    assert during["attempts"] == 0, (outage, during)

    code, out = client.result(timeout=60)
    assert code == 0, (outage, out)
    assert out["state"] == "succeeded"
    [after] = _steps(farm, build_id)
    assert after["id"] == step["id"]
    assert after["state"] == "succeeded", (outage, after)
    assert after["attempts"] == 0, (outage, after)
    assert after["agent_name"] == "remote"
    assert after["assigned_at"] == step["assigned_at"], (outage, after)  # never reassigned
    log = _step_log(farm, step["id"])
    assert log.count("building node 0-0") == 1, (outage, log)
    assert "[bigtent: attempt" not in log, (outage, log)


def test_step_finishing_during_a_cut_is_not_built_again(
    farm_factory: Callable[..., Farm], request: pytest.FixtureRequest
) -> None:
    """The builder ends while the agent cannot reach the runner: the agent still holds the
    lease (it reconnects within it), so its result must count; the step must not run twice."""
    farm = farm_factory()
    proxy = TcpProxy(farm.port)
    request.addfinalizer(proxy.close)
    farm.start_agent("remote", max_jobs=1, runner_url=proxy.url)
    dag = farm.dag_file(layers=1, width=1, sleep=1)
    client = _start_build(farm, dag, "nodes.dag-0-0", request)
    build_id = _wait_for(lambda: _only_build_id(farm), 30, "the build to be created")
    step = _wait_for(
        lambda: _building_on(farm, build_id, "remote"), 30, "the step building on the agent"
    )
    wait_until(
        lambda: "building node 0-0" in _step_log(farm, step["id"]),
        timeout=15,
        what="the builder's first log line",
    )

    cut_at = time.monotonic()
    proxy.cut()
    # Keep the cut until the agent, its build done, has tried to upload the output.
    wait_until(
        lambda: any(" /api/v1/agent/upload/" in line for line in proxy.refused_requests),
        timeout=LEASE_SECS - 2,
        what="the agent to try to upload during the cut",
    )
    outage = _reconnect_within_lease(farm, proxy, "remote", cut_at)

    code, out = client.result(timeout=60)
    assert code == 0, (outage, out)
    [after] = _steps(farm, build_id)
    log = _step_log(farm, step["id"])
    assert after["state"] == "succeeded", (outage, after)
    assert (after["attempts"], after["outcome"]) == (0, "success"), (outage, after, log)
    assert log.count("building node 0-0") == 1, (outage, log)


def test_log_lines_printed_during_a_cut_reach_the_runner(
    farm_factory: Callable[..., Farm], request: pytest.FixtureRequest
) -> None:
    """A step that fails while the agent is cut off: its result arrives after the reconnect,
    and the user must still see why it failed (``bigtent build`` shows the log tail)."""
    farm = farm_factory()
    proxy = TcpProxy(farm.port)
    request.addfinalizer(proxy.close)
    agent = farm.start_agent("remote", max_jobs=1, runner_url=proxy.url)
    dag = farm.dag_file(layers=1, width=1, sleep=1, failing=["0-0"])
    client = _start_build(farm, dag, "nodes.dag-0-0", request)
    build_id = _wait_for(lambda: _only_build_id(farm), 30, "the build to be created")
    step = _wait_for(
        lambda: _building_on(farm, build_id, "remote"), 30, "the step building on the agent"
    )
    wait_until(
        lambda: "building node 0-0" in _step_log(farm, step["id"]),
        timeout=15,
        what="the builder's first log line",
    )

    cut_at = time.monotonic()
    proxy.cut()
    # Keep the cut until the builder has failed (the agent logs each step's outcome).
    marker = f"step {step['id']} ({step['drv_path']}): build_failure"
    wait_until(
        lambda: marker in agent.log.read_text(),
        timeout=LEASE_SECS - 2,
        what="the builder to fail during the cut",
    )
    outage = _reconnect_within_lease(farm, proxy, "remote", cut_at)

    code, _ = client.result(timeout=60)
    assert code != 0
    [after] = _steps(farm, build_id)
    assert (after["state"], after["outcome"], after["attempts"]) == (
        "failed",
        "build_failure",
        0,
    ), (outage, after)
    log = _step_log(farm, step["id"])
    assert "node 0-0 fails on purpose" in log, (outage, log)


# ---- 3. the runner killed mid-DAG and started again --------------------------------------
@pytest.mark.database
def test_runner_killed_mid_dag_restarts_without_rebuilding_finished_steps(
    farm_factory: Callable[..., Farm], request: pytest.FixtureRequest
) -> None:
    """architecture §3: a runner restart loses nothing; queue, leases and builds are in the
    database, so the DAG completes and no step that had succeeded is built again."""
    farm = farm_factory(agents=2)
    dag = farm.dag_file(layers=3, width=2, sleep=2)  # 6 nodes + top, 4 levels deep
    client = _start_build(farm, dag, "top", request)
    build_id = _wait_for(lambda: _only_build_id(farm), 30, "the build to be created")

    def mid_dag() -> list[dict[str, Any]] | None:
        steps = _steps(farm, build_id)
        done = [s for s in steps if s["state"] == "succeeded"]
        running = [s for s in steps if s["state"] in ("assigned", "building")]
        return steps if len(done) >= 2 and running else None

    before = _wait_for(mid_dag, 40, "two steps to succeed with more running")
    succeeded = {s["id"]: s["finished_at"] for s in before if s["state"] == "succeeded"}

    assert farm.runner is not None
    farm.runner.kill()  # SIGKILL
    farm.start_runner()  # same state dir and port

    code, out = client.result(timeout=90)
    assert code == 0, out
    assert out["state"] == "succeeded"
    after = {s["id"]: s for s in _steps(farm, build_id)}
    assert len(after) == 7
    _assert_no_failures(list(after.values()))
    assert all(s["state"] == "succeeded" for s in after.values()), after
    for sid, finished_at in succeeded.items():
        step = after[sid]
        assert step["finished_at"] == finished_at, (sid, finished_at, step)
        assert step["attempts"] == 0, step
        log = _step_log(farm, sid)
        assert log.count("building node") == 1, (sid, log)
