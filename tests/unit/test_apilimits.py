"""The request limits the client checks before sending are the runner's own."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from bigtent.apilimits import LABEL_MAX_CHARS, PRIORITY_MAX, PRIORITY_MIN, build_field_problem
from bigtent.runner.http.routes.builds import BuildBody

DRV = "/nix/store/" + "a" * 32 + "-x.drv"


@pytest.mark.parametrize(
    ("repository", "ref"),
    [
        ("acme/widgets", "refs/heads/main"),
        (None, None),
        ("a" * LABEL_MAX_CHARS, "r"),
        ("a b", None),
        ("acme/*", None),
        ("", None),
        ("a" * (LABEL_MAX_CHARS + 1), None),
        (None, "refs/heads/a b"),
        (None, ""),
    ],
)
def test_the_client_refuses_exactly_what_the_runner_refuses(
    repository: str | None, ref: str | None
) -> None:
    problem = build_field_problem(repository, ref)
    try:
        BuildBody(drvs=[DRV], repository=repository, ref=ref)
    except ValidationError:
        assert problem is not None
    else:
        assert problem is None


def test_priority_range_is_the_runner_s() -> None:
    BuildBody(drvs=[DRV], priority=PRIORITY_MAX)
    BuildBody(drvs=[DRV], priority=PRIORITY_MIN)
    for priority in (PRIORITY_MAX + 1, PRIORITY_MIN - 1):
        with pytest.raises(ValidationError):
            BuildBody(drvs=[DRV], priority=priority)
