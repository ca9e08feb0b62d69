"""What an evaluation's report to its forge says (``EvalReport``): its state, each job's
state, link and, for a failed build, the end of its log."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from bigtent.config.ci import ProjectSection
from bigtent.runner.ci.disclosure import shown_eval_error, shown_job_error
from bigtent.runner.ci.triggers import CiEvalState
from bigtent.runner.db import ci_queries as q
from bigtent.runner.forge.model import EvalReport, EvalState, JobReport, JobState
from bigtent.runner.logs.store import LogStore

LOG_TAIL_LINES = 40
FAILED_TAILS = 50
"""Failed jobs whose log tail a report carries (the forge side caps what it posts)."""


def eval_url(base_url: str, eval_id: int) -> str:
    return f"{base_url}/ci/evaluations/{eval_id}"


async def build_report(
    engine: AsyncEngine,
    projects: Mapping[str, ProjectSection],
    logs: LogStore,
    base_url: str,
    eval_id: int,
) -> EvalReport | None:
    """What the forge is told about an evaluation now (None: no such evaluation, or its
    project reports to no forge)."""
    async with engine.connect() as conn:
        row = await q.fetch_evaluation(conn, eval_id)
        if row is None:
            return None
        jobs = await q.fetch_jobs(conn, eval_id)
        roots: dict[str, Any] = {}
        if row.build_id is not None:
            _, found = await q.build_progress(conn, int(row.build_id))
            roots = {r.drv_path: r for r in found}
    project = projects.get(row.project)
    target = project.target() if project is not None else None
    if target is None:
        return None
    reports = []
    tails = 0
    for j in jobs:
        state = JobState(j.state)
        tail = ""
        summary = ""
        root = roots.get(j.drv_path) if j.drv_path else None
        if state is JobState.FAILED:
            if j.error:
                summary = (
                    shown_job_error(
                        j.error,
                        trusted=bool(row.trusted),
                        admin=False,
                        url=eval_url(base_url, eval_id),
                    )
                    or ""
                )
            elif root is not None and root.id is not None:
                if root.state == "dependency_failed":
                    summary = "a dependency failed"
                elif tails < FAILED_TAILS:
                    tails += 1
                    tail = await asyncio.to_thread(logs.tail, int(root.id), LOG_TAIL_LINES)
                    summary = "build failed"
        url = (
            f"{base_url}/steps/{root.id}"
            if root is not None and root.id is not None
            else eval_url(base_url, eval_id)
        )
        reports.append(
            JobReport(
                attr=j.attr,
                state=state,
                drv_path=j.drv_path or "",
                url=url,
                log_tail=tail,
                summary=summary,
            )
        )
    return EvalReport(
        project=row.project,
        target=target,
        commit_sha=row.commit_sha,
        evaluation_id=int(row.id),
        state=forge_state(CiEvalState(row.state)),
        url=eval_url(base_url, eval_id),
        error=shown_eval_error(
            row.error or "", trusted=bool(row.trusted), admin=False, url=eval_url(base_url, eval_id)
        )
        or ""
        if row.state == CiEvalState.EVAL_ERROR
        else "",
        jobs=tuple(reports),
    )


def forge_state(state: CiEvalState) -> EvalState:
    if state is CiEvalState.AWAITING_APPROVAL:
        return EvalState.QUEUED
    return EvalState(state.value)
