"""The pure parts of a build's JSON (``runner/http/shapes.py``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from bigtent.runner.http.shapes import STEP_COUNTS, root_json, step_counts
from bigtent.states import StepState

ZERO = dict.fromkeys(STEP_COUNTS, 0)


@pytest.mark.parametrize(
    ("states", "expected"),
    [
        ({}, {}),
        ({"waiting": 2, "runnable": 3}, {"total": 5, "waiting": 2, "runnable": 3}),
        ({"assigned": 1, "building": 2}, {"total": 3, "running": 3}),
        ({"failed": 4, "dependency_failed": 5}, {"total": 9, "failed": 9}),
        ({"succeeded": 7, "cancelled": 1}, {"total": 8, "succeeded": 7, "cancelled": 1}),
    ],
)
def test_step_counts(states: dict[str, int], expected: dict[str, int]) -> None:
    assert step_counts(states) == ZERO | expected


def test_every_step_state_is_counted_once() -> None:
    counts = step_counts(dict.fromkeys(StepState, 1))
    assert counts["total"] == len(StepState)
    assert sum(counts.values()) - counts["total"] == len(StepState)


def test_an_unknown_state_is_a_bug_not_a_count() -> None:
    with pytest.raises(ValueError):
        step_counts({"vanished": 1})


@pytest.mark.parametrize(
    ("step_id", "step_state", "shown"),
    [(7, "building", "building"), (7, "succeeded", "succeeded"), (None, None, "cached")],
)
def test_root_json(step_id: int | None, step_state: str | None, shown: str) -> None:
    row = SimpleNamespace(
        drv_path="/nix/store/x.drv", outputs='{"out": "/nix/store/x"}', step_id=step_id
    )
    assert root_json(row, step_state) == {
        "drv_path": "/nix/store/x.drv",
        "outputs": {"out": "/nix/store/x"},
        "step_id": step_id,
        "state": shown,
    }
