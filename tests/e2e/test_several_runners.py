"""End to end: two runner processes on one PostgreSQL database (and one state dir, for the
NAR files), real agents with separate Nix stores on each, two clients building the same DAG
at once, one through each runner. Every step is dispatched exactly once — by the step records
and by the agents' own logs — and both builds succeed."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from tests.databases import needs_postgresql
from tests.e2e.conftest import Farm

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.nix,
    pytest.mark.postgres,
    pytest.mark.database,
    needs_postgresql,
]

_STARTED = re.compile(r"step (\d+) \(/nix/store/[^)]+\): (?:building \(serve\)|realising)$")
"""What an agent logs when it starts a step it accepted."""


def _steps(farm: Farm, build_id: int) -> list[dict[str, Any]]:
    with farm.api() as c:
        return list(c.get(f"/api/v1/builds/{build_id}/steps").json()["steps"])


def test_two_runners_dispatch_every_step_once(farm_factory: Callable[..., Farm]) -> None:
    farm = farm_factory(agents=0)
    peer, peer_url = farm.start_peer_runner()
    for name in ("a0", "a1"):
        farm.start_agent(name, max_jobs=2)
    for name in ("b0", "b1"):
        farm.start_agent(name, max_jobs=2, runner_url=peer_url)
    dag = farm.dag_file(layers=4, width=6)
    # The same DAG through each runner at once: one drv, one step, whoever plans it.
    clients = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bigtent",
                "build",
                "--json",
                "--no-download",
                str(dag),
                "-A",
                "top",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=farm.root,
            env=farm.env(BIGTENT_URL=url),
        )
        for url in (farm.url, peer_url)
    ]
    results = []
    for client in clients:
        out, err = client.communicate(timeout=300)
        assert client.returncode == 0, out + err + farm.logs()
        results.append(json.loads(out))
    assert [r["state"] for r in results] == ["succeeded", "succeeded"]
    first, second = (_steps(farm, r["build_id"]) for r in results)
    step_ids = {s["id"] for s in first} | {s["id"] for s in second}
    assert len(step_ids) == 25, (first, second)  # 4 layers of 6 and the top, shared
    for step in first + second:
        assert step["state"] == "succeeded", step
        assert step["attempts"] == 0, step  # never retried, never handed out again
    # The agents' own record: each step was started once, on one agent, in all.
    started: Counter[int] = Counter()
    where: dict[int, str] = {}
    for name, proc in farm.agents.items():
        for line in proc.log.read_text().splitlines():
            m = _STARTED.search(line)
            if m:
                started[int(m.group(1))] += 1
                where[int(m.group(1))] = name
    assert set(started) == step_ids, farm.logs()
    assert max(started.values()) == 1, [s for s, n in started.items() if n > 1]
    # Agents of both runners did the work, and each step names the agent that built it.
    assert {n[0] for n in where.values()} == {"a", "b"}, where
    for step in first:
        assert step["agent_name"] == where[step["id"]]
    assert peer.alive() and farm.runner is not None and farm.runner.alive()
