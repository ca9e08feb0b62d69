"""The pure parts of the HTTP limits: the connection cap, rate-limited log lines, clipped
error quotes, storage names no file system holds."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from bigtent.errors import QUOTE_CHARS, clipped
from bigtent.ratelog import RateLimitedLog
from bigtent.runner.cache.storage import LocalStorage
from bigtent.runner.http.guard import RESERVED_FDS, connection_cap


@pytest.mark.parametrize(
    ("configured", "fd_limit", "want"),
    [
        (4096, 20000, 4096),
        (4096, 1024, 1024 - RESERVED_FDS),
        (4096, -1, 4096),  # unlimited descriptors
        (4096, 100, 16),  # a tiny limit still serves someone
        (20, 20000, 20),
    ],
)
def test_connection_cap(configured: int, fd_limit: int, want: int) -> None:
    assert connection_cap(configured, fd_limit) == want


def test_a_repeated_line_is_written_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    rl = RateLimitedLog(logging.getLogger("t.ratelog"), interval_secs=10, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="t.ratelog"):
        written = [rl.log("k", logging.ERROR, "accept failed: %s", "EMFILE") for _ in range(1000)]
        assert written.count(True) == 1
        assert rl.log("other", logging.ERROR, "another key")  # keys are separate
        now[0] = 10.0
        assert rl.log("k", logging.ERROR, "accept failed: %s", "EMFILE")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "accept failed: EMFILE",
        "another key",
        "accept failed: EMFILE (and 999 more like this not logged)",
    ]


def test_clipped_quotes_a_short_prefix() -> None:
    long = "x" * 10_000_000
    out = clipped({"loc": ["body", long], long: [long, 1, None], "ok": "short"})
    assert out["ok"] == "short"
    assert out["loc"][0] == "body"
    assert out["loc"][1].startswith("x" * QUOTE_CHARS + "…")
    assert len(out["loc"][1]) < QUOTE_CHARS + 40
    assert "10000000 characters" in out["loc"][1]
    [key] = [k for k in out if k not in ("loc", "ok")]
    assert len(key) < QUOTE_CHARS + 40
    assert out[key][1:] == [1, None]


def test_names_longer_than_a_file_name_are_no_files(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    for name in ("nar/" + "a" * 256, "nar/" + "é" * 128, "nar/" + "a" * 5000):
        assert storage.local_path(name) is None
        with pytest.raises(FileNotFoundError):
            storage.open_file(name)
        with pytest.raises(ValueError):
            storage.exists(name)
    (tmp_path / "nar" / ("a" * 255)).write_bytes(b"x")
    assert storage.local_path("nar/" + "a" * 255) is not None
