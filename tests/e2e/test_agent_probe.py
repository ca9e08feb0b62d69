"""The start-up probe with real processes and real Nix: an agent whose store cannot build exits
at start with Nix's reason and a hint, and never registers; ``bigtent up`` reports such an
agent and stops, and says "bigtent is up" only once its agents have registered."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from bigtent.agent.probe import HINTS, ProbeCause
from tests.conftest import wait_until
from tests.e2e.conftest import Farm, free_port

pytestmark = pytest.mark.e2e

BROKEN = 'extra_nix_options = { "build-users-group" = "nosuchgroup" }'
NIX_ERROR = "the group 'nosuchgroup' specified in 'build-users-group' does not exist"


def test_agent_that_cannot_build_exits_at_start_and_never_registers(
    farm_factory: Callable[..., Farm],
) -> None:
    farm = farm_factory()
    proc = farm.start_agent("broken", wait=False, agent_extra=BROKEN)
    code = proc.popen.wait(timeout=120)
    out = proc.log.read_text()
    assert code == 6, out
    assert NIX_ERROR in out
    assert "hint: " + HINTS[ProbeCause.BUILD_USERS] in out
    assert "Traceback" not in out
    with farm.api() as c:
        names = [a["name"] for a in c.get("/api/v1/agents").json()["agents"]]
    assert "broken" not in names
    # A healthy agent on the same farm passes the same probe and registers.
    farm.start_agent("good")


def _up_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BIGTENT_", "NIX_"))}
    env["NIX_CONFIG"] = "substituters =\n" + extra.pop("nix_config", "")
    env.update(extra)
    return env


@pytest.fixture
def up_proc(tmp_path: Path) -> Iterator[Callable[..., tuple[subprocess.Popen[str], int]]]:
    """``bigtent up --agents 1`` in a fresh state dir on a free port; stopped at teardown."""
    procs: list[subprocess.Popen[str]] = []

    def start(nix_config: str = "") -> tuple[subprocess.Popen[str], int]:
        port = free_port()
        argv = [sys.executable, "-m", "bigtent", "up", "--agents", "1"]
        argv += ["--state-dir", str(tmp_path / "state"), "--port", str(port)]
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_up_env(nix_config=nix_config),
            cwd=tmp_path,
            start_new_session=True,
        )
        procs.append(proc)
        return proc, port

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def test_up_reports_an_agent_that_cannot_build_and_stops(
    up_proc: Callable[..., tuple[subprocess.Popen[str], int]],
) -> None:
    proc, _ = up_proc(nix_config="build-users-group = nosuchgroup\n")
    out, err = proc.communicate(timeout=180)
    assert proc.returncode != 0, out + err
    assert "bigtent is up" not in out
    assert "agent local-1 exited (status 6) before registering" in err
    assert NIX_ERROR in err
    assert "hint: " + HINTS[ProbeCause.BUILD_USERS] in err


def test_up_says_it_is_up_once_its_agents_registered(
    up_proc: Callable[..., tuple[subprocess.Popen[str], int]], tmp_path: Path
) -> None:
    proc, port = up_proc()
    assert proc.stdout is not None
    seen: list[str] = []

    def announced() -> bool:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            raise AssertionError(f"bigtent up exited {proc.returncode}: {''.join(seen)}")
        seen.append(line)
        return line.startswith("bigtent is up")

    wait_until(announced, timeout=180, what="bigtent is up")
    token = (tmp_path / "state" / "tokens" / "client").read_text().strip()
    agents = httpx.get(
        f"http://127.0.0.1:{port}/api/v1/agents",
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    ).json()["agents"]
    assert [(a["name"], a["connected"]) for a in agents] == [("local-1", True)]
