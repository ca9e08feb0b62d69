"""Agents: their sessions' rows, health counters and pruning."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Integer, bindparam, delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from bigtent.runner.db.queries.common import chunks
from bigtent.runner.db.tables import agents


# ---- agents --------------------------------------------------------------------------------
async def upsert_agent(conn: AsyncConnection, machine_id: str, **values: Any) -> Any:
    """Record an agent session (insert or update); returns the row as it now stands, so the
    caller sees the backoff a previous session left behind."""
    existing = (
        await conn.execute(select(agents.c.machine_id).where(agents.c.machine_id == machine_id))
    ).first()
    if existing is None:
        await conn.execute(
            insert(agents).values(machine_id=machine_id, first_seen=values["last_seen"], **values)
        )
    else:
        await conn.execute(update(agents).where(agents.c.machine_id == machine_id).values(**values))
    return (await conn.execute(select(agents).where(agents.c.machine_id == machine_id))).one()


async def fetch_agent(conn: AsyncConnection, machine_id: str) -> Any | None:
    return (await conn.execute(select(agents).where(agents.c.machine_id == machine_id))).first()


async def update_agent(conn: AsyncConnection, machine_id: str, **values: Any) -> bool:
    """Update an agent row; False when there is none (it was pruned)."""
    result = await conn.execute(
        update(agents).where(agents.c.machine_id == machine_id).values(**values)
    )
    return bool(result.rowcount)


async def record_agent_attempt(
    conn: AsyncConnection,
    machine_id: str,
    *,
    succeeded: int = 0,
    failed: int = 0,
    infra: int = 0,
    consecutive_failures: int,
    backoff_until: float | None,
    last_error: str | None = None,
) -> None:
    """Count one finished attempt on an agent and store its backoff and last infrastructure
    error (no row: nothing)."""
    await conn.execute(
        _RECORD_ATTEMPT,
        {
            "b_machine_id": machine_id,
            "b_succeeded": succeeded,
            "b_failed": failed,
            "b_infra": infra,
            "b_consecutive_failures": consecutive_failures,
            "b_backoff_until": backoff_until,
            "b_last_error": last_error,
        },
    )


_RECORD_ATTEMPT = (
    update(agents)
    .where(agents.c.machine_id == bindparam("b_machine_id"))
    .values(
        steps_succeeded=agents.c.steps_succeeded + bindparam("b_succeeded", type_=Integer),
        steps_failed=agents.c.steps_failed + bindparam("b_failed", type_=Integer),
        infra_failures=agents.c.infra_failures + bindparam("b_infra", type_=Integer),
        consecutive_failures=bindparam("b_consecutive_failures"),
        backoff_until=bindparam("b_backoff_until"),
        health_last_error=bindparam("b_last_error"),
    )
)
"""``record_agent_attempt``'s statement, built once (it runs once per attempt)."""


async def mark_all_agents_disconnected(conn: AsyncConnection) -> None:
    await conn.execute(update(agents).values(connected=False))


async def fetch_agents(conn: AsyncConnection) -> list[Any]:
    rows = await conn.execute(select(agents).order_by(agents.c.name))
    return list(rows)


async def delete_agent(conn: AsyncConnection, machine_id: str) -> None:
    await conn.execute(delete(agents).where(agents.c.machine_id == machine_id))


async def delete_stale_agents(
    conn: AsyncConnection, machine_ids: Sequence[str], *, last_seen_before: float
) -> None:
    """Delete these ephemeral rows if they are still unseen since ``last_seen_before``."""
    for chunk in chunks(list(machine_ids)):
        await conn.execute(
            delete(agents).where(
                agents.c.machine_id.in_(chunk),
                agents.c.ephemeral.is_(True),
                agents.c.last_seen < last_seen_before,
            )
        )
