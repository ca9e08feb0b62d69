"""Steps: their rows and dependencies, attempts (docs/api.md "Attempts") and leases."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Float,
    Integer,
    String,
    Text,
    bindparam,
    case,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.dml import Update

from bigtent.runner.db.notify import note_steps
from bigtent.runner.db.queries.common import CHUNK, chunks, for_update, insert_ignore
from bigtent.runner.db.tables import build_steps, derivations, step_attempts, step_deps, steps


async def insert_step(conn: AsyncConnection, **values: Any) -> int | None:
    """A new step; None when its derivation already has one (another runner inserted it
    meanwhile: one drv, one step)."""
    result = await conn.execute(insert_ignore(conn, steps).values(**values).returning(steps.c.id))
    step_id = result.scalar_one_or_none()
    if step_id is None:
        return None
    note_steps(conn, [int(step_id)])
    return int(step_id)


async def insert_steps(conn: AsyncConnection, rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Insert many steps at once (``drv_path`` and the same other columns in every row);
    returns each one's id by .drv path. A derivation that already has a step of that trust
    (another runner inserted it meanwhile) is left out of the answer."""
    if not rows:
        return {}
    result = await conn.execute(
        insert_ignore(conn, steps).returning(steps.c.id, steps.c.drv_path), rows
    )
    ids = {drv_path: int(sid) for sid, drv_path in result}
    note_steps(conn, ids.values())
    return ids


async def insert_step_deps(conn: AsyncConnection, pairs: Iterable[tuple[int, int]]) -> None:
    rows = [{"step_id": s, "dep_id": d} for s, d in set(pairs)]
    if rows:
        note_steps(conn, [r["step_id"] for r in rows])
        await conn.execute(insert_ignore(conn, step_deps), rows)


@functools.cache
def _update_by_id(columns: tuple[str, ...]) -> Update:
    """``UPDATE steps SET <columns> WHERE id = :b_id``, the values bound as ``b_<column>``:
    built once per set of columns (the hot path updates a step a few times per attempt)."""
    return (
        update(steps)
        .where(steps.c.id == bindparam("b_id"))
        .values({c: bindparam(f"b_{c}") for c in columns})
    )


def _bound(row: Mapping[str, Any]) -> dict[str, Any]:
    return {f"b_{k}": v for k, v in row.items()}


async def update_step(conn: AsyncConnection, step_id: int, **values: Any) -> None:
    note_steps(conn, [step_id])
    await conn.execute(_update_by_id(tuple(sorted(values))), {"b_id": step_id, **_bound(values)})


async def update_steps(conn: AsyncConnection, step_ids: Sequence[int], **values: Any) -> None:
    note_steps(conn, step_ids)
    for i in range(0, len(step_ids), CHUNK):
        chunk = step_ids[i : i + CHUNK]
        await conn.execute(update(steps).where(steps.c.id.in_(chunk)).values(**values))


async def update_steps_each(conn: AsyncConnection, rows: Sequence[Mapping[str, Any]]) -> None:
    """Update many steps, each with its own values, in one executemany. Every row has the
    step's ``id`` and the same other keys (the columns to set)."""
    if not rows:
        return
    note_steps(conn, [int(row["id"]) for row in rows])
    columns = tuple(sorted(k for k in rows[0] if k != "id"))
    await conn.execute(_update_by_id(columns), [_bound(row) for row in rows])


async def update_steps_in_state(
    conn: AsyncConnection, step_ids: Sequence[int], states: Sequence[str], **values: Any
) -> set[int]:
    """Update those of the steps that are still in one of ``states``; returns their ids
    (a step another runner moved on is left alone)."""
    changed: set[int] = set()
    stmt = _update_in_state(tuple(sorted(values)))
    bound = {"b_states": list(states), **_bound(values)}
    for i in range(0, len(step_ids), CHUNK):
        rows = await conn.execute(stmt, {"b_ids": list(step_ids[i : i + CHUNK]), **bound})
        changed.update(int(r[0]) for r in rows)
    note_steps(conn, changed)
    return changed


@functools.cache
def _update_in_state(columns: tuple[str, ...]) -> Any:
    """``update_steps_in_state``'s statement, built once per set of columns."""
    return (
        update(steps)
        .where(
            steps.c.id.in_(bindparam("b_ids", expanding=True)),
            steps.c.state.in_(bindparam("b_states", expanding=True)),
        )
        .values({c: bindparam(f"b_{c}") for c in columns})
        .returning(steps.c.id)
    )


# ---- attempts (docs/api.md "Attempts") -----------------------------------------------------
async def insert_step_attempt(
    conn: AsyncConnection,
    step_id: int,
    *,
    attempt: int,
    max_attempts: int,
    finished_at: float,
    outcome: str,
    error: str | None,
    retry_at: float | None,
    leased: bool,
) -> None:
    """Record one ended attempt of a step. A ``leased`` attempt's venue and start are the
    step row's (written with its lease when it was assigned), read by the same statement;
    an attempt that never got a lease has neither."""
    values = {
        "b_step_id": step_id,
        "b_attempt": attempt,
        "b_max_attempts": max_attempts,
        "b_finished_at": finished_at,
        "b_outcome": outcome,
        "b_error": error,
        "b_retry_at": retry_at,
    }
    await conn.execute(_INSERT_LEASED_ATTEMPT if leased else _INSERT_ATTEMPT, values)


_INSERT_ATTEMPT = insert(step_attempts).values(
    step_id=bindparam("b_step_id"),
    attempt=bindparam("b_attempt"),
    max_attempts=bindparam("b_max_attempts"),
    finished_at=bindparam("b_finished_at"),
    outcome=bindparam("b_outcome"),
    error=bindparam("b_error"),
    retry_at=bindparam("b_retry_at"),
)
_INSERT_LEASED_ATTEMPT = insert(step_attempts).from_select(
    [
        "step_id",
        "attempt",
        "max_attempts",
        "agent_machine_id",
        "agent_name",
        "started_at",
        "finished_at",
        "outcome",
        "error",
        "retry_at",
    ],
    select(
        steps.c.id,
        bindparam("b_attempt", type_=Integer),
        bindparam("b_max_attempts", type_=Integer),
        steps.c.agent_machine_id,
        steps.c.agent_name,
        steps.c.assigned_at,
        bindparam("b_finished_at", type_=Float),
        bindparam("b_outcome", type_=String),
        bindparam("b_error", type_=Text),
        bindparam("b_retry_at", type_=Float),
    ).where(steps.c.id == bindparam("b_step_id")),
)
"""The two forms of ``insert_step_attempt``, built once (they run once per attempt)."""


_ATTEMPT_COLUMNS = (step_attempts, steps.c.drv_path, derivations.c.name)


async def fetch_build_attempts(
    conn: AsyncConnection, build_id: int, *, after: int, since: float, limit: int
) -> list[Any]:
    """The attempts of the build's steps that ended at or after ``since`` (the build's
    creation) with an id above ``after``, oldest first, at most ``limit``."""
    rows = await conn.execute(
        select(*_ATTEMPT_COLUMNS)
        .join(steps, steps.c.id == step_attempts.c.step_id)
        .join(derivations, derivations.c.drv_path == steps.c.drv_path)
        .join(build_steps, build_steps.c.step_id == step_attempts.c.step_id)
        .where(
            build_steps.c.build_id == build_id,
            step_attempts.c.id > after,
            step_attempts.c.finished_at >= since,
        )
        .order_by(step_attempts.c.id)
        .limit(limit)
    )
    return list(rows)


async def fetch_step_attempts(conn: AsyncConnection, step_id: int, limit: int) -> list[Any]:
    """The step's newest ``limit`` attempts, oldest first."""
    rows = await conn.execute(
        select(*_ATTEMPT_COLUMNS)
        .join(steps, steps.c.id == step_attempts.c.step_id)
        .join(derivations, derivations.c.drv_path == steps.c.drv_path)
        .where(step_attempts.c.step_id == step_id)
        .order_by(step_attempts.c.id.desc())
        .limit(limit)
    )
    return list(reversed(list(rows)))


@dataclass(frozen=True, slots=True)
class LeaseRow:
    """A step's claim as the database has it."""

    id: int
    state: str
    lease_id: str | None
    lease_expires_at: float | None


async def lock_steps(
    conn: AsyncConnection, step_ids: Sequence[int], *, lock: bool = True
) -> dict[int, LeaseRow]:
    """The steps' state and lease, locked until the transaction ends (``lock``): what a
    transition checks before it relies on them."""
    out: dict[int, LeaseRow] = {}
    for i in range(0, len(step_ids), CHUNK):
        chunk = sorted(step_ids[i : i + CHUNK])
        query = select(steps.c.id, steps.c.state, steps.c.lease_id, steps.c.lease_expires_at).where(
            steps.c.id.in_(chunk)
        )
        rows = await conn.execute(for_update(conn, query) if lock else query)
        for row in rows:
            out[int(row.id)] = LeaseRow(int(row.id), row.state, row.lease_id, row.lease_expires_at)
    return out


async def claim_runnable_steps(conn: AsyncConnection, step_ids: Sequence[int]) -> set[int]:
    """Of these steps, the ones still runnable that no other transaction holds, locked for
    this one (``FOR UPDATE SKIP LOCKED``): the dispatcher assigns exactly those. A step
    another runner is assigning at this moment is skipped, not waited for."""
    if not step_ids:
        return set()
    query = (
        select(steps.c.id)
        .where(steps.c.id.in_(sorted(step_ids)), steps.c.state == "runnable")
        .order_by(steps.c.id)
    )
    rows = await conn.execute(for_update(conn, query, skip_locked=True))
    return {int(r[0]) for r in rows}


async def renew_leases(conn: AsyncConnection, leases: Sequence[tuple[int, str, float]]) -> None:
    """Store renewed lease expiries ``(step id, lease id, expires at)``, each only while the
    step still holds that lease. Other runners judge a lease by this (not announced: a
    renewal changes nothing they act on)."""
    for step_id, lease_id, expires_at in leases:
        await conn.execute(
            update(steps)
            .where(steps.c.id == step_id, steps.c.lease_id == lease_id)
            .values(lease_expires_at=expires_at)
        )


async def fetch_steps_by_drv(
    conn: AsyncConnection, drv_paths: Sequence[str], *, trusted: bool = True, lock: bool = False
) -> dict[str, Any]:
    """The step rows of these derivations, of one trust (each has at most one per trust);
    ``lock``: locked until the transaction ends."""
    out: dict[str, Any] = {}
    for chunk in chunks(sorted(drv_paths)):
        query = (
            select(steps)
            .where(steps.c.drv_path.in_(chunk), steps.c.trusted == trusted)
            .order_by(steps.c.id)
        )
        rows = await conn.execute(for_update(conn, query) if lock else query)
        for row in rows:
            out[row.drv_path] = row
    return out


async def fetch_steps_by_ids(conn: AsyncConnection, step_ids: Sequence[int]) -> list[Any]:
    out: list[Any] = []
    for i in range(0, len(step_ids), CHUNK):
        chunk = step_ids[i : i + CHUNK]
        rows = await conn.execute(
            select(*_STEP_COLUMNS)
            .join(derivations, derivations.c.drv_path == steps.c.drv_path)
            .where(steps.c.id.in_(chunk))
        )
        out.extend(rows)
    return out


_STEP_COLUMNS = (
    steps,
    derivations.c.name,
    derivations.c.system,
    derivations.c.required_features,
    derivations.c.outputs,
)


async def fetch_step(conn: AsyncConnection, step_id: int) -> Any | None:
    return (
        await conn.execute(
            select(*_STEP_COLUMNS)
            .join(derivations, derivations.c.drv_path == steps.c.drv_path)
            .where(steps.c.id == step_id)
        )
    ).first()


async def fetch_build_steps(conn: AsyncConnection, build_id: int) -> list[Any]:
    rows = await conn.execute(
        select(*_STEP_COLUMNS)
        .join(derivations, derivations.c.drv_path == steps.c.drv_path)
        .join(build_steps, build_steps.c.step_id == steps.c.id)
        .where(build_steps.c.build_id == build_id)
        .order_by(steps.c.id)
    )
    return list(rows)


async def fetch_active_steps(conn: AsyncConnection, states: Sequence[str]) -> list[Any]:
    rows = await conn.execute(
        select(*_STEP_COLUMNS)
        .join(derivations, derivations.c.drv_path == steps.c.drv_path)
        .where(steps.c.state.in_(states))
    )
    return list(rows)


async def fetch_step_edges(conn: AsyncConnection, step_ids: Sequence[int]) -> list[tuple[int, int]]:
    """Every (step, dependency) pair with either end among ``step_ids``."""
    out: set[tuple[int, int]] = set()
    for i in range(0, len(step_ids), CHUNK):
        chunk = step_ids[i : i + CHUNK]
        rows = await conn.execute(
            select(step_deps.c.step_id, step_deps.c.dep_id).where(
                step_deps.c.step_id.in_(chunk) | step_deps.c.dep_id.in_(chunk)
            )
        )
        out.update((int(a), int(b)) for a, b in rows)
    return sorted(out)


async def fetch_step_states(
    conn: AsyncConnection, step_ids: Sequence[int]
) -> dict[int, tuple[str, str]]:
    """Step id -> (state, drv path)."""
    out: dict[int, tuple[str, str]] = {}
    for i in range(0, len(step_ids), CHUNK):
        chunk = step_ids[i : i + CHUNK]
        rows = await conn.execute(
            select(steps.c.id, steps.c.state, steps.c.drv_path).where(steps.c.id.in_(chunk))
        )
        out.update((int(a), (str(b), str(c))) for a, b, c in rows)
    return out


async def fetch_step_deps(conn: AsyncConnection, step_ids: Sequence[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for i in range(0, len(step_ids), CHUNK):
        chunk = step_ids[i : i + CHUNK]
        rows = await conn.execute(
            select(step_deps.c.step_id, step_deps.c.dep_id).where(step_deps.c.step_id.in_(chunk))
        )
        out.extend((int(a), int(b)) for a, b in rows)
    return out


async def fetch_step_deps_built_on(
    conn: AsyncConnection, step_ids: Sequence[int]
) -> list[tuple[int, int, str | None, float | None]]:
    """(step, dependency, the machine id of the venue the dependency succeeded on, when it
    finished) of these steps; the machine id is None for a dependency that has not succeeded
    or succeeded on no venue. ``fetch_step_deps`` and where the inputs were built, in one
    statement a chunk."""
    out: list[tuple[int, int, str | None, float | None]] = []
    built_on = case((steps.c.state == "succeeded", steps.c.agent_machine_id), else_=None)
    for i in range(0, len(step_ids), CHUNK):
        chunk = step_ids[i : i + CHUNK]
        rows = await conn.execute(
            select(step_deps.c.step_id, step_deps.c.dep_id, built_on, steps.c.finished_at)
            .join(steps, steps.c.id == step_deps.c.dep_id)
            .where(step_deps.c.step_id.in_(chunk))
        )
        out.extend(
            (int(a), int(b), None if m is None else str(m), None if f is None else float(f))
            for a, b, m, f in rows
        )
    return out


async def count_steps_by_state(conn: AsyncConnection) -> dict[str, int]:
    rows = await conn.execute(select(steps.c.state, func.count()).group_by(steps.c.state))
    return {state: int(n) for state, n in rows}
