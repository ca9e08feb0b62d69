"""The dashboard's frame around every page: its state (templates, sign-in sessions), who is
viewing, rendering a page or an error page with the security headers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode

import jinja2
from fastapi import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from bigtent import __version__
from bigtent.config import DashboardAuth, Role
from bigtent.errors import AuthError, BigtentError
from bigtent.runner.auth.tokens import Principal
from bigtent.runner.components import Components
from bigtent.runner.dashboard import present, views
from bigtent.runner.dashboard.auth import SESSION_COOKIE, SessionStore, Via, Viewer, may_read
from bigtent.runner.scheduler import recovery
from bigtent.runner.venues.sessions import bearer_token

POLL_SECS = 2
"""How often a page's live part refreshes (htmx)."""


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


def environment() -> jinja2.Environment:
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


def dash_of(request: Request) -> Dashboard:
    dash: Dashboard = request.app.state.dashboard
    return dash


def client_host(request: Request) -> str | None:
    return request.client.host if request.client else None


def viewer_of(request: Request) -> Viewer:
    """Who this is: a bearer token, a signed-in session, everyone (a runner without
    tokens), or nobody. A bad bearer token is an AuthError, counted against the address."""
    dash = dash_of(request)
    comps = dash.comps
    token = bearer_token(request.headers.get("authorization"))
    if token is not None:
        host = client_host(request)
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


def allowed_origins(request: Request) -> list[str]:
    """The dashboard's own origins: as this request addressed it, and the public URL."""
    host = request.headers.get("host", "")
    return [f"{request.url.scheme}://{host}", dash_of(request).comps.config.runner.base_url()]


def render(
    request: Request,
    template: str,
    viewer: Viewer,
    status: int = 200,
    **ctx: Any,
) -> HTMLResponse:
    dash = dash_of(request)
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
        set_session_cookie(request, resp, session.id)
    return resp


def set_session_cookie(request: Request, resp: Response, session_id: str) -> None:
    resp.set_cookie(
        SESSION_COOKIE,
        session_id,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https"
        or dash_of(request).comps.config.runner.base_url().startswith("https:"),
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


def error_page(request: Request, exc: BigtentError, viewer: Viewer | None = None) -> Response:
    headers = {"Retry-After": str(exc.detail["retry_after_secs"])} if exc.http_status == 429 else {}
    resp = render(
        request,
        "error.html",
        viewer or Viewer(None, Via.NONE),
        status=exc.http_status,
        message=exc.message,
        title=_ERROR_TITLES.get(exc.http_status, "Error"),
    )
    resp.headers.update(headers)
    return resp


async def page(request: Request, body: Callable[[Viewer], Awaitable[Response]]) -> Response:
    """Run a page: check that the viewer may read (else off to sign in), render failures
    as an HTML page with their status."""
    try:
        viewer = viewer_of(request)
    except AuthError as exc:
        return error_page(request, exc)
    if not may_read(viewer, dash_of(request).mode):
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)
    try:
        return await body(viewer)
    except BigtentError as exc:
        return error_page(request, exc, viewer)
