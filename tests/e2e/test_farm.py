"""End to end: `bigtent build` against a real runner and real agents with separate stores."""

from __future__ import annotations

import subprocess
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bigtent.nix.keys import generate_key
from tests.e2e.conftest import Farm

pytestmark = [pytest.mark.e2e, pytest.mark.nix]


def _steps(farm: Farm, build_id: int) -> dict[str, dict[str, Any]]:
    with farm.api() as c:
        steps = c.get(f"/api/v1/builds/{build_id}/steps").json()["steps"]
    return {str(s["name"]): s for s in steps}


def test_dag_of_33_builds_across_three_agents(farm_factory: Callable[..., Farm]) -> None:
    farm = farm_factory(agents=3)
    dag = farm.dag_file(layers=4, width=8)
    code, out = farm.build_json(str(dag), "-A", "top")
    assert code == 0, out
    assert out["state"] == "succeeded"
    steps = _steps(farm, out["build_id"])
    assert len(steps) == 33
    assert all(s["state"] == "succeeded" for s in steps.values())
    used = Counter(str(s["agent_name"]) for s in steps.values())
    assert len(used) >= 2, used
    result = farm.root / "result"
    assert result.is_symlink()
    assert result.read_text().startswith("top-0 ")


def test_failure_fails_only_its_dependents(farm_factory: Callable[..., Farm]) -> None:
    farm = farm_factory(agents=2)
    # fanIn 1: node (l, i) depends on (l-1, i) only, so 0-1 fails the chain 1-1, 2-1, top.
    dag = farm.dag_file(layers=3, width=3, fanIn=1, failing=["0-1"])
    proc = farm.bigtent("build", str(dag), "-A", "top", "--no-download")
    assert proc.returncode != 0
    assert "dag-0-1" in proc.stdout + proc.stderr
    assert "fails on purpose" in proc.stdout + proc.stderr
    with farm.api() as c:
        build_id = c.get("/api/v1/builds").json()["builds"][0]["id"]
        build = c.get(f"/api/v1/builds/{build_id}").json()
    assert build["state"] == "failed"
    steps = _steps(farm, build_id)
    assert steps["dag-0-1"]["state"] == "failed"
    assert steps["dag-0-1"]["outcome"] == "build_failure"
    for name in ("dag-1-1", "dag-2-1", "dag-top-0"):
        assert steps[name]["state"] == "dependency_failed", name
    for name in ("dag-0-0", "dag-1-0", "dag-2-0", "dag-0-2", "dag-1-2", "dag-2-2"):
        assert steps[name]["state"] == "succeeded", name
    [failed] = build["failed_steps"]
    assert "fails on purpose" in failed["log_tail"]


def test_cached_outputs_are_not_rebuilt(farm_factory: Callable[..., Farm]) -> None:
    farm = farm_factory(agents=1)
    dag = farm.dag_file(layers=2, width=3)
    code, first = farm.build_json(str(dag), "-A", "top", "--no-download")
    assert code == 0, first
    assert len(_steps(farm, first["build_id"])) == 7
    code, again = farm.build_json(str(dag), "-A", "top", "--no-download")
    assert code == 0, again
    assert again["state"] == "succeeded"
    assert _steps(farm, again["build_id"]) == {}
    # A new node on top of cached ones builds only itself.
    code, node = farm.build_json(str(dag), "-A", "nodes.dag-1-0", "--no-download")
    assert code == 0
    assert _steps(farm, node["build_id"]) == {}


def test_kvm_step_goes_to_the_kvm_agent_and_plain_work_stays_off_it(
    farm_factory: Callable[..., Farm],
) -> None:
    farm = farm_factory()
    farm.start_agent("plain", max_jobs=4)
    farm.start_agent("kvmbox", max_jobs=1, supported_features=["kvm"])
    dag = farm.dag_file(layers=1, width=4, kvm=["0-0", "0-1"])
    code, out = farm.build_json(str(dag), "-A", "top", "--no-download")
    assert code == 0, out
    steps = _steps(farm, out["build_id"])
    assert steps["dag-0-0"]["agent_name"] == "kvmbox"
    assert steps["dag-0-1"]["agent_name"] == "kvmbox"
    for name in ("dag-0-2", "dag-0-3", "dag-top-0"):
        assert steps[name]["agent_name"] == "plain", name


def _realise(
    store: Path, paths: list[str], cache_url: str, key: str, xdg: Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "nix-store",
            "--store",
            f"local?root={store}",
            "--realise",
            *paths,
            "--option",
            "substituters",
            cache_url,
            "--option",
            "trusted-public-keys",
            key,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "XDG_CACHE_HOME": str(xdg)},
    )


def test_fresh_store_substitutes_results_only_with_the_runner_key(
    farm_factory: Callable[..., Farm], tmp_path: Path
) -> None:
    farm = farm_factory(agents=2)
    dag = farm.dag_file(layers=2, width=2)
    code, out = farm.build_json(str(dag), "-A", "top", "--no-download")
    assert code == 0, out
    outputs = [
        str(o) for step in _steps(farm, out["build_id"]).values() for o in step["outputs"].values()
    ]
    wrong = generate_key("someone-else-1").public_key().to_text()
    refused = _realise(tmp_path / "wrong", outputs, farm.cache_url, wrong, tmp_path / "x1")
    assert refused.returncode != 0
    assert not (tmp_path / "wrong" / outputs[0].lstrip("/")).exists()
    ok = _realise(tmp_path / "fresh", outputs, farm.cache_url, farm.public_key, tmp_path / "x2")
    assert ok.returncode == 0, ok.stderr
    for path in outputs:
        assert (tmp_path / "fresh" / path.lstrip("/")).exists()
