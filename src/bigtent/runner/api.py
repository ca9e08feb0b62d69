"""HTTP routes: ``/api/v1`` (docs/api.md) and the ``/cache`` binary cache. Routes validate,
call a component and shape the answer; errors are raised and rendered by one handler."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from pydantic import BaseModel, Field
from sqlalchemy.exc import SQLAlchemyError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from bigtent import __version__
from bigtent import protocol as p
from bigtent.apilimits import (
    BUILD_DRVS_MAX,
    LABEL_MAX_CHARS,
    PRIORITY_MAX,
    PRIORITY_MIN,
    REF_PATTERN,
    REPOSITORY_PATTERN,
)
from bigtent.config import Role
from bigtent.errors import (
    AuthError,
    BadRequest,
    BigtentError,
    Forbidden,
    NotFound,
    RangeNotSatisfiable,
    TooManyAuthFailures,
    clipped,
)
from bigtent.runner.auth.ownership import BuildAction, check_build_action
from bigtent.runner.auth.ratelimit import FailureThrottle
from bigtent.runner.auth.tokens import Principal, TokenRegistry
from bigtent.runner.builds import plan_parts
from bigtent.runner.cache import Cache
from bigtent.runner.components import Components
from bigtent.runner.dashboard.routes import _events as step_log_events
from bigtent.runner.dashboard.routes import _start_offset as step_events_start
from bigtent.runner.db import queries
from bigtent.runner.db.migrate import DATABASE_ERRORS, database_unavailable
from bigtent.runner.ingest import ingest_client_path, ingest_output
from bigtent.runner.logretention import expired_response, expired_text, log_expired
from bigtent.runner.logserve import log_response
from bigtent.runner.metrics import Metrics
from bigtent.runner.presigned import record_json
from bigtent.runner.s3 import S3Storage, s3_nar_response
from bigtent.runner.scheduler import recovery
from bigtent.runner.scheduler.health import is_unhealthy, shown_error
from bigtent.runner.scheduler.leases import cached_failure_error
from bigtent.runner.scheduler.matching import has_room
from bigtent.runner.scheduler.model import AGENT
from bigtent.runner.sessions import bearer_token, looks_like_jwt
from bigtent.runner.storage import MAX_NAME_BYTES
from bigtent.runner.trust import build_is_trusted
from bigtent.states import BuildEventKind, BuildState, StepState

log = logging.getLogger(__name__)

LOG_TAIL_LINES = 40
SMALL_NAR_BYTES = 256 * 1024


async def _components(request: Request) -> Components:
    comps: Components = request.app.state.components
    return comps


Comps = Annotated[Components, Depends(_components)]


async def oidc_client(comps: Components, token: str) -> Principal:
    """The client a CI job's ID token stands for, when its ``[[auth.oidc]]`` rule says
    ``clients = true``: untrusted, named and scoped by the job's repository."""
    identity = await comps.sessions.verify_oidc(token)
    assert comps.sessions.oidc is not None  # verify_oidc refuses without issuers
    if not comps.sessions.oidc.admits_clients(identity):
        raise Forbidden("this issuer's ID tokens may not act as a client (clients = false)")
    return Principal(
        f"oidc:{identity.repository}", Role.CLIENT, trusted=False, repository=identity.repository
    )


def _require(role: Role) -> Any:
    # Dependencies are ``async def``: FastAPI runs plain ``def`` ones in a thread pool.
    async def check(
        request: Request, authorization: Annotated[str | None, Header()] = None
    ) -> Principal:
        comps: Components = request.app.state.components
        token = bearer_token(authorization)
        if role is Role.CLIENT and token is not None and looks_like_jwt(token):
            return await oidc_client(comps, token)
        return comps.tokens.require(token, role)

    return Depends(check)


ClientAuth = Annotated[Principal, _require(Role.CLIENT)]
AgentAuth = Annotated[Principal, _require(Role.AGENT)]


async def _agent_credential(
    request: Request, authorization: Annotated[str | None, Header()] = None
) -> None:
    """An agent token, or the JWT of an OIDC-authenticated agent (the WebSocket's rule)."""
    comps: Components = request.app.state.components
    token = bearer_token(authorization)
    host = request.client.host if request.client else None
    comps.sessions.throttle.check(host)
    try:
        if token is not None and looks_like_jwt(token):
            await comps.sessions.verify_oidc(token)
        else:
            comps.tokens.require(token, Role.AGENT)
    except AuthError as exc:
        comps.sessions.throttle.failed(host, exc)
        raise


AgentCredential = Annotated[None, Depends(_agent_credential)]
AdminAuth = Annotated[Principal, _require(Role.ADMIN)]


def error_response(exc: BigtentError) -> JSONResponse:
    """The one rendering of a failure: ``{"error", "detail"}`` with the error's status (a 401
    also names the scheme, RFC 9110). Messages never contain the credential."""
    headers = {"WWW-Authenticate": "Bearer"} if exc.http_status == 401 else None
    if isinstance(exc, TooManyAuthFailures):
        headers = {"Retry-After": str(exc.retry_after_secs)}
    if isinstance(exc, RangeNotSatisfiable):
        headers = {"Content-Range": f"bytes */{exc.size}"}
    if exc.http_status == 503:
        headers = {"Retry-After": str(RETRY_AFTER_SECS)}
    body = {"error": clipped(exc.message), "detail": clipped(exc.detail)}
    return JSONResponse(body, status_code=exc.http_status, headers=headers)


RETRY_AFTER_SECS = 2
"""What a 503 (the database or storage cannot be used now) tells clients to wait."""


_PUBLIC_API_PATHS = frozenset({"/api/v1/openapi.json", "/api/v1/docs"})


def _jwt_for_upload(path: str, scope: Scope) -> bool:
    """An OIDC agent uploads its outputs with its JWT: that route verifies it itself."""
    if not path.startswith(_UPLOAD_PREFIX):
        return False
    token = bearer_token(Headers(scope=scope).get("authorization"))
    return token is not None and looks_like_jwt(token)


_UPLOAD_PREFIX = "/api/v1/agent/upload/"
HOOKS_PREFIX = "/api/v1/hooks/"
"""Forge webhooks carry no bearer token: their route checks the body's HMAC signature."""


class CredentialGate:
    """ASGI middleware: an ``/api/v1`` HTTP request without a valid credential is answered 401
    before its body is read, so an anonymous peer cannot make the runner buffer a large JSON
    body; an address with too many recent credential failures is answered 429 without a look
    at its credential. Routes still check the role; WebSockets check theirs (and the same
    limit) before the upgrade."""

    def __init__(
        self,
        app: ASGIApp,
        tokens: TokenRegistry,
        throttle: FailureThrottle,
        metrics: Metrics,
        jwt_client: Callable[[str], Awaitable[Principal]] | None = None,
    ) -> None:
        self.app = app
        self.tokens = tokens
        self.throttle = throttle
        self.metrics = metrics
        self.jwt_client = jwt_client
        """Verifies a CI job's ID token acting as a client (``oidc_client``); None: no
        ``[[auth.oidc]]`` rule admits clients, and a JWT is refused like any unknown token."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if (
            scope["type"] == "http"
            and path.startswith("/api/v1/")
            and path not in _PUBLIC_API_PATHS
            and not path.startswith(HOOKS_PREFIX)
            and not _jwt_for_upload(path, scope)
        ):
            client = scope.get("client")
            host: str | None = client[0] if client else None
            token = bearer_token(Headers(scope=scope).get("authorization"))
            try:
                self.throttle.check(host)
                try:
                    if self.jwt_client is not None and token and looks_like_jwt(token):
                        await self.jwt_client(token)
                    else:
                        self.tokens.authenticate(token)
                except AuthError as exc:
                    self.throttle.failed(host, exc)
                    raise
            except AuthError as exc:
                self.metrics.auth_failed(exc, token)
                # A limited address's requests are not logged one by one: the throttle
                # logged when the limit was reached.
                level = logging.DEBUG if isinstance(exc, TooManyAuthFailures) else logging.WARNING
                log.log(level, "%s %s from %s refused: %s", scope["method"], path, host or "?", exc)
                await error_response(exc)(scope, receive, send)
                return
        await self.app(scope, receive, send)


MAX_SHOWN_ERRORS = 20
"""Validation errors listed in an answer (a list of a million bad items has as many)."""


def install_error_handlers(app: FastAPI) -> None:
    """One place maps failures to status codes and ``{"error", "detail"}`` bodies."""

    @app.exception_handler(BigtentError)
    async def _bigtent(request: Request, exc: BigtentError) -> JSONResponse:
        if isinstance(exc, AuthError):  # refused by a route (the gate counts its own)
            credential = bearer_token(request.headers.get("authorization"))
            request.app.state.components.metrics.auth_failed(exc, credential)
        return error_response(exc)

    async def _database(request: Request, exc: Exception) -> JSONResponse:
        failure = database_unavailable(exc)
        if failure is None:
            raise exc  # a bug, not an outage: the server error it is
        log.warning("%s %s: %s", request.method, request.url.path, failure)
        return error_response(failure)

    for database_error in DATABASE_ERRORS:
        app.add_exception_handler(database_error, _database)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Never the input itself; a location or message quoting it (a dict key) is clipped.
        errors = [
            {"loc": clipped(list(e.get("loc", ()))), "msg": clipped(e.get("msg", ""))}
            for e in exc.errors()[:MAX_SHOWN_ERRORS]
        ]
        return JSONResponse({"error": "invalid request", "detail": errors}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        body = {"error": clipped(str(exc.detail)), "detail": None}
        return JSONResponse(body, status_code=exc.status_code)


_MAX_ID = 2**63 - 1


def _known_id(ident: int, what: str) -> int:
    """Ids are positive 64-bit integers: any other number names nothing (404), and must not
    reach the database, which cannot even compare it."""
    if not 0 < ident <= _MAX_ID:
        raise NotFound(f"no {what} {ident}")
    return ident


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat() if ts is not None else None


async def _body(request: Request) -> AsyncIterator[bytes]:
    async for chunk in request.stream():
        yield chunk


# Request bodies are bounded per route before they are read: a Content-Length above the
# route's limit is answered 413 at once, and a body without one is counted as it streams and
# refused (413) at the limit. Every route not named below has the app's default
# (``JSON_BODY_BYTES``, set in ``app.create_app``).
JSON_BODY_BYTES = 1024 * 1024
"""A JSON request or a form: tokens, bumps, presign and complete declarations, dashboard forms."""
LIST_BODY_BYTES = 32 * 1024 * 1024
"""``POST /builds`` and ``/paths/missing``: ~300,000 store paths, more than any closure."""
STREAMED_BODY = 2**62
"""NAR uploads stream to storage and are bounded while they do (declared size,
``cache.max_nar_bytes``): no limit here."""


# ---- /api/v1 --------------------------------------------------------------------------------
api = APIRouter(prefix="/api/v1")


@api.get("/status")
async def status(comps: Comps, _: ClientAuth) -> dict[str, Any]:
    counts: dict[str, int] | None = None
    paths: int | None = None
    size: int | None = None
    database_error: str | None = None
    try:
        async with comps.engine.connect() as conn:
            counts = await queries.count_steps_by_state(conn)
            paths, size = await queries.cache_totals(conn)
    except (SQLAlchemyError, OSError) as exc:
        if comps.scheduler.recovery is None:
            raise
        # The scheduler's reload failed too: say so rather than answer 500.
        database_error = recovery.describe(exc)
    overview = comps.scheduler.overview()
    return {
        "version": __version__,
        "cache_url": comps.cache.url,
        "cache_public_key": comps.cache.public_key,
        "untrusted_cache_url": comps.untrusted_cache.url if comps.untrusted_cache else None,
        "untrusted_cache_public_key": (
            comps.untrusted_cache.public_key if comps.untrusted_cache else None
        ),
        "upstreams": [u.model_dump() for u in comps.config.cache.upstreams],
        "steps": counts,
        "queue": overview.queue,
        "agents_connected": overview.agents_connected,
        "ssh_builders": len(comps.ssh.builders),
        "builds_active": overview.builds_active,
        "steps_waiting_for_capacity": overview.steps_waiting_for_capacity,
        "cache_paths": paths,
        "cache_bytes": size,
        "scheduler": _scheduler_status(comps, database_error),
    }


def _scheduler_status(comps: Components, database_error: str | None) -> dict[str, Any]:
    """Whether the scheduler is sound: while reloading its state from the database fails, it
    dispatches nothing (and ``/healthz`` fails)."""
    failure = comps.scheduler.recovery
    if failure is None:
        return {"healthy": True, "problem": None}
    return {
        "healthy": False,
        "problem": recovery.problem(failure),
        "recovery_failures": failure.failures,
        "failing_since": _iso(failure.since),
        "next_retry_at": _iso(failure.retry_at),
        "database_error": database_error,
    }


class PathsBody(BaseModel):
    paths: list[str] = Field(max_length=1_000_000)


@api.post("/paths/missing", max_body_size=LIST_BODY_BYTES)
async def missing_paths(body: PathsBody, comps: Comps, _: ClientAuth) -> dict[str, list[str]]:
    present = await comps.cache.present(body.paths)
    return {"missing": [x for x in body.paths if x not in present]}


@api.put("/paths/{basename}", status_code=201, max_body_size=STREAMED_BODY)
async def upload_path(
    basename: str,
    request: Request,
    comps: Comps,
    _: ClientAuth,
    x_nar_hash: Annotated[str | None, Header()] = None,
    x_nar_size: Annotated[str | None, Header()] = None,
    x_nar_references: Annotated[str | None, Header()] = None,
) -> JSONResponse:
    created = await ingest_client_path(
        comps.cache,
        comps.engine,
        basename,
        _body(request),
        nar_hash=x_nar_hash,
        nar_size=x_nar_size,
        references=x_nar_references,
    )
    return JSONResponse({"path": f"/nix/store/{basename}"}, status_code=201 if created else 200)


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


@api.post("/builds", status_code=201, max_body_size=LIST_BODY_BYTES)
async def create_build(
    body: BuildBody, comps: Comps, who: ClientAuth, response: Response
) -> dict[str, Any]:
    replaces: int | None = None
    if body.submission is not None:
        async with comps.engine.connect() as conn:
            found = await queries.fetch_submitted_build(conn, who.name, body.submission)
        if found is not None:
            row, interrupted = found
            if not interrupted:
                log.info("build %d submitted again by %s: the same build", row.id, who.name)
                response.status_code = 200
                return await _build_json(comps, int(row.id))
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
    return await _build_json(comps, build_id)


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


@api.get("/builds")
async def list_builds(
    comps: Comps,
    who: ClientAuth,
    limit: int = 50,
    state: Annotated[list[str] | None, Query()] = None,
    repository: str | None = None,
    ref: str | None = None,
    mine: bool = False,
) -> dict[str, Any]:
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
    return {"builds": [await _build_json(comps, r.id) for r in rows]}


@api.get("/builds/{build_id}")
async def get_build(build_id: int, comps: Comps, _: ClientAuth) -> dict[str, Any]:
    return await _build_json(comps, build_id, details=True)


@api.get("/builds/{build_id}/steps")
async def get_build_steps(build_id: int, comps: Comps, _: ClientAuth) -> dict[str, Any]:
    _known_id(build_id, "build")
    async with comps.engine.connect() as conn:
        if await queries.fetch_build(conn, build_id) is None:
            raise NotFound(f"no build {build_id}")
        rows = await queries.fetch_build_steps(conn, build_id)
        hits = await _cached_hits(conn, build_id)
    return {"steps": [_with_cached_hit(_step_json(r, comps), hits.get(r.id)) for r in rows]}


async def _cached_hits(conn: Any, build_id: int) -> dict[int, Any]:
    """The build's cached-failure hits by step (``queries.fetch_build_cached_failure_hits``)."""
    return {
        int(h.step_id): h for h in await queries.fetch_build_cached_failure_hits(conn, build_id)
    }


def cached_hit_json(hit: Any) -> dict[str, Any]:
    """A step this build failed from the failure cache: when, the failure it reused (the
    attempt that ran, and the build that queued that run, when known), until when it is
    reused (docs/api.md)."""
    return {
        "hit_at": _iso(hit.hit_at),
        "failed_at": _iso(hit.failed_at),
        "outcome": hit.failed_outcome,
        "cached_until": _iso(hit.cached_until),
        "attempt_id": hit.attempt_id,
        "agent_name": hit.agent_name,
        "ran_in_build": hit.ran_in_build,
    }


def _with_cached_hit(step: dict[str, Any], hit: Any | None) -> dict[str, Any]:
    """A step as this build sees it: for a cached-failure hit, the error says so (the step's
    own row keeps the error of the attempt that ran) and ``cached_failure`` says which."""
    if hit is None:
        return step
    return step | {
        "error": cached_failure_error(
            hit.failed_outcome,
            float(hit.failed_at),
            float(hit.cached_until) - float(hit.failed_at),
            step["error"],
        ),
        "cached_failure": cached_hit_json(hit),
    }


ATTEMPTS_PAGE = 1000
"""Attempt records per ``GET /builds/{id}/attempts`` answer at most (``after=`` pages on)."""
STEP_ATTEMPTS_SHOWN = 200
"""A step's newest attempt records in ``GET /steps/{id}``."""


@api.get("/builds/{build_id}/attempts")
async def get_build_attempts(
    build_id: int, comps: Comps, _: ClientAuth, after: int = 0, limit: int = ATTEMPTS_PAGE
) -> dict[str, Any]:
    """The attempts of the build's steps made since it was created, by record id: a client
    following the build asks with ``after`` = the last id it saw (docs/api.md)."""
    _known_id(build_id, "build")
    async with comps.engine.connect() as conn:
        build = await queries.fetch_build(conn, build_id)
        if build is None:
            raise NotFound(f"no build {build_id}")
        rows = await queries.fetch_build_attempts(
            conn,
            build_id,
            after=max(0, min(after, _MAX_ID)),
            since=build.created_at,
            limit=max(1, min(limit, ATTEMPTS_PAGE)),
        )
    return {"attempts": [attempt_json(r) for r in rows]}


async def _authorize(comps: Components, who: Principal, action: BuildAction, build_id: int) -> Any:
    """The build's row if ``who`` may do ``action`` on it (``ownership.check_build_action``);
    404 for an unknown build, 403 (logged with the actor) for someone else's."""
    _known_id(build_id, "build")
    async with comps.engine.connect() as conn:
        row = await queries.fetch_build(conn, build_id)
    if row is None:
        raise NotFound(f"no build {build_id}")
    try:
        check_build_action(who, action, build_id, row.created_by)
    except Forbidden:
        log.warning(
            "refused: %s (%s) may not %s build %d (created by %s)",
            who.name,
            who.role,
            action,
            build_id,
            row.created_by,
        )
        raise
    return row


@api.post("/builds/{build_id}/cancel")
async def cancel_build(build_id: int, comps: Comps, who: ClientAuth) -> dict[str, Any]:
    await _authorize(comps, who, BuildAction.CANCEL, build_id)
    if await comps.scheduler.cancel_build(build_id, actor=who.name):
        log.info("build %d cancelled by %s", build_id, who.name)
    return await _build_json(comps, build_id)


class BumpBody(BaseModel):
    priority: int | None = Field(default=None, ge=PRIORITY_MIN, le=PRIORITY_MAX)


@api.post("/builds/{build_id}/bump")
async def bump_build(
    build_id: int, comps: Comps, who: ClientAuth, body: BumpBody | None = None
) -> dict[str, Any]:
    row = await _authorize(comps, who, BuildAction.BUMP, build_id)
    priority = body.priority if body and body.priority is not None else int(row.priority) + 10
    if await comps.scheduler.bump_build(build_id, priority, actor=who.name):
        log.info("build %d bumped to priority %d by %s", build_id, priority, who.name)
    return await _build_json(comps, build_id)


@api.post("/builds/{build_id}/restart")
async def restart_build(build_id: int, comps: Comps, who: ClientAuth) -> dict[str, Any]:
    """Clear the cached failures of the build's failed steps and queue its failed,
    dependency-failed and cancelled steps again."""
    await _authorize(comps, who, BuildAction.RESTART, build_id)
    if await comps.scheduler.restart_build(build_id, actor=who.name):
        log.info("build %d restarted by %s", build_id, who.name)
    return await _build_json(comps, build_id)


@api.get("/steps/{step_id}")
async def get_step(step_id: int, comps: Comps, _: ClientAuth) -> dict[str, Any]:
    _known_id(step_id, "step")
    async with comps.engine.connect() as conn:
        row = await queries.fetch_step(conn, step_id)
        if row is None:
            raise NotFound(f"no step {step_id}")
        attempts = await queries.fetch_step_attempts(conn, step_id, STEP_ATTEMPTS_SHOWN)
    return _step_json(row, comps) | {"attempt_records": [attempt_json(r) for r in attempts]}


@api.get("/steps/{step_id}/log")
async def get_step_log(
    step_id: int,
    comps: Comps,
    _: ClientAuth,
    byte_range: Annotated[str | None, Header(alias="range")] = None,
) -> Response:
    """The step's log, whole or one byte range (``Range: bytes=A-B``, ``A-``, ``-N``)."""
    _known_id(step_id, "step")
    async with comps.engine.connect() as conn:
        row = await queries.fetch_step(conn, step_id)
        if row is None:
            raise NotFound(f"no step {step_id}")
    if _log_expired(row, comps):
        # Retention deleted it: say so rather than answer an empty log.
        return expired_response(comps.config.scheduler.log_retention_days)
    return log_response(comps.logs, step_id, byte_range)


@api.get("/steps/{step_id}/events")
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
    _known_id(step_id, "step")
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


def _log_expired(row: Any, comps: Components) -> bool:
    sched = comps.scheduler
    return log_expired(
        row.id, row.finished_at, comps.logs, sched, comps.config.scheduler, sched.clock()
    )


@api.get("/agents")
async def list_agents(comps: Comps, _: ClientAuth) -> dict[str, Any]:
    async with comps.engine.connect() as conn:
        rows = await queries.fetch_agents(conn)
    live = comps.scheduler.venue_infos()
    now = comps.scheduler.clock()
    # With other runners on the database, their agents count as connected while their rows
    # say so and their heartbeats are recent (docs/architecture.md, "Several runners").
    elsewhere_secs = (
        3 * comps.config.scheduler.heartbeat_secs
        if comps.scheduler.overview().shared_database
        else -1.0
    )
    out = []
    for r in rows:
        venue = live.get(r.machine_id)
        # A connected agent's backoff is the scheduler's; a gone one's is its row's, which
        # it gets back when it reconnects.
        backoff = venue.backoff_until if venue else (r.backoff_until or 0.0)
        failures = venue.consecutive_failures if venue else int(r.consecutive_failures)
        out.append(
            {
                "machine_id": r.machine_id,
                "name": r.name,
                "hostname": r.hostname,
                "systems": json.loads(r.systems),
                "supported_features": json.loads(r.supported_features),
                "mandatory_features": json.loads(r.mandatory_features),
                "max_jobs": r.max_jobs,
                "running": venue.running if venue else 0,
                "speed_factor": r.speed_factor,
                "ephemeral": r.ephemeral,
                "trusted": venue.trusted if venue else bool(r.trusted),
                "build_repositories": (
                    sorted(venue.repositories)
                    if venue is not None and venue.repositories is not None
                    else None
                ),
                "auth_kind": r.auth_kind,
                "oidc": _oidc_json(r),
                "launch_id": r.launch_id,
                "version": r.version,
                "connected": venue is not None
                or (bool(r.connected) and now - float(r.last_seen) <= elsewhere_secs),
                "draining": venue.draining if venue else False,
                "free_store_bytes": venue.free_store_bytes if venue else None,
                "has_room": venue is None
                or has_room(venue.free_store_bytes, comps.config.scheduler.min_free_store_bytes),
                "first_seen": _iso(r.first_seen),
                "last_seen": _iso(r.last_seen),
                "steps_succeeded": r.steps_succeeded,
                "steps_failed": r.steps_failed,
                "infra_failures": r.infra_failures,
                "consecutive_failures": failures,
                "backoff_until": _iso(backoff) if backoff > now else None,
                "unhealthy": is_unhealthy(
                    failures, comps.config.scheduler.unhealthy_after_failures
                ),
                "last_error": shown_error(
                    venue.last_error if venue else r.health_last_error, failures
                ),
            }
        )
    return {"agents": out}


def _oidc_json(row: Any) -> dict[str, Any] | None:
    """The CI identity an OIDC agent authenticated as; None for a token agent."""
    if row.auth_kind != "oidc":
        return None
    return {
        "issuer": row.oidc_issuer,
        "repository": row.oidc_repository,
        "subject": row.oidc_subject,
        "workflow_ref": row.oidc_workflow_ref,
        "ref": row.oidc_ref,
    }


@api.get("/builders")
async def list_builders(comps: Comps, _: ClientAuth) -> dict[str, Any]:
    """The ``[[ssh_builders]]``: usable ones with their load and backoff, skipped ones with
    the reason (docs/api.md)."""
    now = comps.scheduler.clock()
    builders = comps.ssh.describe(now)
    for b in builders:
        if b.get("backoff_until") is not None:
            b["backoff_until"] = _iso(b["backoff_until"])
    return {"builders": builders}


@api.post("/agents/{name}/drain")
async def drain_agent(name: str, comps: Comps, _: AdminAuth) -> dict[str, Any]:
    for venue in comps.scheduler.venue_infos().values():
        if venue.kind == AGENT and (venue.name == name or venue.machine_id == name):
            comps.scheduler.drain(venue.machine_id)
            return {"drained": venue.name}
    raise NotFound(f"no connected agent {name!r}")


class TokenBody(BaseModel):
    role: Role
    name: str | None = Field(
        default=None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]*$"
    )
    trusted: bool = False


def _token_json(t: queries.StoredToken) -> dict[str, Any]:
    """A stored token as the API shows it: never the digest."""
    return {
        "name": t.name,
        "role": t.role,
        "trusted": t.trusted,
        "created_by": t.created_by,
        "created_at": _iso(t.created_at),
        "revoked_at": _iso(t.revoked_at),
    }


@api.post("/tokens", status_code=201)
async def create_token(body: TokenBody, comps: Comps, who: AdminAuth) -> dict[str, Any]:
    """Store a new token; its secret is in this answer and nowhere else."""
    token, secret = await comps.token_store.create(
        body.role,
        body.name,
        trusted=body.trusted,
        created_by=who.name,
        now=comps.scheduler.clock(),
    )
    return {**_token_json(token), "token": secret}


@api.get("/tokens")
async def list_tokens(comps: Comps, _: AdminAuth) -> dict[str, Any]:
    return {"tokens": [_token_json(t) for t in await comps.token_store.fetch_all()]}


@api.delete("/tokens/{name}")
async def revoke_token(name: str, comps: Comps, who: AdminAuth) -> dict[str, Any]:
    """Revoke a stored token: from this answer on it authenticates nothing."""
    token = await comps.token_store.revoke(name, revoked_by=who.name, now=comps.scheduler.clock())
    return _token_json(token)


@api.put("/agent/upload/{lease_id}/{output_name}", max_body_size=STREAMED_BODY)
async def upload_output(
    lease_id: str,
    output_name: str,
    request: Request,
    comps: Comps,
    _: AgentCredential,
    x_nar_hash: Annotated[str | None, Header()] = None,
    x_nar_size: Annotated[str | None, Header()] = None,
) -> dict[str, Any]:
    info = await ingest_output(
        comps.cache,
        comps.upstreams,
        comps.scheduler,
        lease_id,
        output_name,
        _body(request),
        nar_hash=x_nar_hash,
        nar_size=x_nar_size,
        untrusted=comps.untrusted_cache,
    )
    return record_json(info)


@api.post("/agent/upload/{lease_id}/{output_name}" + p.PRESIGN_SUFFIX)
async def presign_output(
    lease_id: str,
    output_name: str,
    body: p.UploadDeclaration,
    comps: Comps,
    _: AgentCredential,
) -> dict[str, Any]:
    """A presigned upload of one output file to the bucket, or "PUT it to the runner"."""
    plan = await comps.presigned.presign(lease_id, output_name, body)
    return plan.model_dump(mode="json")


@api.post("/agent/upload/{lease_id}/{output_name}" + p.COMPLETE_SUFFIX)
async def complete_output(
    lease_id: str,
    output_name: str,
    body: p.UploadDeclaration,
    comps: Comps,
    _: AgentCredential,
) -> dict[str, Any]:
    """Verify a presigned upload and publish it (answers as the direct PUT does)."""
    return record_json(await comps.presigned.complete(lease_id, output_name, body))


@api.websocket("/agent/ws")
async def agent_ws(websocket: WebSocket) -> None:
    comps: Components = websocket.app.state.components
    await comps.sessions.handle(websocket)


async def _build_json(comps: Components, build_id: int, details: bool = False) -> dict[str, Any]:
    _known_id(build_id, "build")
    async with comps.engine.connect() as conn:
        build = await queries.fetch_build(conn, build_id)
        if build is None:
            raise NotFound(f"no build {build_id}")
        roots = await queries.fetch_build_roots(conn, build_id)
        steps = await queries.fetch_build_steps(conn, build_id)
        events = await queries.fetch_build_events(conn, build_id, EVENTS_SHOWN) if details else []
        hits = await _cached_hits(conn, build_id) if details else {}
    by_id = {s.id: s for s in steps}
    counts = {
        k: 0
        for k in ("total", "waiting", "runnable", "running", "succeeded", "failed", "cancelled")
    }
    for s in steps:
        counts["total"] += 1
        state = StepState(s.state)
        if state in (StepState.ASSIGNED, StepState.BUILDING):
            counts["running"] += 1
        elif state in (StepState.FAILED, StepState.DEPENDENCY_FAILED):
            counts["failed"] += 1
        else:
            counts[state.value] += 1
    out: dict[str, Any] = {
        "id": build.id,
        "state": build.state,
        "priority": build.priority,
        "created_at": _iso(build.created_at),
        "finished_at": _iso(build.finished_at),
        "created_by": build.created_by,
        "repository": build.repository,
        "ref": build.ref,
        "trusted": bool(build.trusted),
        "roots": [
            {
                "drv_path": r.drv_path,
                "outputs": json.loads(r.outputs),
                "step_id": r.step_id,
                "state": by_id[r.step_id].state if r.step_id in by_id else "cached",
            }
            for r in roots
        ],
        "counts": counts,
        "waiting_for_capacity_count": 0,
    }
    waiting = _waiting_for_capacity(comps, steps)
    out["waiting_for_capacity_count"] = len(waiting)
    if details:
        out["events"] = [build_event_json(e) for e in events]
        out["waiting_for_capacity"] = waiting[:WAITING_LISTED]
        out["failed_steps"] = [
            _with_cached_hit(
                {
                    "id": s.id,
                    "drv_path": s.drv_path,
                    "state": s.state,
                    "outcome": s.outcome,
                    "error": s.error,
                    "log_tail": (
                        expired_text(comps.config.scheduler.log_retention_days)
                        if _log_expired(s, comps)
                        else comps.logs.tail(s.id, LOG_TAIL_LINES)
                    ),
                },
                hits.get(s.id),
            )
            for s in steps
            if s.state == StepState.FAILED
        ]
    return out


EVENTS_SHOWN = 200
"""A build's newest events in ``GET /builds/{id}``."""


def build_event_json(row: Any) -> dict[str, Any]:
    """One entry of a build's history (``build_events``)."""
    return {
        "id": row.id,
        "at": _iso(row.at),
        "kind": row.kind,
        "actor": row.actor,
        "detail": row.detail,
    }


WAITING_LISTED = 20
"""Steps waiting for capacity listed in ``GET /builds/{id}`` (the count has them all)."""


def _waiting_for_capacity(comps: Components, steps: Sequence[Any]) -> list[dict[str, Any]]:
    """The build's runnable steps that no venue can take (``Scheduler.capacity_waiting``),
    longest waiting first."""
    waiting = comps.scheduler.capacity_waiting()
    if not waiting:
        return []
    found = [s for s in steps if s.id in waiting and s.state == StepState.RUNNABLE]
    found.sort(key=lambda s: (waiting[s.id], s.id))
    return [
        {
            "step_id": s.id,
            "drv_path": s.drv_path,
            "name": s.name,
            "system": s.system,
            "required_features": json.loads(s.required_features),
            "reason": comps.scheduler.waiting_reason(s.id),
            "since": _iso(waiting[s.id]),
        }
        for s in found
    ]


def _step_json(row: Any, comps: Components) -> dict[str, Any]:
    return {
        "log_expired": _log_expired(row, comps),
        "id": row.id,
        "drv_path": row.drv_path,
        "name": row.name,
        "system": row.system,
        "required_features": json.loads(row.required_features),
        "state": row.state,
        "outcome": row.outcome,
        "error": row.error,
        "exit_code": row.exit_code,
        "attempts": row.attempts,
        "agent_name": row.agent_name,
        "trusted": bool(row.trusted),
        "created_at": _iso(row.created_at),
        "assigned_at": _iso(row.assigned_at),
        "started_at": _iso(row.started_at),
        "finished_at": _iso(row.finished_at),
        "outputs": json.loads(row.outputs),
        "waiting_reason": comps.scheduler.waiting_reason(row.id),
    }


def attempt_json(row: Any) -> dict[str, Any]:
    """One attempt record (a row of ``queries.fetch_build_attempts``/``fetch_step_attempts``)."""
    return {
        "id": row.id,
        "step_id": row.step_id,
        "drv_path": row.drv_path,
        "name": row.name,
        "attempt": row.attempt,
        "max_attempts": row.max_attempts,
        "agent_name": row.agent_name,
        "started_at": _iso(row.started_at),
        "finished_at": _iso(row.finished_at),
        "outcome": row.outcome,
        "error": row.error,
        "retry_at": _iso(row.retry_at),
    }


# ---- /cache --------------------------------------------------------------------------------
cache_routes = APIRouter(prefix="/cache", include_in_schema=False)


def _untrusted(comps: Components) -> Cache:
    if comps.untrusted_cache is None:
        raise NotFound("no untrusted cache")
    return comps.untrusted_cache


def _cache_info(comps: Components, cache: Cache) -> Response:
    # The untrusted cache is consulted after the main one (a higher Priority number).
    priority = comps.config.cache.priority + (10 if cache.untrusted else 0)
    text = f"StoreDir: /nix/store\nWantMassQuery: 1\nPriority: {priority}\n"
    return PlainTextResponse(text, media_type="text/x-nix-cache-info")


async def _narinfo(cache: Cache, hash_part: str) -> Response:
    text = await cache.narinfo_text(hash_part) if len(hash_part) == 32 else None
    cache.metrics.narinfo_served(hit=text is not None)
    if text is None:
        raise NotFound("no such path")
    return PlainTextResponse(text, media_type="text/x-nix-narinfo")


async def _nar(cache: Cache, file_name: str, request: Request) -> Response:
    storage = cache.storage
    if len(file_name.encode()) > MAX_NAME_BYTES:
        raise NotFound("no such NAR")  # no file has such a name, in a directory or a bucket
    cache.nar_requested(f"nar/{file_name}")
    if isinstance(storage, S3Storage):
        return await s3_nar_response(storage, f"nar/{file_name}", head=request.method == "HEAD")
    path = storage.local_path(f"nar/{file_name}")
    if path is None:
        raise NotFound("no such NAR")
    size = path.stat().st_size
    if size <= SMALL_NAR_BYTES:
        # Most NARs are small: one read beats FileResponse's thread hop per chunk.
        return Response(path.read_bytes(), media_type="application/x-nix-nar")
    return FileResponse(path, media_type="application/x-nix-nar")


@cache_routes.api_route("/nix-cache-info", methods=["GET", "HEAD"])
async def nix_cache_info(comps: Comps) -> Response:
    return _cache_info(comps, comps.cache)


@cache_routes.api_route("/{hash_part}.narinfo", methods=["GET", "HEAD"])
async def get_narinfo(hash_part: str, comps: Comps) -> Response:
    return await _narinfo(comps.cache, hash_part)


@cache_routes.api_route("/nar/{file_name}", methods=["GET", "HEAD"])
async def get_nar(file_name: str, comps: Comps, request: Request) -> Response:
    return await _nar(comps.cache, file_name, request)


# The untrusted cache (docs/security.md): outputs of untrusted builds, signed with its own key.
# Its narinfo index is its own; its NAR files share the storage (named by their own hash).
@cache_routes.api_route("/untrusted/nix-cache-info", methods=["GET", "HEAD"])
async def untrusted_cache_info(comps: Comps) -> Response:
    return _cache_info(comps, _untrusted(comps))


@cache_routes.api_route("/untrusted/{hash_part}.narinfo", methods=["GET", "HEAD"])
async def get_untrusted_narinfo(hash_part: str, comps: Comps) -> Response:
    return await _narinfo(_untrusted(comps), hash_part)


@cache_routes.api_route("/untrusted/nar/{file_name}", methods=["GET", "HEAD"])
async def get_untrusted_nar(file_name: str, comps: Comps, request: Request) -> Response:
    return await _nar(_untrusted(comps), file_name, request)
