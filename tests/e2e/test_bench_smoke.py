"""The benchmark scripts keep working: each runs once on a tiny size and reports its fields
(nothing is timed: the numbers on a shared machine mean nothing here)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import have_nix, nix_children_see_our_root

REPO = Path(__file__).resolve().parents[2]

# The benchmarks choose their own database (SQLite, or a URL they are given): like every e2e
# test not marked ``database``, they run in the SQLite pass only.
pytestmark = [pytest.mark.e2e]


def run_bench(script: str, *args: str, cwd: Path, timeout: float = 300) -> Any:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args, "--json"],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout)


def assert_machine(result: dict[str, Any]) -> None:
    m = result["machine"]
    assert m["cores"] >= 1 and m["ram_gib"] > 0 and len(m["load_average"]) == 3
    assert m["cpu_model"] and m["date"]


@pytest.mark.nix
@pytest.mark.skipif(not have_nix(), reason="needs Nix")
def test_dag_benchmark_runs_on_a_tiny_dag(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "dag.py"), "--layers", "2", "--width", "2",
         "--no-ssh", "--sleep-layers", "1", "--sleep-width", "1", "--cpu-dag", "20", "--json"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "bigtent / local nix-build -j2:" in proc.stderr
    assert "makespan (build created -> finished on the runner)" in proc.stderr
    result = json.loads(proc.stdout)
    assert result["derivations"] == 5
    # The wide CPU DAG: 2 layers of 10 plus the top; the runner did work for it.
    assert result["cpu_dag_steps"] == 21
    assert result["cpu_dag_runner_cpu_secs"] > 0 and result["runner_cpu_ms_per_step"] > 0
    assert result["dag_runner_cpu_ms_per_step"] > 0
    targets = result["targets"]
    assert set(targets) == {
        "bigtent_vs_local",
        "download_vs_local",
        "ssh_vs_bigtent",
        "makespan_ratio",
        "runner_cpu_ms_per_step",
    }
    assert targets["ssh_vs_bigtent"] == {"value": None, "limit": 20.0, "sense": "min", "met": None}
    for key in ("bigtent_vs_local", "download_vs_local", "makespan_ratio"):
        assert targets[key]["value"] == result[key] and isinstance(targets[key]["met"], bool)
    assert targets["runner_cpu_ms_per_step"]["met"] == (result["runner_cpu_ms_per_step"] <= 2.0)
    assert "## targets" in proc.stderr


@pytest.mark.nix
@pytest.mark.skipif(not have_nix(), reason="needs Nix")
def test_dag_benchmark_takes_a_statement_census(tmp_path: Path) -> None:
    """``BENCH_SQL_CENSUS``: the runner's statements over the CPU DAG, counted in the runner
    (one attempt record per step of the 21-step DAG, every step's end committed)."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "dag.py"), "--layers", "1", "--width", "1",
         "--no-ssh", "--sleep-layers", "1", "--sleep-width", "1", "--cpu-dag", "20", "--json"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "BENCH_SQL_CENSUS": str(tmp_path / "census")},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    census = json.loads(proc.stdout)["sql_census"]
    counts = census["statements"]
    assert sum(n for s, n in counts.items() if s.startswith("INSERT INTO step_attempts")) == 21
    assert census["statements_per_step"] == sum(counts.values()) / 21
    assert census["transactions_per_step"]["commit"] >= 1
    assert "## SQL statements per step over the CPU DAG" in proc.stderr


def test_scheduler_benchmark_reports_its_fields(tmp_path: Path) -> None:
    result = run_bench(
        "scheduler.py", "--size", "1000", "--agents", "40", "--steady", "200", cwd=tmp_path
    )
    assert_machine(result)
    assert [r["size"] for r in result["runs"]] == [100, 1000]
    for run in result["runs"]:
        assert run["first"]["steps"] == run["size"]
        assert run["first"]["first_assign_secs"] is not None
        assert run["capacity"]["capacity"]["decisions"] > 0
        assert run["capacity"]["steady"]["finished"] > 0
        assert run["memory"]["tracemalloc_peak_bytes"] > 0
        assert run["heap_pops_per_sec"] > 0
    h = result["headline"]
    assert set(h["per_decision_cpu_us_by_size"]) == {"100", "1000"}
    for key in ("decisions_per_sec", "decisions_per_cpu_sec", "rss_after_submit_mib"):
        assert h[key] > 0
    assert h["hydra_reference"]["secs_to_start"] == 88.0


def test_fanin_benchmark_reports_its_fields(tmp_path: Path) -> None:
    result = run_bench(
        "fanin.py", "--agents", "20", "--ramp-secs", "0.5", "--duration", "3",
        "--heartbeat-secs", "1", cwd=tmp_path,
    )  # fmt: skip
    assert_machine(result)
    for server in ("runner", "baseline"):
        r = result[server]
        assert r["registered"] == 20 and r["error_count"] == 0, r["errors"]
        assert r["heartbeat"]["n"] > 0 and r["register"]["n"] == 20
        assert r["steady"]["cores"] >= 0 and r["rss_bytes"] > 0
    h = result["headline"]
    assert h["heartbeat_p99_ms"] >= h["heartbeat_p50_ms"] > 0
    assert h["runner_rss_mib"] > 0 and h["errors"] == 0


@pytest.mark.nix
@pytest.mark.skipif(not have_nix(), reason="needs Nix")
@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_cache_benchmark_reports_its_fields(tmp_path: Path) -> None:
    result = run_bench(
        "cache.py", "--size-mib", "4", "--narinfo-repeat", "1", "--rounds", "1", cwd=tmp_path
    )
    assert_machine(result)
    n = result["nars"]["count"]
    assert n > 1
    for key in ("ingest_none", "ingest_zstd"):
        assert result[key]["nars"] == n and result[key]["mib_per_sec"] > 0
    assert result["sha256sum"]["mib_per_sec"] > 0
    # Real Nix substituted the whole closure (every part and the top) from each cache.
    assert result["closure_paths"] == n + 1
    for source in ("runner", "static", "file"):
        assert result["realise"][source]["paths"] == n + 1
    for server in ("runner", "static"):
        assert result["serving"][server]["nar"]["requests"] == n + 1
    h = result["headline"]
    assert h["ingest_none_vs_sha256sum"] > 0 and h["serve_nar_vs_static"] > 0
    assert h["realise_runner_vs_file"] > 0
    # Each target is judged against its figure.
    assert h["met_ingest"] == (h["ingest_none_vs_sha256sum"] >= h["target_ingest"])
    assert h["met_serving"] == (h["serve_nar_vs_static"] >= h["target_serving"])
    assert h["met_realise"] == (h["realise_runner_vs_file"] <= h["target_realise"])


def test_forge_benchmark_reports_its_fields(tmp_path: Path) -> None:
    result = run_bench("forge.py", "--jobs", "30", "--fail-every", "3", cwd=tmp_path)
    assert_machine(result)
    assert (result["jobs"], result["failed_jobs"], result["reports"]) == (30, 10, 64)
    assert result["check_runs_wanted"] == 11  # the summary and one per failed job
    assert result["github_posts"] == 11 and result["token_requests"] == 1
    assert result["final_report_to_posted_secs"] > 0 < result["baseline_direct_create_secs"]


@pytest.mark.nix
@pytest.mark.skipif(not have_nix(), reason="needs Nix")
def test_nixhook_benchmark_runs_on_a_tiny_dag(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "nixhook.py"), "--layers", "2", "--width", "2",
         "--no-ssh", "--json"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["derivations"] == 5
    assert set(result["wall_secs"]) == {
        "nix-build -j2 (local)",
        "bigtent build (2 agents x 2 jobs, results fetched)",
        "nix-build through bigtent-nix-hook (same farm)",
        "nix-build through bigtent-nix-hook, helper running",
        "nix-build --store unix:// through bigtent nix-proxy (same farm)",
    }
    assert result["ssh_vs_hook"] is None


def test_logretention_benchmark_reports_its_fields(tmp_path: Path) -> None:
    result = run_bench("logretention.py", "--logs", "200", cwd=tmp_path)
    assert_machine(result)
    # Half the logs are past retention: every one of them goes, the rest stays.
    assert result["expired"] == result["deleted"] == 100 and result["files_left"] == 200
    assert result["more"] is False and result["pass_secs"] > 0
    assert result["loop_lateness_ms"]["n"] > 0 and result["baseline_lateness_ms"]["n"] > 0


@pytest.mark.nix
@pytest.mark.skipif(not have_nix(), reason="needs Nix")
@nix_children_see_our_root
def test_eval_benchmark_reports_its_fields(tmp_path: Path) -> None:
    result = run_bench("eval.py", "--jobs", "5", cwd=tmp_path)
    assert_machine(result)
    run = result["run"]
    assert run["jobs"] == 5 and run["steps"] == 5
    assert run["baseline_nix_eval"]["jobs"] == 5
    assert run["webhook_to_first_dispatch_secs"] is not None
    assert run["webhook_to_final_secs"] >= run["webhook_to_building_secs"]
    assert run["evaluator_peak_rss_bytes_logged"] > 0


def test_gc_benchmark_reports_its_fields(tmp_path: Path) -> None:
    result = run_bench("gc.py", "--paths", "300", cwd=tmp_path)
    assert_machine(result)
    first, second = result["first"], result["second"]
    assert first["paths_deleted"] == result["idle_paths"] > 0
    assert first["files_deleted"] == result["idle_paths"]
    assert second["paths_deleted"] == 0
    assert first["serving_errors"] == [] and first["peak_rss_mib"] > 0


@pytest.mark.nix
@pytest.mark.skipif(not have_nix(), reason="needs Nix")
@nix_children_see_our_root
def test_eval_benchmark_can_stop_at_the_first_dispatch(tmp_path: Path) -> None:
    result = run_bench("eval.py", "--jobs", "5", "--until-dispatch", cwd=tmp_path)
    run = result["run"]
    assert run["webhook_to_first_dispatch_secs"] is not None
    assert run["webhook_to_final_secs"] is None and run["steps"] == 5


@pytest.mark.nix
@pytest.mark.skipif(not have_nix(), reason="needs Nix")
def test_drvingest_benchmark_reports_its_fields(tmp_path: Path) -> None:
    result = run_bench("drvingest.py", "--jobs", "20", "--deps", "--batch", "7", cwd=tmp_path)
    assert_machine(result)
    run = result["run"]
    assert run["paths"] == 22 and run["batch"] == 7
    assert run["single_secs"] > 0 and run["batch_secs"] > 0


@pytest.mark.nix
@pytest.mark.skipif(not have_nix(), reason="needs Nix")
def test_requests_cpu_benchmark_reports_its_fields(tmp_path: Path) -> None:
    result = run_bench("requests_cpu.py", "--requests", "20", "--rounds", "1", cwd=tmp_path)
    assert_machine(result)
    routes = result["routes"]
    assert set(routes) == {"narinfo", "nar", "narinfo-404", "build", "upload"}
    statuses = {name: r["status"] for name, r in routes.items()}
    assert statuses == {"narinfo": 200, "nar": 200, "narinfo-404": 404, "build": 200, "upload": 409}
    for r in routes.values():
        assert r["runner_us"] >= 0 and r["floor_us"] >= 0 and r["bytes"] > 0


def test_outputput_benchmark_reports_its_fields(tmp_path: Path) -> None:
    result = run_bench("outputput.py", "--uploads", "20", "--rounds", "2", cwd=tmp_path)
    assert_machine(result)
    run = result["run"]
    assert run["uploads"] == 20 and len(run["ms_per_upload"]) == 2
    assert 0 < run["best"] == min(run["ms_per_upload"])
    assert 0 < run["loop_best"] == min(run["loop_ms_per_upload"])
