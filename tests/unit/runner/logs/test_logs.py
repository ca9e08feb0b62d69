"""The compressed step logs: any byte range reads back what was appended, the files are a
plain multi-frame zstd stream, the size bound holds with a marker line, a torn end is
repaired, and every appended byte reaches the live viewers once."""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bigtent.runner.logs.live import Chunk, LogFanout
from bigtent.runner.logs.store import (
    LogStore,
    frames_for,
    parse_index,
    reconcile_index,
    truncation_marker,
)

_counter = itertools.count()

lines_st = st.lists(
    st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\n"), max_size=40),
    max_size=12,
)
ops_st = st.lists(st.one_of(lines_st, st.just("close")), min_size=1, max_size=25)


def _expected(ops: list[list[str] | str], max_bytes: int) -> bytes:
    out = b""
    for op in ops:
        if op == "close" or len(out) >= max_bytes:
            continue
        data = "".join(x + "\n" for x in op).encode(errors="replace")
        if len(out) + len(data) > max_bytes:
            data = data[: max_bytes - len(out)] + truncation_marker(max_bytes)
        out += data
    return out


def _zstd_cat(path: Path) -> bytes:
    """What ``zstd -d`` makes of the file: every frame, in order."""
    reader = zstandard.ZstdDecompressor().stream_reader(
        io.BytesIO(path.read_bytes()), read_across_frames=True
    )
    return reader.read()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=ops_st, max_bytes=st.integers(1, 600), frame=st.integers(1, 97), data=st.data())
def test_ranges_read_back_what_was_appended(
    tmp_path: Path, ops: list[list[str] | str], max_bytes: int, frame: int, data: st.DataObject
) -> None:
    store = LogStore(tmp_path / f"logs{next(_counter)}", max_bytes, frame_bytes=frame)
    fanout = store.fanout
    sub = fanout.subscribe(7)
    for op in ops:
        if isinstance(op, str):
            store.close(7)
        else:
            store.append(7, op)
    want = _expected(ops, max_bytes)
    assert store.size(7) == len(want)
    assert store.read(7) == want
    start = data.draw(st.integers(0, len(want) + 3))
    end = data.draw(st.integers(0, len(want) + 3))
    assert store.read_range(7, start, end) == want[start:end]
    # The stored part alone, in small pieces, while some of it may still be pending.
    snap = store.snapshot(7)
    assert b"".join(store.iter_stored(7, 0, snap.framed, chunk_bytes=5)) + snap.pending == want
    # Viewers saw every byte once, in order, at the right offsets.
    got = b""
    for chunk in sub._chunks:
        assert chunk.offset == len(got)
        got += chunk.data
    assert got == want
    store.close(7)
    assert (_zstd_cat(store.path(7)) if store.path(7).exists() else b"") == want
    assert store.tail(7, 3) == "\n".join(want.decode(errors="replace").splitlines()[-3:])


def test_log_is_cut_at_max_bytes_with_one_marker(tmp_path: Path) -> None:
    store = LogStore(tmp_path, 20)
    store.append(1, ["0123456789", "abcdefghij", "more"])
    store.append(1, ["ignored"])
    store.close(1)
    store.append(1, ["still ignored after reopening"])
    text = store.read(1)
    assert text == b"0123456789\nabcdefghi" + truncation_marker(20)
    assert text.count(b"truncated") == 1
    assert b"scheduler.max_log_bytes" in text


def test_pending_lines_are_readable_before_they_are_framed(tmp_path: Path) -> None:
    store = LogStore(tmp_path, 1 << 20, frame_bytes=1 << 16)
    store.append(3, ["building", "still building"])
    assert store.snapshot(3).framed == 0
    assert store.read(3) == b"building\nstill building\n"
    assert store.stored_size(3) == 0
    store.close(3)
    assert store.stored_size(3) == len(b"building\nstill building\n")


def test_a_torn_end_is_cut_away_on_reopening(tmp_path: Path) -> None:
    store = LogStore(tmp_path, 1 << 20, frame_bytes=8)
    store.append(5, ["first line", "second line"])
    store.close(5)
    good = store.read(5)
    # A crash: half a frame after the last record, and half a record in the index.
    with store.path(5).open("ab") as f:
        f.write(b"\x28\xb5\x2f\xfd garbage")
    with store.index_path(5).open("ab") as f:
        f.write(b"\x01\x02\x03")
    assert store.read(5) == good  # readers ignore what no whole record covers
    store.append(5, ["after the crash"])
    store.close(5)
    assert store.read(5) == good + b"after the crash\n"
    assert _zstd_cat(store.path(5)) == good + b"after the crash\n"


def test_a_log_gets_its_files_with_its_first_frame(tmp_path: Path) -> None:
    store = LogStore(tmp_path, 1 << 20, frame_bytes=8)
    store.append(3, ["build"])
    assert not store.path(3).exists() and not store.index_path(3).exists()
    store.append(3, ["ing"])  # a frame before the end: indexed at once
    assert _zstd_cat(store.path(3)) == b"build\nin"
    assert parse_index(store.index_path(3).read_bytes()) == [(8, store.path(3).stat().st_size)]


def test_a_log_of_one_frame_written_at_its_end_is_one_file(tmp_path: Path) -> None:
    store = LogStore(tmp_path, 1 << 20, frame_bytes=1 << 16)
    store.append(3, ["building", "done"])
    store.close(3)
    assert _zstd_cat(store.path(3)) == b"building\ndone\n"
    assert not store.index_path(3).exists()
    assert store.read(3) == b"building\ndone\n" and store.stored_size(3) == 14
    assert store.read_range(3, 9, 13) == b"done" and store.tail(3, 1) == "done"
    # The next attempt appends: the lone frame's record goes to the index first.
    store.append(3, ["again"])
    store.close(3)
    assert store.read(3) == b"building\ndone\nagain\n"
    records = parse_index(store.index_path(3).read_bytes())
    assert [u for u, _ in records] == [14, 20]
    assert records[-1][1] == store.path(3).stat().st_size


def test_a_crash_after_a_lone_frame_keeps_it_and_cuts_what_follows(tmp_path: Path) -> None:
    store = LogStore(tmp_path, 1 << 20)
    store.append(5, ["kept"])
    store.close(5)
    size = store.path(5).stat().st_size
    # A crash while the next frame was written: data past the lone frame, no record yet.
    with store.path(5).open("ab") as f:
        f.write(b"\x28\xb5\x2f\xfd garbage")
    store.index_path(5).write_bytes(b"\x01\x02")  # and a torn first record
    assert store.read(5) == b"kept\n"
    store.append(5, ["after the crash"])
    store.close(5)
    assert store.read(5) == b"kept\nafter the crash\n"
    assert _zstd_cat(store.path(5)) == b"kept\nafter the crash\n"
    assert parse_index(store.index_path(5).read_bytes())[0] == (5, size)


def test_a_step_whose_log_never_got_a_frame_has_no_files(tmp_path: Path) -> None:
    store = LogStore(tmp_path, 1 << 20)
    store.append(4, [])
    assert store.is_open(4)
    store.close(4)
    assert sorted(tmp_path.iterdir()) == []
    assert store.read(4) == b"" and store.stored_size(4) == 0 and store.tail(4) == ""
    assert store.stale(float("inf"), 10) == []
    assert store.delete(4)


def test_a_crash_while_the_first_frame_was_written_leaves_an_empty_log(tmp_path: Path) -> None:
    store = LogStore(tmp_path, 1 << 20)
    # A torn first frame, no record.
    whole = zstandard.ZstdCompressor(write_content_size=True).compress(b"lost\n" * 100)
    store.path(8).write_bytes(whole[: len(whole) // 2])
    assert store.read(8) == b"" and store.stored_size(8) == 0
    store.append(8, ["after the crash"])
    store.close(8)
    assert store.read(8) == b"after the crash\n"
    assert _zstd_cat(store.path(8)) == b"after the crash\n"


def test_a_whole_first_frame_without_its_record_is_read(tmp_path: Path) -> None:
    store = LogStore(tmp_path, 1 << 20)
    # A crash between the first frame and its record, or a lone frame: the frame is whole.
    store.path(8).write_bytes(zstandard.ZstdCompressor().compress(b"kept\n"))
    assert store.read(8) == b"kept\n"
    store.append(8, ["after the crash"])
    store.close(8)
    assert store.read(8) == b"kept\nafter the crash\n"


def test_reset_forgets_the_log(tmp_path: Path) -> None:
    store = LogStore(tmp_path, 1 << 20)
    store.append(2, ["old run"])
    store.reset(2)
    assert store.read(2) == b""
    assert not store.path(2).exists() and not store.index_path(2).exists()
    store.append(2, ["new run"])
    assert store.read(2) == b"new run\n"


def test_an_uncompressed_log_of_an_older_runner_is_read_and_converted(tmp_path: Path) -> None:
    (tmp_path / "9.log").write_bytes(b"old line 1\nold line 2\n")
    store = LogStore(tmp_path, 1 << 20, frame_bytes=7)
    assert store.read(9) == b"old line 1\nold line 2\n"
    assert store.read_range(9, 4, 10) == b"line 1"
    assert store.tail(9, 1) == "old line 2"
    store.append(9, ["new line"])
    store.close(9)
    assert not (tmp_path / "9.log").exists()
    assert store.read(9) == b"old line 1\nold line 2\nnew line\n"


def test_unknown_step_has_an_empty_log(tmp_path: Path) -> None:
    store = LogStore(tmp_path, 100)
    assert store.size(4) == 0
    assert store.read(4) == b""
    assert store.read_range(4, 10, 20) == b""
    assert store.tail(4) == ""


def test_a_damaged_frame_ends_the_read_with_a_note(tmp_path: Path) -> None:
    store = LogStore(tmp_path, 1 << 20, frame_bytes=4)
    store.append(6, ["abcdefgh"])
    store.close(6)
    raw = bytearray(store.path(6).read_bytes())
    records = parse_index(store.index_path(6).read_bytes())
    # Damage the second frame's magic number.
    raw[records[0][1]] ^= 0xFF
    store.path(6).write_bytes(bytes(raw))
    text = store.read(6)
    assert text.startswith(b"abcd")
    assert b"damaged" in text


@pytest.mark.parametrize(
    ("records", "size", "kept"),
    [
        ([(4, 10), (8, 20)], 20, [(4, 10), (8, 20)]),
        ([(4, 10), (8, 20)], 19, [(4, 10)]),
        ([(4, 10), (4, 20)], 20, [(4, 10)]),
        ([(4, 10), (8, 10)], 20, [(4, 10)]),
        ([], 5, []),
        ([(0, 0)], 0, []),
    ],
)
def test_reconcile_index(
    records: list[tuple[int, int]], size: int, kept: list[tuple[int, int]]
) -> None:
    assert reconcile_index(records, size) == kept


@given(
    ends=st.lists(st.integers(1, 20), min_size=1, max_size=10),
    start=st.integers(0, 250),
    length=st.integers(1, 50),
)
def test_frames_for_covers_exactly_the_range(ends: list[int], start: int, length: int) -> None:
    records, u = [], 0
    for n in ends:
        u += n
        records.append((u, u))
    end = start + length
    chosen = set(frames_for(records, start, end))
    for i, (u_end, _) in enumerate(records):
        u_start = records[i - 1][0] if i else 0
        overlaps = u_start < end and u_end > start
        assert (i in chosen) == overlaps


async def test_slow_viewer_is_dropped_and_the_producer_goes_on(tmp_path: Path) -> None:
    fanout = LogFanout(subscriber_max_bytes=10)
    store = LogStore(tmp_path, 1 << 20, fanout)
    fast, slow = fanout.subscribe(1), fanout.subscribe(1)
    store.append(1, ["12345"])  # 6 bytes: both take it
    batch = await fast.next_batch(1)
    assert batch.chunks == [Chunk(0, b"12345\n")]
    store.append(1, ["6789"])  # slow would hold 11 > 10 bytes: dropped
    assert fanout.viewers(1) == 1
    assert fanout.dropped_total == 1
    assert (await fast.next_batch(1)).chunks == [Chunk(6, b"6789\n")]
    gone = await slow.next_batch(1)
    assert gone.dropped and gone.chunks == []
    store.close(1)
    assert (await fast.next_batch(1)).attempt_ended
    assert store.read(1) == b"12345\n6789\n"


async def test_viewer_limits(tmp_path: Path) -> None:
    from bigtent.errors import Unavailable

    fanout = LogFanout(max_per_step=2, max_total=3)
    a, _ = fanout.subscribe(1), fanout.subscribe(1)
    with pytest.raises(Unavailable):
        fanout.subscribe(1)
    fanout.subscribe(2)
    with pytest.raises(Unavailable):
        fanout.subscribe(3)
    fanout.unsubscribe(a)
    fanout.unsubscribe(a)  # twice: no harm
    fanout.subscribe(3)
    assert fanout.viewers(1) == 1 and fanout.viewers(3) == 1


async def test_next_batch_waits_only_as_long_as_told(tmp_path: Path) -> None:
    sub = LogFanout().subscribe(1)
    batch = await sub.next_batch(0.01)
    assert batch.chunks == [] and not batch.attempt_ended and not batch.dropped
