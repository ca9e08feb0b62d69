"""Signing in to the dashboard with a token, and out."""

from __future__ import annotations

import logging
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from starlette.responses import RedirectResponse, Response

from bigtent.errors import AuthError, BadRequest, BigtentError, PayloadTooLarge
from bigtent.runner.auth.tokens import token_digest
from bigtent.runner.dashboard.auth import SESSION_COOKIE, Via, Viewer, origin_allowed, safe_next
from bigtent.runner.dashboard.shell import (
    allowed_origins,
    client_host,
    dash_of,
    error_page,
    render,
    set_session_cookie,
    viewer_of,
)

log = logging.getLogger(__name__)

router = APIRouter(include_in_schema=False)


MAX_FORM_BYTES = 16 * 1024


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
        return error_page(request, exc)
    return render(request, "login.html", viewer, next=safe_next(next), error=None, title="Sign in")


@router.post("/login")
async def login(request: Request) -> Response:
    dash = dash_of(request)
    comps = dash.comps
    viewer = Viewer(None, Via.NONE)
    try:
        form = await read_form(request)
        target = safe_next(form.get("next"))
        if not origin_allowed(
            request.headers.get("origin"), request.headers.get("referer"), allowed_origins(request)
        ):
            return render(
                request,
                "login.html",
                viewer,
                status=403,
                next=target,
                error="the form was not posted from this dashboard",
                title="Sign in",
            )
        host = client_host(request)
        comps.auth_throttle.check(host)
        token = form.get("token", "").strip()
        try:
            principal = comps.tokens.authenticate(token or None)
        except AuthError as exc:
            comps.auth_throttle.failed(host, exc)
            log.warning("dashboard sign-in from %s refused: %s", host or "?", exc)
            return render(
                request,
                "login.html",
                viewer,
                status=401,
                next=target,
                error="that token is not valid",
                title="Sign in",
            )
    except BigtentError as exc:
        return error_page(request, exc)
    dash.sessions.drop(request.cookies.get(SESSION_COOKIE))
    session = dash.sessions.create(bytes.fromhex(token_digest(token)) if token else None)
    log.info("dashboard: %s (%s) signed in from %s", principal.name, principal.role, host or "?")
    resp = RedirectResponse(target, status_code=303)
    set_session_cookie(request, resp, session.id)
    return resp


@router.post("/logout")
async def logout(request: Request) -> Response:
    dash = dash_of(request)
    try:
        form = await read_form(request)
    except BigtentError as exc:
        return error_page(request, exc)
    session = dash.sessions.get(request.cookies.get(SESSION_COOKIE))
    ok = origin_allowed(
        request.headers.get("origin"), request.headers.get("referer"), allowed_origins(request)
    )
    if session is not None and ok and form.get("csrf") == session.csrf:
        dash.sessions.drop(session.id)
    resp = RedirectResponse("/", status_code=303)
    resp.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return resp
