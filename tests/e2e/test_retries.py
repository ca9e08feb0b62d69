"""Every retry is visible (docs/cli.md): a farm whose only agent's store breaks after the
agent registered. A real runner, a real agent process and real Nix: the agent's store gets a
schema version newer than its Nix supports (as a newer Nix would leave it), so every step it
takes fails to prepare. ``bigtent build`` prints each failed attempt as it happens and ends
non-zero with the last reason within ``scheduler.max_infra_attempts``."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from datetime import datetime
from typing import Any

import pytest

from bigtent.client.follow import POLL_INTERVAL_SECS
from tests.e2e.conftest import Farm

pytestmark = [pytest.mark.e2e, pytest.mark.nix]

BROKEN = "current Nix store schema is version 99"
SLACK_SECS = 2.0
"""Beyond one poll: a client process and an HTTP round trip on a busy shared machine."""


def break_store(farm: Farm, agent: str) -> None:
    """Make the agent's store unusable: Nix refuses a store whose schema is newer than its
    own, at every process it starts on it."""
    db = farm.root / "agents" / agent / "root" / "nix" / "var" / "nix" / "db"
    db.mkdir(parents=True, exist_ok=True)
    (db / "schema").write_text("99")


def attempts(farm: Farm, build_id: int) -> list[dict[str, Any]]:
    with farm.api() as c:
        resp = c.get(f"/api/v1/builds/{build_id}/attempts")
        resp.raise_for_status()
        found: list[dict[str, Any]] = resp.json()["attempts"]
    return found


def test_a_broken_agent_store_shows_each_attempt_and_fails_with_the_reason(
    farm_factory: Any,
) -> None:
    farm: Farm = farm_factory(agents=1, scheduler_extra="max_infra_attempts = 2")
    break_store(farm, "a0")
    dag = farm.dag_file(layers=1, width=1)

    lines: list[tuple[float, str]] = []
    started = time.monotonic()
    client = subprocess.Popen(
        [sys.executable, "-m", "bigtent", "build", str(dag), "-A", "nodes.dag-0-0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=farm.env(),
        cwd=farm.root,
    )

    def read() -> None:
        assert client.stderr is not None
        for line in client.stderr:
            lines.append((time.time(), line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = client.wait(timeout=120)
    finally:
        client.kill()
    took = time.monotonic() - started
    reader.join(timeout=10)
    text = "\n".join(line for _, line in lines)
    assert code == 1, text

    retry = [(t, line) for t, line in lines if line.startswith("retrying dag-0-0 (attempt 1/2")]
    final = [(t, line) for t, line in lines if line.startswith("giving up on dag-0-0 (attempt 2/2")]
    assert len(retry) == 1 and len(final) == 1, text
    for _, line in (*retry, *final):
        assert "failed on a0: prepare_failure: " in line and BROKEN in line, line
    assert "; next try in " in retry[0][1]
    assert final[0][1].endswith("; no more tries)")
    # Then the step's failure with its last reason, and the build's end.
    assert "infrastructure failure after 2 attempts; last: prepare_failure" in text
    assert "requested derivation(s) did not build" in text
    # The log tail the client printed ends with the last attempt's reason.
    tail = text[text.index("last lines of its log") :]
    assert "[bigtent: attempt 2 on a0: prepare_failure: " in tail and BROKEN in tail

    # Each line came within one poll of the runner recording its attempt.
    [queued] = [line for _, line in lines if line.startswith("build ") and "queued" in line]
    build_id = int(queued.split()[1])
    records = attempts(farm, build_id)
    assert [(r["attempt"], r["agent_name"], r["outcome"]) for r in records] == [
        (1, "a0", "prepare_failure"),
        (2, "a0", "prepare_failure"),
    ]
    assert records[0]["retry_at"] is not None and records[1]["retry_at"] is None
    for record, (seen_at, _) in zip(records, (retry[0], final[0]), strict=True):
        recorded = datetime.fromisoformat(record["finished_at"]).timestamp()
        delay = seen_at - recorded
        print(f"attempt {record['attempt']}: printed {delay:.3f} s after it was recorded")
        assert delay <= POLL_INTERVAL_SECS + SLACK_SECS, (delay, record)
    print(f"bigtent build took {took:.1f} s from start to its non-zero exit")
    assert farm.agents["a0"].alive()

    # --json: the same attempts, as part of the report.
    again = farm.dag_file(layers=1, width=1)
    code, report = farm.build_json(str(again), "-A", "nodes.dag-0-0", "--no-download")
    assert code == 1 and report["succeeded"] is False
    assert [(a["attempt"], a["max_attempts"], a["agent_name"]) for a in report["attempts"]] == [
        (1, 2, "a0"),
        (2, 2, "a0"),
    ]
    assert all(BROKEN in a["error"] for a in report["attempts"])
    assert report["attempts"][-1]["retry_at"] is None
    [failed] = report["failed_steps"]
    assert BROKEN in failed["error"] and "after 2 attempts" in failed["error"]
