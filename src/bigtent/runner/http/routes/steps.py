"""``/api/v1/steps/{id}``: a step, its log (whole or by range) and its live log events."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query
from fastapi.responses import JSONResponse, Response, StreamingResponse

from bigtent.apilimits import known_id
from bigtent.apimodels import Step
from bigtent.errors import NotFound
from bigtent.runner.dashboard.logstream import log_events as step_log_events
from bigtent.runner.dashboard.logstream import start_offset as step_events_start
from bigtent.runner.db import queries
from bigtent.runner.http.deps import ClientAuth, Comps
from bigtent.runner.http.shapes import answer, attempt_json, step_json, step_log_expired
from bigtent.runner.logs.retention import expired_response
from bigtent.runner.logs.serve import log_response

router = APIRouter()


STEP_ATTEMPTS_SHOWN = 200
"""A step's newest attempt records in ``GET /steps/{id}``."""


@router.get("/steps/{step_id}", response_model=Step)
async def get_step(step_id: int, comps: Comps, _: ClientAuth) -> JSONResponse:
    known_id(step_id, "step")
    async with comps.engine.connect() as conn:
        row = await queries.fetch_step(conn, step_id)
        if row is None:
            raise NotFound(f"no step {step_id}")
        attempts = await queries.fetch_step_attempts(conn, step_id, STEP_ATTEMPTS_SHOWN)
    return answer(step_json(row, comps) | {"attempt_records": [attempt_json(r) for r in attempts]})


@router.get("/steps/{step_id}/log")
async def get_step_log(
    step_id: int,
    comps: Comps,
    _: ClientAuth,
    byte_range: Annotated[str | None, Header(alias="range")] = None,
) -> Response:
    """The step's log, whole or one byte range (``Range: bytes=A-B``, ``A-``, ``-N``)."""
    known_id(step_id, "step")
    async with comps.engine.connect() as conn:
        row = await queries.fetch_step(conn, step_id)
        if row is None:
            raise NotFound(f"no step {step_id}")
    if step_log_expired(row, comps):
        # Retention deleted it: say so rather than answer an empty log.
        return expired_response(comps.config.scheduler.log_retention_days)
    return log_response(comps.logs, step_id, byte_range)


@router.get("/steps/{step_id}/events")
async def get_step_events(
    step_id: int,
    comps: Comps,
    _: ClientAuth,
    from_offset: Annotated[str | None, Query(alias="from")] = None,
    last_event_id: Annotated[str | None, Header(alias="last-event-id")] = None,
) -> StreamingResponse:
    """The step's log as server-sent events, as the dashboard's ``/steps/{id}/events``
    (``log`` events from ``?from=`` or ``Last-Event-ID`` on, live while the step runs, then
    one ``end`` event with its final state), behind a client token and with JSON errors:
    ``bigtent log --follow`` and ``bigtent build -L`` read it."""
    known_id(step_id, "step")
    async with comps.engine.connect() as conn:
        if await queries.fetch_step(conn, step_id) is None:
            raise NotFound(f"no step {step_id}")
    start = step_events_start(last_event_id, from_offset)
    sub = comps.logs.fanout.subscribe(step_id)  # Unavailable (503) when too many watch
    return StreamingResponse(
        step_log_events(comps, step_id, start, sub),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
