"""Step events outside a terminal, ``-L``'s prefixed lines, the live log stream's events,
human times and fitted tables: the pure parts of what the client prints."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from rich.console import Console

from bigtent import humanize
from bigtent.apimodels import Build, Step
from bigtent.client.progress import (
    PrefixedLines,
    SeenStep,
    has_log,
    nothing_to_build,
    step_events,
)
from bigtent.client.reports import progress_line
from bigtent.client.sse import LogEvent, SseParser
from bigtent.client.tables import Column, fit_widths, render_table
from bigtent.errors import BadRequest, ProtocolError
from bigtent.runner.http.routes.builds import build_state_filter

T0 = "2026-12-06T10:00:00+00:00"
T4 = "2026-12-06T10:00:04.250000+00:00"


def step(id: int, state: str, **kw: Any) -> Step:
    return Step(id=id, drv_path=f"/nix/store/x-{id}.drv", name=f"dag-{id}", state=state, **kw)


def test_step_events_say_each_change_once() -> None:
    lines, seen = step_events({}, [step(1, "building", agent_name="a0"), step(2, "waiting")])
    assert lines == ["step 1 dag-1: started on a0"]
    again, seen = step_events(seen, [step(1, "building", agent_name="a0"), step(2, "waiting")])
    assert again == []
    done = step(1, "succeeded", agent_name="a0", started_at=T0, finished_at=T4)
    lines, seen = step_events(seen, [done, step(2, "assigned", agent_name="a1")])
    assert lines == ["step 1 dag-1: succeeded on a0 in 4.2 s", "step 2 dag-2: started on a1"]
    failed = step(
        2,
        "failed",
        agent_name="a1",
        started_at=T0,
        finished_at=T4,
        outcome="build_failure",
        error="\nerror: builder failed\nmore",
    )
    lines, seen = step_events(seen, [done, failed, step(3, "dependency_failed")])
    assert lines == [
        "step 2 dag-2: failed on a1 after 4.2 s (build_failure: error: builder failed)",
        "step 3 dag-3: not built, a dependency failed",
    ]
    assert seen[2] == SeenStep("failed", 0)
    assert step_events(seen, [done, failed])[0] == []


def test_a_retried_step_starts_again_with_its_attempt_number() -> None:
    _, seen = step_events({}, [step(1, "building", agent_name="a0")])
    # between two looks the attempt on a0 failed (infrastructure) and a1 took the step
    lines, seen = step_events(seen, [step(1, "building", agent_name="a1", attempts=1)])
    assert lines == ["step 1 dag-1: started on a1 (attempt 2)"]
    lines, _ = step_events(seen, [step(1, "cancelled")])
    assert lines == ["step 1 dag-1: cancelled"]


def test_a_fast_step_seen_only_when_done_is_one_line() -> None:
    lines, _ = step_events({}, [step(1, "succeeded", agent_name="a0")])
    assert lines == ["step 1 dag-1: succeeded on a0"]


def _build(total: int, outputs: list[dict[str, str]]) -> Build:
    roots = [{"drv_path": f"/nix/store/r{i}.drv", "outputs": o} for i, o in enumerate(outputs)]
    return Build.model_validate(
        {"id": 3, "state": "succeeded", "roots": roots, "counts": {"total": total}}
    )


@pytest.mark.parametrize(
    ("state", "agent", "shown"),
    [
        ("building", "a0", True),
        ("assigned", "a0", True),
        ("succeeded", "a0", True),  # ran and ended between two looks: its whole log
        ("failed", "a0", True),
        ("failed", None, False),  # never ran (no agent): nothing to show
        ("dependency_failed", None, False),
        ("cancelled", None, False),
        ("waiting", None, False),
        ("runnable", None, False),
    ],
)
def test_which_steps_have_a_log_for_dash_l(state: str, agent: str | None, shown: bool) -> None:
    assert has_log(step(1, state, agent_name=agent)) is shown


def test_a_build_without_steps_says_nothing_to_build() -> None:
    cached = _build(0, [{"out": "/nix/store/a"}, {"out": "/nix/store/b", "dev": "/nix/store/c"}])
    assert nothing_to_build(cached) == "nothing to build: all 3 outputs cached"
    assert progress_line(cached) == "nothing to build: all 3 outputs cached"
    one = _build(0, [{"out": "/nix/store/a"}])
    assert progress_line(one) == "nothing to build: all 1 output cached"
    built = Build.model_validate(
        {"id": 3, "state": "running", "counts": {"total": 2, "succeeded": 1, "running": 1}}
    )
    assert nothing_to_build(built) is None
    assert progress_line(built) == "1/2 steps done, 1 running"


def test_prefixed_lines_hold_a_partial_line_back() -> None:
    lines = PrefixedLines("hello-1.0> ")
    assert lines.feed("configuring\nbuil") == ["hello-1.0> configuring"]
    assert lines.feed("ding\r\n\n") == ["hello-1.0> building", "hello-1.0> "]
    assert lines.feed("no newline") == []
    assert lines.flush() == ["hello-1.0> no newline"]
    assert lines.flush() == []


def _events(text: str) -> list[LogEvent]:
    parser = SseParser()
    return [e for e in map(parser.feed, text.split("\n")) if e is not None]


def test_sse_parser_reads_the_runners_log_stream() -> None:
    stream = (
        "retry: 1000\n\n"
        'id: 6\nevent: log\ndata: "line 1\\n"\n\n'
        ": keepalive\n\n"
        'id: 13\nevent: log\ndata: "line 2\\n"\n\n'
        "event: reset\ndata: null\n\n"
        'id: 13\nevent: end\ndata: {"state": "succeeded"}\n\n'
    )
    assert _events(stream) == [
        LogEvent(text="line 1\n", offset=6),
        LogEvent(text="line 2\n", offset=13),
        LogEvent(reset=True),
        LogEvent(offset=13, end_state="succeeded"),
    ]
    with pytest.raises(ProtocolError):
        _events("event: log\ndata: {not json\n\n")


def test_build_state_filter() -> None:
    assert build_state_filter([]) == []
    assert build_state_filter(["failed,succeeded", "FAILED", " "]) == ["failed", "succeeded"]
    with pytest.raises(BadRequest, match="unknown build state 'done'"):
        build_state_filter(["done"])


NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("delta", "text"),
    [
        (timedelta(seconds=0.4), "just now"),
        (timedelta(seconds=12.7), "12 s ago"),
        (timedelta(minutes=3, seconds=59), "3 min ago"),
        (timedelta(hours=2, minutes=5), "2 h 05 min ago"),
        (timedelta(days=3, hours=4), "3 d 4 h ago"),
        (timedelta(seconds=-30), "in 30 s"),
        (timedelta(days=8), "2026-11-28 12:00"),
    ],
)
def test_relative_times(delta: timedelta, text: str) -> None:
    assert humanize.relative(NOW - delta, NOW) == text


def test_relative_iso() -> None:
    assert humanize.relative_iso("2026-12-06T11:59:48.123456+00:00", NOW) == "11 s ago"
    assert humanize.relative_iso("2026-12-06T11:59:48", NOW) == "12 s ago"  # naive: UTC
    assert humanize.relative_iso(None, NOW) == "-"
    assert humanize.relative_iso("", NOW, missing="") == ""
    assert humanize.relative_iso("yesterday", NOW) == "yesterday"
    assert humanize.seconds_between(T0, T4) == 4.25
    assert humanize.seconds_between(T0, None) is None
    assert humanize.seconds_between("2026-12-06T10:00:00", T4) is None  # naive and aware


COLUMNS = [Column("name", key=True), Column("state"), Column("systems"), Column("error")]
ROWS = [
    ["local-1", "connected", "x86_64-linux, aarch64-linux", "error: cannot connect to builder"],
    ["gha-x86-123.1-0a1b2c3d", "gone", "x86_64-linux", ""],
]


def test_fit_widths_keep_names_and_narrow_the_widest_other_columns() -> None:
    natural = fit_widths(COLUMNS, ROWS, 500)
    assert natural == [22, 9, 27, 32]
    narrow = fit_widths(COLUMNS, ROWS, 60)
    assert sum(narrow) + 3 * 3 <= 60
    assert narrow[0] == 22  # a key column is never narrowed
    assert narrow[2] >= len("aarch64-linux") - 1 and narrow[2] >= 12  # its longest word
    # too narrow for the words: as narrow as they allow, never cutting the key column
    assert fit_widths(COLUMNS, ROWS, 20) == [22, 9, 12, 7]


def test_render_table_fits_the_width_without_cutting_names() -> None:
    table, width = render_table(COLUMNS, ROWS, width=60)
    assert width == 60
    out = io.StringIO()
    Console(file=out, width=width, highlight=False).print(table)
    text = out.getvalue()
    assert max(len(line.rstrip()) for line in text.splitlines()) <= 60
    assert "gha-x86-123.1-0a1b2c3d" in text and "…" not in text
    _, wider = render_table(COLUMNS, ROWS, width=20)
    assert wider == 22 + 9 + 12 + 7 + 9  # printed wider than asked rather than cut
