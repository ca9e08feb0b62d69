"""End to end: `bigtent build` with nix-build's and flakes' targets, and the runner's errors,
against a real runner and a real agent."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import current_system
from tests.e2e.conftest import DAG_NIX, Farm
from tests.integration.nix.test_targets_nix import make_flake

pytestmark = [pytest.mark.e2e, pytest.mark.nix]


def test_flake_checks_of_a_git_repository_build_each_by_attribute_path(
    farm_factory: Callable[..., Farm],
) -> None:
    if shutil.which("git") is None:
        pytest.skip("needs git")
    farm = farm_factory(agents=1)
    system = current_system()
    make_flake(farm.root / "repo", system, salt=uuid.uuid4().hex)
    code, doc = farm.build_json(f"./repo#checks.{system}", "--no-out-link")
    assert code == 0, doc
    jobs = {j["attr"]: j for j in doc["jobs"]}
    assert sorted(jobs) == [
        f"checks.{system}.lint",
        f"checks.{system}.nested.deep",
        f"checks.{system}.unit",
    ]
    assert all(j["built"] and j["state"] == "succeeded" for j in jobs.values())
    out = Path(jobs[f"checks.{system}.unit"]["outputs"]["out"])
    assert out.read_text().startswith("unit")  # fetched into the client's store


def test_expression_with_attribute_and_arguments_builds(farm_factory: Callable[..., Farm]) -> None:
    farm = farm_factory(agents=1)
    salt = uuid.uuid4().hex
    code, doc = farm.build_json(
        "-E", f"import {DAG_NIX}", "-A", "top", "--argstr", "salt", salt,
        "--arg", "layers", "2", "--arg", "width", "2",
    )  # fmt: skip
    assert code == 0, doc
    assert [(j["attr"], j["built"]) for j in doc["jobs"]] == [("top", True)]
    assert (farm.root / "result").read_text().startswith("top-0 ")


def test_the_runner_s_errors_are_shown_with_their_exit_codes(
    farm_factory: Callable[..., Farm],
) -> None:
    farm = farm_factory()
    log = farm.bigtent("log", "abc")
    assert log.returncode == 2, log.stderr
    assert log.stderr == "Error: step id must be a positive number (got 'abc')\n"
    refused = farm.bigtent("builds", token="bt_not-a-token")
    assert refused.returncode == 3
    assert f"the runner at {farm.url} refused the token from BIGTENT_TOKEN" in refused.stderr
    assert "--token-file FILE" in refused.stderr
    dag = farm.dag_file(layers=1, width=1)
    high = farm.bigtent("build", str(dag), "-A", "top", "--priority", "5000")
    assert high.returncode == 2
    assert "5000 is not in the range -1000<=x<=1000" in high.stderr
    with farm.api() as c:
        assert c.get("/api/v1/builds").json()["builds"] == []
    bad = farm.bigtent("build", str(dag), "-A", "nope")
    assert bad.returncode == 1
    assert "error: attribute 'nope' in selection path 'nope' not found" in bad.stderr
    assert "command: nix-instantiate " in bad.stderr
