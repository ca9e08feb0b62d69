"""A step's log on the dashboard: the raw log, and the live stream as server-sent events."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response, StreamingResponse

from bigtent.apilimits import known_id
from bigtent.errors import NotFound
from bigtent.runner.components import Components
from bigtent.runner.dashboard import present
from bigtent.runner.dashboard.auth import Viewer
from bigtent.runner.dashboard.shell import dash_of, page
from bigtent.runner.db import queries
from bigtent.runner.logs.live import Subscription
from bigtent.runner.logs.retention import expired_response, log_expired
from bigtent.runner.logs.serve import log_response, parse_offset
from bigtent.runner.logs.store import READ_CHUNK_BYTES

router = APIRouter(include_in_schema=False)


KEEPALIVE_SECS = 15.0
"""A live log stream sends a comment this often when nothing happens."""


END_CHECK_SECS = 0.1


END_CHECK_WINDOW_SECS = 5.0
"""After an attempt ends, how often and how long the stream looks for the step's final
state (it is recorded just after the log closes) before it goes back to waiting."""


SSE_RETRY_MILLIS = 1000


async def _require_step(comps: Components, step_id: int) -> None:
    known_id(step_id, "step")
    async with comps.engine.connect() as conn:
        if await queries.fetch_step(conn, step_id) is None:
            raise NotFound(f"no step {step_id}")


async def _expired_log(comps: Components, step_id: int) -> Response | None:
    """The answer for a log retention deleted, else None."""
    async with comps.engine.connect() as conn:
        row = await queries.fetch_step(conn, step_id)
    cfg, sched = comps.config.scheduler, comps.scheduler
    if row is None or not log_expired(
        step_id, row.finished_at, comps.logs, sched, cfg, sched.clock()
    ):
        return None
    return expired_response(cfg.log_retention_days)


@router.get("/steps/{step_id}/log")
async def step_log(request: Request, step_id: int) -> Response:
    """The raw log (``text/plain``), whole or by ``Range``, as ``/api/v1/steps/ID/log``."""

    async def body(viewer: Viewer) -> Response:
        comps = dash_of(request).comps
        await _require_step(comps, step_id)
        resp = await _expired_log(comps, step_id) or log_response(
            comps.logs, step_id, request.headers.get("range")
        )
        resp.headers["X-Content-Type-Options"] = "nosniff"
        return resp

    return await page(request, body)


@router.get("/steps/{step_id}/events")
async def step_events(request: Request, step_id: int) -> Response:
    """The step's log as server-sent events: ``log`` events (data: a JSON string, id: the
    log offset after it) from ``Last-Event-ID`` or ``?from=`` on, live while the step
    runs, then one ``end`` event with its final state."""

    async def body(viewer: Viewer) -> Response:
        comps = dash_of(request).comps
        await _require_step(comps, step_id)
        start = start_offset(request.headers.get("last-event-id"), request.query_params.get("from"))
        sub = comps.logs.fanout.subscribe(step_id)  # Unavailable (503) when too many watch
        return StreamingResponse(
            log_events(comps, step_id, start, sub),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    return await page(request, body)


def start_offset(last_event_id: str | None, from_param: str | None) -> int:
    for value in (last_event_id, from_param):
        offset = parse_offset(value)
        if offset is not None:
            return offset
    return 0


def _sse(event: str, data: Any, event_id: int | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data)}\n\n"


def _read_stored(comps: Components, step_id: int, start: int, end: int) -> bytes:
    return b"".join(comps.logs.iter_stored(step_id, start, end))


async def _final_state(comps: Components, step_id: int) -> str | None:
    """The step's state when it is final, else None. The scheduler's memory answers for
    active steps; the database only for steps it no longer holds."""
    state = comps.scheduler.step_state(step_id)
    if state is not None and not state.is_final:
        return None
    async with comps.engine.connect() as conn:
        row = await queries.fetch_step(conn, step_id)
    if row is None:
        return "gone"
    return str(row.state) if present.is_final(str(row.state)) else None


async def log_events(
    comps: Components, step_id: int, start: int, sub: Subscription
) -> AsyncGenerator[str]:
    """The stream behind ``step_events``. ``sub`` was taken before the snapshot below, in
    the same turn of the event loop: every byte after the snapshot comes through it, none
    is missed or sent twice (offsets say which bytes a chunk holds)."""
    logs = comps.logs
    try:
        snap = logs.snapshot(step_id)
        yield f"retry: {SSE_RETRY_MILLIS}\n\n"
        pos = start
        if pos > snap.size:  # the log was started afresh since this viewer read it
            yield _sse("reset", None)
            pos = 0
        while pos < snap.framed:
            end = min(snap.framed, pos + READ_CHUNK_BYTES)
            data = await asyncio.to_thread(_read_stored, comps, step_id, pos, end)
            if not data:
                break
            pos += len(data)
            yield _sse("log", data.decode(errors="replace"), pos)
        if pos < snap.size:
            tail = snap.pending[pos - snap.framed :]
            pos = snap.size
            yield _sse("log", tail.decode(errors="replace"), pos)
        # A log already closed when this viewer came (its attempt ended, the step's final
        # state may not be written yet): look for the end as often as right after an
        # ``attempt_ended`` notice, not only at the next keepalive.
        closed = snap.size > 0 and not logs.is_open(step_id)
        ended_at: float | None = time.monotonic() if closed else None
        while True:
            state = await _final_state(comps, step_id)
            closing = state is not None
            near_end = ended_at is not None and time.monotonic() - ended_at < END_CHECK_WINDOW_SECS
            batch = await sub.next_batch(
                0 if closing else END_CHECK_SECS if near_end else KEEPALIVE_SECS
            )
            for chunk in batch.chunks:
                if chunk.end <= pos:
                    continue
                piece = chunk.data[max(0, pos - chunk.offset) :]
                pos = chunk.end
                yield _sse("log", piece.decode(errors="replace"), pos)
            if closing:
                yield _sse("end", {"state": state}, pos)
                return
            if batch.dropped:
                return  # fell behind: the browser reconnects from ``pos`` (Last-Event-ID)
            if batch.attempt_ended:
                ended_at = time.monotonic()
            elif not batch.chunks and not near_end:
                yield ": keepalive\n\n"
    finally:
        comps.logs.fanout.unsubscribe(sub)
