"""Every SQL statement of the runner: small typed async functions on an AsyncConnection.

Writes to steps, builds and tokens note the ids they change on the connection
(``notify.note_*``); the scheduler announces them to other runners when its transaction
commits (PostgreSQL; docs/architecture.md, "Several runners").
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Float,
    Integer,
    Select,
    String,
    Table,
    Text,
    bindparam,
    case,
    delete,
    exists,
    func,
    insert,
    literal,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from bigtent.nix.narinfo import NarInfo
from bigtent.runner.db.notify import note_builds, note_steps, note_tokens
from bigtent.runner.db.tables import (
    agents,
    build_events,
    build_roots,
    build_steps,
    builds,
    cache_gc_doomed,
    cache_gc_runs,
    cache_pins,
    cached_failure_hits,
    derivations,
    forge_outbox,
    launches,
    step_attempts,
    step_deps,
    steps,
    store_paths,
    tokens,
    untrusted_store_paths,
)

STORE = "/nix/store/"
_CHUNK = 500
"""Rows per IN (...) query: well below SQLite's bound-parameter limit."""


def _chunks(items: Sequence[str]) -> Iterable[Sequence[str]]:
    for i in range(0, len(items), _CHUNK):
        yield items[i : i + _CHUNK]


def _for_update(conn: AsyncConnection, query: Select[Any], *, skip_locked: bool = False) -> Any:
    """``SELECT ... FOR UPDATE [SKIP LOCKED]`` on PostgreSQL: the rows stay locked until the
    transaction ends, so another runner's conflicting write waits (or, with ``skip_locked``,
    is passed over). SQLite has one writer at a time and no row locks: the query as is."""
    if conn.dialect.name == "postgresql":
        return query.with_for_update(skip_locked=skip_locked)
    return query


def _insert_ignore(conn: AsyncConnection, table: Table) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING for the connection's dialect."""
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    return sqlite.insert(table).on_conflict_do_nothing()


# ---- store paths (the cache index) ---------------------------------------------------------
# ``table`` is ``store_paths`` (the main cache) or ``untrusted_store_paths`` (the untrusted
# cache, docs/security.md); a query only ever sees one of them.
CACHE_TABLES = (store_paths, untrusted_store_paths)


async def present_store_paths(
    conn: AsyncConnection, paths: Sequence[str], table: Table = store_paths
) -> set[str]:
    found: set[str] = set()
    for chunk in _chunks(list(paths)):
        rows = await conn.execute(select(table.c.path).where(table.c.path.in_(chunk)))
        found.update(r[0] for r in rows)
    return found


async def store_path_files(
    conn: AsyncConnection, paths: Sequence[str], table: Table = store_paths
) -> dict[str, str]:
    """The NAR file name (narinfo ``URL``) of each recorded path among ``paths``."""
    out: dict[str, str] = {}
    for chunk in _chunks(list(paths)):
        rows = await conn.execute(select(table.c.path, table.c.url).where(table.c.path.in_(chunk)))
        out.update((path, url) for path, url in rows)
    return out


async def store_path_references(
    conn: AsyncConnection, paths: Sequence[str], table: Table = store_paths
) -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for chunk in _chunks(list(paths)):
        rows = await conn.execute(
            select(table.c.path, table.c.references).where(table.c.path.in_(chunk))
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


async def fetch_store_path_by_hash(
    conn: AsyncConnection, hash_part: str, table: Table = store_paths
) -> NarInfo | None:
    row = (await conn.execute(select(table).where(table.c.hash_part == hash_part))).first()
    return _narinfo(row) if row is not None else None


async def insert_store_path(
    conn: AsyncConnection, info: NarInfo, *, created_at: float, table: Table = store_paths
) -> bool:
    """Record a narinfo; False when the path was already recorded (the first record wins)."""
    hash_part = info.store_path[len(STORE) :].split("-", 1)[0]
    result = await conn.execute(
        _insert_ignore(conn, table).values(
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


def _store_path_row(info: NarInfo, created_at: float) -> dict[str, Any]:
    return {
        "path": info.store_path,
        "hash_part": info.store_path[len(STORE) :].split("-", 1)[0],
        "nar_hash": info.nar_hash,
        "nar_size": info.nar_size,
        "url": info.url,
        "compression": info.compression,
        "file_hash": info.file_hash or "",
        "file_size": info.file_size or 0,
        "references": json.dumps(sorted(info.references)),
        "deriver": info.deriver,
        "ca": info.ca,
        "sig": "\n".join(info.sigs),
        "created_at": created_at,
    }


async def insert_store_paths(
    conn: AsyncConnection,
    infos: Sequence[NarInfo],
    *,
    created_at: float,
    table: Table = store_paths,
) -> dict[str, NarInfo]:
    """Record many narinfos in one statement (a path already recorded keeps its first
    record); returns what the table now holds for each of them, to be remembered after the
    commit."""
    if not infos:
        return {}
    await conn.execute(_insert_ignore(conn, table), [_store_path_row(i, created_at) for i in infos])
    out: dict[str, NarInfo] = {}
    for chunk in _chunks([i.store_path for i in infos]):
        rows = await conn.execute(select(table).where(table.c.path.in_(chunk)))
        out.update((row.path, _narinfo(row)) for row in rows)
    return out


async def forget_store_path(
    conn: AsyncConnection, hash_part: str, table: Table = store_paths
) -> bool:
    """Delete a path's narinfo (its NAR is missing or bad); False when it was not recorded."""
    result = await conn.execute(delete(table).where(table.c.hash_part == hash_part))
    return bool(result.rowcount)


async def all_store_paths(
    conn: AsyncConnection, table: Table = store_paths, *, after: str = "", limit: int = 1000
) -> list[NarInfo]:
    """Recorded narinfos in hash-part order, ``limit`` at a time after ``after``."""
    rows = await conn.execute(
        select(table).where(table.c.hash_part > after).order_by(table.c.hash_part).limit(limit)
    )
    return [_narinfo(r) for r in rows]


async def cache_totals(conn: AsyncConnection, table: Table = store_paths) -> tuple[int, int]:
    """(number of paths, total compressed bytes)."""
    row = (
        await conn.execute(select(func.count(), func.coalesce(func.sum(table.c.file_size), 0)))
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


def _derivation_row(drv: DrvInfo) -> dict[str, Any]:
    return {
        "drv_path": drv.drv_path,
        "name": drv.name,
        "system": drv.system,
        "required_features": json.dumps(sorted(drv.required_features)),
        "outputs": json.dumps(dict(drv.outputs)),
        "input_drvs": json.dumps({k: list(v) for k, v in drv.input_drvs.items()}),
        "input_srcs": json.dumps(list(drv.input_srcs)),
        "hash_modulo": drv.hash_modulo,
    }


async def insert_derivation(conn: AsyncConnection, drv: DrvInfo) -> None:
    await conn.execute(_insert_ignore(conn, derivations).values(**_derivation_row(drv)))


async def insert_derivations(conn: AsyncConnection, drvs: Sequence[DrvInfo]) -> None:
    """Record many parsed derivations in one statement (recorded ones stay as they are)."""
    if drvs:
        await conn.execute(_insert_ignore(conn, derivations), [_derivation_row(d) for d in drvs])


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
    build_id = int(result.scalar_one())
    note_builds(conn, [build_id])
    return build_id


async def insert_build_roots(
    conn: AsyncConnection, build_id: int, roots: Mapping[str, int | None]
) -> None:
    if roots:
        note_builds(conn, [build_id])
        await conn.execute(
            insert(build_roots),
            [{"build_id": build_id, "drv_path": d, "step_id": s} for d, s in roots.items()],
        )


async def insert_build_steps(conn: AsyncConnection, build_id: int, step_ids: Iterable[int]) -> None:
    rows = [{"build_id": build_id, "step_id": s} for s in set(step_ids)]
    if rows:
        note_builds(conn, [build_id])
        await conn.execute(insert(build_steps), rows)


async def update_build(conn: AsyncConnection, build_id: int, **values: Any) -> None:
    note_builds(conn, [build_id])
    await conn.execute(update(builds).where(builds.c.id == build_id).values(**values))


async def delete_build(conn: AsyncConnection, build_id: int) -> None:
    """Delete a build with its roots, memberships, events and cache hits (its steps stay)."""
    note_builds(conn, [build_id])
    await conn.execute(delete(build_events).where(build_events.c.build_id == build_id))
    await conn.execute(
        delete(cached_failure_hits).where(cached_failure_hits.c.build_id == build_id)
    )
    await conn.execute(delete(build_roots).where(build_roots.c.build_id == build_id))
    await conn.execute(delete(build_steps).where(build_steps.c.build_id == build_id))
    await conn.execute(delete(builds).where(builds.c.id == build_id))


async def start_builds(conn: AsyncConnection, build_ids: Sequence[int]) -> None:
    """Queued builds become running (a build another runner already finished stays so)."""
    if build_ids:
        note_builds(conn, build_ids)
        await conn.execute(
            update(builds)
            .where(builds.c.id.in_(sorted(build_ids)), builds.c.state == "queued")
            .values(state="running")
        )


async def finish_build(
    conn: AsyncConnection, build_id: int, state: str, *, finished_at: float
) -> bool:
    """Record a build's end unless it already ended (another runner may have got there
    first); True when this call recorded it."""
    note_builds(conn, [build_id])
    result = await conn.execute(
        update(builds)
        .where(
            builds.c.id == build_id,
            builds.c.state.not_in(["succeeded", "failed", "cancelled"]),
        )
        .values(state=state, finished_at=finished_at)
    )
    return bool(result.rowcount)


async def fetch_builds_by_ids(conn: AsyncConnection, build_ids: Sequence[int]) -> list[Any]:
    out: list[Any] = []
    for i in range(0, len(build_ids), _CHUNK):
        chunk = build_ids[i : i + _CHUNK]
        out.extend(await conn.execute(select(builds).where(builds.c.id.in_(chunk))))
    return out


async def insert_build_event(
    conn: AsyncConnection,
    build_id: int,
    *,
    at: float,
    kind: str,
    actor: str,
    detail: str | None = None,
) -> None:
    """Record what happened to a build (``build_events``), in the caller's transaction."""
    await conn.execute(
        insert(build_events).values(build_id=build_id, at=at, kind=kind, actor=actor, detail=detail)
    )


async def fetch_build_events(conn: AsyncConnection, build_id: int, limit: int) -> list[Any]:
    """The build's newest ``limit`` events, oldest first."""
    rows = await conn.execute(
        select(build_events)
        .where(build_events.c.build_id == build_id)
        .order_by(build_events.c.id.desc())
        .limit(limit)
    )
    return list(reversed(list(rows)))


async def fetch_submitted_build(
    conn: AsyncConnection, created_by: str, submission_key: str
) -> tuple[Any, bool] | None:
    """The newest build ``created_by`` submitted with this key, and whether its admission was
    interrupted (an ``admission_interrupted`` event); None when there is none."""
    row = (
        await conn.execute(
            select(builds)
            .where(builds.c.created_by == created_by, builds.c.submission_key == submission_key)
            .order_by(builds.c.id.desc())
            .limit(1)
        )
    ).first()
    if row is None:
        return None
    interrupted = (
        await conn.execute(
            select(func.count())
            .select_from(build_events)
            .where(
                build_events.c.build_id == row.id,
                build_events.c.kind == "admission_interrupted",
            )
        )
    ).scalar_one()
    return row, bool(interrupted)


async def fetch_build(conn: AsyncConnection, build_id: int) -> Any | None:
    return (await conn.execute(select(builds).where(builds.c.id == build_id))).first()


async def fetch_builds(
    conn: AsyncConnection,
    limit: int,
    *,
    states: Sequence[str] = (),
    repository: str | None = None,
    ref: str | None = None,
    created_by: str | None = None,
    before_id: int | None = None,
) -> list[Any]:
    """The newest ``limit`` builds, newest first; only those in ``states`` (any when empty),
    of ``repository``, of ``ref`` and created by the token named ``created_by`` when given;
    with ``before_id``, only older builds (keyset paging: the last id of the previous page).
    The one query behind the dashboard's ``/builds`` and ``GET /api/v1/builds``."""
    query = select(builds)
    if before_id is not None:
        query = query.where(builds.c.id < before_id)
    if states:
        query = query.where(builds.c.state.in_(list(states)))
    if repository is not None:
        query = query.where(builds.c.repository == repository)
    if ref is not None:
        query = query.where(builds.c.ref == ref)
    if created_by is not None:
        query = query.where(builds.c.created_by == created_by)
    rows = await conn.execute(query.order_by(builds.c.id.desc()).limit(limit))
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


async def fetch_roots_of_builds(conn: AsyncConnection, build_ids: Sequence[int]) -> list[Any]:
    """The roots of every build in ``build_ids`` (by build, then .drv path), each with its
    derivation's ``outputs`` and ``step_state``: its step's state when that step is one of
    the build's steps, else None (the root was cached). One query for a whole build list."""
    if not build_ids:
        return []
    rows = await conn.execute(
        select(build_roots, derivations.c.outputs, steps.c.state.label("step_state"))
        .join(derivations, derivations.c.drv_path == build_roots.c.drv_path)
        .outerjoin(
            build_steps,
            (build_steps.c.build_id == build_roots.c.build_id)
            & (build_steps.c.step_id == build_roots.c.step_id),
        )
        .outerjoin(steps, steps.c.id == build_steps.c.step_id)
        .where(build_roots.c.build_id.in_(list(build_ids)))
        .order_by(build_roots.c.build_id, build_roots.c.drv_path)
    )
    return list(rows)


async def fetch_build_steps_in_state(
    conn: AsyncConnection, build_ids: Sequence[int], state: str
) -> list[tuple[int, int]]:
    """(build id, step id) of the steps of ``build_ids`` in ``state``."""
    if not build_ids:
        return []
    rows = await conn.execute(
        select(build_steps.c.build_id, build_steps.c.step_id)
        .join(steps, steps.c.id == build_steps.c.step_id)
        .where(build_steps.c.build_id.in_(list(build_ids)), steps.c.state == state)
    )
    return [(int(b), int(s)) for b, s in rows]


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


async def insert_step(conn: AsyncConnection, **values: Any) -> int | None:
    """A new step; None when its derivation already has one (another runner inserted it
    meanwhile: one drv, one step)."""
    result = await conn.execute(_insert_ignore(conn, steps).values(**values).returning(steps.c.id))
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
        _insert_ignore(conn, steps).returning(steps.c.id, steps.c.drv_path), rows
    )
    ids = {drv_path: int(sid) for sid, drv_path in result}
    note_steps(conn, ids.values())
    return ids


async def insert_step_deps(conn: AsyncConnection, pairs: Iterable[tuple[int, int]]) -> None:
    rows = [{"step_id": s, "dep_id": d} for s, d in set(pairs)]
    if rows:
        note_steps(conn, [r["step_id"] for r in rows])
        await conn.execute(_insert_ignore(conn, step_deps), rows)


async def update_step(conn: AsyncConnection, step_id: int, **values: Any) -> None:
    note_steps(conn, [step_id])
    await conn.execute(update(steps).where(steps.c.id == step_id).values(**values))


async def update_steps(conn: AsyncConnection, step_ids: Sequence[int], **values: Any) -> None:
    note_steps(conn, step_ids)
    for i in range(0, len(step_ids), _CHUNK):
        chunk = step_ids[i : i + _CHUNK]
        await conn.execute(update(steps).where(steps.c.id.in_(chunk)).values(**values))


async def update_steps_each(conn: AsyncConnection, rows: Sequence[Mapping[str, Any]]) -> None:
    """Update many steps, each with its own values, in one executemany. Every row has the
    step's ``id`` and the same other keys (the columns to set)."""
    if not rows:
        return
    note_steps(conn, [int(row["id"]) for row in rows])
    columns = [k for k in rows[0] if k != "id"]
    stmt = (
        update(steps)
        .where(steps.c.id == bindparam("b_id"))
        .values({c: bindparam(f"b_{c}") for c in columns})
    )
    await conn.execute(stmt, [{f"b_{k}": v for k, v in row.items()} for row in rows])


async def update_steps_in_state(
    conn: AsyncConnection, step_ids: Sequence[int], states: Sequence[str], **values: Any
) -> set[int]:
    """Update those of the steps that are still in one of ``states``; returns their ids
    (a step another runner moved on is left alone)."""
    changed: set[int] = set()
    for i in range(0, len(step_ids), _CHUNK):
        chunk = step_ids[i : i + _CHUNK]
        rows = await conn.execute(
            update(steps)
            .where(steps.c.id.in_(chunk), steps.c.state.in_(list(states)))
            .values(**values)
            .returning(steps.c.id)
        )
        changed.update(int(r[0]) for r in rows)
    note_steps(conn, changed)
    return changed


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
    if not leased:
        await conn.execute(
            insert(step_attempts).values(
                step_id=step_id,
                attempt=attempt,
                max_attempts=max_attempts,
                finished_at=finished_at,
                outcome=outcome,
                error=error,
                retry_at=retry_at,
            )
        )
        return
    await conn.execute(
        insert(step_attempts).from_select(
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
                literal(attempt, Integer),
                literal(max_attempts, Integer),
                steps.c.agent_machine_id,
                steps.c.agent_name,
                steps.c.assigned_at,
                literal(finished_at, Float),
                literal(outcome, String),
                literal(error, Text),
                literal(retry_at, Float),
            ).where(steps.c.id == step_id),
        )
    )


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
    for i in range(0, len(step_ids), _CHUNK):
        chunk = sorted(step_ids[i : i + _CHUNK])
        query = select(steps.c.id, steps.c.state, steps.c.lease_id, steps.c.lease_expires_at).where(
            steps.c.id.in_(chunk)
        )
        rows = await conn.execute(_for_update(conn, query) if lock else query)
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
    rows = await conn.execute(_for_update(conn, query, skip_locked=True))
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
    for chunk in _chunks(sorted(drv_paths)):
        query = (
            select(steps)
            .where(steps.c.drv_path.in_(chunk), steps.c.trusted == trusted)
            .order_by(steps.c.id)
        )
        rows = await conn.execute(_for_update(conn, query) if lock else query)
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


async def fetch_step_edges(conn: AsyncConnection, step_ids: Sequence[int]) -> list[tuple[int, int]]:
    """Every (step, dependency) pair with either end among ``step_ids``."""
    out: set[tuple[int, int]] = set()
    for i in range(0, len(step_ids), _CHUNK):
        chunk = step_ids[i : i + _CHUNK]
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
    for i in range(0, len(step_ids), _CHUNK):
        chunk = step_ids[i : i + _CHUNK]
        rows = await conn.execute(
            select(steps.c.id, steps.c.state, steps.c.drv_path).where(steps.c.id.in_(chunk))
        )
        out.update((int(a), (str(b), str(c))) for a, b, c in rows)
    return out


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
    last_error: str | None = None,
) -> None:
    """Count one finished attempt on an agent and store its backoff and last infrastructure
    error (no row: nothing)."""
    await conn.execute(
        update(agents)
        .where(agents.c.machine_id == machine_id)
        .values(
            steps_succeeded=agents.c.steps_succeeded + succeeded,
            steps_failed=agents.c.steps_failed + failed,
            infra_failures=agents.c.infra_failures + infra,
            consecutive_failures=consecutive_failures,
            backoff_until=backoff_until,
            health_last_error=last_error,
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
    note_tokens(conn)
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
    note_tokens(conn)
    await conn.execute(
        update(tokens)
        .where(tokens.c.name == name, tokens.c.revoked_at.is_(None))
        .values(revoked_at=revoked_at)
    )


# ---- autoscaler launches (docs/autoscaling.md) ----------------------------------------------
async def fetch_build_scopes(
    conn: AsyncConnection, build_ids: Sequence[int]
) -> dict[int, tuple[str | None, bool]]:
    """Build id -> (repository, trusted): what trust scoping decides on (architecture §6)."""
    ids = sorted(set(build_ids))
    out: dict[int, tuple[str | None, bool]] = {}
    for i in range(0, len(ids), _CHUNK):
        rows = await conn.execute(
            select(builds.c.id, builds.c.repository, builds.c.trusted).where(
                builds.c.id.in_(ids[i : i + _CHUNK])
            )
        )
        for bid, repository, trusted in rows:
            out[int(bid)] = (repository, bool(trusted))
    return out


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
    for chunk in _chunks(sorted(set(launch_ids))):
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


# ---- dashboard (docs/dashboard.md) ---------------------------------------------------------
async def fetch_build_state_counts(
    conn: AsyncConnection, build_ids: Sequence[int]
) -> dict[int, dict[str, int]]:
    """Per build, how many of its steps are in each state."""
    out: dict[int, dict[str, int]] = {b: {} for b in build_ids}
    if not build_ids:
        return out
    rows = await conn.execute(
        select(build_steps.c.build_id, steps.c.state, func.count())
        .join(steps, steps.c.id == build_steps.c.step_id)
        .where(build_steps.c.build_id.in_(list(build_ids)))
        .group_by(build_steps.c.build_id, steps.c.state)
    )
    for build_id, state, n in rows:
        out[int(build_id)][str(state)] = int(n)
    return out


async def fetch_step_build_ids(conn: AsyncConnection, step_id: int, limit: int) -> list[int]:
    """The newest builds that include this step."""
    rows = await conn.execute(
        select(build_steps.c.build_id)
        .where(build_steps.c.step_id == step_id)
        .order_by(build_steps.c.build_id.desc())
        .limit(limit)
    )
    return [int(r[0]) for r in rows]


async def search_steps(conn: AsyncConnection, text: str, limit: int) -> list[Any]:
    """Steps whose .drv path or one of whose output paths contains ``text`` (newest first;
    a substring match, so it scans the derivations)."""
    rows = await conn.execute(
        select(*_STEP_COLUMNS)
        .join(derivations, derivations.c.drv_path == steps.c.drv_path)
        .where(
            derivations.c.drv_path.contains(text, autoescape=True)
            | derivations.c.outputs.contains(text, autoescape=True)
        )
        .order_by(steps.c.id.desc())
        .limit(limit)
    )
    return list(rows)


async def search_store_paths(conn: AsyncConnection, text: str, limit: int) -> list[Any]:
    """Cached store paths containing ``text``."""
    rows = await conn.execute(
        select(
            store_paths.c.path,
            store_paths.c.nar_size,
            store_paths.c.file_size,
            store_paths.c.deriver,
            store_paths.c.created_at,
        )
        .where(store_paths.c.path.contains(text, autoescape=True))
        .order_by(store_paths.c.path)
        .limit(limit)
    )
    return list(rows)


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
        _insert_ignore(conn, forge_outbox).values(
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


async def fetch_failed_dependencies(
    conn: AsyncConnection, step_ids: Sequence[int]
) -> dict[int, list[Any]]:
    """Per step, its dependencies that failed, were dependency-failed or were cancelled
    (``id``, ``drv_path``, ``name``, ``state``), by id: why a dependency-failed step failed."""
    out: dict[int, list[Any]] = {}
    for i in range(0, len(step_ids), _CHUNK):
        chunk = list(step_ids[i : i + _CHUNK])
        rows = await conn.execute(
            select(
                step_deps.c.step_id.label("dependent_id"),
                steps.c.id,
                steps.c.drv_path,
                steps.c.state,
                derivations.c.name,
            )
            .join(steps, steps.c.id == step_deps.c.dep_id)
            .join(derivations, derivations.c.drv_path == steps.c.drv_path)
            .where(
                step_deps.c.step_id.in_(chunk),
                steps.c.state.in_(["failed", "dependency_failed", "cancelled"]),
            )
            .order_by(step_deps.c.step_id, steps.c.id)
        )
        for r in rows:
            out.setdefault(int(r.dependent_id), []).append(r)
    return out


async def fetch_root_names(
    conn: AsyncConnection, build_ids: Sequence[int], per_build: int = 3
) -> dict[int, tuple[list[str], int]]:
    """Per build, the names of its first ``per_build`` requested (top-level) derivations, by
    name, and how many it requested in all (a CI evaluation may request thousands: only the
    first few are read)."""
    out: dict[int, tuple[list[str], int]] = {b: ([], 0) for b in build_ids}
    if not build_ids:
        return out
    ranked = (
        select(
            build_roots.c.build_id,
            derivations.c.name,
            func.row_number()
            .over(
                partition_by=build_roots.c.build_id,
                order_by=(derivations.c.name, build_roots.c.drv_path),
            )
            .label("rank"),
            func.count().over(partition_by=build_roots.c.build_id).label("total"),
        )
        .join(derivations, derivations.c.drv_path == build_roots.c.drv_path)
        .where(build_roots.c.build_id.in_(list(build_ids)))
        .subquery()
    )
    rows = await conn.execute(
        select(ranked.c.build_id, ranked.c.name, ranked.c.total)
        .where(ranked.c.rank <= per_build)
        .order_by(ranked.c.build_id, ranked.c.rank)
    )
    for build_id, name, total in rows:
        names, _ = out[int(build_id)]
        names.append(str(name))
        out[int(build_id)] = (names, int(total))
    return out


async def fetch_build_run_intervals(
    conn: AsyncConnection, build_ids: Sequence[int]
) -> dict[int, list[tuple[float, float | None]]]:
    """Per build, when its steps ran since it was created: (start, end) of every ended
    attempt that had a venue, and (start, None) for each step running now. What
    ``present.busy_secs`` adds up for a build's "took"."""
    out: dict[int, list[tuple[float, float | None]]] = {b: [] for b in build_ids}
    if not build_ids:
        return out
    ids = list(build_ids)
    ended = await conn.execute(
        select(build_steps.c.build_id, step_attempts.c.started_at, step_attempts.c.finished_at)
        .join(step_attempts, step_attempts.c.step_id == build_steps.c.step_id)
        .join(builds, builds.c.id == build_steps.c.build_id)
        .where(
            build_steps.c.build_id.in_(ids),
            step_attempts.c.started_at.is_not(None),
            step_attempts.c.finished_at >= builds.c.created_at,
        )
    )
    for build_id, start, end in ended:
        out[int(build_id)].append((float(start), float(end)))
    running = await conn.execute(
        select(build_steps.c.build_id, steps.c.assigned_at)
        .join(steps, steps.c.id == build_steps.c.step_id)
        .where(
            build_steps.c.build_id.in_(ids),
            steps.c.state.in_(["assigned", "building"]),
            steps.c.assigned_at.is_not(None),
        )
    )
    for build_id, start in running:
        out[int(build_id)].append((float(start), None))
    return out


# ---- cache retention (docs/cache.md) ---------------------------------------------------------
@dataclass(frozen=True, slots=True)
class CacheRow:
    """What a collection needs of a cached path."""

    path: str
    hash_part: str
    url: str
    file_size: int
    references: tuple[str, ...]
    """Full store paths."""
    created_at: float
    last_used_at: float | None


async def cache_rows_raw(conn: AsyncConnection, table: Table) -> list[Any]:
    """Every path of a cache's index as raw rows (``decode_cache_rows`` makes them
    ``CacheRow``s, in a worker thread for a large cache)."""
    result = await conn.execute(
        select(
            table.c.path,
            table.c.hash_part,
            table.c.url,
            table.c.file_size,
            table.c.references,
            table.c.created_at,
            table.c.last_used_at,
        )
    )
    return [tuple(r) for r in result]


def decode_cache_rows(rows: Sequence[Any]) -> list[CacheRow]:
    return [
        CacheRow(
            path,
            hash_part,
            url,
            int(size),
            tuple(STORE + ref for ref in json.loads(refs)),
            float(created),
            None if used is None else float(used),
        )
        for path, hash_part, url, size, refs, created, used in rows
    ]


async def cache_rows(conn: AsyncConnection, table: Table) -> list[CacheRow]:
    """Every path of a cache's index."""
    return decode_cache_rows(await cache_rows_raw(conn, table))


async def cache_rows_since(conn: AsyncConnection, table: Table, since: float) -> list[CacheRow]:
    """Paths published or used at ``since`` or later (what a sweep must not delete)."""
    rows = await conn.execute(
        select(table.c.path).where((table.c.created_at >= since) | (table.c.last_used_at >= since))
    )
    paths = [r[0] for r in rows]
    out: list[CacheRow] = []
    for chunk in _chunks(paths):
        refs = await store_path_references(conn, chunk, table)
        out.extend(CacheRow(p, "", "", 0, r, since, since) for p, r in refs.items())
    return out


async def cache_file_totals(conn: AsyncConnection, table: Table) -> tuple[int, int]:
    """(paths, bytes of NAR files counting each file once) of a cache."""
    paths = (await conn.execute(select(func.count()).select_from(table))).scalar_one()
    files = select(table.c.url, func.max(table.c.file_size).label("size")).group_by(table.c.url)
    sub = files.subquery()
    size = (await conn.execute(select(func.coalesce(func.sum(sub.c.size), 0)))).scalar_one()
    return int(paths), int(size)


async def touch_store_paths(
    conn: AsyncConnection, table: Table, uses: Sequence[tuple[str, float]]
) -> None:
    """Record when paths (by hash part) were last asked for: one statement for the batch."""
    if not uses:
        return
    await conn.execute(
        update(table)
        .where(table.c.hash_part == bindparam("h"))
        .values(last_used_at=bindparam("t")),
        [{"h": h, "t": t} for h, t in uses],
    )


async def touch_nar_files(conn: AsyncConnection, uses: Sequence[tuple[str, float]]) -> None:
    """Record when NAR files (by narinfo ``URL``) were last fetched, for every path of either
    cache that names them."""
    if not uses:
        return
    for table in CACHE_TABLES:
        await conn.execute(
            update(table).where(table.c.url == bindparam("u")).values(last_used_at=bindparam("t")),
            [{"u": u, "t": t} for u, t in uses],
        )


async def latest_build_roots(conn: AsyncConnection, keep: int) -> list[str]:
    """The .drv paths requested by the ``keep`` latest succeeded builds of each
    repository/ref (builds without one count as one group), and by every unfinished build."""
    rank = (
        func.row_number()
        .over(partition_by=(builds.c.repository, builds.c.ref), order_by=builds.c.id.desc())
        .label("rank")
    )
    ranked = select(builds.c.id, rank).where(builds.c.state == "succeeded").subquery()
    kept = select(ranked.c.id).where(ranked.c.rank <= keep)
    active = select(builds.c.id).where(builds.c.state.in_(["queued", "running"]))
    rows = await conn.execute(
        select(build_roots.c.drv_path)
        .where(build_roots.c.build_id.in_(kept.union(active).scalar_subquery()))
        .distinct()
    )
    return [r[0] for r in rows]


async def active_step_drvs(conn: AsyncConnection, *, since: float | None = None) -> list[str]:
    """The .drv paths of every step that has not finished (created at ``since`` or later)."""
    query = select(steps.c.drv_path).where(
        steps.c.state.in_(["waiting", "runnable", "assigned", "building"])
    )
    if since is not None:
        query = query.where(steps.c.created_at >= since)
    rows = await conn.execute(query.distinct())
    return [r[0] for r in rows]


async def doom_store_paths(
    conn: AsyncConnection, table: Table, hash_parts: Sequence[str], *, before: float, now: float
) -> list[tuple[str, str]]:
    """Delete the narinfos of ``hash_parts`` not published or used since ``before`` and note
    their NAR files as doomed, in the caller's transaction; returns (path, url) of those
    deleted."""
    out: list[tuple[str, str]] = []
    for chunk in _chunks(list(hash_parts)):
        query = select(table.c.hash_part, table.c.path, table.c.url).where(
            table.c.hash_part.in_(chunk),
            table.c.created_at < before,
            func.coalesce(table.c.last_used_at, 0.0) < before,
        )
        rows = list(await conn.execute(_for_update(conn, query)))
        if not rows:
            continue
        await conn.execute(delete(table).where(table.c.hash_part.in_([r[0] for r in rows])))
        urls = sorted({r[2] for r in rows})
        await conn.execute(
            _insert_ignore(conn, cache_gc_doomed), [{"url": u, "doomed_at": now} for u in urls]
        )
        out.extend((r[1], r[2]) for r in rows)
    return out


async def doomed_files(
    conn: AsyncConnection, urls: Sequence[str] | None = None
) -> list[tuple[str, float]]:
    """(url, doomed at) of the doomed NAR files among ``urls`` (None: all of them)."""
    query = select(cache_gc_doomed.c.url, cache_gc_doomed.c.doomed_at)
    if urls is None:
        rows = await conn.execute(query.order_by(cache_gc_doomed.c.url))
        return [(r[0], float(r[1])) for r in rows]
    out: list[tuple[str, float]] = []
    for chunk in _chunks(list(urls)):
        rows = await conn.execute(query.where(cache_gc_doomed.c.url.in_(chunk)))
        out.extend((r[0], float(r[1])) for r in rows)
    return sorted(out)


async def files_in_use(conn: AsyncConnection, urls: Sequence[str]) -> set[str]:
    """Which of NAR files ``urls`` a path of either cache names."""
    found: set[str] = set()
    for table in CACHE_TABLES:
        for chunk in _chunks(list(urls)):
            rows = await conn.execute(select(table.c.url).where(table.c.url.in_(chunk)).distinct())
            found.update(r[0] for r in rows)
    return found


async def undoom_files(conn: AsyncConnection, urls: Sequence[str]) -> None:
    for chunk in _chunks(list(urls)):
        await conn.execute(delete(cache_gc_doomed).where(cache_gc_doomed.c.url.in_(chunk)))


async def redoom_files(conn: AsyncConnection, urls: Sequence[str], now: float) -> None:
    """Look at doomed files ``urls`` again at a later collection, as if doomed at ``now``."""
    for chunk in _chunks(list(urls)):
        await conn.execute(
            update(cache_gc_doomed).where(cache_gc_doomed.c.url.in_(chunk)).values(doomed_at=now)
        )


@dataclass(frozen=True, slots=True)
class Pin:
    name: str
    paths: tuple[str, ...]
    created_at: float
    created_by: str
    expires_at: float | None


def _pin(row: Any) -> Pin:
    return Pin(
        row.name, tuple(json.loads(row.paths)), row.created_at, row.created_by, row.expires_at
    )


async def upsert_pin(conn: AsyncConnection, pin: Pin) -> None:
    """Create pin ``pin.name`` or replace its paths and expiry."""
    await conn.execute(delete(cache_pins).where(cache_pins.c.name == pin.name))
    await conn.execute(
        insert(cache_pins).values(
            name=pin.name,
            paths=json.dumps(sorted(pin.paths)),
            created_at=pin.created_at,
            created_by=pin.created_by,
            expires_at=pin.expires_at,
        )
    )


async def fetch_pins(conn: AsyncConnection) -> list[Pin]:
    rows = await conn.execute(select(cache_pins).order_by(cache_pins.c.name))
    return [_pin(r) for r in rows]


async def delete_pin(conn: AsyncConnection, name: str) -> bool:
    result = await conn.execute(delete(cache_pins).where(cache_pins.c.name == name))
    return bool(result.rowcount)


async def delete_expired_pins(conn: AsyncConnection, now: float) -> int:
    result = await conn.execute(
        delete(cache_pins).where(
            cache_pins.c.expires_at.is_not(None), cache_pins.c.expires_at <= now
        )
    )
    return int(result.rowcount or 0)


async def insert_gc_run(conn: AsyncConnection, **values: Any) -> int:
    result = await conn.execute(insert(cache_gc_runs).values(**values))
    pk = result.inserted_primary_key
    assert pk is not None
    return int(pk[0])


async def last_gc_run(conn: AsyncConnection) -> Any | None:
    rows = await conn.execute(select(cache_gc_runs).order_by(cache_gc_runs.c.id.desc()).limit(1))
    return rows.first()
