"""`bigtent jobs` and `bigtent evals` print the shared fitted tables: a job's attribute path
and an evaluation's ref are never cut, however narrow the terminal."""

from __future__ import annotations

import httpx

from tests.unit.cli.helpers import RunnerStub, parse_table, run_cli

ATTR = "checks.x86_64-linux.a-rather-long-integration-test-name"
EVALUATION = {
    "id": 7,
    "project": "widgets",
    "ref": "refs/heads/feature/a-long-branch-name",
    "commit": "0123456789abcdef0123456789abcdef01234567",
    "state": "failed",
    "trusted": True,
    "build_id": 3,
    "error": None,
    "jobs": [
        {"attr": ATTR, "state": "failed", "drv_path": "/nix/store/" + "a" * 32 + "-t.drv"},
        {"attr": "checks.x86_64-linux.ok", "state": "succeeded", "drv_path": None, "error": None},
    ],
}


def _runner(request: httpx.Request) -> httpx.Response:
    if request.url.path == "/api/v1/evaluations/7":
        return httpx.Response(200, json=EVALUATION)
    if request.url.path == "/api/v1/projects/widgets/evaluations":
        return httpx.Response(200, json={"evaluations": [EVALUATION]})
    return httpx.Response(404, json={"error": "not found"})


def test_jobs_keeps_attribute_paths_whole_and_exits_1_for_a_failed_evaluation(
    runner_stub: RunnerStub,
) -> None:
    runner_stub.answer(_runner)
    result = run_cli(["jobs", "7"], env={"COLUMNS": "60"})
    assert result.exit_code == 1, result.output
    rows = parse_table(result.output)
    assert [r["job"] for r in rows] == [ATTR, "checks.x86_64-linux.ok"]


def test_evals_keeps_the_ref_whole(runner_stub: RunnerStub) -> None:
    runner_stub.answer(_runner)
    result = run_cli(["evals", "widgets"], env={"COLUMNS": "60"})
    assert result.exit_code == 0, result.output
    [row] = parse_table(result.output)
    assert row["ref"] == "feature/a-long-branch-name" and row["commit"] == "0123456789ab"
