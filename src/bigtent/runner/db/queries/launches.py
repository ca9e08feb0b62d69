"""Autoscaler launches (docs/autoscaling.md)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from bigtent.runner.db.queries.common import chunks
from bigtent.runner.db.tables import launches

# ---- autoscaler launches (docs/autoscaling.md) ----------------------------------------------


async def insert_launch(
    conn: AsyncConnection, launch_id: str, pool: str, state: str, created_at: float
) -> None:
    await conn.execute(
        insert(launches).values(
            launch_id=launch_id,
            pool=pool,
            state=state,
            created_at=created_at,
            updated_at=created_at,
        )
    )


async def update_launch(
    conn: AsyncConnection, launch_id: str, *, unless_state: str | None = None, **values: Any
) -> bool:
    """Update a launch (not when it is in ``unless_state``); False when nothing changed."""
    query = update(launches).where(launches.c.launch_id == launch_id)
    if unless_state is not None:
        query = query.where(launches.c.state != unless_state)
    result = await conn.execute(query.values(**values))
    return bool(result.rowcount)


async def fetch_launch(conn: AsyncConnection, launch_id: str) -> Any | None:
    return (await conn.execute(select(launches).where(launches.c.launch_id == launch_id))).first()


async def fetch_launches_by_ids(conn: AsyncConnection, launch_ids: Sequence[str]) -> list[Any]:
    out: list[Any] = []
    for chunk in chunks(sorted(set(launch_ids))):
        out.extend(await conn.execute(select(launches).where(launches.c.launch_id.in_(chunk))))
    return out


async def fetch_launches(
    conn: AsyncConnection,
    *,
    states: Sequence[str] | None = None,
    limit: int | None = None,
    pool: str | None = None,
) -> list[Any]:
    """Launches, newest first."""
    query = select(launches).order_by(launches.c.created_at.desc(), launches.c.launch_id)
    if states is not None:
        query = query.where(launches.c.state.in_(list(states)))
    if pool is not None:
        query = query.where(launches.c.pool == pool)
    if limit is not None:
        query = query.limit(limit)
    return list(await conn.execute(query))


async def fetch_launch_retry_at(conn: AsyncConnection) -> dict[str, float]:
    """Per pool, the latest time a failed dispatch said not to dispatch before."""
    rows = await conn.execute(
        select(launches.c.pool, func.max(launches.c.retry_at))
        .where(launches.c.retry_at.is_not(None))
        .group_by(launches.c.pool)
    )
    return {str(pool): float(at) for pool, at in rows}
