"""Cached failures, per build (migration 0013)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement, exists, func, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from bigtent.runner.db.tables import (
    build_steps,
    builds,
    cached_failure_hits,
    derivations,
    step_attempts,
    steps,
)


# ---- cached failures, per build (migration 0013) -------------------------------------------
async def insert_cached_failure_hit(
    conn: AsyncConnection,
    build_id: int,
    step_id: int,
    *,
    hit_at: float,
    failed_at: float,
    failed_outcome: str,
    cached_until: float,
) -> None:
    """Record that ``build_id`` failed ``step_id`` from the failure cache, pointing at the
    step's newest attempt that ended as the cached failure did (the attempt that really
    ran), in the caller's transaction. The step's own row is left as that attempt wrote it."""
    attempt = (
        select(func.max(step_attempts.c.id))
        .where(
            step_attempts.c.step_id == step_id,
            step_attempts.c.outcome == failed_outcome,
            step_attempts.c.retry_at.is_(None),
        )
        .scalar_subquery()
    )
    await conn.execute(
        insert(cached_failure_hits).values(
            build_id=build_id,
            step_id=step_id,
            attempt_id=attempt,
            hit_at=hit_at,
            failed_at=failed_at,
            failed_outcome=failed_outcome,
            cached_until=cached_until,
        )
    )


async def fetch_build_cached_failure_hits(conn: AsyncConnection, build_id: int) -> list[Any]:
    """The build's cached-failure hits, oldest first, each with the attempt that really ran
    (``attempt``, ``max_attempts``, ``agent_name``, ``started_at``, ``finished_at``,
    ``error``: NULL when it has no record) and ``ran_in_build``: the newest other build of
    the step created by the time that attempt started that did not hit the cache itself
    (the build that queued the run; NULL when none is known)."""
    other_hit = (
        select(cached_failure_hits.c.id)
        .where(
            cached_failure_hits.c.step_id == build_steps.c.step_id,
            cached_failure_hits.c.build_id == build_steps.c.build_id,
        )
        .correlate(build_steps)
    )
    started = func.coalesce(step_attempts.c.started_at, step_attempts.c.finished_at)

    def ran_in(pick: Any, *since: ColumnElement[bool]) -> Any:
        return (
            select(pick(build_steps.c.build_id))
            .join(builds, builds.c.id == build_steps.c.build_id)
            .where(
                build_steps.c.step_id == cached_failure_hits.c.step_id,
                build_steps.c.build_id != cached_failure_hits.c.build_id,
                builds.c.created_at <= started,
                ~exists(other_hit),
                *since,
            )
            .correlate(cached_failure_hits, step_attempts, steps)
            .scalar_subquery()
        )

    # The build that queued the run: the first created since the step was last queued
    # (``steps.created_at``); after a restart (an older build queued it again), the newest
    # one created before the attempt started.
    queued_by = func.coalesce(
        ran_in(func.min, builds.c.created_at >= steps.c.created_at), ran_in(func.max)
    )
    rows = await conn.execute(
        select(
            cached_failure_hits,
            steps.c.drv_path,
            derivations.c.name,
            step_attempts.c.attempt,
            step_attempts.c.max_attempts,
            step_attempts.c.agent_name,
            step_attempts.c.started_at,
            step_attempts.c.finished_at,
            step_attempts.c.error,
            queued_by.label("ran_in_build"),
        )
        .join(steps, steps.c.id == cached_failure_hits.c.step_id)
        .join(derivations, derivations.c.drv_path == steps.c.drv_path)
        .outerjoin(step_attempts, step_attempts.c.id == cached_failure_hits.c.attempt_id)
        .where(cached_failure_hits.c.build_id == build_id)
        .order_by(cached_failure_hits.c.id)
    )
    return list(rows)


async def fetch_cached_failure_builds(
    conn: AsyncConnection, step_id: int, build_ids: Sequence[int]
) -> set[int]:
    """Which of ``build_ids`` failed ``step_id`` from the failure cache (did not run it)."""
    if not build_ids:
        return set()
    rows = await conn.execute(
        select(cached_failure_hits.c.build_id).where(
            cached_failure_hits.c.step_id == step_id,
            cached_failure_hits.c.build_id.in_(list(build_ids)),
        )
    )
    return {int(r[0]) for r in rows}
