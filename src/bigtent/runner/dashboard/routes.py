"""The dashboard's HTTP routes: server-rendered pages at ``/`` here; the live log stream
(``logstream``), sign-in (``signin``) and the admin actions (``actions``) in their own
modules, around the frame in ``shell`` (docs/dashboard.md).

Pages are whole HTML documents that read fine without JavaScript; with it, htmx re-fetches
the live part of a page every few seconds and swaps it in, and a step's log follows the
build through server-sent events.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, FastAPI, Request
from starlette.responses import Response
from starlette.staticfiles import StaticFiles

from bigtent.errors import BadRequest
from bigtent.runner.auth.ownership import may_act
from bigtent.runner.components import Components
from bigtent.runner.dashboard import actions, logstream, signin, views
from bigtent.runner.dashboard.auth import SessionStore, Viewer
from bigtent.runner.dashboard.shell import Dashboard, dash_of, environment, page, render
from bigtent.states import BuildState

log = logging.getLogger(__name__)


def install_dashboard(app: FastAPI, comps: Components) -> None:
    """Serve the dashboard at ``/`` (and its files at ``/static``)."""
    app.state.dashboard = Dashboard(comps, environment(), SessionStore(), views.CacheTotals())
    app.include_router(router)
    app.include_router(logstream.router)
    app.include_router(signin.router)
    app.include_router(actions.router)
    app.mount(
        "/static",
        StaticFiles(packages=[("bigtent.runner.dashboard", "static")]),
        name="dashboard-static",
    )


router = APIRouter(include_in_schema=False)


# ---- pages -----------------------------------------------------------------------------------
@router.get("/")
async def overview(request: Request) -> Response:
    async def body(viewer: Viewer) -> Response:
        dash = dash_of(request)
        data = await views.load_overview(dash.comps, dash.cache_totals, dash.took)
        return render(request, "overview.html", viewer, o=data, title="Overview")

    return await page(request, body)


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
        dash = dash_of(request)
        data = await views.load_builds(dash.comps, filters, page_size, before_id, dash.took)
        return render(request, "builds.html", viewer, p=data, title="Builds")

    return await page(request, body)


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
        data = await views.load_build(dash_of(request).comps, build_id)
        can_act = viewer.principal is not None and may_act(viewer.principal, data.build.created_by)
        return render(
            request, "build.html", viewer, b=data, title=f"Build {build_id}", can_act=can_act
        )

    return await page(request, body)


@router.get("/steps/{step_id}")
async def step_page(request: Request, step_id: int) -> Response:
    async def body(viewer: Viewer) -> Response:
        data = await views.load_step(dash_of(request).comps, step_id)
        return render(request, "step.html", viewer, s=data, title=f"Step {data.step.name}")

    return await page(request, body)


@router.get("/agents")
async def agents_page(request: Request) -> Response:
    async def body(viewer: Viewer) -> Response:
        data = await views.load_agents(dash_of(request).comps)
        return render(request, "agents.html", viewer, a=data, title="Agents")

    return await page(request, body)


@router.get("/search")
async def search_page(request: Request, q: str = "") -> Response:
    async def body(viewer: Viewer) -> Response:
        data = await views.search(dash_of(request).comps, q[:512])
        return render(request, "search.html", viewer, r=data, query=data.query, title="Search")

    return await page(request, body)
