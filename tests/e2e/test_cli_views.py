"""End to end: what the client prints (issue items 5, 6, 7, 13) against a real runner and
agent: step events outside a terminal and ``-L``, ``bigtent log --follow``, ``bigtent steps``,
``bigtent builds`` filters, a fully cached build, a cancel and a refused agent in the logs,
and ``bigtent up``'s own output."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_until
from tests.e2e.conftest import Farm, free_port
from tests.unit.cli.helpers import parse_table, widest_line

pytestmark = [pytest.mark.e2e, pytest.mark.nix]


def _steps(farm: Farm, build_id: str | int) -> list[dict[str, Any]]:
    with farm.api() as c:
        return list(c.get(f"/api/v1/builds/{build_id}/steps").json()["steps"])


def _step_in(farm: Farm, build_id: str, name: str, states: set[str]) -> dict[str, Any] | None:
    for step in _steps(farm, build_id):
        if step["name"] == name and step["state"] in states:
            return step
    return None


def _latest_build(farm: Farm) -> str | None:
    with farm.api() as c:
        builds = c.get("/api/v1/builds", params={"limit": 1}).json()["builds"]
    return str(builds[0]["id"]) if builds else None


def _background_build(farm: Farm, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bigtent", "build", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=farm.env(),
        cwd=farm.root,
    )


def test_progress_lines_and_build_logs_outside_a_terminal(
    farm_factory: Callable[..., Farm],
) -> None:
    farm = farm_factory(agents=1)
    dag = farm.dag_file(layers=2, width=1, fanIn=1, sleep=1)
    proc = farm.bigtent("build", str(dag), "-A", "top", "--no-download", "-L")
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr
    build_id = re.search(r"^build (\d+) queued$", err, re.M)
    assert build_id is not None, err
    steps = _steps(farm, build_id.group(1))
    for step in steps:
        label = f"step {step['id']} {step['name']}"
        assert re.search(rf"^{label}: succeeded on a0 in \d+\.\d s$", err, re.M), err
        # -L: the step's log lines, prefixed with its derivation's name, also for a step
        # that started and ended between two looks of the client
        node = step["name"].removeprefix("dag-")
        assert f"{step['name']}> building node {node}" in err, err
    # "started" for every step the client saw running (a 1 s step may run between two looks)
    started = [s for s in steps if f"step {s['id']} {s['name']}: started on a0" in err]
    assert started, err
    # one line per event, no progress bar or spinner frames in a pipe
    assert "\r" not in err and "━" not in err and "⠋" not in err
    assert f"build {build_id.group(1)} succeeded: 3/3 steps done" in err

    again = farm.bigtent("build", str(dag), "-A", "top", "--no-download")
    assert again.returncode == 0, again.stderr
    assert "nothing to build: all 1 output cached" in again.stderr
    assert "0/0" not in again.stderr


def test_log_follows_a_running_step_until_it_ends(farm_factory: Callable[..., Farm]) -> None:
    farm = farm_factory(agents=1)
    dag = farm.dag_file(layers=1, width=1, sleep=20)
    build = _background_build(farm, str(dag), "-A", "top", "--no-download")
    try:
        wait_until(lambda: _latest_build(farm) is not None, timeout=60, what="the build")
        build_id = _latest_build(farm)
        assert build_id is not None
        wait_until(
            lambda: _step_in(farm, build_id, "dag-0-0", {"building"}) is not None,
            timeout=60,
            what="the step to run",
        )
        step = _step_in(farm, build_id, "dag-0-0", {"building"})
        assert step is not None
        # --no-follow: what the log holds now, at once, while the step still runs
        now = farm.bigtent("log", str(step["id"]), "--no-follow", check=True)
        assert _step_in(farm, build_id, "dag-0-0", {"building"}) is not None
        assert now.stdout.startswith("building node 0-0")
        # by default a running step's log is followed until the step ends
        followed = farm.bigtent("log", str(step["id"]), check=True)
        assert _step_in(farm, build_id, "dag-0-0", {"succeeded"}) is not None
        assert followed.stdout.startswith("building node 0-0\n")
        assert build.wait(timeout=120) == 0
    finally:
        if build.poll() is None:
            build.kill()
            build.wait()


def test_steps_and_builds_filters(farm_factory: Callable[..., Farm]) -> None:
    farm = farm_factory(agents=1)
    good = farm.dag_file(layers=2, width=2, fanIn=1)
    bad = farm.dag_file(layers=1, width=1, failing=["0-0"])
    mine = farm.bigtent(
        "build", str(good), "-A", "top", "--no-download",
        "--repository", "acme/widgets", "--ref", "refs/heads/main",
    )  # fmt: skip
    assert mine.returncode == 0, mine.stderr
    other = farm.bigtent("build", str(bad), "-A", "top", "--no-download", token=farm.admin_token)
    assert other.returncode == 1, other.stderr

    def ids(*args: str) -> list[str]:
        proc = farm.bigtent("builds", "--json", *args, check=True)
        return [str(b["id"]) for b in json.loads(proc.stdout)]

    assert ids() == ["2", "1"]
    assert ids("--limit", "1") == ["2"]
    assert ids("--state", "failed") == ["2"]
    assert ids("--state", "failed", "--state", "succeeded") == ["2", "1"]
    assert ids("--mine") == ["1"]
    assert ids("--repository", "acme/widgets") == ["1"]
    assert ids("--ref", "refs/heads/main") == ["1"]
    assert ids("--ref", "refs/heads/other") == []
    wrong = farm.bigtent("builds", "--state", "finished")
    assert wrong.returncode == 2 and "finished" in wrong.stderr

    # bigtent steps: the build's steps, their agent and times; a table that fits
    steps = json.loads(farm.bigtent("steps", "1", "--json", check=True).stdout)
    assert sorted(s["name"] for s in steps) == [
        *["dag-0-0", "dag-0-1", "dag-1-0", "dag-1-1"],
        "dag-top-0",
    ]
    assert {s["state"] for s in steps} == {"succeeded"}
    assert {s["agent_name"] for s in steps} == {"a0"}
    rows = parse_table(_cli(farm, "steps", "1", columns=250))
    assert {r["name"] for r in rows} == {s["name"] for s in steps}
    assert all(r["agent"] == "a0" and r["state"] == "succeeded" for r in rows)
    assert all(r["started"].endswith(" ago") and r["took"].endswith(" s") for r in rows)
    narrow = _cli(farm, "steps", "2", columns=90)
    assert widest_line(narrow) <= 90, narrow
    failed = {r["name"]: r for r in parse_table(narrow)}
    assert failed["dag-0-0"]["state"] == "failed"  # names are never cut, the reason folds
    assert failed["dag-0-0"]["outcome"].startswith("build_failure: error: builder for")
    assert failed["dag-top-0"]["state"] == "dependency_failed"
    # the builds table: human times (no microseconds)
    builds = _cli(farm, "builds", columns=250)
    assert not re.search(r"\d\d:\d\d:\d\d\.\d+", builds), builds
    assert {r["created"][-4:] for r in parse_table(builds)} == {" ago"}


def _cli(farm: Farm, *args: str, columns: int) -> str:
    """Stdout of a client command run with ``COLUMNS`` set (a table's width)."""
    proc = subprocess.run(
        [sys.executable, "-m", "bigtent", *args],
        capture_output=True,
        text=True,
        env=farm.env(COLUMNS=str(columns)),
        cwd=farm.root,
        timeout=60,
        check=True,
    )
    return proc.stdout


def test_cancel_and_refused_agent_are_no_alarm(farm_factory: Callable[..., Farm]) -> None:
    farm = farm_factory(agents=1)
    dag = farm.dag_file(layers=1, width=1, sleep=60)
    build = _background_build(farm, str(dag), "-A", "top", "--no-download")
    try:
        wait_until(lambda: _latest_build(farm) is not None, timeout=60, what="the build")
        build_id = _latest_build(farm)
        assert build_id is not None
        wait_until(
            lambda: _step_in(farm, build_id, "dag-0-0", {"building"}) is not None,
            timeout=60,
            what="the step to run",
        )
        farm.bigtent("cancel", build_id, check=True)
        assert build.wait(timeout=60) == 1
    finally:
        if build.poll() is None:
            build.kill()
            build.wait()
    agent_log = farm.agents["a0"].log
    wait_until(
        lambda: "the runner no longer needs its result" in agent_log.read_text(),
        timeout=30,
        what="the agent to hear the runner did not record the aborted step",
    )
    assert " WARNING " not in agent_log.read_text()

    refused = farm.start_agent(
        "intruder", token="not-a-token", wait=False, extra_args=["--skip-probe"]
    )
    assert refused.popen.wait(timeout=60) == 3
    assert farm.runner is not None
    runner_log = farm.runner.log.read_text()
    assert "agent connection from 127.0.0.1 refused: invalid token" in runner_log
    assert " ERROR " not in runner_log, runner_log
    said = refused.log.read_text()
    assert said.count(" ERROR ") == 1 and "refused the agent's credentials" in said, said
    assert "Traceback" not in said


def _read_until(proc: subprocess.Popen[str], marker: str, timeout: float) -> str:
    """What ``proc`` wrote on stdout until a line holding ``marker``."""
    assert proc.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if marker in line:
            return "".join(seen)
    raise AssertionError(f"no {marker!r} within {timeout}s:\n" + "".join(seen))


def test_up_says_one_line_about_its_database(tmp_path: Path) -> None:
    state = tmp_path / "state"
    port = free_port()
    up = subprocess.Popen(
        [sys.executable, "-m", "bigtent", "up", "--agents", "0", "--state-dir", str(state),
         "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )  # fmt: skip
    try:
        out = _read_until(up, "bigtent is up", timeout=90)
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(timeout=60)
    assert "alembic" not in out, out
    assert "None" not in out, out
    assert out.count("database created (schema ") == 1, out
    assert "alembic" not in (state / "logs" / "runner.log").read_text()


def test_up_checks_its_port_before_writing_a_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "new-state"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "bigtent", "up", "--agents", "0", "--state-dir", str(state),
             "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"Error: port {port} on 127.0.0.1 is already in use; choose another with --port"
    )
    assert not state.exists()
