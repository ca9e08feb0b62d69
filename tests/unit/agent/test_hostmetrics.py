"""What the heartbeats say about the host (``agent/hostmetrics.py``)."""

from __future__ import annotations

from pathlib import Path

from bigtent.agent.hostmetrics import read_host_metrics


def test_read_host_metrics(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    (proc / "pressure").mkdir(parents=True)
    (proc / "meminfo").write_text("MemTotal:  1000 kB\nMemFree: 100 kB\nMemAvailable:  400 kB\n")
    (proc / "pressure" / "cpu").write_text(
        "some avg10=1.50 avg60=0.09 avg300=0.28 total=3621154\n"
        "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
    )
    metrics = read_host_metrics(tmp_path / "no" / "such" / "store", tmp_path, proc=proc)
    assert metrics.memory_total_bytes == 1000 * 1024
    assert metrics.memory_used_bytes == 600 * 1024
    assert metrics.psi_cpu_some_avg10 == 1.5
    assert metrics.free_store_bytes is not None and metrics.free_store_bytes > 0
    assert metrics.free_build_bytes == metrics.free_store_bytes


def test_read_host_metrics_without_proc(tmp_path: Path) -> None:
    metrics = read_host_metrics(tmp_path, tmp_path, proc=tmp_path / "missing")
    assert metrics.memory_total_bytes is None
    assert metrics.psi_cpu_some_avg10 is None
