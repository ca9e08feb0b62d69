"""An agent whose store is a small tmpfs builds a chain of derivations whose outputs together
are several times the store's size: it collects its store (Nix's GC) as it goes, never
losing a running step's inputs, and the build succeeds; the runner learns its free disk from
heartbeats."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Farm
from tests.e2e.test_faults import _steps, _wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.nix, pytest.mark.slow]

MIB = 1024 * 1024
STORE_BYTES = 48 * MIB
"""The tmpfs the agent's store lives on."""
OUTPUT_BYTES = 6 * MIB
LINKS = 16
"""16 outputs of 6 MiB: 96 MiB, twice the store."""

CHAIN_NIX = """
let
  salt = "SALT";
  link = i: prev: derivation {
    name = "chain-${toString i}";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    PATH = "/usr/bin:/bin";
    inherit salt prev;
    args = [ "-c" ''
      test -z "$prev" || test "$(stat -c %s $prev/blob)" = BYTES
      mkdir $out
      head -c BYTES /dev/urandom > $out/blob
      echo ${toString i} > $out/n
    '' ];
  };
  go = i: prev: if i > LINKS then prev else go (i + 1) (link i prev);
in go 1 ""
"""


@pytest.fixture
def small_store(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of ``STORE_BYTES`` for the agent's store root (needs root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    root = tmp_path / "small-store"
    root.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={STORE_BYTES}", "tmpfs", str(root)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)


def _agent(farm: Farm, name: str) -> dict[str, Any]:
    with farm.api() as c:
        agents = c.get("/api/v1/agents").json()["agents"]
    return next(a for a in agents if a["name"] == name)


def test_agent_with_small_store_builds_a_chain_larger_than_its_store(
    farm_factory: Callable[..., Farm], small_store: Path, tmp_path: Path
) -> None:
    farm = farm_factory(scheduler_extra=f"min_free_store_bytes = {8 * MIB}\n")
    agent = farm.start_agent(
        "small",
        max_jobs=1,
        store=f"local?root={small_store}",
        agent_extra=f"min_free_bytes = {20 * MIB}\ntarget_free_bytes = {40 * MIB}\n"
        "gc_check_secs = 1\n",
    )
    nix = tmp_path / "chain.nix"
    nix.write_text(
        CHAIN_NIX.replace("SALT", os.urandom(8).hex())
        .replace("BYTES", str(OUTPUT_BYTES))
        .replace("LINKS", str(LINKS))
    )
    code, data = farm.build_json(str(nix), "--no-download", timeout=600)
    assert code == 0, (data, farm.logs())
    log = agent.log.read_text()
    assert "store collected:" in log, log[-4000:]
    assert "No space left" not in log
    # Every link was built, none failed for want of space. A link may be retried for one
    # reason only, a race of Nix 2.8's collector: a Nix process that saw the GC lock held
    # connects to the GC socket just as the collection ends ("cannot connect to socket at
    # .../gc-socket/socket"); the step is retried at once and succeeds.
    steps = _steps(farm, data["build_id"])
    assert len(steps) == LINKS
    assert [s["state"] for s in steps] == ["succeeded"] * LINKS
    failures = [line for line in log.splitlines() if "_failure (" in line]
    assert all("gc-socket/socket" in line for line in failures), failures
    assert sum(s["attempts"] for s in steps) == len(failures) <= 2, (steps, failures)
    # The runner knows the agent's free disk from its heartbeats.
    shown = _wait_for(
        lambda: _with_free_disk(_agent(farm, "small")),
        30,
        "the agent's free disk in the agents API",
    )
    assert 0 < shown["free_store_bytes"] <= STORE_BYTES
    assert shown["has_room"] is True


def _with_free_disk(agent: dict[str, Any]) -> dict[str, Any] | None:
    return agent if agent.get("free_store_bytes") is not None else None


def test_runner_deletes_step_logs_past_retention(farm_factory: Callable[..., Farm]) -> None:
    # 0.00003 days: 2.6 s; looked at every 0.5 s.
    farm = farm_factory(
        agents=1,
        scheduler_extra="log_retention_days = 0.00003\nlog_retention_check_secs = 0.5\n",
    )
    code, data = farm.build_json(str(farm.dag_file(layers=1, width=2)), "-A", "top")
    assert code == 0, data
    steps = _steps(farm, data["build_id"])
    logs = farm.root / "runner" / "logs"

    def expired() -> bool:
        with farm.api() as c:
            return all(
                c.get(f"/api/v1/steps/{s['id']}/log").headers.get("x-bigtent-log-expired") == "true"
                for s in steps
            )

    _wait_for(expired, 60, "every step's log to expire")
    assert logs.is_dir()
    assert [p.name for s in steps for p in logs.glob(f"{s['id']}.log*")] == []
    runner_log = farm.procs[0].log.read_text()
    deleted = sum(int(n) for n in re.findall(r"deleted (\d+) step logs older than", runner_log))
    assert deleted == len(steps), runner_log[-3000:]
    out = farm.bigtent("log", str(steps[0]["id"]))
    assert "log expired" in out.stdout, out
