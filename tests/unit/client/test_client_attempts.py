"""``bigtent build`` and the attempts of its steps: the line printed for a failed
infrastructure attempt (pure), and following the attempt records while the build runs
(after= the last id seen, each record once, in the poll that first sees it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from bigtent.apimodels import Build, StepAttempt
from bigtent.client import follow
from bigtent.client.build import BuildOptions, run_build
from bigtent.client.follow import AttemptFollower, follow_build
from bigtent.client.observer import SilentObserver
from bigtent.client.reports import attempt_notice, build_report
from tests.unit.client.test_client_build import (
    DIAMOND,
    FakeRunner,
    FakeStore,
    S,
    _client,
    _wire_build,
)

REASON = "error: the group 'nixbld' specified in 'build-users-group' does not exist"


def wire_attempt(ident: int, **overrides: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "id": ident,
        "step_id": 9,
        "drv_path": S + "abc-hello-1.0.drv",
        "name": "hello-1.0",
        "attempt": ident,
        "max_attempts": 5,
        "agent_name": "agent-1",
        "started_at": "2026-12-06T04:00:00+00:00",
        "finished_at": "2026-12-06T04:00:03+00:00",
        "outcome": "prepare_failure",
        "error": f"{REASON}\n(more lines)",
        "retry_at": "2026-12-06T04:00:13+00:00",
    }
    record.update(overrides)
    return record


def attempt(**overrides: Any) -> StepAttempt:
    return StepAttempt.model_validate(wire_attempt(2, **overrides))


def test_a_failed_infrastructure_attempt_is_one_line_with_its_next_try() -> None:
    assert attempt_notice(attempt()) == (
        f"retrying hello-1.0 (attempt 2/5 failed on agent-1: prepare_failure: {REASON}; "
        "next try in 10 s)"
    )


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        # The last allowed attempt: no more tries.
        (
            {"retry_at": None, "attempt": 5, "outcome": "agent_lost", "error": "lease expired"},
            "giving up on hello-1.0 (attempt 5/5 failed on agent-1: agent_lost: "
            "lease expired; no more tries)",
        ),
        # The first line that says something; no agent (it never got a lease).
        (
            {"agent_name": None, "error": "\n  \nfirst words\nsecond", "outcome": "upload_failure"},
            "retrying hello-1.0 (attempt 2/5 failed: upload_failure: first words; "
            "next try in 10 s)",
        ),
        ({"retry_at": "2026-12-06T04:00:03+00:00"}, "next try at once)"),
        ({"retry_at": "2026-12-06T04:00:03.250000+00:00"}, "next try in 0.2 s)"),
        ({"retry_at": "2026-12-06T04:00:12+00:00"}, "next try in 9.0 s)"),
        ({"retry_at": "2026-12-06T04:05:03+00:00"}, "next try in 5 min 00 s)"),
        ({"error": None}, "failed on agent-1: prepare_failure; next try in 10 s)"),
        ({"name": ""}, f"retrying {S}abc-hello-1.0.drv (attempt"),
    ],
)
def test_attempt_notice_variants(overrides: dict[str, Any], expected: str) -> None:
    notice = attempt_notice(attempt(**overrides))
    assert notice is not None and expected in notice


@pytest.mark.parametrize("outcome", ["success", "build_failure", "timed_out", "aborted", "new"])
def test_other_outcomes_print_nothing(outcome: str) -> None:
    """Successes and build failures are the build's own report; an abort (a cancel, an agent
    shutting down) is not a failure; an outcome this client does not know is not guessed at."""
    assert attempt_notice(attempt(outcome=outcome)) is None


class Recorder(SilentObserver):
    def __init__(self) -> None:
        self.events: list[str] = []

    def on_progress(self, build: Build) -> None:
        self.events.append(f"build {build.state.value}")

    def on_attempt(self, attempt: StepAttempt) -> None:
        self.events.append(f"attempt {attempt.id}")


class GrowingRunner(FakeRunner):
    """Records appear as the build moves on: ``shown[i]`` records exist at build poll i."""

    def __init__(
        self, builds: list[dict[str, Any]], records: list[dict[str, Any]], shown: list[int]
    ):
        super().__init__([], [], builds)
        self.records, self.shown, self.polls = records, shown, 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/v1/builds/5":
            self.attempts = self.records[: self.shown[min(self.polls, len(self.shown) - 1)]]
            self.polls += 1
        return await super().__call__(request)


async def test_each_attempt_reaches_the_observer_once_in_the_poll_that_sees_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(follow, "ATTEMPTS_PAGE", 2)
    records = [wire_attempt(i) for i in (1, 2, 3)]
    runner = GrowingRunner(
        [
            _wire_build("running", running=1),
            _wire_build("running", running=1),
            _wire_build("running", running=1),
            _wire_build("failed", failed=1),
        ],
        records,
        shown=[0, 1, 3, 3],
    )
    observer = Recorder()
    follower = AttemptFollower(5)
    async with _client(runner) as client:
        final = await follow_build(client, 5, observer, interval_secs=0, attempts=follower)
    assert final.state.value == "failed"
    assert observer.events == [
        "build running",
        "attempt 1",  # recorded before the second poll: printed by it
        "build running",
        "attempt 2",
        "attempt 3",
        "build running",
        "build failed",
    ]
    assert [a.id for a in follower.seen] == [1, 2, 3]
    # after= the last id seen; a full page is followed by another request at once.
    assert runner.attempt_queries == [(0, 2), (0, 2), (1, 2), (3, 2), (3, 2)]


async def test_an_older_runner_without_attempts_is_followed_as_before() -> None:
    runner = FakeRunner([], [], [_wire_build("running", running=1), _wire_build("succeeded")])
    runner.attempts = None
    follower = AttemptFollower(5)
    async with _client(runner) as client:
        final = await follow_build(client, 5, Recorder(), interval_secs=0, attempts=follower)
    assert final.state.value == "succeeded"
    assert follower.seen == [] and not follower.supported


async def test_the_json_report_carries_every_attempt_seen(tmp_path: Path) -> None:
    store = FakeStore(tmp_path, DIAMOND)
    runner = FakeRunner([], DIAMOND, [_wire_build("queued"), _wire_build("failed", failed=1)])
    runner.attempts = [
        wire_attempt(1),
        wire_attempt(2, retry_at=None, attempt=2, max_attempts=2),
    ]
    async with _client(runner) as client:
        result = await run_build(
            client, store, [S + "top.drv"], BuildOptions(poll_interval_secs=0), SilentObserver()
        )
    assert [a.id for a in result.attempts] == [1, 2]
    doc = build_report(result.build, result.links, result.attempts)
    assert [a["retry_at"] for a in doc["attempts"]] == ["2026-12-06T04:00:13+00:00", None]
    assert doc["attempts"][0] == runner.attempts[0] | {"step_id": "9"}
    json.dumps(doc)
