"""``bigtent build`` shows each failed infrastructure attempt as the flow reports it (on
stderr, in non-terminal output too) and puts every attempt into its ``--json`` report."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.unit.cli.helpers import run_cli as run
from tests.unit.cli.samples import BUILD
from tests.unit.client.test_client_attempts import REASON, wire_attempt

FAILED: dict[str, Any] = {
    **BUILD,
    "state": "failed",
    "roots": [{**BUILD["roots"][0], "state": "failed"}],
    "failed_steps": [
        {
            "id": 9,
            "drv_path": "/nix/store/aaaa-hello.drv",
            "state": "failed",
            "outcome": "prepare_failure",
            "error": f"infrastructure failure after 2 attempts; last: prepare_failure: {REASON}",
            "log_tail": "[bigtent: attempt 2 on agent-1]\n",
        }
    ],
}


@pytest.fixture
def flow(monkeypatch: pytest.MonkeyPatch) -> None:
    import bigtent.client.build as build_module
    from bigtent.apimodels import Build, StepAttempt
    from bigtent.client.build import BuildResult

    async def fake_run_build(
        client: Any, store: Any, drvs: Any, options: Any, observer: Any, tracker: Any = None
    ) -> BuildResult:
        seen = [
            StepAttempt.model_validate(wire_attempt(1, max_attempts=2)),
            StepAttempt.model_validate(
                wire_attempt(2, max_attempts=2, retry_at=None, error="second\nmore")
            ),
        ]
        for attempt in seen:
            observer.on_attempt(attempt)
        return BuildResult(Build.model_validate(FAILED), attempts=seen)

    monkeypatch.setattr(build_module, "run_build", fake_run_build)


@pytest.mark.usefixtures("flow")
def test_build_prints_each_failed_attempt_and_the_last_reason() -> None:
    result = run(["build", "--drv", "/nix/store/aaaa-hello.drv", "--no-download"])
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert (
        f"retrying hello-1.0 (attempt 1/2 failed on agent-1: prepare_failure: {REASON}; "
        "next try in 10 s)"
    ) in lines
    assert (
        "giving up on hello-1.0 (attempt 2/2 failed on agent-1: prepare_failure: second; "
        "no more tries)"
    ) in lines
    # Then the step's failure with its last reason and the log tail.
    assert f"after 2 attempts; last: prepare_failure: {REASON}" in result.stderr
    assert "[bigtent: attempt 2 on agent-1]" in result.stderr
    assert result.stderr.index("retrying") < result.stderr.index("failed step 9")


@pytest.mark.usefixtures("flow")
def test_build_json_reports_every_attempt() -> None:
    result = run(["build", "--drv", "/nix/store/aaaa-hello.drv", "--no-download", "--json"])
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert [(a["attempt"], a["max_attempts"], a["retry_at"]) for a in doc["attempts"]] == [
        (1, 2, "2026-12-06T04:00:13+00:00"),
        (2, 2, None),
    ]
    assert doc["attempts"][0]["agent_name"] == "agent-1"
    assert "retrying" not in result.stdout
