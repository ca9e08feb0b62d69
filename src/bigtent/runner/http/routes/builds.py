"""``/api/v1/builds``: create, list, show, and the owner's actions (cancel, bump, restart)."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from bigtent.apilimits import (
    BUILD_DRVS_MAX,
    BUILD_WAIT_MAX_SECS,
    LABEL_MAX_CHARS,
    MAX_ID,
    PRIORITY_MAX,
    PRIORITY_MIN,
    PROGRESS_TOKEN_MAX_CHARS,
    REF_PATTERN,
    REPOSITORY_PATTERN,
    known_id,
)
from bigtent.apimodels import (
    WAITED_HEADER,
    AttemptList,
    Build,
    BuildList,
    StepList,
    progress_seen,
    progress_token,
    seen_counts_steps,
)
from bigtent.config import Role
from bigtent.errors import BadRequest, InvalidParameter, NotFound
from bigtent.runner.auth.ownership import BuildAction
from bigtent.runner.buildactions import act_on_build
from bigtent.runner.builds import plan_parts
from bigtent.runner.components import Components
from bigtent.runner.db import queries
from bigtent.runner.http.deps import LIST_BODY_BYTES, ClientAuth, Comps, caller
from bigtent.runner.http.hotpath import HotTable
from bigtent.runner.http.shapes import (
    answer,
    attempt_json,
    build_json,
    build_list_json,
    cached_hits,
    step_json,
    with_cached_hit,
)
from bigtent.runner.trust import build_is_trusted
from bigtent.states import BuildEventKind, BuildState

log = logging.getLogger(__name__)

router = APIRouter()


class BuildBody(BaseModel):
    drvs: list[str] = Field(min_length=1, max_length=BUILD_DRVS_MAX)
    priority: int = Field(default=0, ge=PRIORITY_MIN, le=PRIORITY_MAX)
    repository: str | None = Field(
        default=None, min_length=1, max_length=LABEL_MAX_CHARS, pattern=REPOSITORY_PATTERN
    )
    """What the build is for, e.g. ``acme/widgets``: OIDC agents serve their rule's ones."""
    ref: str | None = Field(
        default=None, min_length=1, max_length=LABEL_MAX_CHARS, pattern=REF_PATTERN
    )
    """The git ref, e.g. ``refs/heads/main``; a pull request ref is never trusted."""
    trusted: bool = True
    """Ask for a trusted build; it is one only for a trusted creator and ref (architecture §6)."""
    submission: str | None = Field(
        default=None, min_length=16, max_length=64, pattern=r"^[A-Za-z0-9_-]+$"
    )
    """The client's random key for this submission, the same on each retry of it: a retry
    finds the build the first attempt created (200) or, when the runner stopped while
    admitting that one, replaces it."""


@router.post("/builds", response_model=Build, status_code=201, max_body_size=LIST_BODY_BYTES)
async def create_build(body: BuildBody, comps: Comps, who: ClientAuth) -> JSONResponse:
    replaces: int | None = None
    if body.submission is not None:
        async with comps.engine.connect() as conn:
            found = await queries.fetch_submitted_build(conn, who.name, body.submission)
        if found is not None:
            row, interrupted = found
            if not interrupted:
                log.info("build %d submitted again by %s: the same build", row.id, who.name)
                return answer(await build_json(comps, int(row.id)))
            replaces = int(row.id)
    trusted = build_is_trusted(
        requested=body.trusted, role=who.role, token_trusted=who.trusted, ref=body.ref
    )
    also = None if trusted else comps.untrusted_cache
    # Planned and admitted in parts: a large build starts while it is still being planned.
    build_id = await comps.scheduler.admit_build(
        priority=body.priority,
        created_by=who.name,
        parts=plan_parts(comps.cache, comps.upstreams, body.drvs, also=also),
        repository=who.repository if who.repository is not None else body.repository,
        ref=body.ref,
        trusted=trusted,
        submission_key=body.submission,
    )
    if replaces is not None:
        await comps.scheduler.record_build_event(
            replaces,
            BuildEventKind.REPLACED,
            actor=who.name,
            detail=f"submitted again as build {build_id}",
        )
        log.info("build %d replaces build %d, whose admission was interrupted", build_id, replaces)
    if body.trusted and not trusted:
        log.info("build %d by %s is untrusted (ref %s)", build_id, who.name, body.ref)
    return answer(await build_json(comps, build_id), status_code=201)


def build_state_filter(values: Sequence[str]) -> list[str]:
    """The build states of ``?state=`` (repeatable, or comma-separated); 400 for a state that
    is none (pure)."""
    states: list[str] = []
    for value in values:
        for part in value.split(","):
            name = part.strip().lower()
            if not name:
                continue
            if name not in {s.value for s in BuildState}:
                known = ", ".join(s.value for s in BuildState)
                raise BadRequest(f"unknown build state {part.strip()!r} (states: {known})")
            if name not in states:
                states.append(name)
    return states


@router.get("/builds", response_model=BuildList)
async def list_builds(
    comps: Comps,
    who: ClientAuth,
    limit: int = 50,
    state: Annotated[list[str] | None, Query()] = None,
    repository: str | None = None,
    ref: str | None = None,
    mine: bool = False,
) -> JSONResponse:
    """The newest builds, filtered in the query: ``state`` (repeatable or comma-separated),
    ``repository``, ``ref``, ``mine`` (created by the caller's token)."""
    states = build_state_filter(state or [])
    async with comps.engine.connect() as conn:
        rows = await queries.fetch_builds(
            conn,
            max(1, min(limit, 1000)),
            states=states,
            repository=repository,
            ref=ref,
            created_by=who.name if mine else None,
        )
        return answer({"builds": await build_list_json(comps, conn, rows)})


@dataclass(frozen=True)
class BuildWait:
    """``GET /builds/{id}?wait=SECS&seen=TOKEN``: answer once the build's progress token is
    no longer ``seen``, or after ``secs``."""

    secs: float
    seen: str


def build_wait(wait: str | None, seen: str | None) -> BuildWait | None:
    """The wait a ``GET /builds/{id}`` asks for, None without one; a bad value is a 422 with
    what is wrong (pure: both request paths validate here)."""
    if wait is None and seen is None:
        return None
    if wait is None or seen is None:
        raise InvalidParameter(
            "wait and seen go together: wait=SECONDS&seen=TOKEN, TOKEN the build's progress "
            "token as last seen (docs/api.md)"
        )
    try:
        secs = float(wait)
    except ValueError:
        secs = math.nan
    if not 0 <= secs <= BUILD_WAIT_MAX_SECS:  # NaN is in no range
        raise InvalidParameter(
            f"wait must be a number of seconds from 0 to {BUILD_WAIT_MAX_SECS:g} (got {wait!r})"
        )
    if not 0 < len(seen) <= PROGRESS_TOKEN_MAX_CHARS:
        raise InvalidParameter(
            f"seen must have 1 to {PROGRESS_TOKEN_MAX_CHARS} characters (got {len(seen)})"
        )
    return BuildWait(secs, seen)


async def watched_build(comps: Components, build_id: int, wait: BuildWait | None) -> JSONResponse:
    """The build as ``GET /builds/{id}`` answers it; with ``wait``, once it is no longer as
    the client saw it (``progress_seen``: its state and step counts, or its state alone) or
    it ended, else at the wait's end, saying so in ``WAITED_HEADER``. The scheduler's
    ``build_watch`` says when to read it again; at the wait's end with no word from it, the
    answer is the build as last read (the change it did not say is seen by the next look),
    so a wait costs the database no more reads than the poll it replaces."""
    if wait is None:
        return answer(await build_json(comps, build_id, details=True))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait.secs
    steps = seen_counts_steps(wait.seen)
    while True:
        # Watched before it is read: a change committed during the read wakes the wait.
        with comps.scheduler.build_watch.watching(build_id, steps=steps) as changed:
            body = await build_json(comps, build_id, details=True)
            left = deadline - loop.time()
            if (
                left > 0
                and not BuildState(body["state"]).is_final
                and progress_seen(progress_token(body["state"], body["counts"]), wait.seen)
            ):
                woken, _ = await asyncio.wait([changed], timeout=left)
                if woken:
                    continue
            response = answer(body)
            response.headers[WAITED_HEADER] = f"{wait.secs:g}"
            return response


@router.get("/builds/{build_id}", response_model=Build)
async def get_build(
    build_id: int,
    comps: Comps,
    _: ClientAuth,
    wait: Annotated[
        str | None,
        Query(
            description=f"Seconds (at most {BUILD_WAIT_MAX_SECS:g}) to hold the answer while "
            "the build's progress token is still `seen`."
        ),
    ] = None,
    seen: Annotated[
        str | None,
        Query(description="The build's progress token as the client last saw it, or its state."),
    ] = None,
) -> JSONResponse:
    return await watched_build(comps, build_id, build_wait(wait, seen))


async def hot_get_build(comps: Components, request: Request, params: dict[str, str]) -> Response:
    """``get_build`` for ``HotRoutes`` (runner/http/hotpath.py), which takes only ids of
    digits (FastAPI answers anything else, as an invalid id)."""
    await caller(comps, request.headers.get("authorization"), Role.CLIENT)
    query = request.query_params
    wait = build_wait(query.get("wait"), query.get("seen"))
    return await watched_build(comps, int(params["build_id"]), wait)


@router.get("/builds/{build_id}/steps", response_model=StepList)
async def get_build_steps(build_id: int, comps: Comps, _: ClientAuth) -> JSONResponse:
    known_id(build_id, "build")
    async with comps.engine.connect() as conn:
        if await queries.fetch_build(conn, build_id) is None:
            raise NotFound(f"no build {build_id}")
        rows = await queries.fetch_build_steps(conn, build_id)
        hits = await cached_hits(conn, build_id)
    return answer({"steps": [with_cached_hit(step_json(r, comps), hits.get(r.id)) for r in rows]})


ATTEMPTS_PAGE = 1000
"""Attempt records per ``GET /builds/{id}/attempts`` answer at most (``after=`` pages on)."""


@router.get("/builds/{build_id}/attempts", response_model=AttemptList)
async def get_build_attempts(
    build_id: int, comps: Comps, _: ClientAuth, after: int = 0, limit: int = ATTEMPTS_PAGE
) -> JSONResponse:
    """The attempts of the build's steps made since it was created, by record id: a client
    following the build asks with ``after`` = the last id it saw (docs/api.md)."""
    known_id(build_id, "build")
    async with comps.engine.connect() as conn:
        build = await queries.fetch_build(conn, build_id)
        if build is None:
            raise NotFound(f"no build {build_id}")
        rows = await queries.fetch_build_attempts(
            conn,
            build_id,
            after=max(0, min(after, MAX_ID)),
            since=build.created_at,
            limit=max(1, min(limit, ATTEMPTS_PAGE)),
        )
    return answer({"attempts": [attempt_json(r) for r in rows]})


@router.post("/builds/{build_id}/cancel", response_model=Build)
async def cancel_build(build_id: int, comps: Comps, who: ClientAuth) -> JSONResponse:
    await act_on_build(comps, who, BuildAction.CANCEL, build_id)
    return answer(await build_json(comps, build_id))


class BumpBody(BaseModel):
    priority: int | None = Field(default=None, ge=PRIORITY_MIN, le=PRIORITY_MAX)


@router.post("/builds/{build_id}/bump", response_model=Build)
async def bump_build(
    build_id: int, comps: Comps, who: ClientAuth, body: BumpBody | None = None
) -> JSONResponse:
    await act_on_build(
        comps, who, BuildAction.BUMP, build_id, priority=body.priority if body else None
    )
    return answer(await build_json(comps, build_id))


@router.post("/builds/{build_id}/restart", response_model=Build)
async def restart_build(build_id: int, comps: Comps, who: ClientAuth) -> JSONResponse:
    """Clear the cached failures of the build's failed steps and queue its failed,
    dependency-failed and cancelled steps again."""
    await act_on_build(comps, who, BuildAction.RESTART, build_id)
    return answer(await build_json(comps, build_id))


HOT_BUILDS: HotTable = {
    "/api/v1/builds/{build_id:digits}": (("GET",), hot_get_build),
}
"""A client's polls of its build, answered by ``HotRoutes`` (runner/http/hotpath.py)."""
