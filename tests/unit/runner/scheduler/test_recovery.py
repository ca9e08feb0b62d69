"""A failed reload of the scheduler's state: retried with capped backoff, reported (pure)."""

from __future__ import annotations

from bigtent.runner.scheduler import recovery


def test_failures_count_up_and_back_off_to_a_cap() -> None:
    first = recovery.failed(None, "OperationalError: gone", 100.0, base_secs=1.0, max_secs=8.0)
    assert (first.since, first.failures, first.retry_at) == (100.0, 1, 101.0)
    waits = []
    state = first
    for now in (101.0, 103.0, 107.0, 115.0, 123.0):
        state = recovery.failed(state, "OperationalError: gone", now, base_secs=1.0, max_secs=8.0)
        waits.append(state.retry_at - now)
    assert waits == [2.0, 4.0, 8.0, 8.0, 8.0]
    assert state.since == 100.0 and state.failures == 6


def test_a_retry_is_due_only_when_failing_and_its_time_came() -> None:
    state = recovery.failed(None, "x", 10.0, base_secs=1.0, max_secs=1.0)
    assert not recovery.due(None, 1e9)
    assert not recovery.due(state, 10.5)
    assert recovery.due(state, 11.0)


def test_the_problem_says_what_failed_and_is_none_when_sound() -> None:
    assert recovery.problem(None) is None
    state = recovery.failed(recovery.failed(None, "OSError: disk", 0.0), "OSError: disk", 1.0)
    text = recovery.problem(state)
    assert text is not None and "2 attempts" in text and "OSError: disk" in text
    public = recovery.problem(state, public=True)
    assert public is not None and "2 attempts" in public and "disk" not in public


def test_describe_keeps_the_type_and_first_line_bounded() -> None:
    assert recovery.describe(OSError("no\nmore")) == "OSError: no"
    assert recovery.describe(RuntimeError()) == "RuntimeError"
    long = recovery.describe(ValueError("x" * 10_000))
    assert len(long) == recovery.MAX_RECOVERY_ERROR_CHARS
