"""The dashboard's admin and build actions (cancel, restart, bump, drain): a form or a script,
then back to the page.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Request
from starlette.responses import RedirectResponse, Response

from bigtent.apilimits import PRIORITY_MAX, PRIORITY_MIN
from bigtent.errors import AuthError, BadRequest, BigtentError, NotFound
from bigtent.runner.auth.ownership import BuildAction
from bigtent.runner.auth.tokens import Principal
from bigtent.runner.buildactions import act_on_build
from bigtent.runner.components import Components
from bigtent.runner.dashboard.auth import check_action, origin_allowed
from bigtent.runner.dashboard.shell import (
    allowed_origins,
    client_host,
    dash_of,
    error_page,
    viewer_of,
)
from bigtent.runner.dashboard.signin import read_form
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


def form_priority(form: dict[str, str]) -> int | None:
    """The bump form's priority; None (the default bump) when it is empty."""
    raw = form.get("priority", "").strip()
    if not raw:
        return None
    try:
        priority = int(raw)
    except ValueError as exc:
        raise BadRequest(f"priority must be a whole number (got {raw!r})") from exc
    if not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise BadRequest(
            f"priority must be between {PRIORITY_MIN} and {PRIORITY_MAX} (got {priority})"
        )
    return priority


async def _on_build(request: Request, action: BuildAction, build_id: int) -> Response:
    """A build action (the API's, ``buildactions.act_on_build``), then the build's page."""

    async def run(comps: Components, form: dict[str, str], who: Principal) -> str:
        priority = form_priority(form) if action is BuildAction.BUMP else None
        await act_on_build(comps, who, action, build_id, priority=priority)
        return f"/builds/{build_id}"

    return await _action(request, run, admin_only=False)


@router.post("/builds/{build_id}/cancel")
async def cancel(request: Request, build_id: int) -> Response:
    return await _on_build(request, BuildAction.CANCEL, build_id)


@router.post("/builds/{build_id}/restart")
async def restart(request: Request, build_id: int) -> Response:
    return await _on_build(request, BuildAction.RESTART, build_id)


@router.post("/builds/{build_id}/bump")
async def bump(request: Request, build_id: int) -> Response:
    return await _on_build(request, BuildAction.BUMP, build_id)


@router.post("/agents/{machine_id}/drain")
async def drain(request: Request, machine_id: str) -> Response:
    async def run(comps: Components, form: dict[str, str], who: Principal) -> str:
        venue = comps.scheduler.venue_info(machine_id)
        if venue is None or venue.kind != AGENT:
            raise NotFound(f"no connected agent {machine_id!r}")
        comps.scheduler.drain(machine_id)
        return "/agents"

    return await _action(request, run)
