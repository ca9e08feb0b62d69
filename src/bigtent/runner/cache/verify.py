"""``bigtent cache verify``: check that every narinfo's NAR file is in the storage and is what
the narinfo says (size, hash); with ``repair``, forget the bad paths (and delete a bad file) so
they are built or uploaded again.

A running runner notices a missing NAR file by itself when a path is looked up (narinfo, or
``/paths/missing``; local storage only, see ``Storage.surely_missing``); a file that is there
but damaged is found only by this check.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass, field

from sqlalchemy import Table
from sqlalchemy.ext.asyncio import AsyncEngine

from bigtent.nix import base32
from bigtent.nix.narinfo import NarInfo
from bigtent.nix.store_path import StorePath
from bigtent.runner.cache.storage import Storage
from bigtent.runner.db import queries
from bigtent.runner.db.tables import store_paths, untrusted_store_paths

log = logging.getLogger(__name__)

READ_BYTES = 1024 * 1024
PAGE = 500
"""Narinfos read from the database at a time."""


@dataclass(frozen=True, slots=True)
class BadPath:
    path: str
    cache: str
    """``main`` or ``untrusted``."""
    reason: str


@dataclass(slots=True)
class VerifyReport:
    checked: int = 0
    bad: list[BadPath] = field(default_factory=list)
    forgotten: int = 0

    def as_json(self) -> dict[str, object]:
        return {
            "checked": self.checked,
            "bad": [{"path": b.path, "cache": b.cache, "reason": b.reason} for b in self.bad],
            "forgotten": self.forgotten,
        }


def judge_file(info: NarInfo, size: int, sha256: bytes) -> str | None:
    """Why a stored NAR file of ``size`` bytes hashing to ``sha256`` does not match ``info``
    (another size or hash), or None when it does."""
    if info.file_size is not None and size != info.file_size:
        return f"NAR file {info.url} has {size} bytes, the narinfo says {info.file_size}"
    want = info.file_hash or info.nar_hash
    got = base32.format_hash("sha256", sha256)
    if got != want:
        return f"NAR file {info.url} hashes to {got}, the narinfo says {want}"
    return None


def stored_problem(storage: Storage, info: NarInfo) -> tuple[str, bool] | None:
    """Why the stored NAR file of ``info`` is bad (missing, another size or hash) and whether
    it is missing, or None (blocking: call it from a worker thread)."""
    try:
        body = storage.open_file(info.url)
    except FileNotFoundError:
        return f"NAR file {info.url} is missing", True
    sha = hashlib.sha256()
    size = 0
    with body:
        while chunk := body.read(READ_BYTES):
            sha.update(chunk)
            size += len(chunk)
    reason = judge_file(info, size, sha.digest())
    return None if reason is None else (reason, False)


async def verify_cache(
    engine: AsyncEngine, storage: Storage, tables: dict[str, Table], *, repair: bool
) -> VerifyReport:
    """Check every narinfo of ``tables`` (name -> index table); with ``repair``, forget the
    bad ones and delete their damaged files (a missing one stays missing)."""
    report = VerifyReport()
    for cache_name, table in tables.items():
        after = ""
        while True:
            async with engine.connect() as conn:
                page = await queries.all_store_paths(conn, table, after=after, limit=PAGE)
            if not page:
                break
            after = StorePath.parse(page[-1].store_path).hash_part
            for info in page:
                report.checked += 1
                problem = await asyncio.to_thread(stored_problem, storage, info)
                if problem is None:
                    continue
                reason, missing = problem
                report.bad.append(BadPath(info.store_path, cache_name, reason))
                log.warning("%s (%s cache): %s", info.store_path, cache_name, reason)
                if repair:
                    report.forgotten += await _forget(engine, storage, table, info, missing)
    return report


async def _forget(
    engine: AsyncEngine, storage: Storage, table: Table, info: NarInfo, missing: bool
) -> int:
    if not missing:
        # Named by its own hash, a damaged file is bad for every path naming it: delete it,
        # so a running runner also finds it missing when any of them is looked up.
        await asyncio.to_thread(storage.remove, info.url)
    async with engine.begin() as conn:
        forgot = await queries.forget_store_path(
            conn, StorePath.parse(info.store_path).hash_part, table
        )
    return 1 if forgot else 0


def cache_tables() -> dict[str, Table]:
    """Both caches' indexes by name (``BadPath.cache``)."""
    return {"main": store_paths, "untrusted": untrusted_store_paths}
