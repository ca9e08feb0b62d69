"""A step's log over HTTP: the whole log or one byte range (RFC 9110 §14), streamed from
the compressed store without holding it in memory."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from starlette.responses import StreamingResponse

from bigtent.errors import RangeNotSatisfiable
from bigtent.runner.logs.store import LogSnapshot, LogStore

_RANGE = re.compile(r"bytes=([0-9]*)-([0-9]*)")
_HUGE = 2**63 - 1
"""Larger than any log or file: a longer number means the same as this one."""


def bounded_decimal(text: str) -> int:
    """ASCII digits as an integer, capped at ``_HUGE`` without converting a long string
    (Python refuses strings of more than 4300 digits: a ``ValueError`` that would be a 500)."""
    digits = text.lstrip("0")
    if len(digits) > 19:
        return _HUGE
    return min(int(digits or "0"), _HUGE)


def parse_offset(text: str | None) -> int | None:
    """A byte offset sent by a client (``Last-Event-ID``, ``?from=``): ASCII digits only,
    capped like ``bounded_decimal``; None when absent or not a number."""
    if text is None:
        return None
    text = text.strip()
    if not text or not text.isascii() or not text.isdigit():
        return None
    return bounded_decimal(text)


@dataclass(frozen=True, slots=True)
class ByteRange:
    """Bytes ``[start, end)`` of a resource."""

    start: int
    end: int


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The single byte range a ``Range`` header asks for, clipped to ``size``; None means
    "send it all" (no header, another unit, several ranges, or a malformed one: RFC 9110
    lets a server ignore those). ``RangeNotSatisfiable`` when the range lies past the end
    (also ``bytes=N-`` with N at the end: nothing new yet)."""
    if header is None:
        return None
    m = _RANGE.fullmatch(header.strip().replace(" ", ""))
    if m is None:
        return None
    first, last = m.group(1), m.group(2)
    if not first and not last:
        return None
    if not first:  # a suffix: the last N bytes
        n = bounded_decimal(last)
        if n == 0 or size == 0:
            raise RangeNotSatisfiable("range not satisfiable", size=size)
        return ByteRange(max(0, size - n), size)
    start = bounded_decimal(first)
    if last and bounded_decimal(last) < start:
        return None
    if start >= size:
        raise RangeNotSatisfiable("range not satisfiable", size=size)
    end = min(size, bounded_decimal(last) + 1) if last else size
    return ByteRange(start, end)


def _body(logs: LogStore, step_id: int, snap: LogSnapshot, r: ByteRange) -> Iterator[bytes]:
    """The stored part from the files (Starlette iterates this in a worker thread), then
    the part that was still in memory when the request came."""
    yield from logs.iter_stored(step_id, r.start, min(r.end, snap.framed))
    lo = max(r.start, snap.framed) - snap.framed
    hi = r.end - snap.framed
    if hi > lo:
        yield snap.pending[lo:hi]


def log_response(logs: LogStore, step_id: int, range_header: str | None) -> StreamingResponse:
    """200 with the whole log, or 206 with the range asked for; the size is the log's at
    this moment (a running step's log grows: ask again from where this one ended)."""
    snap = logs.snapshot(step_id)
    size = snap.size
    wanted = parse_range(range_header, size)
    r = wanted or ByteRange(0, size)
    headers = {"Accept-Ranges": "bytes", "Content-Length": str(r.end - r.start)}
    status = 200
    if wanted is not None:
        status = 206
        headers["Content-Range"] = f"bytes {r.start}-{r.end - 1}/{size}"
    return StreamingResponse(
        _body(logs, step_id, snap, r),
        status_code=status,
        headers=headers,
        media_type="text/plain; charset=utf-8",
    )
