"""Step log retention: the cutoff (pure), finding and deleting old logs on disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bigtent.runner.logs.retention import (
    DAY_SECS,
    cutoff,
    expire_logs,
    expired_text,
    is_expired,
)
from bigtent.runner.logs.store import LogStore

NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("finished_at", "days", "expired"),
    [
        (NOW - 10 * DAY_SECS, 0, False),  # 0: keep forever
        (NOW - 10 * DAY_SECS, 7, True),
        (NOW - 7 * DAY_SECS + 1, 7, False),
        (NOW - 7 * DAY_SECS - 1, 7, True),
        (None, 7, False),  # not finished
        (NOW - 3600, 0.01, True),  # 0.01 days: 864 s
    ],
)
def test_is_expired(finished_at: float | None, days: float, expired: bool) -> None:
    assert is_expired(finished_at, NOW, days) is expired


def test_cutoff() -> None:
    assert cutoff(NOW, 0) is None
    assert cutoff(NOW, 2) == NOW - 2 * DAY_SECS
    assert "expired" in expired_text(30) and "30 days" in expired_text(30)


def _log(logs: LogStore, step: int, age_secs: float) -> None:
    logs.append(step, [f"line of step {step}"])
    logs.close(step)
    when = NOW - age_secs
    os.utime(logs.path(step), (when, when))  # a one-frame log is one file


async def test_expire_logs_deletes_old_logs_of_finished_steps_only(tmp_path: Path) -> None:
    logs = LogStore(tmp_path / "logs", 1 << 20)
    for step in range(1, 8):
        _log(logs, step, age_secs=10 * DAY_SECS)
    _log(logs, 8, age_secs=60)  # recent
    _log(logs, 9, age_secs=10 * DAY_SECS)  # old, but its step still runs (silent)
    (tmp_path / "logs" / "notes.txt").write_text("not a log")
    before = NOW - 7 * DAY_SECS
    assert logs.stale(before, 100) == [1, 2, 3, 4, 5, 6, 7, 9]
    assert logs.stale(before, 3) == [1, 2, 3]

    deleted, more = await expire_logs(logs, before, lambda s: s == 9, batch=2, limit=5)
    assert (deleted, more) == (5, True)  # a full pass: another follows at once
    deleted, more = await expire_logs(logs, before, lambda s: s == 9, batch=2, limit=5)
    assert (deleted, more) == (2, False)
    left = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert left == ["8.log.zst", "9.log.zst", "notes.txt"]
    assert logs.read(8) == b"line of step 8\n" and logs.read(1) == b""
    # Nothing left to do: an empty pass, and the running step's log stays.
    assert await expire_logs(logs, before, lambda s: s == 9) == (0, False)


def test_a_log_being_written_is_not_deleted(tmp_path: Path) -> None:
    logs = LogStore(tmp_path / "logs", 1 << 20)
    logs.append(1, ["still running"])
    assert logs.delete(1) is False
    logs.close(1)
    assert logs.delete(1) is True and logs.read(1) == b""
