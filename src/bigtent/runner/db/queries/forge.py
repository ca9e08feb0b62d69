"""Reports to forges (runner/forge, docs/ci.md): the outbox."""

from __future__ import annotations

from typing import Any

from sqlalchemy import case, delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from bigtent.runner.db.queries.common import insert_ignore
from bigtent.runner.db.tables import forge_outbox


# ---- reports to forges (runner/forge, docs/ci.md) ------------------------------------------
async def fetch_forge_outbox(conn: AsyncConnection, evaluation_id: int) -> Any | None:
    query = select(forge_outbox).where(forge_outbox.c.evaluation_id == evaluation_id)
    return (await conn.execute(query)).first()


async def store_forge_wanted(
    conn: AsyncConnection,
    evaluation_id: int,
    *,
    project: str,
    kind: str,
    target: str,
    commit_sha: str,
    wanted: str,
    final: bool,
    now: float,
) -> None:
    """Record what the forge should show for an evaluation (a new row, or the next version of
    its row): pending again, due at once unless its sending is backing off after a failure. A
    new report also ends a give-up (the forge may work again)."""
    inserted = await conn.execute(
        insert_ignore(conn, forge_outbox).values(
            evaluation_id=evaluation_id,
            project=project,
            forge_kind=kind,
            forge_target=target,
            commit_sha=commit_sha,
            forge_wanted=wanted,
            wanted_seq=1,
            wanted_final=final,
            forge_sent="{}",
            sent_seq=0,
            pending=True,
            next_attempt_at=now,
            attempts=0,
            gave_up=False,
            created_at=now,
            updated_at=now,
        )
    )
    if inserted.rowcount == 1:
        return
    c = forge_outbox.c
    await conn.execute(
        update(forge_outbox)
        .where(c.evaluation_id == evaluation_id)
        .values(
            forge_target=target,
            forge_wanted=wanted,
            wanted_seq=c.wanted_seq + 1,
            wanted_final=final,
            pending=True,
            next_attempt_at=case((c.gave_up, now), (c.attempts == 0, now), else_=c.next_attempt_at),
            attempts=case((c.gave_up, 0), else_=c.attempts),
            first_failure_at=case((c.gave_up, None), else_=c.first_failure_at),
            gave_up=False,
            updated_at=now,
        )
    )


async def due_forge_outbox(
    conn: AsyncConnection, now: float, runner_id: str, limit: int
) -> list[Any]:
    """Pending rows due at ``now`` that no other runner holds, soonest first."""
    c = forge_outbox.c
    query = (
        select(forge_outbox)
        .where(
            c.pending,
            ~c.gave_up,
            c.next_attempt_at <= now,
            c.claimed_until.is_(None) | (c.claimed_until < now) | (c.claimed_by == runner_id),
        )
        .order_by(c.next_attempt_at, c.evaluation_id)
        .limit(limit)
    )
    return list(await conn.execute(query))


async def next_forge_attempt_at(conn: AsyncConnection) -> float | None:
    """When the next pending row is due (None: none is pending)."""
    c = forge_outbox.c
    query = select(func.min(c.next_attempt_at)).where(c.pending, ~c.gave_up)
    value = (await conn.execute(query)).scalar()
    return float(value) if value is not None else None


async def claim_forge_outbox(
    conn: AsyncConnection, evaluation_id: int, runner_id: str, until: float, now: float
) -> bool:
    """Hold a row for sending until ``until``; False when another runner holds it."""
    c = forge_outbox.c
    result = await conn.execute(
        update(forge_outbox)
        .where(
            c.evaluation_id == evaluation_id,
            c.claimed_until.is_(None) | (c.claimed_until < now) | (c.claimed_by == runner_id),
        )
        .values(claimed_by=runner_id, claimed_until=until)
    )
    return bool(result.rowcount == 1)


async def update_forge_outbox(conn: AsyncConnection, evaluation_id: int, **values: Any) -> None:
    await conn.execute(
        update(forge_outbox).where(forge_outbox.c.evaluation_id == evaluation_id).values(**values)
    )


async def settle_forge_outbox(conn: AsyncConnection, evaluation_id: int, seen_seq: int) -> bool:
    """The version ``seen_seq`` is sent: not pending any more, unless a newer one came."""
    c = forge_outbox.c
    result = await conn.execute(
        update(forge_outbox)
        .where(c.evaluation_id == evaluation_id, c.wanted_seq == seen_seq)
        .values(pending=False, sent_seq=seen_seq, claimed_by=None, claimed_until=None)
    )
    return bool(result.rowcount == 1)


async def prune_forge_outbox(conn: AsyncConnection, before: float) -> int:
    """Forget rows sent (or given up) and untouched since ``before``."""
    c = forge_outbox.c
    result = await conn.execute(
        delete(forge_outbox).where(~c.pending | c.gave_up, c.updated_at < before)
    )
    return int(result.rowcount or 0)


async def release_forge_claims(conn: AsyncConnection, runner_id: str) -> None:
    """A stopping runner lets go of the rows it holds."""
    c = forge_outbox.c
    await conn.execute(
        update(forge_outbox)
        .where(c.claimed_by == runner_id)
        .values(claimed_by=None, claimed_until=None)
    )
