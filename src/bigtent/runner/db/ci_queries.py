"""The SQL of Nix CI (projects, evaluations, jobs, webhook deliveries): docs/ci.md."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import and_, delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from bigtent.runner.db.queries.common import insert_ignore
from bigtent.runner.db.tables import (
    build_roots,
    builds,
    ci_evaluations,
    ci_jobs,
    ci_projects,
    ci_webhook_deliveries,
    steps,
)

FINAL_EVAL_STATES = ("succeeded", "failed", "eval_error", "cancelled")


# ---- projects -------------------------------------------------------------------------------


async def fetch_projects(conn: AsyncConnection) -> list[Any]:
    return list(await conn.execute(select(ci_projects).order_by(ci_projects.c.name)))


async def upsert_project(
    conn: AsyncConnection, name: str, source: str, settings: dict[str, Any], now: float
) -> None:
    text = json.dumps(settings, sort_keys=True)
    done = await conn.execute(
        update(ci_projects).where(ci_projects.c.name == name).values(source=source, settings=text)
    )
    if done.rowcount == 0:
        await conn.execute(
            insert(ci_projects).values(name=name, source=source, settings=text, created_at=now)
        )


async def insert_project(
    conn: AsyncConnection, name: str, source: str, settings: dict[str, Any], now: float
) -> bool:
    """False when a project of that name exists."""
    result = await conn.execute(
        insert_ignore(conn, ci_projects)
        .values(
            name=name, source=source, settings=json.dumps(settings, sort_keys=True), created_at=now
        )
        .returning(ci_projects.c.name)
    )
    return result.first() is not None


async def delete_project(conn: AsyncConnection, name: str) -> bool:
    done = await conn.execute(delete(ci_projects).where(ci_projects.c.name == name))
    return bool(done.rowcount)


# ---- webhook deliveries ---------------------------------------------------------------------


async def record_delivery(conn: AsyncConnection, delivery_id: str, forge: str, now: float) -> bool:
    """False when the delivery id was seen before (a replay)."""
    result = await conn.execute(
        insert_ignore(conn, ci_webhook_deliveries)
        .values(delivery_id=delivery_id, forge=forge, received_at=now)
        .returning(ci_webhook_deliveries.c.delivery_id)
    )
    return result.first() is not None


async def prune_deliveries(conn: AsyncConnection, before: float) -> None:
    await conn.execute(
        delete(ci_webhook_deliveries).where(ci_webhook_deliveries.c.received_at < before)
    )


async def count_deliveries(conn: AsyncConnection) -> int:
    return int(
        (await conn.execute(select(func.count()).select_from(ci_webhook_deliveries))).scalar_one()
    )


# ---- evaluations ----------------------------------------------------------------------------


async def insert_evaluation(conn: AsyncConnection, **values: Any) -> int | None:
    """The new evaluation's id; None when this (project, ref, commit) has one already."""
    result = await conn.execute(
        insert_ignore(conn, ci_evaluations).values(**values).returning(ci_evaluations.c.id)
    )
    row = result.first()
    return int(row[0]) if row is not None else None


async def find_evaluation(
    conn: AsyncConnection, project: str, ref: str, commit_sha: str
) -> Any | None:
    return (
        await conn.execute(
            select(ci_evaluations).where(
                ci_evaluations.c.project == project,
                ci_evaluations.c.ref == ref,
                ci_evaluations.c.commit_sha == commit_sha,
            )
        )
    ).first()


async def fetch_evaluation(conn: AsyncConnection, eval_id: int) -> Any | None:
    return (
        await conn.execute(select(ci_evaluations).where(ci_evaluations.c.id == eval_id))
    ).first()


async def fetch_evaluations(
    conn: AsyncConnection, project: str | None, limit: int, ref: str | None = None
) -> list[Any]:
    q = select(ci_evaluations).order_by(ci_evaluations.c.id.desc()).limit(limit)
    if project is not None:
        q = q.where(ci_evaluations.c.project == project)
    if ref is not None:
        q = q.where(ci_evaluations.c.ref == ref)
    return list(await conn.execute(q))


async def fetch_active_evaluations(conn: AsyncConnection, project: str) -> list[Any]:
    return list(
        await conn.execute(
            select(ci_evaluations).where(
                ci_evaluations.c.project == project,
                ci_evaluations.c.state.not_in(FINAL_EVAL_STATES),
            )
        )
    )


async def fetch_evaluations_in(
    conn: AsyncConnection, states: Sequence[str], claimed_by: str | None = None
) -> list[Any]:
    q = select(ci_evaluations).where(ci_evaluations.c.state.in_(states))
    if claimed_by is not None:
        q = q.where(ci_evaluations.c.claimed_by == claimed_by)
    return list(await conn.execute(q.order_by(ci_evaluations.c.id)))


async def transition(
    conn: AsyncConnection, eval_id: int, from_states: Sequence[str], **values: Any
) -> bool:
    """Move an evaluation on only if it is in one of ``from_states`` (a claim, a supersede,
    an end): True when this call moved it. With several runners on one database exactly one
    of them wins."""
    done = await conn.execute(
        update(ci_evaluations)
        .where(ci_evaluations.c.id == eval_id, ci_evaluations.c.state.in_(from_states))
        .values(**values)
    )
    return bool(done.rowcount)


async def branches_of(conn: AsyncConnection, project: str) -> list[Any]:
    """Each ref of the project with its newest evaluation id and count."""
    rows = await conn.execute(
        select(
            ci_evaluations.c.ref,
            func.max(ci_evaluations.c.id).label("latest"),
            func.count().label("evaluations"),
        )
        .where(ci_evaluations.c.project == project)
        .group_by(ci_evaluations.c.ref)
        .order_by(ci_evaluations.c.ref)
    )
    return list(rows)


# ---- jobs -----------------------------------------------------------------------------------


async def insert_jobs(conn: AsyncConnection, eval_id: int, jobs: Sequence[dict[str, Any]]) -> None:
    if jobs:
        await conn.execute(insert(ci_jobs), [{"evaluation_id": eval_id, **j} for j in jobs])


async def delete_jobs(conn: AsyncConnection, eval_id: int) -> None:
    await conn.execute(delete(ci_jobs).where(ci_jobs.c.evaluation_id == eval_id))


async def fetch_jobs(conn: AsyncConnection, eval_id: int) -> list[Any]:
    return list(
        await conn.execute(
            select(ci_jobs).where(ci_jobs.c.evaluation_id == eval_id).order_by(ci_jobs.c.attr)
        )
    )


async def set_job_states(conn: AsyncConnection, eval_id: int, states: dict[str, str]) -> None:
    for attr, state in states.items():
        await conn.execute(
            update(ci_jobs)
            .where(ci_jobs.c.evaluation_id == eval_id, ci_jobs.c.attr == attr)
            .values(state=state)
        )


async def job_history(conn: AsyncConnection, project: str, ref: str, attr: str) -> list[Any]:
    """A job's state in the newest evaluations of a ref (newest first)."""
    return list(
        await conn.execute(
            select(ci_evaluations.c.id, ci_evaluations.c.commit_sha, ci_jobs.c.state)
            .join(ci_jobs, ci_jobs.c.evaluation_id == ci_evaluations.c.id)
            .where(
                ci_evaluations.c.project == project,
                ci_evaluations.c.ref == ref,
                ci_jobs.c.attr == attr,
            )
            .order_by(ci_evaluations.c.id.desc())
            .limit(50)
        )
    )


async def build_progress(conn: AsyncConnection, build_id: int) -> tuple[str | None, list[Any]]:
    """A build's state and, per root derivation, its step's id and state (None: no step)."""
    build = (await conn.execute(select(builds.c.state).where(builds.c.id == build_id))).first()
    if build is None:
        return None, []
    rows = await conn.execute(
        select(build_roots.c.drv_path, steps.c.id, steps.c.state)
        .select_from(build_roots.outerjoin(steps, and_(steps.c.id == build_roots.c.step_id)))
        .where(build_roots.c.build_id == build_id)
    )
    return str(build.state), list(rows)
