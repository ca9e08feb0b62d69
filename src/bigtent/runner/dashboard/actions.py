"""The dashboard's admin and build actions (cancel, restart, bump, drain): a form or a script,
then back to the page.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import RedirectResponse, Response

from bigtent.errors import AuthError, BadRequest, BigtentError, NotFound
from bigtent.runner.auth.ownership import BuildAction, check_build_action
from bigtent.runner.auth.tokens import Principal
from bigtent.runner.components import Components
from bigtent.runner.dashboard import views
from bigtent.runner.dashboard.auth import check_action, origin_allowed
from bigtent.runner.dashboard.shell import (
    allowed_origins,
    client_host,
    dash_of,
    error_page,
    viewer_of,
)
from bigtent.runner.dashboard.signin import read_form
from bigtent.runner.db import queries
from bigtent.runner.scheduler.model import AGENT

log = logging.getLogger(__name__)

router = APIRouter(include_in_schema=False)


async def _action(
    request: Request,
    run: Callable[[Components, dict[str, str], Principal], Awaitable[str]],
    *,
    admin_only: bool = True,
) -> Response:
    """An action from a form (session + CSRF token + same origin) or a script (bearer
    token); then back to the page it concerns. Build actions (not ``admin_only``) are open
    to clients, and ``run`` applies the ownership rule."""
    dash = dash_of(request)
    try:
        viewer = viewer_of(request)
    except AuthError as exc:
        return error_page(request, exc)
    try:
        form = await read_form(request)
        origin_ok = origin_allowed(
            request.headers.get("origin"), request.headers.get("referer"), allowed_origins(request)
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
                client_host(request) or "?",
                exc,
            )
        return error_page(request, exc, viewer)
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
