"""The CI API (docs/api.md "Nix CI"): webhooks, projects, evaluations and jobs."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from bigtent.apilimits import known_id
from bigtent.config import Role
from bigtent.config.ci import ProjectSection
from bigtent.errors import AuthError, BadRequest, ConfigError, NotFound, PayloadTooLarge
from bigtent.runner.auth.tokens import Principal
from bigtent.runner.ci.disclosure import shown_eval_error, shown_job_error
from bigtent.runner.ci.service import CiService
from bigtent.runner.ci.triggers import match_project
from bigtent.runner.ci.webhooks import (
    HookForge,
    Ignored,
    Rerun,
    Trigger,
    hook_headers,
    matching_secrets,
    parse_event,
    parse_payload,
)
from bigtent.runner.db import ci_queries as q
from bigtent.runner.http.deps import AdminAuth, ClientAuth, Comps, iso

log = logging.getLogger(__name__)

ci_routes = APIRouter(prefix="/api/v1")

HOOK_ROUTE_BYTES = 64 * 1024 * 1024
"""The route's own bound; ``evaluation.webhook_max_bytes`` (smaller) is applied in it."""


def _ci(comps: Comps) -> CiService:
    if comps.ci is None:
        raise NotFound("this runner has no CI service")
    return comps.ci


async def _bounded_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise PayloadTooLarge(f"webhook body larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"webhook body larger than {limit} bytes")
    return bytes(body)


async def _hook(forge: HookForge, request: Request, comps: Comps) -> JSONResponse:
    """Verify, then act: nothing is stored for a delivery that fails any check."""
    ci = _ci(comps)
    host = request.client.host if request.client else None
    comps.auth_throttle.check(host)
    body = await _bounded_body(request, comps.config.evaluation.webhook_max_bytes)
    headers = {k.lower(): v for k, v in request.headers.items()}
    try:
        hh = hook_headers(forge, headers)
        await ci.reload_projects()
        secrets = {}
        for p in ci.projects.values():
            try:
                secret = p.webhook_secret()
            except ConfigError as exc:  # one project's broken secret fails no other's hooks
                log.error("webhook secret of project %s skipped: %s", p.name, exc)
                continue
            if secret is not None:
                secrets[p.name] = secret
        signed_by = matching_secrets(secrets, body, hh.signature)
        if not signed_by:
            raise AuthError("webhook signature does not match any project's secret")
    except AuthError as exc:
        comps.auth_throttle.failed(host, exc)
        log.warning("webhook from %s refused: %s", host or "?", exc)
        raise
    event = parse_event(hh.event, parse_payload(body))
    if isinstance(event, Ignored):
        return JSONResponse({"accepted": False, "reason": event.reason}, status_code=202)
    candidates = [ci.projects[n] for n in signed_by]
    project = match_project(
        candidates,
        event.repository,
        event.clone_urls if isinstance(event, Trigger) else (),
    )
    if project is None:
        raise NotFound(f"no project for repository {event.repository!r} signed with its secret")
    async with comps.engine.begin() as conn:
        fresh = await q.record_delivery(conn, hh.delivery, forge.value, comps.scheduler.clock())
    if not fresh:
        raise BadRequest(f"webhook delivery {hh.delivery} was received before (a replay)")
    if isinstance(event, Rerun):
        async with comps.engine.connect() as conn:
            row = await q.fetch_evaluation(conn, event.evaluation_id)
        if row is None or row.project != project.name:
            raise NotFound(f"no evaluation {event.evaluation_id} of project {project.name}")
        restarted = await ci.rerun(event)
        return JSONResponse({"accepted": True, "restarted": restarted}, status_code=202)
    stale = await ci.stale(project, event)
    if stale is not None:
        return JSONResponse(
            {"accepted": False, "project": project.name, "reason": stale}, status_code=202
        )
    eval_id = await ci.trigger(project, event)
    return JSONResponse(
        {"accepted": eval_id is not None, "project": project.name, "evaluation": eval_id},
        status_code=202,
    )


@ci_routes.post("/hooks/github", max_body_size=HOOK_ROUTE_BYTES)
async def github_hook(request: Request, comps: Comps) -> JSONResponse:
    return await _hook(HookForge.GITHUB, request, comps)


@ci_routes.post("/hooks/forgejo", max_body_size=HOOK_ROUTE_BYTES)
async def forgejo_hook(request: Request, comps: Comps) -> JSONResponse:
    return await _hook(HookForge.FORGEJO, request, comps)


@ci_routes.post("/hooks/gitea", max_body_size=HOOK_ROUTE_BYTES)
async def gitea_hook(request: Request, comps: Comps) -> JSONResponse:
    return await _hook(HookForge.FORGEJO, request, comps)


# ---- projects -------------------------------------------------------------------------------


def _project_json(ci: CiService, p: ProjectSection, who: Principal) -> dict[str, Any]:
    """A project's settings; the paths of its secret files for admins only."""
    settings = p.model_dump(mode="json") if who.role is Role.ADMIN else p.public_json()
    return {**settings, "source": ci.sources.get(p.name, "config")}


@ci_routes.get("/projects")
async def list_projects(comps: Comps, who: ClientAuth) -> dict[str, Any]:
    ci = _ci(comps)
    await ci.reload_projects()
    return {"projects": [_project_json(ci, p, who) for p in ci.projects.values()]}


@ci_routes.post("/projects", status_code=201)
async def add_project(request: Request, comps: Comps, who: AdminAuth) -> dict[str, Any]:
    ci = _ci(comps)
    try:
        project = ProjectSection.model_validate_json(await request.body())
    except ValidationError as exc:
        errors = exc.errors()
        where = ".".join(str(x) for x in errors[0]["loc"]) if errors else ""
        what = errors[0]["msg"] if errors else ""
        raise BadRequest(
            f"invalid project: {where + ': ' if where else ''}{what}",
            detail=[{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in exc.errors()],
        ) from exc
    await ci.add_project(project)
    return _project_json(ci, project, who)


@ci_routes.get("/projects/{name}")
async def show_project(name: str, comps: Comps, who: ClientAuth) -> dict[str, Any]:
    ci = _ci(comps)
    await ci.reload_projects()
    project = ci.project(name)
    async with comps.engine.connect() as conn:
        refs = await q.branches_of(conn, name)
        latest = {}
        for r in refs:
            row = await q.fetch_evaluation(conn, int(r.latest))
            if row is not None:
                latest[r.ref] = _eval_json(row, who.role is Role.ADMIN)
    return {
        **_project_json(ci, project, who),
        "refs": [
            {"ref": r.ref, "evaluations": int(r.evaluations), "latest": latest.get(r.ref)}
            for r in refs
        ],
    }


@ci_routes.delete("/projects/{name}")
async def remove_project(name: str, comps: Comps, _: AdminAuth) -> dict[str, Any]:
    await _ci(comps).remove_project(name)
    return {"removed": name}


@ci_routes.post("/projects/{name}/evaluate", status_code=202)
async def evaluate_project(
    name: str,
    comps: Comps,
    _: AdminAuth,
    branch: str | None = Query(default=None, max_length=200),
) -> dict[str, Any]:
    """Evaluate a branch's current commit now (a manual trigger)."""
    eval_id = await _ci(comps).evaluate_now(name, branch)
    return {"evaluation": eval_id}


@ci_routes.get("/projects/{name}/evaluations")
async def project_evaluations(
    name: str,
    comps: Comps,
    who: ClientAuth,
    limit: int = Query(default=50, ge=1, le=1000),
    ref: str | None = Query(default=None, max_length=256),
) -> dict[str, Any]:
    ci = _ci(comps)
    await ci.reload_projects()
    ci.project(name)
    async with comps.engine.connect() as conn:
        rows = await q.fetch_evaluations(conn, name, limit, ref=ref)
    return {"evaluations": [_eval_json(r, who.role is Role.ADMIN) for r in rows]}


# ---- evaluations ----------------------------------------------------------------------------


def _eval_json(row: Any, admin: bool) -> dict[str, Any]:
    """An evaluation as the API shows it; an untrusted one's Nix message to admins only
    (``disclosure.py``)."""
    return {
        "id": row.id,
        "project": row.project,
        "ref": row.ref,
        "commit": row.commit_sha,
        "trigger": row.trigger,
        "pull_request": row.pull_request,
        "trusted": bool(row.trusted),
        "state": row.state,
        "error": shown_eval_error(row.error, trusted=bool(row.trusted), admin=admin),
        "build_id": row.build_id,
        "created_at": iso(row.created_at),
        "started_at": iso(row.started_at),
        "finished_at": iso(row.finished_at),
        "superseded_by": row.superseded_by,
    }


@ci_routes.get("/evaluations/{eval_id}")
async def show_evaluation(eval_id: int, comps: Comps, who: ClientAuth) -> dict[str, Any]:
    known_id(eval_id, "evaluation")
    async with comps.engine.connect() as conn:
        row = await q.fetch_evaluation(conn, eval_id)
        if row is None:
            raise NotFound(f"no evaluation {eval_id}")
        jobs = await q.fetch_jobs(conn, eval_id)
    admin = who.role is Role.ADMIN
    trusted = bool(row.trusted)
    return {
        **_eval_json(row, admin),
        "jobs": [
            {
                "attr": j.attr,
                "drv_path": j.drv_path,
                "state": j.state,
                "error": shown_job_error(j.error, trusted=trusted, admin=admin),
            }
            for j in jobs
        ],
    }


@ci_routes.get("/evaluations/{eval_id}/report")
async def evaluation_report(eval_id: int, comps: Comps, _: ClientAuth) -> dict[str, Any]:
    """What the forge is told about the evaluation now (the ``Reporter``'s input)."""
    known_id(eval_id, "evaluation")
    report = await _ci(comps).build_report(eval_id)
    if report is None:
        raise NotFound(f"no report for evaluation {eval_id} (no evaluation, or no forge)")
    return dataclasses.asdict(report)


@ci_routes.post("/evaluations/{eval_id}/approve")
async def approve_evaluation(eval_id: int, comps: Comps, _: AdminAuth) -> dict[str, Any]:
    known_id(eval_id, "evaluation")
    await _ci(comps).approve(eval_id)
    return {"approved": eval_id}


@ci_routes.post("/evaluations/{eval_id}/cancel")
async def cancel_evaluation(eval_id: int, comps: Comps, _: AdminAuth) -> dict[str, Any]:
    known_id(eval_id, "evaluation")
    return {"cancelled": await _ci(comps).cancel(eval_id)}


@ci_routes.post("/evaluations/{eval_id}/rerun")
async def rerun_evaluation(
    eval_id: int,
    comps: Comps,
    _: AdminAuth,
    attr: str | None = Query(default=None, max_length=512),
) -> dict[str, Any]:
    """Restart the evaluation's failed jobs (``attr``: only if that job failed)."""
    known_id(eval_id, "evaluation")
    async with comps.engine.connect() as conn:
        row = await q.fetch_evaluation(conn, eval_id)
    if row is None:
        raise NotFound(f"no evaluation {eval_id}")
    restarted = await _ci(comps).rerun(Rerun(row.project, eval_id, attr))
    return {"restarted": restarted}
