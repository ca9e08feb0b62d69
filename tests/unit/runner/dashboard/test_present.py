"""How the dashboard shows durations, sizes, progress and the order of a build's steps."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bigtent.runner.dashboard import present
from bigtent.states import StepState


@pytest.mark.parametrize(
    ("secs", "text"),
    [
        (None, "—"),
        (-1, "0.0 s"),
        (0.42, "0.4 s"),
        (12.7, "12 s"),
        (184, "3 min 04 s"),
        (7500, "2 h 05 min"),
    ],
)
def test_fmt_duration(secs: float | None, text: str) -> None:
    assert present.fmt_duration(secs) == text


@pytest.mark.parametrize(
    ("n", "text"),
    [(None, "—"), (0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (5 * 1024**3, "5.0 GiB")],
)
def test_fmt_bytes(n: int | None, text: str) -> None:
    assert present.fmt_bytes(n) == text


def test_fmt_ago() -> None:
    assert present.fmt_ago(None, 100) == "never"
    assert present.fmt_ago(99.5, 100) == "just now"
    assert present.fmt_ago(70, 100) == "30 s ago"
    assert present.fmt_ago(110, 100) == "in 10 s"


def test_store_name() -> None:
    assert present.store_name("/nix/store/" + "a" * 32 + "-hello-2.12.drv") == "hello-2.12.drv"
    assert present.store_name("plain") == "plain"


def test_strip_ansi() -> None:
    assert present.strip_ansi("\x1b[31;1merror:\x1b[0m boom\x1b]8;;http://x\x07") == "error: boom"


states_st = st.lists(st.sampled_from([s.value for s in StepState]), max_size=40)


@given(states=states_st)
def test_progress_counts_every_step_once(states: list[str]) -> None:
    p = present.progress(states)
    assert p.total == len(states)
    final = sum(1 for s in states if StepState(s).is_final)
    assert p.done == final
    assert 0 <= p.percent <= 100
    assert (p.percent == 100) == (final == len(states))
    # The bar's parts are in order, do not overlap and fit the bar.
    x = 0.0
    for _, start, width in p.segments():
        assert start >= x - 1e-6 and width > 0
        x = start + width
    assert x <= 100.0 + 1e-6


def test_progress_from_counts_and_an_empty_build() -> None:
    p = present.progress_from_counts(
        {"succeeded": 3, "failed": 1, "dependency_failed": 2, "building": 2}
    )
    assert (p.total, p.succeeded, p.failed, p.running, p.percent) == (8, 3, 3, 2, 75)
    assert present.progress([]).percent == 100


def test_failed_steps_come_first_then_running_then_queued() -> None:
    steps = [
        ("succeeded", 1),
        ("waiting", 2),
        ("building", 3),
        ("failed", 9),
        ("dependency_failed", 4),
        ("runnable", 5),
        ("failed", 6),
        ("cancelled", 7),
        ("assigned", 8),
    ]
    ordered = sorted(steps, key=lambda s: present.step_order_key(*s))
    assert [i for _, i in ordered] == [6, 9, 4, 3, 8, 5, 2, 7, 1]


def test_online_by_kind() -> None:
    counts = present.online_by_kind([(False, "token"), (True, "oidc"), (True, "token")], 2)
    assert counts == {"persistent": 1, "ephemeral": 2, "token": 2, "oidc": 1, "ssh": 2}


@pytest.mark.parametrize(
    ("retry_at", "text"),
    [
        (None, "final"),
        (100.01, "retried at once"),
        (100.2, "retry after 0.2 s"),
        (110.0, "retry after 10 s"),
        (400, "retry after 5 min 00 s"),
    ],
)
def test_attempt_next(retry_at: float | None, text: str) -> None:
    assert present.attempt_next(retry_at, 100.0) == text


def test_outcome_class() -> None:
    assert present.outcome_class("success") == "succeeded"
    assert {present.outcome_class(o) for o in ("prepare_failure", "aborted")} == {"failed"}


_ODD = [10**400, 2**64, float("inf"), float("-inf"), float("nan"), 1e300, -(10**30)]


@pytest.mark.parametrize("value", _ODD)
def test_presentation_never_raises_on_a_stored_odd_value(value: float) -> None:
    """A value stored before ranges were enforced (or by any other way in) shows as a dash
    or a plain number, never as a 500."""
    for text in (
        present.fmt_bytes(value),  # type: ignore[arg-type]
        present.fmt_duration(value),
        present.fmt_time(value),
        present.fmt_ago(value, 1.7e9),
        present.iso(value),
    ):
        assert isinstance(text, str)
    assert present.fmt_time(1e300) == "—"
    assert present.fmt_bytes(10**400) == "—"


def test_fmt_bytes_goes_past_tebibytes() -> None:
    assert present.fmt_bytes(3 * 1024**5) == "3.0 PiB"
    assert present.fmt_bytes(2**62) == "4.0 EiB"


@pytest.mark.parametrize(
    ("intervals", "took"),
    [
        ([], 0.0),  # nothing ran (everything cached, or a cached failure)
        ([(10.0, 20.0)], 10.0),
        # Two steps one after the other with a wait between: the wait does not count.
        ([(10.0, 20.0), (50.0, 55.0)], 15.0),
        # Overlapping steps count once.
        ([(10.0, 20.0), (15.0, 30.0), (12.0, 13.0)], 20.0),
        # Touching intervals.
        ([(10.0, 20.0), (20.0, 25.0)], 15.0),
        # Running now (end None) counts until ``end``.
        ([(10.0, 20.0), (90.0, None)], 20.0),
        # A shared step that started before the build was created counts from its creation.
        ([(-5.0, 8.0)], 8.0),
        # Odd stored values are skipped; an attempt that ended as it began adds nothing.
        ([(float("nan"), 5.0), (3.0, 3.0), (float("inf"), None)], 0.0),
    ],
)
def test_busy_secs_counts_only_time_a_step_ran(
    intervals: list[tuple[float, float | None]], took: float
) -> None:
    assert present.busy_secs(intervals, 0.0, 100.0) == pytest.approx(took)


@given(
    st.lists(
        st.tuples(st.floats(0, 1000, allow_nan=False), st.one_of(st.none(), st.floats(0, 1000))),
        max_size=20,
    )
)
def test_busy_secs_is_bounded_by_the_wall_time(
    intervals: list[tuple[float, float | None]],
) -> None:
    took = present.busy_secs(intervals, 100.0, 600.0)
    assert 0.0 <= took <= 500.0


def test_roots_summary() -> None:
    assert present.roots_summary(["hello", "world.drv"], 2) == (["hello", "world"], 0)
    assert present.roots_summary(["job-0", "job-1"], 5) == (["job-0", "job-1"], 3)
    assert present.roots_summary([], 0) == ([], 0)


@given(
    st.lists(
        st.tuples(
            st.floats(-100, 1000, allow_nan=False),
            st.one_of(st.none(), st.floats(-100, 1000, allow_nan=False)),
        ),
        max_size=30,
    ),
    st.floats(0, 1200),
)
def test_merged_spans_add_up_as_the_attempts_do(
    intervals: list[tuple[float, float | None]], end: float
) -> None:
    """What the build lists keep per build (a few spans) says the same as every attempt."""
    merged = present.merge_spans(intervals, 0.0)
    assert sum(1 for _, e in merged if e is None) <= 1
    ended = [(s, e) for s, e in merged if e is not None]
    assert all(a[1] < b[0] for a, b in itertools.pairwise(ended))  # disjoint
    assert present.busy_secs(merged, 0.0, end) == pytest.approx(
        present.busy_secs(intervals, 0.0, end), abs=1e-6
    )


def test_merge_spans() -> None:
    raw = [(5.0, 8.0), (-3.0, 2.0), (7.0, 12.0), (20.0, None), (15.0, None), (30.0, 31.0)]
    assert present.merge_spans(raw, 0.0) == [(0.0, 2.0), (5.0, 12.0), (30.0, 31.0), (15.0, None)]
