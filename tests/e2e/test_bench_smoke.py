"""The benchmark scripts keep working: each runs once on a tiny size (nothing is timed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import have_nix

REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.nix,
    pytest.mark.skipif(not have_nix(), reason="needs Nix"),
]


def test_dag_benchmark_runs_on_a_tiny_dag(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "dag.py"), "--layers", "2", "--width", "2",
         "--no-ssh", "--sleep-layers", "1", "--sleep-width", "1"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "bigtent / local nix-build -j2:" in proc.stdout
    assert "makespan (build created -> finished on the runner)" in proc.stdout
