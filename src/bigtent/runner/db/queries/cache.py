"""The cache index (store paths, narinfo fields) and cache retention: last uses, doomed files,
pins, collection runs (docs/cache.md)."""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Table, bindparam, delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from bigtent.nix.narinfo import NarInfo
from bigtent.runner.db.queries.common import STORE, chunks, for_update, insert_ignore
from bigtent.runner.db.tables import (
    build_roots,
    builds,
    cache_gc_doomed,
    cache_gc_runs,
    cache_pins,
    steps,
    store_paths,
    untrusted_store_paths,
)

# ---- store paths (the cache index) ---------------------------------------------------------
# ``table`` is ``store_paths`` (the main cache) or ``untrusted_store_paths`` (the untrusted
# cache, docs/security.md); a query only ever sees one of them.
CACHE_TABLES = (store_paths, untrusted_store_paths)


async def present_store_paths(
    conn: AsyncConnection, paths: Sequence[str], table: Table = store_paths
) -> set[str]:
    found: set[str] = set()
    for chunk in chunks(list(paths)):
        rows = await conn.execute(select(table.c.path).where(table.c.path.in_(chunk)))
        found.update(r[0] for r in rows)
    return found


async def store_path_files(
    conn: AsyncConnection, paths: Sequence[str], table: Table = store_paths
) -> dict[str, str]:
    """The NAR file name (narinfo ``URL``) of each recorded path among ``paths``."""
    out: dict[str, str] = {}
    stmt = _files_of(table)
    for chunk in chunks(list(paths)):
        rows = await conn.execute(stmt, {"b_paths": list(chunk)})
        out.update((path, url) for path, url in rows)
    return out


@functools.cache
def _files_of(table: Table) -> Any:
    return select(table.c.path, table.c.url).where(
        table.c.path.in_(bindparam("b_paths", expanding=True))
    )


async def store_path_references(
    conn: AsyncConnection, paths: Sequence[str], table: Table = store_paths
) -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for chunk in chunks(list(paths)):
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
    row = (await conn.execute(_by_hash(table), {"b_hash_part": hash_part})).first()
    return _narinfo(row) if row is not None else None


@functools.cache
def _by_hash(table: Table) -> Any:
    """``fetch_store_path_by_hash``'s statement, built once per table (it answers every
    narinfo request that memory does not)."""
    return select(table).where(table.c.hash_part == bindparam("b_hash_part"))


async def insert_store_path(
    conn: AsyncConnection, info: NarInfo, *, created_at: float, table: Table = store_paths
) -> bool:
    """Record a narinfo; False when the path was already recorded (the first record wins)."""
    result = await conn.execute(insert_ignore(conn, table), _store_path_row(info, created_at))
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
    await conn.execute(insert_ignore(conn, table), [_store_path_row(i, created_at) for i in infos])
    out: dict[str, NarInfo] = {}
    for chunk in chunks([i.store_path for i in infos]):
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
    for chunk in chunks(paths):
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
    for chunk in chunks(list(hash_parts)):
        query = select(table.c.hash_part, table.c.path, table.c.url).where(
            table.c.hash_part.in_(chunk),
            table.c.created_at < before,
            func.coalesce(table.c.last_used_at, 0.0) < before,
        )
        rows = list(await conn.execute(for_update(conn, query)))
        if not rows:
            continue
        await conn.execute(delete(table).where(table.c.hash_part.in_([r[0] for r in rows])))
        urls = sorted({r[2] for r in rows})
        await conn.execute(
            insert_ignore(conn, cache_gc_doomed), [{"url": u, "doomed_at": now} for u in urls]
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
    for chunk in chunks(list(urls)):
        rows = await conn.execute(query.where(cache_gc_doomed.c.url.in_(chunk)))
        out.extend((r[0], float(r[1])) for r in rows)
    return sorted(out)


async def files_in_use(conn: AsyncConnection, urls: Sequence[str]) -> set[str]:
    """Which of NAR files ``urls`` a path of either cache names."""
    found: set[str] = set()
    for table in CACHE_TABLES:
        for chunk in chunks(list(urls)):
            rows = await conn.execute(select(table.c.url).where(table.c.url.in_(chunk)).distinct())
            found.update(r[0] for r in rows)
    return found


async def undoom_files(conn: AsyncConnection, urls: Sequence[str]) -> None:
    for chunk in chunks(list(urls)):
        await conn.execute(delete(cache_gc_doomed).where(cache_gc_doomed.c.url.in_(chunk)))


async def redoom_files(conn: AsyncConnection, urls: Sequence[str], now: float) -> None:
    """Look at doomed files ``urls`` again at a later collection, as if doomed at ``now``."""
    for chunk in chunks(list(urls)):
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
