"""End to end with S3 storage: agents upload their outputs straight to a bucket (moto's S3
server on loopback) through presigned URLs, the runner verifies and publishes them, and real
Nix clients substitute the results from ``/cache``, redirected to the bucket."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bigtent.nix.keys import generate_key
from tests.e2e.conftest import Farm
from tests.s3 import Bucket

pytestmark = [pytest.mark.e2e, pytest.mark.nix]


def _steps(farm: Farm, build_id: int) -> list[dict[str, Any]]:
    with farm.api() as c:
        steps: list[dict[str, Any]] = c.get(f"/api/v1/builds/{build_id}/steps").json()["steps"]
    return steps


def _realise(
    store: Path, paths: list[str], farm: Farm, key: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["nix-store", "--store", f"local?root={store}", "--realise", *paths,
         "--option", "substituters", farm.cache_url, "--option", "trusted-public-keys", key],
        capture_output=True, text=True, timeout=120,
        env={"PATH": "/usr/bin:/bin", "XDG_CACHE_HOME": str(store.parent / f"xdg-{store.name}")},
    )  # fmt: skip


@pytest.mark.parametrize("compression", ["zstd", "xz"])
def test_dag_with_s3_storage_is_substituted_by_a_fresh_store(
    farm_factory: Callable[..., Farm], s3_bucket: Bucket, tmp_path: Path, compression: str
) -> None:
    farm = farm_factory(agents=2, storage=s3_bucket, cache_extra=f'compression = "{compression}"')
    dag = farm.dag_file(layers=2, width=3)
    # The client downloads the results too: Nix follows the redirects to the bucket.
    code, out = farm.build_json(str(dag), "-A", "top")
    assert code == 0, out
    assert out["state"] == "succeeded"
    steps = _steps(farm, out["build_id"])
    assert len(steps) == 7 and all(s["state"] == "succeeded" for s in steps)
    assert (farm.root / "result").read_text().startswith("top-0 ")
    outputs = [str(o) for s in steps for o in s["outputs"].values()]

    # Every output went through a presigned upload, none through a PUT to the runner.
    assert farm.runner is not None
    runner_log = farm.runner.log.read_text()
    assert runner_log.count("by a presigned upload") == len(outputs), runner_log[-3000:]
    assert "by a PUT to the runner" not in runner_log
    ext = {"zstd": ".nar.zst", "xz": ".nar.xz"}[compression]
    nar_keys = [k for k in s3_bucket.list_keys() if k.startswith("nar/")]
    assert len([k for k in nar_keys if k.endswith(ext)]) >= len(outputs)
    assert s3_bucket.list_keys("incoming/") == []
    assert not list((farm.root / "runner" / "cache" / "tmp").iterdir())

    wrong = generate_key("someone-else-1").public_key().to_text()
    refused = _realise(tmp_path / "wrong", outputs, farm, wrong)
    assert refused.returncode != 0
    ok = _realise(tmp_path / "fresh", outputs, farm, farm.public_key)
    assert ok.returncode == 0, ok.stderr
    for path in outputs:
        assert (tmp_path / "fresh" / path.lstrip("/")).exists()
