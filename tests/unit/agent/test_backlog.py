"""The bounded backlog of log lines a persistent agent keeps while it has no session."""

from __future__ import annotations

from bigtent.agent.backlog import STEP_LIMIT_CHARS, TOTAL_LIMIT_CHARS, LogBacklog, lost_marker
from bigtent.protocol import MAX_LOG_LINES_PER_BATCH, LeaseId, Log, StepId

S1, S2, S3 = StepId(1), StepId(2), StepId(3)


def batch(step_id: StepId, *lines: str) -> Log:
    return Log(step_id=step_id, lease_id=LeaseId(f"lease-{step_id}"), lines=list(lines))


def drain(backlog: LogBacklog, step_id: StepId, max_lines: int = 500) -> list[list[str]]:
    out = []
    while (taken := backlog.take(step_id, max_lines, 1 << 20)) is not None:
        message = taken.message()
        assert (message.step_id, message.lease_id) == (step_id, f"lease-{step_id}")
        out.append(message.lines)
    return out


def test_lines_come_out_in_order_in_bounded_batches() -> None:
    backlog = LogBacklog()
    backlog.add(batch(S1, "a", "b"))
    backlog.add(batch(S2, "x"))
    backlog.add(batch(S1, "c", "d", "e"))
    assert S1 in backlog and backlog.steps == [S1, S2]
    assert drain(backlog, S1, max_lines=2) == [["a", "b"], ["c", "d"], ["e"]]
    assert S1 not in backlog  # emptied: the step's lines go directly again
    assert drain(backlog, S2) == [["x"]]
    assert backlog.chars == 0 and backlog.steps == []


def test_batch_size_respects_the_protocol() -> None:
    backlog = LogBacklog()
    backlog.add(batch(S1, *["l"] * MAX_LOG_LINES_PER_BATCH))
    backlog.add(batch(S1, *["l"] * 10))
    assert [len(b) for b in drain(backlog, S1, max_lines=10**6)] == [MAX_LOG_LINES_PER_BATCH, 10]
    backlog.add(batch(S1, *["x" * 100] * 10))
    taken = backlog.take(S1, 500, 250)
    assert taken is not None and len(taken.lines) == 3  # stops once past max_chars


def test_step_bound_drops_the_oldest_lines_behind_one_marker() -> None:
    backlog = LogBacklog(step_limit=10, total_limit=100)
    backlog.add(batch(S1, "1", "2", "3"))  # 2 characters each, newline included
    backlog.add(batch(S1, "4", "5", "6", "7"))
    assert backlog.lines(S1) == [lost_marker(2), "3", "4", "5", "6", "7"]
    backlog.add(batch(S1, "8"))
    assert backlog.lines(S1) == [lost_marker(3), "4", "5", "6", "7", "8"]
    assert backlog.chars == 10
    assert drain(backlog, S1) == [[lost_marker(3), "4", "5", "6", "7", "8"]]


def test_marker_counts_against_the_batch_lines() -> None:
    backlog = LogBacklog(step_limit=4, total_limit=100)
    backlog.add(batch(S1, "a", "b", "c"))
    assert drain(backlog, S1, max_lines=2) == [[lost_marker(1), "b"], ["c"]]


def test_total_bound_takes_from_the_largest_backlog() -> None:
    backlog = LogBacklog(step_limit=100, total_limit=20)
    backlog.add(batch(S1, *"abcdefgh"))  # 16
    backlog.add(batch(S2, "x", "y"))  # 4: at the total
    assert backlog.chars == 20 and backlog.lines(S2) == ["x", "y"]
    backlog.add(batch(S3, "p", "q", "r"))  # 6 more: S1 gives up 3 lines
    assert backlog.chars == 20
    assert backlog.lines(S1) == [lost_marker(3), *"defgh"]
    assert backlog.lines(S2) == ["x", "y"]
    assert backlog.lines(S3) == ["p", "q", "r"]


def test_put_back_restores_a_failed_batch_in_front() -> None:
    backlog = LogBacklog(step_limit=6, total_limit=100)
    backlog.add(batch(S1, "a", "b", "c", "d"))
    taken = backlog.take(S1, 3, 1000)
    assert taken is not None and taken.message().lines == [lost_marker(1), "b", "c"]
    backlog.add(batch(S1, "e"))
    backlog.put_back(taken)
    # Back in order; the marker's count survives; the bound still holds.
    assert backlog.lines(S1) == [lost_marker(2), "c", "d", "e"]
    assert backlog.chars == 6


def test_discard_forgets_a_step() -> None:
    backlog = LogBacklog()
    backlog.add(batch(S1, "a", "b"))
    backlog.add(batch(S2, "c"))
    assert backlog.discard(S1) == 2
    assert backlog.discard(S1) == 0
    assert backlog.steps == [S2] and backlog.chars == 2


def test_default_bounds() -> None:
    assert (STEP_LIMIT_CHARS, TOTAL_LIMIT_CHARS) == (1 << 20, 8 << 20)


def test_marker_text() -> None:
    assert lost_marker(1) == "[bigtent: 1 log line lost while the agent was disconnected]"
    assert "1500 log lines lost" in lost_marker(1500)
