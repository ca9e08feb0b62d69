"""What the dashboard reads (docs/dashboard.md): counts per build, search, root names, run
intervals, failed dependencies."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from bigtent.runner.db.queries.common import CHUNK
from bigtent.runner.db.queries.steps import _STEP_COLUMNS
from bigtent.runner.db.tables import (
    build_roots,
    build_steps,
    builds,
    derivations,
    step_attempts,
    step_deps,
    steps,
    store_paths,
)


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


async def fetch_failed_dependencies(
    conn: AsyncConnection, step_ids: Sequence[int]
) -> dict[int, list[Any]]:
    """Per step, its dependencies that failed, were dependency-failed or were cancelled
    (``id``, ``drv_path``, ``name``, ``state``), by id: why a dependency-failed step failed."""
    out: dict[int, list[Any]] = {}
    for i in range(0, len(step_ids), CHUNK):
        chunk = list(step_ids[i : i + CHUNK])
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
