"""The runner's answers as the CLI prints them with ``--json`` (``bigtent builds``,
``bigtent steps``, ``bigtent build --json``…): a stable document for scripts, apart from the
wire. Ids are text there, as they always were (on the wire they are integers), and fields the
printed documents never had stay out of them."""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Any

from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from bigtent.apimodels import (
    Build,
    BuildRoot,
    FailedStep,
    RunnerStatus,
    Step,
    StepAttempt,
    WaitingStep,
)

IDS_AS_TEXT: Mapping[type[BaseModel], frozenset[str]] = {
    Build: frozenset({"id"}),
    BuildRoot: frozenset({"step_id"}),
    FailedStep: frozenset({"id"}),
    WaitingStep: frozenset({"step_id"}),
    Step: frozenset({"id"}),
    StepAttempt: frozenset({"step_id"}),
}
"""The build and step ids each model prints as text (an attempt's own ``id`` is a number)."""

NOT_PRINTED: Mapping[type[BaseModel], frozenset[str]] = {
    Build: frozenset({"created_by", "events"}),
    Step: frozenset({"log_expired", "exit_code", "cached_failure"}),
    FailedStep: frozenset({"cached_failure"}),
    RunnerStatus: frozenset({"queue", "ssh_builders", "cache_paths", "cache_bytes", "scheduler"}),
}
"""Fields of the answers that the printed documents leave out (the API has them)."""


def printed(value: Any) -> Any:
    """``value`` as JSON-ready data for ``--json``: models field by field (ids as text,
    ``NOT_PRINTED`` left out), lists and dicts item by item, enums as their value (pure)."""
    if isinstance(value, BaseModel):
        kind = type(value)
        as_text = IDS_AS_TEXT.get(kind, frozenset())
        left_out = NOT_PRINTED.get(kind, frozenset())
        return {
            name: (str(field) if name in as_text and field is not None else printed(field))
            for name in kind.model_fields
            if name not in left_out
            for field in (getattr(value, name),)
        }
    if isinstance(value, list | tuple):
        return [printed(v) for v in value]
    if isinstance(value, dict):
        return {k: printed(v) for k, v in value.items()}
    if isinstance(value, Enum):
        return value.value
    return to_jsonable_python(value)
