"""Every SQL statement of the runner: small typed async functions on an AsyncConnection."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Table, bindparam, delete, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from bigtent.nix.narinfo import NarInfo
from bigtent.runner.db.tables import (
    agents,
    build_roots,
    build_steps,
    builds,
    derivations,
    step_deps,
    steps,
    store_paths,
    tokens,
)

STORE = "/nix/store/"
_CHUNK = 500
"""Rows per IN (...) query: well below SQLite's bound-parameter limit."""


def _chunks(items: Sequence[str]) -> Iterable[Sequence[str]]:
    for i in range(0, len(items), _CHUNK):
        yield items[i : i + _CHUNK]


def _insert_ignore(conn: AsyncConnection, table: Table) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING for the connection's dialect."""
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    return sqlite.insert(table).on_conflict_do_nothing()


# ---- store paths (the cache index) ---------------------------------------------------------
async def present_store_paths(conn: AsyncConnection, paths: Sequence[str]) -> set[str]:
    found: set[str] = set()
    for chunk in _chunks(list(paths)):
        rows = await conn.execute(select(store_paths.c.path).where(store_paths.c.path.in_(chunk)))
        found.update(r[0] for r in rows)
    return found


async def store_path_references(
    conn: AsyncConnection, paths: Sequence[str]
) -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for chunk in _chunks(list(paths)):
        rows = await conn.execute(
            select(store_paths.c.path, store_paths.c.references).where(
                store_paths.c.path.in_(chunk)
            )
        )
        for path, refs in rows:
            out[path] = tuple(STORE + r for r in json.loads(refs))
    return out


def _narinfo(row: Any) -> NarInfo:
    return NarInfo(
        store_path=row.path,
        url=row.url,
        compression=row.compression,
        file_hash=row.file_hash,
        file_size=row.file_size,
        nar_hash=row.nar_hash,
        nar_size=row.nar_size,
        references=tuple(json.loads(row.references)),
        deriver=row.deriver,
        sigs=tuple(s for s in row.sig.split("\n") if s),
        ca=row.ca,
    )


async def fetch_store_path_by_hash(conn: AsyncConnection, hash_part: str) -> NarInfo | None:
    row = (
        await conn.execute(select(store_paths).where(store_paths.c.hash_part == hash_part))
    ).first()
    return _narinfo(row) if row is not None else None


async def insert_store_path(conn: AsyncConnection, info: NarInfo, *, created_at: float) -> bool:
    """Record a narinfo; False when the path was already recorded (the first record wins)."""
    hash_part = info.store_path[len(STORE) :].split("-", 1)[0]
    result = await conn.execute(
        _insert_ignore(conn, store_paths).values(
            path=info.store_path,
            hash_part=hash_part,
            nar_hash=info.nar_hash,
            nar_size=info.nar_size,
            url=info.url,
            compression=info.compression,
            file_hash=info.file_hash or "",
            file_size=info.file_size or 0,
            references=json.dumps(sorted(info.references)),
            deriver=info.deriver,
            ca=info.ca,
            sig="\n".join(info.sigs),
            created_at=created_at,
        )
    )
    return bool(result.rowcount)


async def cache_totals(conn: AsyncConnection) -> tuple[int, int]:
    """(number of paths, total compressed bytes)."""
    row = (
        await conn.execute(
            select(func.count(), func.coalesce(func.sum(store_paths.c.file_size), 0))
        )
    ).one()
    return int(row[0]), int(row[1])


# ---- derivations ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class DrvInfo:
    """What the scheduler needs of a parsed .drv."""

    drv_path: str
    name: str
    system: str
    required_features: frozenset[str]
    outputs: Mapping[str, str]
    input_drvs: Mapping[str, tuple[str, ...]]
    input_srcs: tuple[str, ...]
    hash_modulo: str | None = None
    """Hex of Nix's hashDerivationModulo of the .drv; None for rows recorded before it was."""


async def insert_derivation(conn: AsyncConnection, drv: DrvInfo) -> None:
    await conn.execute(
        _insert_ignore(conn, derivations).values(
            drv_path=drv.drv_path,
            name=drv.name,
            system=drv.system,
            required_features=json.dumps(sorted(drv.required_features)),
            outputs=json.dumps(dict(drv.outputs)),
            input_drvs=json.dumps({k: list(v) for k, v in drv.input_drvs.items()}),
            input_srcs=json.dumps(list(drv.input_srcs)),
            hash_modulo=drv.hash_modulo,
        )
    )


async def set_derivation_hash_modulo(
    conn: AsyncConnection, drv_path: str, hash_modulo: str
) -> None:
    """Fill in the hash modulo of a derivation recorded before it was stored."""
    await conn.execute(
        update(derivations)
        .where(derivations.c.drv_path == drv_path, derivations.c.hash_modulo.is_(None))
        .values(hash_modulo=hash_modulo)
    )


def _drv(row: Any) -> DrvInfo:
    # One decode for the four JSON columns (each is valid JSON text): planning a large build
    # decodes a row per derivation.
    features, outputs, input_drvs, input_srcs = json.loads(
        f"[{row.required_features},{row.outputs},{row.input_drvs},{row.input_srcs}]"
    )
    return DrvInfo(
        drv_path=row.drv_path,
        name=row.name,
        system=row.system,
        required_features=frozenset(features),
        outputs=outputs,
        input_drvs={k: tuple(v) for k, v in input_drvs.items()},
        input_srcs=tuple(input_srcs),
        hash_modulo=row.hash_modulo,
    )


async def fetch_derivations(conn: AsyncConnection, paths: Sequence[str]) -> dict[str, DrvInfo]:
    out: dict[str, DrvInfo] = {}
    for chunk in _chunks(list(paths)):
        rows = await conn.execute(select(derivations).where(derivations.c.drv_path.in_(chunk)))
        for row in rows:
            out[row.drv_path] = _drv(row)
    return out


# ---- builds and steps ----------------------------------------------------------------------
async def insert_build(conn: AsyncConnection, **values: Any) -> int:
    result = await conn.execute(insert(builds).values(**values).returning(builds.c.id))
    return int(result.scalar_one())


async def insert_build_roots(
    conn: AsyncConnection, build_id: int, roots: Mapping[str, int | None]
) -> None:
    if roots:
        await conn.execute(
            insert(build_roots),
            [{"build_id": build_id, "drv_path": d, "step_id": s} for d, s in roots.items()],
        )


async def insert_build_steps(conn: AsyncConnection, build_id: int, step_ids: Iterable[int]) -> None:
    rows = [{"build_id": build_id, "step_id": s} for s in set(step_ids)]
    if rows:
        await conn.execute(insert(build_steps), rows)


async def update_build(conn: AsyncConnection, build_id: int, **values: Any) -> None:
    await conn.execute(update(builds).where(builds.c.id == build_id).values(**values))


async def delete_build(conn: AsyncConnection, build_id: int) -> None:
    """Delete a build with its roots and memberships (its steps stay)."""
    await conn.execute(delete(build_roots).where(build_roots.c.build_id == build_id))
    await conn.execute(delete(build_steps).where(build_steps.c.build_id == build_id))
    await conn.execute(delete(builds).where(builds.c.id == build_id))


async def fetch_build(conn: AsyncConnection, build_id: int) -> Any | None:
    return (await conn.execute(select(builds).where(builds.c.id == build_id))).first()


async def fetch_builds(conn: AsyncConnection, limit: int) -> list[Any]:
    rows = await conn.execute(select(builds).order_by(builds.c.id.desc()).limit(limit))
    return list(rows)


async def fetch_active_builds(conn: AsyncConnection) -> list[Any]:
    rows = await conn.execute(select(builds).where(builds.c.state.in_(["queued", "running"])))
    return list(rows)


async def fetch_build_roots(conn: AsyncConnection, build_id: int) -> list[Any]:
    rows = await conn.execute(
        select(build_roots, derivations.c.outputs)
        .join(derivations, derivations.c.drv_path == build_roots.c.drv_path)
        .where(build_roots.c.build_id == build_id)
        .order_by(build_roots.c.drv_path)
    )
    return list(rows)


async def fetch_all_build_roots(conn: AsyncConnection, build_ids: Sequence[int]) -> list[Any]:
    if not build_ids:
        return []
    rows = await conn.execute(select(build_roots).where(build_roots.c.build_id.in_(build_ids)))
    return list(rows)


async def fetch_build_step_ids(conn: AsyncConnection, build_ids: Sequence[int]) -> list[Any]:
    if not build_ids:
        return []
    rows = await conn.execute(
        select(build_steps.c.build_id, build_steps.c.step_id).where(
            build_steps.c.build_id.in_(build_ids)
        )
    )
    return list(rows)


async def insert_step(conn: AsyncConnection, **values: Any) -> int:
    result = await conn.execute(insert(steps).values(**values).returning(steps.c.id))
    return int(result.scalar_one())


async def insert_steps(conn: AsyncConnection, rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Insert many steps at once (``drv_path`` and the same other columns in every row);
    returns each one's id by .drv path."""
    if not rows:
        return {}
    result = await conn.execute(insert(steps).returning(steps.c.id, steps.c.drv_path), rows)
    return {drv_path: int(sid) for sid, drv_path in result}


async def insert_step_deps(conn: AsyncConnection, pairs: Iterable[tuple[int, int]]) -> None:
    rows = [{"step_id": s, "dep_id": d} for s, d in set(pairs)]
    if rows:
        await conn.execute(_insert_ignore(conn, step_deps), rows)


async def update_step(conn: AsyncConnection, step_id: int, **values: Any) -> None:
    await conn.execute(update(steps).where(steps.c.id == step_id).values(**values))


async def update_steps(conn: AsyncConnection, step_ids: Sequence[int], **values: Any) -> None:
    for i in range(0, len(step_ids), _CHUNK):
        chunk = step_ids[i : i + _CHUNK]
        await conn.execute(update(steps).where(steps.c.id.in_(chunk)).values(**values))


async def update_steps_each(conn: AsyncConnection, rows: Sequence[Mapping[str, Any]]) -> None:
    """Update many steps, each with its own values, in one executemany. Every row has the
    step's ``id`` and the same other keys (the columns to set)."""
    if not rows:
        return
    columns = [k for k in rows[0] if k != "id"]
    stmt = (
        update(steps)
        .where(steps.c.id == bindparam("b_id"))
        .values({c: bindparam(f"b_{c}") for c in columns})
    )
    await conn.execute(stmt, [{f"b_{k}": v for k, v in row.items()} for row in rows])


async def fetch_steps_by_drv(conn: AsyncConnection, drv_paths: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for chunk in _chunks(list(drv_paths)):
        rows = await conn.execute(select(steps).where(steps.c.drv_path.in_(chunk)))
        for row in rows:
            out[row.drv_path] = row
    return out


async def fetch_steps_by_ids(conn: AsyncConnection, step_ids: Sequence[int]) -> list[Any]:
    out: list[Any] = []
    for i in range(0, len(step_ids), _CHUNK):
        chunk = step_ids[i : i + _CHUNK]
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


async def fetch_step_deps(conn: AsyncConnection, step_ids: Sequence[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for i in range(0, len(step_ids), _CHUNK):
        chunk = step_ids[i : i + _CHUNK]
        rows = await conn.execute(
            select(step_deps.c.step_id, step_deps.c.dep_id).where(step_deps.c.step_id.in_(chunk))
        )
        out.extend((int(a), int(b)) for a, b in rows)
    return out


async def count_steps_by_state(conn: AsyncConnection) -> dict[str, int]:
    rows = await conn.execute(select(steps.c.state, func.count()).group_by(steps.c.state))
    return {state: int(n) for state, n in rows}


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
) -> None:
    """Count one finished attempt on an agent and store its backoff (no row: nothing)."""
    await conn.execute(
        update(agents)
        .where(agents.c.machine_id == machine_id)
        .values(
            steps_succeeded=agents.c.steps_succeeded + succeeded,
            steps_failed=agents.c.steps_failed + failed,
            infra_failures=agents.c.infra_failures + infra,
            consecutive_failures=consecutive_failures,
            backoff_until=backoff_until,
        )
    )


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
    for chunk in _chunks(list(machine_ids)):
        await conn.execute(
            delete(agents).where(
                agents.c.machine_id.in_(chunk),
                agents.c.ephemeral.is_(True),
                agents.c.last_seen < last_seen_before,
            )
        )


# ---- tokens (created through the API; docs/security.md) -------------------------------------
@dataclass(frozen=True, slots=True)
class StoredToken:
    """A token row: never the secret, only its digest."""

    name: str
    role: str
    sha256: str
    trusted: bool
    created_by: str
    created_at: float
    revoked_at: float | None


def _token(row: Any) -> StoredToken:
    return StoredToken(
        name=row.name,
        role=row.role,
        sha256=row.sha256,
        trusted=bool(row.trusted),
        created_by=row.created_by,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
    )


async def insert_token(conn: AsyncConnection, token: StoredToken) -> bool:
    """Insert a token; False when its name (or digest) is taken, revoked or not."""
    values = {
        "name": token.name,
        "role": token.role,
        "sha256": token.sha256,
        "trusted": token.trusted,
        "created_by": token.created_by,
        "created_at": token.created_at,
        "revoked_at": token.revoked_at,
    }
    result = await conn.execute(_insert_ignore(conn, tokens).values(**values))
    return bool(result.rowcount)


async def fetch_tokens(conn: AsyncConnection, *, active_only: bool = False) -> list[StoredToken]:
    query = select(tokens).order_by(tokens.c.name)
    if active_only:
        query = query.where(tokens.c.revoked_at.is_(None))
    return [_token(r) for r in await conn.execute(query)]


async def fetch_token(conn: AsyncConnection, name: str) -> StoredToken | None:
    row = (await conn.execute(select(tokens).where(tokens.c.name == name))).first()
    return _token(row) if row is not None else None


async def revoke_token(conn: AsyncConnection, name: str, *, revoked_at: float) -> None:
    """Mark the token revoked (a no-op when it already is: the first time is kept)."""
    await conn.execute(
        update(tokens)
        .where(tokens.c.name == name, tokens.c.revoked_at.is_(None))
        .values(revoked_at=revoked_at)
    )
