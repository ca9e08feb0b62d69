"""What the scheduler reads from the database: the rows a start (``load``), a new build, a
restart and a catch-up with other runners need, and the rows a transition checks. With
``persist`` (the writes), the scheduler's only door to ``bigtent.runner.db.queries``: the
layers above decide on what these return and never name a query themselves.

Rows are returned as the queries give them; ``model.node_from_row`` makes nodes of step
rows. ``DrvInfo``, ``LeaseRow`` and ``AssignedDrv`` are the row types the layers above name."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from bigtent.runner.db import queries
from bigtent.runner.db.queries import AssignedDrv, AssignmentDrvs, DrvInfo, LeaseRow

__all__ = [
    "ActiveRows",
    "AssignedDrv",
    "AssignmentDrvs",
    "BuildParts",
    "DrvInfo",
    "LeaseRow",
    "RestartRows",
    "active",
    "assignment_derivations",
    "build_parts",
    "builds",
    "derivations",
    "edges",
    "expiry_rows",
    "locked_rows",
    "restart_rows",
    "step_states",
    "steps",
    "steps_by_drv",
]


@dataclass
class BuildParts:
    """The roots (.drv path -> step id, None: cached) and members of some builds."""

    roots: dict[int, dict[str, int | None]]
    members: dict[int, set[int]]

    def root_steps(self) -> set[int]:
        """The step ids of every root."""
        return {s for r in self.roots.values() for s in r.values() if s is not None}


@dataclass
class ActiveRows:
    """What a start reads: the active steps, their edges, where their succeeded inputs were
    built, and the active builds with their roots and members."""

    steps: list[Any]
    deps: list[tuple[int, int]]
    """(step, dependency) of every active step, the dependency active or not."""
    builds: list[Any]
    parts: BuildParts
    built_inputs: list[tuple[int, str]] = field(default_factory=list)
    """(step, machine id) for each of an active step's dependencies that succeeded on a
    venue, in the order they finished (``steps.tally_built_inputs``)."""


@dataclass
class RestartRows:
    """What a restart reads of a build: its row, its members' rows, its roots (.drv path ->
    step id) and the edges among its members."""

    build: Any
    members: list[Any]
    roots: dict[str, int | None]
    deps: list[tuple[int, int]]


async def build_parts(conn: AsyncConnection, build_ids: Sequence[int]) -> BuildParts:
    """The roots and members of these builds."""
    roots: dict[int, dict[str, int | None]] = {i: {} for i in build_ids}
    for r in await queries.fetch_all_build_roots(conn, build_ids):
        roots[r.build_id][r.drv_path] = r.step_id
    members: dict[int, set[int]] = {i: set() for i in build_ids}
    for b, s in await queries.fetch_build_step_ids(conn, build_ids):
        members[b].add(int(s))
    return BuildParts(roots, members)


async def active(conn: AsyncConnection, states: Collection[str]) -> ActiveRows:
    """The steps in ``states`` (the active ones), their edges and where their succeeded
    inputs were built (one statement for both), and the active builds with their roots and
    members."""
    rows = await queries.fetch_active_steps(conn, list(states))
    ids = [int(r.id) for r in rows]
    edges = await queries.fetch_step_deps_built_on(conn, ids)
    deps = [(sid, dep) for sid, dep, _, _ in edges]
    built = sorted(
        (finished or 0.0, dep, sid, machine)
        for sid, dep, machine, finished in edges
        if machine is not None
    )
    active_builds = await queries.fetch_active_builds(conn)
    parts = await build_parts(conn, [int(b.id) for b in active_builds])
    return ActiveRows(
        rows, deps, active_builds, parts, [(sid, machine) for _, _, sid, machine in built]
    )


async def steps(conn: AsyncConnection, step_ids: Iterable[int]) -> list[Any]:
    """The rows of these steps (in id order)."""
    return await queries.fetch_steps_by_ids(conn, sorted(step_ids))


async def steps_by_drv(
    conn: AsyncConnection, drv_paths: Sequence[str], *, trusted: bool
) -> dict[str, Any]:
    """The step rows of these derivations, of one trust, locked until the transaction ends:
    another runner cannot change them under a decision taken on them."""
    return await queries.fetch_steps_by_drv(conn, drv_paths, trusted=trusted, lock=True)


async def edges(
    conn: AsyncConnection, step_ids: Iterable[int], *, both_ends: bool = False
) -> list[tuple[int, int]]:
    """The (step, dependency) pairs of these steps; ``both_ends``: every pair with either end
    among them."""
    ids = sorted(step_ids)
    if both_ends:
        return await queries.fetch_step_edges(conn, ids)
    return await queries.fetch_step_deps(conn, ids)


async def step_states(conn: AsyncConnection, step_ids: Iterable[int]) -> dict[int, tuple[str, str]]:
    """Step id -> (state, .drv path)."""
    return await queries.fetch_step_states(conn, sorted(step_ids))


async def builds(conn: AsyncConnection, build_ids: Iterable[int]) -> list[Any]:
    """The rows of these builds."""
    return await queries.fetch_builds_by_ids(conn, sorted(build_ids))


async def restart_rows(conn: AsyncConnection, build_id: int) -> RestartRows | None:
    """What a restart of the build needs (None: no such build)."""
    row = await queries.fetch_build(conn, build_id)
    if row is None:
        return None
    members = await queries.fetch_build_steps(conn, build_id)
    roots = {r.drv_path: r.step_id for r in await queries.fetch_all_build_roots(conn, [build_id])}
    deps = await queries.fetch_step_deps(conn, [int(m.id) for m in members])
    return RestartRows(row, members, roots, deps)


async def derivations(conn: AsyncConnection, drv_paths: Sequence[str]) -> dict[str, DrvInfo]:
    """The derivations' records by .drv path."""
    return await queries.fetch_derivations(conn, drv_paths)


async def assignment_derivations(conn: AsyncConnection, drv_paths: Sequence[str]) -> AssignmentDrvs:
    """What a chunk of assignments carries of its derivations (``carried``)."""
    return await queries.assignment_derivations(conn, drv_paths)


async def locked_rows(conn: AsyncConnection, step_ids: Sequence[int]) -> dict[int, LeaseRow]:
    """The steps' state and lease, locked until the transaction ends: what a transition on a
    shared database checks before it relies on them."""
    return await queries.lock_steps(conn, step_ids)


async def expiry_rows(engine: AsyncEngine, step_ids: Sequence[int]) -> dict[int, LeaseRow]:
    """The steps' state and lease as committed, unlocked: whether leases due here expired."""
    async with engine.connect() as conn:
        return await queries.lock_steps(conn, step_ids, lock=False)
