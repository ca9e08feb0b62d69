"""Builds: their rows, roots, steps and events, the derivations they name, and what trust scoping
reads of them (architecture §6)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import bindparam, delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from bigtent.protocol import MAX_ASSIGN_DRV_BYTES
from bigtent.runner.db.notify import note_builds
from bigtent.runner.db.queries.common import CHUNK, chunks, insert_ignore
from bigtent.runner.db.tables import (
    build_events,
    build_roots,
    build_steps,
    builds,
    cached_failure_hits,
    derivations,
    steps,
)


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
    text: str | None = field(default=None, compare=False, repr=False)
    """The .drv's text, on the way in only (recorded when at most ``MAX_ASSIGN_DRV_BYTES``
    long, for assignments): records read back leave it out (``assignment_derivations``)."""


def _derivation_row(drv: DrvInfo) -> dict[str, Any]:
    text = drv.text
    return {
        "drv_path": drv.drv_path,
        "name": drv.name,
        "system": drv.system,
        "required_features": json.dumps(sorted(drv.required_features)),
        "outputs": json.dumps(dict(drv.outputs)),
        "input_drvs": json.dumps({k: list(v) for k, v in drv.input_drvs.items()}),
        "input_srcs": json.dumps(list(drv.input_srcs)),
        "hash_modulo": drv.hash_modulo,
        "text": text if text is not None and len(text) <= MAX_ASSIGN_DRV_BYTES else None,
    }


async def insert_derivation(conn: AsyncConnection, drv: DrvInfo) -> None:
    await conn.execute(insert_ignore(conn, derivations), _derivation_row(drv))


async def insert_derivations(conn: AsyncConnection, drvs: Sequence[DrvInfo]) -> None:
    """Record many parsed derivations in one statement (recorded ones stay as they are)."""
    if drvs:
        await conn.execute(insert_ignore(conn, derivations), [_derivation_row(d) for d in drvs])


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


_RECORD_COLUMNS = [c for c in derivations.c if c.name != "text"]
"""A record without its text: planning reads thousands, none needs it."""


async def fetch_derivations(conn: AsyncConnection, paths: Sequence[str]) -> dict[str, DrvInfo]:
    out: dict[str, DrvInfo] = {}
    for chunk in chunks(list(paths)):
        rows = await conn.execute(select(*_RECORD_COLUMNS).where(derivations.c.drv_path.in_(chunk)))
        for row in rows:
            out[row.drv_path] = _drv(row)
    return out


@dataclass(frozen=True, slots=True)
class AssignedDrv:
    """What an assignment carries of a derivation recorded with its text."""

    text: str
    input_drvs: Mapping[str, Sequence[str]]
    input_srcs: Sequence[str]


@dataclass(frozen=True, slots=True)
class AssignmentDrvs:
    """The derivations of some assigned steps that were recorded with their text, and the
    outputs of their input derivations."""

    drvs: dict[str, AssignedDrv]
    outputs: dict[str, dict[str, str]]


_ASSIGNED_DRVS = select(
    derivations.c.drv_path,
    derivations.c.text,
    derivations.c.input_drvs,
    derivations.c.input_srcs,
).where(
    derivations.c.drv_path.in_(bindparam("paths", expanding=True)),
    derivations.c.text.is_not(None),
)
_DRV_OUTPUTS = select(derivations.c.drv_path, derivations.c.outputs).where(
    derivations.c.drv_path.in_(bindparam("paths", expanding=True))
)
"""Built once: the dispatcher runs them for every chunk it sends."""


async def assignment_derivations(conn: AsyncConnection, drv_paths: Sequence[str]) -> AssignmentDrvs:
    """Two queries per ``CHUNK`` paths: the texts and inputs of ``drv_paths``, then the
    outputs of their input derivations."""
    drvs: dict[str, AssignedDrv] = {}
    for chunk in chunks(list(drv_paths)):
        for row in await conn.execute(_ASSIGNED_DRVS, {"paths": chunk}):
            input_drvs, input_srcs = json.loads(f"[{row.input_drvs},{row.input_srcs}]")
            drvs[row.drv_path] = AssignedDrv(row.text, input_drvs, input_srcs)
    outputs: dict[str, dict[str, str]] = {}
    inputs = list(dict.fromkeys(p for d in drvs.values() for p in d.input_drvs))
    for chunk in chunks(inputs):
        for out in await conn.execute(_DRV_OUTPUTS, {"paths": chunk}):
            outputs[out.drv_path] = json.loads(out.outputs)
    return AssignmentDrvs(drvs, outputs)


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
    for i in range(0, len(build_ids), CHUNK):
        chunk = build_ids[i : i + CHUNK]
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


async def fetch_build_scopes(
    conn: AsyncConnection, build_ids: Sequence[int]
) -> dict[int, tuple[str | None, bool]]:
    """Build id -> (repository, trusted): what trust scoping decides on (architecture §6)."""
    ids = sorted(set(build_ids))
    out: dict[int, tuple[str | None, bool]] = {}
    for i in range(0, len(ids), CHUNK):
        rows = await conn.execute(
            select(builds.c.id, builds.c.repository, builds.c.trusted).where(
                builds.c.id.in_(ids[i : i + CHUNK])
            )
        )
        for bid, repository, trusted in rows:
            out[int(bid)] = (repository, bool(trusted))
    return out
