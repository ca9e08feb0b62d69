"""The dashboard's bump form (``dashboard/actions.form_priority``): empty is the default
bump, a whole number in the API's range is the priority, anything else is a 400."""

from __future__ import annotations

import pytest

from bigtent.apilimits import PRIORITY_MAX, PRIORITY_MIN
from bigtent.errors import BadRequest
from bigtent.runner.dashboard.actions import form_priority


@pytest.mark.parametrize(
    ("form", "priority"),
    [
        ({}, None),
        ({"priority": "  "}, None),
        ({"priority": "7"}, 7),
        ({"priority": " -3 "}, -3),
        ({"priority": str(PRIORITY_MIN)}, PRIORITY_MIN),
        ({"priority": str(PRIORITY_MAX)}, PRIORITY_MAX),
    ],
)
def test_form_priority(form: dict[str, str], priority: int | None) -> None:
    assert form_priority(form) == priority


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ("high", "whole number"),
        ("1.5", "whole number"),
        (str(PRIORITY_MAX + 1), "between"),
        (str(PRIORITY_MIN - 1), "between"),
    ],
)
def test_form_priority_refuses(raw: str, says: str) -> None:
    with pytest.raises(BadRequest, match=says):
        form_priority({"priority": raw})
