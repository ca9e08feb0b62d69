"""When a venue is unhealthy and how many steps it may run (pure)."""

from __future__ import annotations

import pytest

from bigtent.runner.scheduler.health import (
    allowed_jobs,
    became_unhealthy,
    is_unhealthy,
    shown_error,
)


@pytest.mark.parametrize(
    ("failures", "threshold", "unhealthy", "jobs_of_4"),
    [
        (0, 3, False, 4),
        (2, 3, False, 4),
        (3, 3, True, 1),
        (7, 3, True, 1),
        (1, 1, True, 1),
        (0, 1, False, 4),
        (50, 0, False, 4),  # 0: never unhealthy
    ],
)
def test_unhealthy_venues_run_one_step_at_a_time(
    failures: int, threshold: int, unhealthy: bool, jobs_of_4: int
) -> None:
    assert is_unhealthy(failures, threshold) is unhealthy
    assert allowed_jobs(4, failures, threshold) == jobs_of_4
    assert allowed_jobs(1, failures, threshold) == 1


def test_became_unhealthy_only_at_the_crossing() -> None:
    assert [n for n in range(8) if became_unhealthy(n, 3)] == [3]
    assert not any(became_unhealthy(n, 0) for n in range(8))


@pytest.mark.parametrize(
    ("last_error", "failures", "shown"),
    [
        ("error: boom", 2, "error: boom"),
        ("error: boom", 0, None),  # a success ended the run of failures
        ("", 3, None),
        (None, 3, None),
    ],
)
def test_shown_error(last_error: str | None, failures: int, shown: str | None) -> None:
    assert shown_error(last_error, failures) == shown
