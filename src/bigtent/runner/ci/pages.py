"""Dashboard pages of Nix CI: projects -> branches and pull requests -> evaluations -> jobs,
with each job's state over a ref's recent evaluations (Hydra's jobset page)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from bigtent.errors import NotFound
from bigtent.runner.ci.disclosure import shown_eval_error, shown_job_error
from bigtent.runner.components import Components
from bigtent.runner.dashboard.shell import dash_of, page, render
from bigtent.runner.db import ci_queries as q

ci_pages = APIRouter(include_in_schema=False)

HISTORY = 10
"""Evaluations of a ref shown side by side on a project's page."""


@dataclass(slots=True)
class ProjectRow:
    name: str
    url: str
    forge: str
    refs: list[dict[str, Any]] = field(default_factory=list)


async def _projects(comps: Components) -> list[ProjectRow]:
    ci = comps.ci
    if ci is None:
        return []
    await ci.reload_projects()
    rows = []
    async with comps.engine.connect() as conn:
        for p in ci.projects.values():
            row = ProjectRow(p.name, p.url, p.forge.value)
            for r in await q.branches_of(conn, p.name):
                latest = await q.fetch_evaluation(conn, int(r.latest))
                row.refs.append({"ref": r.ref, "count": int(r.evaluations), "latest": latest})
            rows.append(row)
    return rows


@ci_pages.get("/ci")
async def projects_page(request: Request) -> Response:
    async def body(viewer: Any) -> Response:
        data = await _projects(dash_of(request).comps)
        return render(request, "ci_projects.html", viewer, projects=data, title="CI projects")

    return await page(request, body)


@ci_pages.get("/ci/projects/{name}")
async def project_page(request: Request, name: str, ref: str = "") -> Response:
    async def body(viewer: Any) -> Response:
        comps = dash_of(request).comps
        if comps.ci is None:
            raise NotFound("this runner has no CI")
        await comps.ci.reload_projects()
        project = comps.ci.project(name)
        async with comps.engine.connect() as conn:
            refs = await q.branches_of(conn, name)
            chosen = ref[:256] or (refs[0].ref if refs else "")
            evals = await q.fetch_evaluations(conn, name, HISTORY, ref=chosen) if chosen else []
            matrix: dict[str, dict[int, str]] = {}
            for ev in evals:
                for j in await q.fetch_jobs(conn, int(ev.id)):
                    matrix.setdefault(j.attr, {})[int(ev.id)] = j.state
        return render(
            request,
            "ci_project.html",
            viewer,
            project=project,
            refs=refs,
            ref=chosen,
            evals=evals,
            matrix=sorted(matrix.items()),
            title=f"CI {name}",
        )

    return await page(request, body)


@ci_pages.get("/ci/evaluations/{eval_id}")
async def evaluation_page(request: Request, eval_id: int) -> Response:
    async def body(viewer: Any) -> Response:
        comps = dash_of(request).comps
        if not 0 < eval_id < 2**63:
            raise NotFound(f"no evaluation {eval_id}")
        async with comps.engine.connect() as conn:
            ev = await q.fetch_evaluation(conn, eval_id)
            if ev is None:
                raise NotFound(f"no evaluation {eval_id}")
            jobs = await q.fetch_jobs(conn, eval_id)
            steps: dict[str, int] = {}
            if ev.build_id is not None:
                _, roots = await q.build_progress(conn, int(ev.build_id))
                steps = {r.drv_path: int(r.id) for r in roots if r.id is not None}
        # An untrusted evaluation's Nix messages: admins only (disclosure.py).
        trusted = bool(ev.trusted)
        return render(
            request,
            "ci_evaluation.html",
            viewer,
            ev=ev,
            ev_error=shown_eval_error(ev.error, trusted=trusted, admin=viewer.is_admin),
            job_errors={
                j.attr: shown_job_error(j.error, trusted=trusted, admin=viewer.is_admin)
                for j in jobs
            },
            jobs=jobs,
            steps=steps,
            title=f"Evaluation {eval_id}",
        )

    return await page(request, body)
