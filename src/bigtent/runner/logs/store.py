"""Build logs: one zstd-compressed file per step under ``STATE/logs``, bounded in size,
readable by byte range while the step still runs, and fanned out live to viewers.

A step's log is ``STEP.log.zst``: a sequence of independent zstd frames (so ``zstd -d``
reads it whole), each holding at most ``FRAME_BYTES`` of log. ``STEP.log.idx`` beside it
holds one record per frame, ``(uncompressed end, compressed end)`` as two little-endian
u64s, so a byte range of the log costs the frames it touches, not the whole file. Lines are
gathered in memory and written as a frame once ``FRAME_BYTES`` are pending, ``FLUSH_SECS``
after the first pending line, or when the attempt ends. A frame is written before its index
record; on reopening, records that point past the data (and data past the last record) are
cut away, so a crash loses at most the pending lines and never corrupts the log.

A log whose only frame was written when its attempt ended (most steps: a short log) gets no
index: a data file whose index has no whole record (none, or a torn one) is read as one
frame, its first, if that frame is complete (``lone_frame``; a torn one reads as an empty
log, data past it is cut away). Its record goes to the index before a second frame's, so the
rule above holds from then on, and a crash in between still leaves the first frame readable.

Readers of the stored part may run in a thread: frames and index records, once written,
never change (until ``reset`` deletes the log for a fresh run).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import os
import struct
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

from bigtent.runner.logs.live import Chunk, LogFanout

log = logging.getLogger(__name__)

FRAME_BYTES = 64 * 1024
"""Uncompressed bytes per zstd frame (the unit of a range read)."""
FLUSH_SECS = 1.0
"""Pending lines reach the disk at most this long after they arrived."""
ZSTD_LEVEL = 3
READ_CHUNK_BYTES = 256 * 1024
"""Bytes a streamed read yields at a time."""
TAIL_BYTES = 64 * 1024
"""How far back from the end ``tail`` looks for lines."""
_RECORD = struct.Struct("<QQ")
_LOG_SUFFIXES = frozenset({"log.zst", "log.idx", "log"})
_APPEND_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT
"""``open(path, "ab")`` without the file object (``os.open``'s descriptors are not inherited)."""


def truncation_marker(max_bytes: int) -> bytes:
    """The line that ends a log cut at ``max_bytes`` (``scheduler.max_log_bytes``)."""
    return f"\n[bigtent: log truncated at {max_bytes} bytes (scheduler.max_log_bytes)]\n".encode()


def reconcile_index(records: list[tuple[int, int]], data_bytes: int) -> list[tuple[int, int]]:
    """The longest prefix of ``records`` that describes frames really in a data file of
    ``data_bytes`` bytes: ends strictly increasing, the last compressed end within the file.
    (A crash between writing a frame and its record leaves data past the last record; one
    in the middle of a record leaves a record past the data.)"""
    out: list[tuple[int, int]] = []
    last_u = last_c = 0
    for u_end, c_end in records:
        if u_end <= last_u or c_end <= last_c or c_end > data_bytes:
            break
        out.append((u_end, c_end))
        last_u, last_c = u_end, c_end
    return out


def parse_index(raw: bytes) -> list[tuple[int, int]]:
    """Index records from the index file's bytes (a torn last record is ignored)."""
    whole = len(raw) - len(raw) % _RECORD.size
    return [_RECORD.unpack_from(raw, i) for i in range(0, whole, _RECORD.size)]


def lone_frame(raw: bytes) -> list[tuple[int, int]]:
    """The record of the first frame of ``raw`` (a data file without an index record), or
    none when that frame is not whole (a crash while it was written)."""
    if not raw:
        return []
    d = zstandard.ZstdDecompressor().decompressobj()
    try:
        text = d.decompress(raw)
    except zstandard.ZstdError:
        return []
    if not d.eof or not text:
        return []
    return [(len(text), len(raw) - len(d.unused_data))]


def frames_for(records: list[tuple[int, int]], start: int, end: int) -> range:
    """Indexes of the frames holding uncompressed bytes ``[start, end)``."""
    ends = [u for u, _ in records]
    first = bisect.bisect_right(ends, start)
    last = bisect.bisect_left(ends, end)
    return range(first, min(last + 1, len(records)))


@dataclass(frozen=True, slots=True)
class LogSnapshot:
    """A consistent view of a log at one moment: ``framed`` bytes on disk, then ``pending``
    bytes still in memory."""

    framed: int
    pending: bytes = b""

    @property
    def size(self) -> int:
        return self.framed + len(self.pending)


@dataclass(eq=False)
class _OpenLog:
    """A log being appended to. No file stays open between frames: a runner with many
    running steps holds no descriptor per step."""

    data: Path
    index: Path
    framed: int
    compressed: int
    pending: bytearray = field(default_factory=bytearray)
    timer: asyncio.TimerHandle | None = None
    unindexed: tuple[int, int] | None = None
    """The record of a lone frame (written without one), for the index once a second
    frame follows."""

    @property
    def size(self) -> int:
        return self.framed + len(self.pending)


class LogStore:
    """Appends log lines per step (bounded by ``max_bytes`` of uncompressed log, then one
    marker line), reads them back by byte range, and publishes appended bytes to the live
    viewers in ``fanout``."""

    def __init__(
        self,
        root: Path,
        max_bytes: int,
        fanout: LogFanout | None = None,
        *,
        frame_bytes: int = FRAME_BYTES,
    ) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.frame_bytes = frame_bytes
        self.fanout = fanout if fanout is not None else LogFanout()
        root.mkdir(parents=True, exist_ok=True)
        self._open: dict[int, _OpenLog] = {}
        self._compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)

    def path(self, step_id: int) -> Path:
        return self.root / f"{step_id}.log.zst"

    def index_path(self, step_id: int) -> Path:
        return self.root / f"{step_id}.log.idx"

    def _legacy_path(self, step_id: int) -> Path:
        """Where logs were kept, uncompressed, before they were compressed."""
        return self.root / f"{step_id}.log"

    # ---- writing ---------------------------------------------------------------------------
    def append(self, step_id: int, lines: list[str]) -> None:
        """Append lines; past ``max_bytes`` further lines are dropped behind one marker
        line. The appended bytes go to the step's live viewers at once."""
        f = self._open.get(step_id)
        if f is None:
            f = self._reopen(step_id)
        size = f.size
        if size >= self.max_bytes:
            return
        data = "".join(line + "\n" for line in lines).encode(errors="replace")
        if size + len(data) > self.max_bytes:
            data = data[: max(0, self.max_bytes - size)] + truncation_marker(self.max_bytes)
        if not data:
            return
        f.pending += data
        while len(f.pending) >= self.frame_bytes:
            self._write_frame(f, bytes(f.pending[: self.frame_bytes]))
            del f.pending[: self.frame_bytes]
        if f.pending and f.timer is None:
            f.timer = _call_later(FLUSH_SECS, self._flush_pending, step_id)
        self.fanout.publish(step_id, Chunk(size, data))

    def _flush_pending(self, step_id: int, *, last: bool = False) -> None:
        f = self._open.get(step_id)
        if f is None:
            return
        if f.timer is not None:
            f.timer.cancel()
            f.timer = None
        if f.pending:
            self._write_frame(f, bytes(f.pending), last=last)
            f.pending.clear()

    def _write_frame(self, f: _OpenLog, data: bytes, *, last: bool = False) -> None:
        """Append one frame, then its index record: each file opened once, written with one
        system call. The ``last`` frame of a log that has none yet is a lone frame: no index
        (one file made per step, not two)."""
        frame = self._compressor.compress(data)
        lone = last and f.framed == 0
        if f.unindexed is not None:  # a second frame: the lone one's record goes first
            _append(f.index, _RECORD.pack(*f.unindexed))
            f.unindexed = None
        _append(f.data, frame)
        f.framed += len(data)
        f.compressed += len(frame)
        if lone:
            f.unindexed = (f.framed, f.compressed)
        else:
            _append(f.index, _RECORD.pack(f.framed, f.compressed))

    def _reopen(self, step_id: int) -> _OpenLog:
        """Open a step's log for appending, repairing a torn end and converting a log kept
        uncompressed by an older runner. A new log creates no file: the first frame creates
        the data file, its record the index (a log that never got a frame has neither, and
        reads as empty; a lone frame's record waits for a second frame)."""
        data_path, index_path = self.path(step_id), self.index_path(step_id)
        framed = compressed = 0
        unindexed: tuple[int, int] | None = None
        try:
            dat = os.open(data_path, os.O_RDWR)
        except FileNotFoundError:
            pass  # a new log (the usual case: no buffered file object for it)
        else:
            with open(dat, "r+b") as data_file:
                records: list[tuple[int, int]] = []
                with contextlib.suppress(FileNotFoundError):
                    records = parse_index(index_path.read_bytes())
                records = reconcile_index(records, os.fstat(data_file.fileno()).st_size)
                indexed = len(records)
                if not records:
                    records = lone_frame(data_file.read())
                    unindexed = records[0] if records else None
                framed, compressed = records[-1] if records else (0, 0)
                data_file.truncate(compressed)
            with contextlib.suppress(FileNotFoundError):
                os.truncate(index_path, indexed * _RECORD.size)
        f = _OpenLog(data_path, index_path, framed, compressed, unindexed=unindexed)
        self._open[step_id] = f
        if framed == 0:
            legacy = self._legacy_path(step_id)
            try:
                fd = os.open(legacy, os.O_RDONLY)
            except FileNotFoundError:
                return f
            with open(fd, "rb") as legacy_file:
                old = legacy_file.read()
            for i in range(0, len(old), self.frame_bytes):
                self._write_frame(f, old[i : i + self.frame_bytes])
            legacy.unlink()
        return f

    def close(self, step_id: int) -> None:
        """The attempt ended: write what is pending, close the files, tell the viewers."""
        self._flush_pending(step_id, last=True)
        self._open.pop(step_id, None)
        self.fanout.attempt_ended(step_id)

    def reset(self, step_id: int) -> None:
        """Forget a step's log (it is about to run again from scratch)."""
        self.close(step_id)
        for p in (self.path(step_id), self.index_path(step_id), self._legacy_path(step_id)):
            p.unlink(missing_ok=True)

    def stale(self, before: float, limit: int) -> list[int]:
        """Up to ``limit`` steps whose log files were last written before ``before`` (epoch
        seconds), oldest step id first: the candidates of log retention (thread-safe). A
        log's last write is its step's end, so this scans the files retention keeps, not the
        steps in the database."""
        found: set[int] = set()
        with os.scandir(self.root) as entries:
            for entry in entries:
                step, _, suffix = entry.name.partition(".")
                if not step.isdigit() or suffix not in _LOG_SUFFIXES:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    if entry.stat().st_mtime < before:
                        found.add(int(step))
        return sorted(found)[:limit]

    def delete(self, step_id: int) -> bool:
        """Delete a finished step's log (retention); False when it is being written."""
        if step_id in self._open:
            return False
        for p in (self.path(step_id), self.index_path(step_id), self._legacy_path(step_id)):
            p.unlink(missing_ok=True)
        return True

    def close_all(self) -> None:
        for step_id in list(self._open):
            self.close(step_id)

    # ---- reading ---------------------------------------------------------------------------
    def snapshot(self, step_id: int) -> LogSnapshot:
        """What the log holds now (call on the event loop, where appends happen)."""
        f = self._open.get(step_id)
        if f is not None:
            return LogSnapshot(f.framed, bytes(f.pending))
        return LogSnapshot(self.stored_size(step_id))

    def size(self, step_id: int) -> int:
        return self.snapshot(step_id).size

    def is_open(self, step_id: int) -> bool:
        """Whether the step's log is being appended to (an attempt runs)."""
        return step_id in self._open

    def stored_size(self, step_id: int) -> int:
        """Bytes of log in frames on disk (thread-safe)."""
        records = self._records(step_id)
        if records is None:
            with contextlib.suppress(FileNotFoundError):
                return self._legacy_path(step_id).stat().st_size
            return 0
        return records[-1][0] if records else 0

    def _records(self, step_id: int) -> list[tuple[int, int]] | None:
        """The frame index (a lone frame's record when it has none), or None when the step
        has no compressed log."""
        raw = b""
        with contextlib.suppress(FileNotFoundError):
            raw = self.index_path(step_id).read_bytes()
        try:
            with self.path(step_id).open("rb") as data:
                records = reconcile_index(parse_index(raw), os.fstat(data.fileno()).st_size)
                return records or lone_frame(data.read())
        except FileNotFoundError:
            return None

    def iter_stored(
        self, step_id: int, start: int, end: int, chunk_bytes: int = READ_CHUNK_BYTES
    ) -> Iterator[bytes]:
        """The stored bytes ``[start, end)`` in pieces of at most about ``chunk_bytes``,
        decompressing only the frames they lie in (thread-safe: touches only the files)."""
        if end <= start:
            return
        records = self._records(step_id)
        if records is None:
            yield from _iter_plain(self._legacy_path(step_id), start, end, chunk_bytes)
            return
        out = bytearray()
        decompressor = zstandard.ZstdDecompressor()
        try:
            with self.path(step_id).open("rb") as data:
                for i in frames_for(records, start, end):
                    u_start, c_start = records[i - 1] if i else (0, 0)
                    u_end, c_end = records[i]
                    data.seek(c_start)
                    try:
                        text = decompressor.decompress(data.read(c_end - c_start))
                    except zstandard.ZstdError:
                        log.warning("log of step %d is damaged at byte %d", step_id, u_start)
                        out += b"\n[bigtent: the rest of this log is damaged]\n"
                        break
                    out += text[max(0, start - u_start) : min(u_end, end) - u_start]
                    while len(out) >= chunk_bytes:
                        yield bytes(out[:chunk_bytes])
                        del out[:chunk_bytes]
        except FileNotFoundError:
            return  # reset meanwhile
        if out:
            yield bytes(out)

    def read_range(self, step_id: int, start: int, end: int | None = None) -> bytes:
        """Bytes ``[start, end)`` of the log as it is now (on the event loop; for small
        reads: a large one belongs in a thread, through ``snapshot`` and ``iter_stored``)."""
        snap = self.snapshot(step_id)
        end = snap.size if end is None else min(end, snap.size)
        stored = b"".join(self.iter_stored(step_id, start, min(end, snap.framed)))
        lo = max(start, snap.framed) - snap.framed
        return stored + snap.pending[lo : max(lo, end - snap.framed)]

    def read(self, step_id: int) -> bytes:
        return self.read_range(step_id, 0)

    def tail(self, step_id: int, lines: int = 30) -> str:
        size = self.size(step_id)
        data = self.read_range(step_id, max(0, size - TAIL_BYTES), size)
        last = deque(data.decode(errors="replace").splitlines(), maxlen=lines)
        return "\n".join(last)


def _append(path: Path, data: bytes) -> None:
    """Append ``data`` to ``path`` (created if missing, as ``open(path, "ab")`` would)."""
    fd = os.open(path, _APPEND_FLAGS, 0o666)
    try:
        view = memoryview(data)
        while view:  # a regular file takes it whole; a short write is finished, not lost
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _iter_plain(path: Path, start: int, end: int, chunk_bytes: int) -> Iterator[bytes]:
    try:
        with path.open("rb") as f:
            f.seek(start)
            left = end - start
            while left > 0 and (piece := f.read(min(chunk_bytes, left))):
                left -= len(piece)
                yield piece
    except FileNotFoundError:
        return


def _call_later(delay: float, fn: Callable[[int], None], arg: int) -> asyncio.TimerHandle | None:
    """Schedule on the running loop; None outside one (then pending lines wait for the next
    frame or ``close``)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    return loop.call_later(delay, fn, arg)
