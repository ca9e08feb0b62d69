"""The dashboard's HTTP routes: server-rendered pages at ``/``, the live log stream, sign-in,
and the admin actions (docs/dashboard.md).

Pages are whole HTML documents that read fine without JavaScript; with it, htmx re-fetches
the live part of a page every few seconds and swaps it in, and a step's log follows the
build through server-sent events.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

import jinja2
from fastapi import APIRouter, FastAPI, Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.staticfiles import StaticFiles

from bigtent import __version__
from bigtent.config import DashboardAuth, Role
from bigtent.errors import AuthError, BadRequest, BigtentError, NotFound, PayloadTooLarge
from bigtent.runner.auth.ownership import BuildAction, check_build_action, may_act
from bigtent.runner.auth.tokens import Principal, token_digest
from bigtent.runner.components import Components
from bigtent.runner.dashboard import present, views
from bigtent.runner.dashboard.auth import (
    SESSION_COOKIE,
    SessionStore,
    Via,
    Viewer,
    check_action,
    may_read,
    origin_allowed,
    safe_next,
)
from bigtent.runner.db import queries
from bigtent.runner.livelog import Subscription
from bigtent.runner.logretention import expired_response, log_expired
from bigtent.runner.logs import READ_CHUNK_BYTES
from bigtent.runner.logserve import log_response, parse_offset
from bigtent.runner.scheduler import recovery
from bigtent.runner.scheduler.model import AGENT
from bigtent.runner.sessions import bearer_token
from bigtent.states import BuildState

log = logging.getLogger(__name__)

MAX_FORM_BYTES = 16 * 1024
POLL_SECS = 2
"""How often a page's live part refreshes (htmx)."""
KEEPALIVE_SECS = 15.0
"""A live log stream sends a comment this often when nothing happens."""
END_CHECK_SECS = 0.1
END_CHECK_WINDOW_SECS = 5.0
"""After an attempt ends, how often and how long the stream looks for the step's final
state (it is recorded just after the log closes) before it goes back to waiting."""
SSE_RETRY_MILLIS = 1000

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


@dataclass(eq=False)
class Dashboard:
    """The dashboard's own state: templates and sign-in sessions."""

    comps: Components
    env: jinja2.Environment
    sessions: SessionStore
    cache_totals: views.CacheTotals
    took: views.TookCache = field(default_factory=views.TookCache)

    @property
    def mode(self) -> DashboardAuth:
        return self.comps.config.runner.dashboard_auth


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("bigtent.runner.dashboard", "templates"),
        autoescape=jinja2.select_autoescape(["html"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals.update(
        fmt_duration=present.fmt_duration,
        fmt_bytes=present.fmt_bytes,
        quota_percent=present.quota_percent,
        fmt_time=present.fmt_time,
        fmt_ago=present.fmt_ago,
        iso=present.iso,
        store_name=present.store_name,
        is_final=present.is_final,
        attempt_next=present.attempt_next,
        outcome_class=present.outcome_class,
        urlencode_query=urlencode,
        version=__version__,
        poll_secs=POLL_SECS,
    )
    return env


def install_dashboard(app: FastAPI, comps: Components) -> None:
    """Serve the dashboard at ``/`` (and its files at ``/static``)."""
    app.state.dashboard = Dashboard(comps, _environment(), SessionStore(), views.CacheTotals())
    app.include_router(router)
    app.mount(
        "/static",
        StaticFiles(packages=[("bigtent.runner.dashboard", "static")]),
        name="dashboard-static",
    )


def _dash(request: Request) -> Dashboard:
    dash: Dashboard = request.app.state.dashboard
    return dash


def _client_host(request: Request) -> str | None:
    return request.client.host if request.client else None


def viewer_of(request: Request) -> Viewer:
    """Who this is: a bearer token, a signed-in session, everyone (a runner without
    tokens), or nobody. A bad bearer token is an AuthError, counted against the address."""
    dash = _dash(request)
    comps = dash.comps
    token = bearer_token(request.headers.get("authorization"))
    if token is not None:
        host = _client_host(request)
        comps.auth_throttle.check(host)
        try:
            return Viewer(comps.tokens.authenticate(token), Via.BEARER)
        except AuthError as exc:
            comps.auth_throttle.failed(host, exc)
            raise
    session = dash.sessions.get(request.cookies.get(SESSION_COOKIE))
    if not comps.tokens.enabled:
        return Viewer(Principal("anonymous", Role.ADMIN), Via.OPEN, session)
    if session is not None and session.token_digest is not None:
        try:
            return Viewer(
                comps.tokens.authenticate_digest(session.token_digest), Via.SESSION, session
            )
        except AuthError:
            dash.sessions.drop(session.id)  # the token was revoked: so is the session
    return Viewer(None, Via.NONE, None)


def _allowed_origins(request: Request) -> list[str]:
    """The dashboard's own origins: as this request addressed it, and the public URL."""
    host = request.headers.get("host", "")
    return [f"{request.url.scheme}://{host}", _dash(request).comps.config.runner.base_url()]


def _render(
    request: Request,
    template: str,
    viewer: Viewer,
    status: int = 200,
    **ctx: Any,
) -> HTMLResponse:
    dash = _dash(request)
    session = viewer.session
    needs_session = viewer.via is Via.OPEN and session is None
    if needs_session:
        # A runner without tokens: everyone may act, but forms still need a CSRF token,
        # which lives in a session.
        session = dash.sessions.create(None)
    html = dash.env.get_template(template).render(
        request=request,
        viewer=viewer,
        csrf=session.csrf if session is not None else "",
        mode=dash.mode,
        path=request.url.path,
        scheduler_problem=recovery.problem(
            dash.comps.scheduler.recovery, public=dash.mode is DashboardAuth.PUBLIC
        ),
        **({"can_act": viewer.is_admin} | ctx),
    )
    resp = HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)
    if needs_session and session is not None:
        _set_session_cookie(request, resp, session.id)
    return resp


def _set_session_cookie(request: Request, resp: Response, session_id: str) -> None:
    resp.set_cookie(
        SESSION_COOKIE,
        session_id,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https"
        or _dash(request).comps.config.runner.base_url().startswith("https:"),
        path="/",
    )


_ERROR_TITLES = {
    400: "Bad request",
    401: "Sign in needed",
    403: "Not allowed",
    404: "Not found",
    413: "Too large",
    429: "Too many attempts",
    503: "Busy",
}


def _error_page(request: Request, exc: BigtentError, viewer: Viewer | None = None) -> Response:
    headers = {"Retry-After": str(exc.detail["retry_after_secs"])} if exc.http_status == 429 else {}
    resp = _render(
        request,
        "error.html",
        viewer or Viewer(None, Via.NONE),
        status=exc.http_status,
        message=exc.message,
        title=_ERROR_TITLES.get(exc.http_status, "Error"),
    )
    resp.headers.update(headers)
    return resp


async def _page(request: Request, body: Callable[[Viewer], Awaitable[Response]]) -> Response:
    """Run a page: check that the viewer may read (else off to sign in), render failures
    as an HTML page with their status."""
    try:
        viewer = viewer_of(request)
    except AuthError as exc:
        return _error_page(request, exc)
    if not may_read(viewer, _dash(request).mode):
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)
    try:
        return await body(viewer)
    except BigtentError as exc:
        return _error_page(request, exc, viewer)


router = APIRouter(include_in_schema=False)


# ---- pages -----------------------------------------------------------------------------------
@router.get("/")
async def overview(request: Request) -> Response:
    async def body(viewer: Viewer) -> Response:
        dash = _dash(request)
        data = await views.load_overview(dash.comps, dash.cache_totals, dash.took)
        return _render(request, "overview.html", viewer, o=data, title="Overview")

    return await _page(request, body)


@router.get("/builds")
async def builds_page(
    request: Request,
    state: str = "",
    repository: str = "",
    ref: str = "",
    creator: str = "",
    limit: str = "",
    before: str = "",
) -> Response:
    """Every build, newest first, by pages, filtered by state, repository, ref and creator."""

    async def body(viewer: Viewer) -> Response:
        page_size = _whole_number(limit, "limit") or views.BUILDS_PAGE
        before_id = _whole_number(before, "before")
        wanted = state.strip()
        if wanted and wanted not in {str(s) for s in BuildState}:
            raise BadRequest(
                f"unknown build state {wanted[:40]!r}: one of "
                + ", ".join(str(s) for s in BuildState)
            )
        cut = views.FILTER_MAX_CHARS
        filters = views.BuildFilters(
            wanted, repository.strip()[:cut], ref.strip()[:cut], creator.strip()[:cut]
        )
        dash = _dash(request)
        data = await views.load_builds(dash.comps, filters, page_size, before_id, dash.took)
        return _render(request, "builds.html", viewer, p=data, title="Builds")

    return await _page(request, body)


def _whole_number(text: str, name: str) -> int | None:
    """A query parameter that must be a whole number (empty: None); anything else is a 400
    page naming it."""
    text = text.strip()
    if not text:
        return None
    if not text.isascii() or not text.isdigit() or len(text) > 19:
        raise BadRequest(f"{name} must be a whole number, not {text[:40]!r}")
    return int(text)


@router.get("/builds/{build_id}")
async def build_page(request: Request, build_id: int) -> Response:
    async def body(viewer: Viewer) -> Response:
        data = await views.load_build(_dash(request).comps, build_id)
        can_act = viewer.principal is not None and may_act(viewer.principal, data.build.created_by)
        return _render(
            request, "build.html", viewer, b=data, title=f"Build {build_id}", can_act=can_act
        )

    return await _page(request, body)


@router.get("/steps/{step_id}")
async def step_page(request: Request, step_id: int) -> Response:
    async def body(viewer: Viewer) -> Response:
        data = await views.load_step(_dash(request).comps, step_id)
        return _render(request, "step.html", viewer, s=data, title=f"Step {data.step.name}")

    return await _page(request, body)


@router.get("/agents")
async def agents_page(request: Request) -> Response:
    async def body(viewer: Viewer) -> Response:
        data = await views.load_agents(_dash(request).comps)
        return _render(request, "agents.html", viewer, a=data, title="Agents")

    return await _page(request, body)


@router.get("/search")
async def search_page(request: Request, q: str = "") -> Response:
    async def body(viewer: Viewer) -> Response:
        data = await views.search(_dash(request).comps, q[:512])
        return _render(request, "search.html", viewer, r=data, query=data.query, title="Search")

    return await _page(request, body)


# ---- logs ------------------------------------------------------------------------------------
async def _require_step(comps: Components, step_id: int) -> None:
    views.known_id(step_id, "step")
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
        comps = _dash(request).comps
        await _require_step(comps, step_id)
        resp = await _expired_log(comps, step_id) or log_response(
            comps.logs, step_id, request.headers.get("range")
        )
        resp.headers["X-Content-Type-Options"] = "nosniff"
        return resp

    return await _page(request, body)


@router.get("/steps/{step_id}/events")
async def step_events(request: Request, step_id: int) -> Response:
    """The step's log as server-sent events: ``log`` events (data: a JSON string, id: the
    log offset after it) from ``Last-Event-ID`` or ``?from=`` on, live while the step
    runs, then one ``end`` event with its final state."""

    async def body(viewer: Viewer) -> Response:
        comps = _dash(request).comps
        await _require_step(comps, step_id)
        start = _start_offset(
            request.headers.get("last-event-id"), request.query_params.get("from")
        )
        sub = comps.logs.fanout.subscribe(step_id)  # Unavailable (503) when too many watch
        return StreamingResponse(
            _events(comps, step_id, start, sub),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    return await _page(request, body)


def _start_offset(last_event_id: str | None, from_param: str | None) -> int:
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


async def _events(
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


# ---- sign-in ---------------------------------------------------------------------------------
async def read_form(request: Request) -> dict[str, str]:
    """A small ``application/x-www-form-urlencoded`` body (first value of each field)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        if ctype:
            raise BadRequest("expected a form (application/x-www-form-urlencoded)")
        return {}
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise PayloadTooLarge(f"form larger than {MAX_FORM_BYTES} bytes")
    fields = parse_qs(body.decode(errors="replace"), keep_blank_values=True, max_num_fields=20)
    return {k: v[0] for k, v in fields.items()}


@router.get("/login")
async def login_form(request: Request, next: str = "/") -> Response:
    try:
        viewer = viewer_of(request)
    except AuthError as exc:
        return _error_page(request, exc)
    return _render(request, "login.html", viewer, next=safe_next(next), error=None, title="Sign in")


@router.post("/login")
async def login(request: Request) -> Response:
    dash = _dash(request)
    comps = dash.comps
    viewer = Viewer(None, Via.NONE)
    try:
        form = await read_form(request)
        target = safe_next(form.get("next"))
        if not origin_allowed(
            request.headers.get("origin"), request.headers.get("referer"), _allowed_origins(request)
        ):
            return _render(
                request,
                "login.html",
                viewer,
                status=403,
                next=target,
                error="the form was not posted from this dashboard",
                title="Sign in",
            )
        host = _client_host(request)
        comps.auth_throttle.check(host)
        token = form.get("token", "").strip()
        try:
            principal = comps.tokens.authenticate(token or None)
        except AuthError as exc:
            comps.auth_throttle.failed(host, exc)
            log.warning("dashboard sign-in from %s refused: %s", host or "?", exc)
            return _render(
                request,
                "login.html",
                viewer,
                status=401,
                next=target,
                error="that token is not valid",
                title="Sign in",
            )
    except BigtentError as exc:
        return _error_page(request, exc)
    dash.sessions.drop(request.cookies.get(SESSION_COOKIE))
    session = dash.sessions.create(bytes.fromhex(token_digest(token)) if token else None)
    log.info("dashboard: %s (%s) signed in from %s", principal.name, principal.role, host or "?")
    resp = RedirectResponse(target, status_code=303)
    _set_session_cookie(request, resp, session.id)
    return resp


@router.post("/logout")
async def logout(request: Request) -> Response:
    dash = _dash(request)
    try:
        form = await read_form(request)
    except BigtentError as exc:
        return _error_page(request, exc)
    session = dash.sessions.get(request.cookies.get(SESSION_COOKIE))
    ok = origin_allowed(
        request.headers.get("origin"), request.headers.get("referer"), _allowed_origins(request)
    )
    if session is not None and ok and form.get("csrf") == session.csrf:
        dash.sessions.drop(session.id)
    resp = RedirectResponse("/", status_code=303)
    resp.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return resp


# ---- actions ---------------------------------------------------------------------------------
async def _action(
    request: Request,
    run: Callable[[Components, dict[str, str], Principal], Awaitable[str]],
    *,
    admin_only: bool = True,
) -> Response:
    """An action from a form (session + CSRF token + same origin) or a script (bearer
    token); then back to the page it concerns. Build actions (not ``admin_only``) are open
    to clients, and ``run`` applies the ownership rule."""
    dash = _dash(request)
    try:
        viewer = viewer_of(request)
    except AuthError as exc:
        return _error_page(request, exc)
    try:
        form = await read_form(request)
        origin_ok = origin_allowed(
            request.headers.get("origin"), request.headers.get("referer"), _allowed_origins(request)
        )
        principal = check_action(
            viewer, csrf=form.get("csrf"), origin_ok=origin_ok, admin_only=admin_only
        )
        target = await run(dash.comps, form, principal)
    except BigtentError as exc:
        if exc.http_status in (401, 403):
            log.warning(
                "dashboard action %s from %s refused: %s",
                request.url.path,
                _client_host(request) or "?",
                exc,
            )
        return _error_page(request, exc, viewer)
    log.info("dashboard: %s by %s", request.url.path, principal.name)
    return RedirectResponse(target, status_code=303)


async def _existing_build(
    comps: Components, build_id: int, principal: Principal, action: BuildAction
) -> Any:
    """The build's row if ``principal`` may do ``action`` on it (the API's rule)."""
    views.known_id(build_id, "build")
    async with comps.engine.connect() as conn:
        row = await queries.fetch_build(conn, build_id)
    if row is None:
        raise NotFound(f"no build {build_id}")
    check_build_action(principal, action, build_id, row.created_by)
    return row


@router.post("/builds/{build_id}/cancel")
async def cancel(request: Request, build_id: int) -> Response:
    async def run(comps: Components, form: dict[str, str], who: Principal) -> str:
        await _existing_build(comps, build_id, who, BuildAction.CANCEL)
        await comps.scheduler.cancel_build(build_id, actor=who.name)
        return f"/builds/{build_id}"

    return await _action(request, run, admin_only=False)


@router.post("/builds/{build_id}/restart")
async def restart(request: Request, build_id: int) -> Response:
    async def run(comps: Components, form: dict[str, str], who: Principal) -> str:
        await _existing_build(comps, build_id, who, BuildAction.RESTART)
        await comps.scheduler.restart_build(build_id, actor=who.name)
        return f"/builds/{build_id}"

    return await _action(request, run, admin_only=False)


@router.post("/builds/{build_id}/bump")
async def bump(request: Request, build_id: int) -> Response:
    async def run(comps: Components, form: dict[str, str], who: Principal) -> str:
        row = await _existing_build(comps, build_id, who, BuildAction.BUMP)
        raw = form.get("priority", "").strip()
        try:
            priority = int(raw) if raw else int(row.priority) + 10
        except ValueError as exc:
            raise BadRequest(f"priority must be a whole number (got {raw!r})") from exc
        if not -1000 <= priority <= 1000:
            raise BadRequest(f"priority must be between -1000 and 1000 (got {priority})")
        await comps.scheduler.bump_build(build_id, priority, actor=who.name)
        return f"/builds/{build_id}"

    return await _action(request, run, admin_only=False)


@router.post("/agents/{machine_id}/drain")
async def drain(request: Request, machine_id: str) -> Response:
    async def run(comps: Components, form: dict[str, str], who: Principal) -> str:
        venue = comps.scheduler.venue_info(machine_id)
        if venue is None or venue.kind != AGENT:
            raise NotFound(f"no connected agent {machine_id!r}")
        comps.scheduler.drain(machine_id)
        return "/agents"

    return await _action(request, run)
