"""The client's pure parts for waiting for capacity, ``--timeout`` and stopping early."""

from __future__ import annotations

from collections.abc import Sequence

import httpx
import pytest

from bigtent.apimodels import Build, Step, WaitingStep
from bigtent.client.api import RunnerClient
from bigtent.client.build import parse_duration
from bigtent.client.follow import BuildTracker, follow_build
from bigtent.client.observer import SilentObserver
from bigtent.client.reports import (
    build_report,
    capacity_summary,
    newly_waiting,
    pending_line,
    pending_steps,
    stop_report,
    waiting_line,
)
from bigtent.errors import UsageError

REASON = "waiting for capacity: no agent offers aarch64-linux"


@pytest.mark.parametrize(
    ("text", "secs"),
    [
        ("90", 90.0),
        ("90s", 90.0),
        ("10m", 600.0),
        ("2h", 7200.0),
        ("1h30m", 5400.0),
        ("1.5h", 5400.0),
        ("1d", 86400.0),
        (" 5S ", 5.0),
    ],
)
def test_parse_duration(text: str, secs: float) -> None:
    assert parse_duration(text) == secs


@pytest.mark.parametrize("text", ["", "0", "0s", "soon", "10x", "-5s", "5 s", "m", "1h-2m"])
def test_parse_duration_refuses_nonsense(text: str) -> None:
    with pytest.raises(UsageError, match="--timeout needs a positive duration"):
        parse_duration(text)


def _waiting(step_id: int, reason: str = REASON) -> WaitingStep:
    return WaitingStep(
        step_id=step_id, drv_path=f"/nix/store/x-{step_id}.drv", name=f"s{step_id}", reason=reason
    )


def _build(*waiting: WaitingStep, count: int | None = None, state: str = "queued") -> Build:
    return Build.model_validate(
        {
            "id": 5,
            "state": state,
            "waiting_for_capacity": [w.model_dump() for w in waiting],
            "waiting_for_capacity_count": len(waiting) if count is None else count,
        }
    )


def test_capacity_summary_and_lines() -> None:
    assert capacity_summary(_build()) is None
    assert capacity_summary(_build(_waiting(1), count=30)) == "30 waiting for capacity"
    assert waiting_line(_waiting(7)) == f"step 7 s7: {REASON}"


def test_each_waiting_step_is_reported_once_and_again_when_its_reason_changes() -> None:
    shown: set[tuple[int, str | None]] = set()
    first = newly_waiting(_build(_waiting(1), _waiting(2)), shown)
    assert [w.step_id for w in first] == [1, 2]
    shown.update((w.step_id, w.reason) for w in first)
    assert newly_waiting(_build(_waiting(1), _waiting(2)), shown) == []
    other = "waiting for capacity: no agent offers aarch64-linux (features: kvm)"
    again = newly_waiting(_build(_waiting(1, other), _waiting(3)), shown)
    assert [(w.step_id, w.reason) for w in again] == [(1, other), (3, REASON)]


def _step(step_id: int, state: str, reason: str | None = None) -> Step:
    return Step(
        id=step_id, drv_path="/nix/store/x.drv", name="x", state=state, waiting_reason=reason
    )


def test_pending_steps_are_those_not_final() -> None:
    steps = [
        _step(1, "succeeded"),
        _step(2, "runnable", REASON),
        _step(3, "waiting"),
        _step(4, "building"),
        _step(5, "dependency_failed"),
        _step(6, "cancelled"),
        _step(7, "assigned"),
        _step(8, "some-new-state"),
    ]
    assert [s.id for s in pending_steps(steps)] == [2, 3, 4, 7, 8]
    assert pending_line(steps[1]) == f"step 2 x: runnable ({REASON})"
    assert pending_line(steps[2]) == "step 3 x: waiting"


def test_stop_report_is_the_build_report_plus_why_and_what_was_pending() -> None:
    build = _build(_waiting(2))
    doc = stop_report(build, [_step(2, "runnable", REASON)], reason="timeout", cancelled=True)
    assert {k: doc[k] for k in build_report(build)} == build_report(build)
    assert doc["stopped"] == "timeout" and doc["cancelled"] is True
    assert doc["waiting_for_capacity"][0]["reason"] == REASON
    assert [p["id"] for p in doc["pending"]] == ["2"]
    assert stop_report(None, [], reason="terminated", cancelled=False)["build_id"] is None


async def test_follow_build_reports_waiting_steps_once_and_keeps_the_last_build() -> None:
    polls = [
        _build(_waiting(2)),
        _build(_waiting(2)),
        _build(_waiting(2), _waiting(3)),
        _build(state="failed"),
    ]

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/attempts"):
            return httpx.Response(200, json={"attempts": []})
        return httpx.Response(200, json=polls.pop(0).model_dump(mode="json"))

    reported: list[list[int]] = []

    class Observer(SilentObserver):
        def on_waiting_for_capacity(self, steps: Sequence[WaitingStep]) -> None:
            reported.append([s.step_id for s in steps])

    tracker = BuildTracker(build_id=5)
    async with RunnerClient("http://runner", transport=httpx.MockTransport(handler)) as client:
        final = await follow_build(client, 5, Observer(), interval_secs=0, tracker=tracker)
    assert final.state.value == "failed"
    assert reported == [[2], [3]]
    assert tracker.last == final
