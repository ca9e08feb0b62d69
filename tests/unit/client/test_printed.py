"""``--json`` documents (``client/printed.py``): ids as text, fields the documents never
had left out, everything else as the model's JSON."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel

from bigtent.apimodels import (
    Build,
    BuildRoot,
    CachedFailure,
    FailedStep,
    RunnerStatus,
    SchedulerHealth,
    Step,
    StepAttempt,
    TokenInfo,
    WaitingStep,
)
from bigtent.client.printed import IDS_AS_TEXT, NOT_PRINTED, printed
from bigtent.states import BuildState

ATTEMPT = StepAttempt(
    id=9, step_id=4, drv_path="/nix/store/x.drv", attempt=1, max_attempts=2, outcome="success"
)
HIT = CachedFailure(outcome="build_failure", attempt_id=3, ran_in_build=2)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (BuildRoot(drv_path="/d.drv", step_id=3), {"step_id": "3"}),
        (BuildRoot(drv_path="/d.drv", step_id=None), {"step_id": None}),
        (WaitingStep(step_id=5, drv_path="/d.drv"), {"step_id": "5"}),
        (FailedStep(id=6, drv_path="/d.drv", cached_failure=HIT), {"id": "6"}),
        (ATTEMPT, {"id": 9, "step_id": "4"}),
        (Step(id=7, drv_path="/d.drv", exit_code=1, attempt_records=[ATTEMPT]), {"id": "7"}),
    ],
)
def test_ids_are_text_but_an_attempts_own(model: BaseModel, expected: dict[str, Any]) -> None:
    doc = printed(model)
    assert {k: doc[k] for k in expected} == expected


def test_a_build_prints_as_before_with_nested_ids_as_text() -> None:
    build = Build(
        id=12,
        state=BuildState.FAILED,
        created_by="alice",
        roots=[BuildRoot(drv_path="/d.drv", step_id=3)],
        failed_steps=[FailedStep(id=3, drv_path="/d.drv", cached_failure=HIT)],
    )
    doc = printed(build)
    assert doc["id"] == "12" and doc["state"] == "failed"
    assert "created_by" not in doc and "events" not in doc
    assert doc["roots"][0]["step_id"] == "3"
    assert doc["failed_steps"][0]["id"] == "3" and "cached_failure" not in doc["failed_steps"][0]
    json.dumps(doc)  # JSON-ready as it is


def test_fields_left_out_are_fields_of_the_models() -> None:
    for kind, names in (*NOT_PRINTED.items(), *IDS_AS_TEXT.items()):
        assert names <= set(kind.model_fields), kind


def test_status_leaves_out_what_it_never_printed() -> None:
    status = RunnerStatus(steps=None, scheduler=SchedulerHealth(healthy=False))
    doc = printed(status)
    assert doc["steps"] is None
    assert not {"queue", "ssh_builders", "cache_paths", "cache_bytes", "scheduler"} & set(doc)


@pytest.mark.parametrize(
    "value",
    [
        TokenInfo(name="ci", role="client"),
        [TokenInfo(name="ci", role="client")],
        {"drained": "b-1"},
        None,
    ],
)
def test_other_values_are_their_json(value: Any) -> None:
    expected = (
        value.model_dump(mode="json")
        if isinstance(value, BaseModel)
        else [v.model_dump(mode="json") for v in value]
        if isinstance(value, list)
        else value
    )
    assert printed(value) == expected
