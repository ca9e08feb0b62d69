"""Garbage collection of the runner's caches: mark, then sweep (docs/cache.md).

**Mark.** Pending uses are flushed; a snapshot of both caches' indexes and of the roots (pins,
the latest builds per repository/ref, what unfinished steps need) is read, and
``policy.decide`` says what goes: the untrusted cache first, whose kept paths' references into
the main cache are roots of the main cache.

**Sweep**, a batch at a time, in the policy's order (referrers before what they reference):

1. Paths published, used or needed by a new step since the grace period before the mark, and
   their closures, are spared (read again before every batch).
2. One transaction deletes the batch's narinfo rows (only those still neither published nor
   used since then) and notes their NAR files as *doomed* (``cache_gc_doomed``).
3. After it commits, the runner stops serving those narinfos from memory, and each doomed file
   no narinfo names any more is deleted, then its doom note.

A runner killed anywhere leaves a consistent cache: rows and file both there, or rows gone and
a doom note left (the file perhaps still there, never served since no narinfo names it), which
the next collection finishes first. A file published again after it was doomed is kept (the
file's gate in one runner, its modification time between runners).

Several runners on PostgreSQL: a session advisory lock lets one collect at a time; the others
answer ``Conflict`` (on demand) or skip the turn (schedule).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from bigtent.config import RetentionPolicySection, RetentionSection
from bigtent.errors import BigtentError, Conflict
from bigtent.runner.cache.service import Cache
from bigtent.runner.cache.storage import Storage
from bigtent.runner.db import queries
from bigtent.runner.db.tables import store_paths, untrusted_store_paths
from bigtent.runner.metrics import Metrics
from bigtent.runner.retention import pins as pin_rules
from bigtent.runner.retention.policy import CachedPath, Decision, Policy, RootKind, closure, decide
from bigtent.runner.retention.usage import UsageRecorder

log = logging.getLogger(__name__)

GC_LOCK = 0x62745F6763  # "bt_gc": the PostgreSQL advisory lock key of a collection
DAY = 86400.0
LISTED_PATHS = 1000
"""Deleted paths a report lists (with their reasons); the counts cover all."""
MAIN, UNTRUSTED = "main", "untrusted"
STORE_PREFIX_LEN = len("/nix/store/")


def policy_of(section: RetentionPolicySection, grace_secs: float) -> Policy:
    return Policy(
        max_idle_secs=section.max_idle_days * DAY if section.max_idle_days > 0 else None,
        quota_high=section.quota_high_bytes,
        quota_low=section.quota_low_bytes,
        grace_secs=grace_secs,
    )


@dataclass(slots=True)
class CacheReport:
    """One cache's part of a collection."""

    decision: Decision
    deleted: int = 0
    """Narinfos deleted (a dry run: would be)."""
    spared: int = 0
    """Marked paths the sweep kept: used, published or needed again meanwhile."""
    bytes_freed: int = 0
    """Bytes of the NAR files deleted (a dry run: that would be)."""
    by_reason: dict[str, int] = field(default_factory=dict)
    """Deleted paths by reason (a dry run: would be)."""
    listed: list[tuple[str, str, int]] = field(default_factory=list)
    """(path, reason, file bytes) of the first ``LISTED_PATHS`` deleted."""

    def as_json(self) -> dict[str, Any]:
        d = self.decision
        return {
            "paths_before": d.paths,
            "bytes_before": d.bytes_before,
            "bytes_after": d.bytes_after,
            "bytes_freed": self.bytes_freed,
            "deleted": self.deleted,
            "deleted_by_reason": self.by_reason,
            "spared": self.spared,
            "roots": dict(sorted(d.roots.items())),
            "kept_rooted": d.kept_hard,
            "kept_recent": d.kept_recent,
            "over_quota": d.over_quota,
            "paths": [{"path": p, "reason": r, "bytes": b} for p, r, b in self.listed],
            "more_paths": max(0, self.deleted - len(self.listed)),
        }


@dataclass(slots=True)
class GcReport:
    started_at: float
    trigger: str
    dry_run: bool
    finished_at: float = 0.0
    caches: dict[str, CacheReport] = field(default_factory=dict)
    files_deleted: int = 0
    resumed_files: int = 0
    """Doomed files of an earlier, interrupted collection deleted first."""

    @property
    def paths_deleted(self) -> int:
        return sum(c.deleted for c in self.caches.values())

    @property
    def bytes_freed(self) -> int:
        return sum(c.bytes_freed for c in self.caches.values())

    def as_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "trigger": self.trigger,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "paths_deleted": self.paths_deleted,
            "bytes_freed": self.bytes_freed,
            "files_deleted": self.files_deleted,
            "resumed_files": self.resumed_files,
            "caches": {name: c.as_json() for name, c in self.caches.items()},
        }


@dataclass(frozen=True, slots=True)
class _Index:
    graph: Mapping[str, CachedPath]
    by_hash: Mapping[str, tuple[str, ...]]
    by_file: Mapping[str, tuple[str, ...]]
    file_size: Mapping[str, int]

    @classmethod
    def of(cls, graph: Mapping[str, CachedPath]) -> _Index:
        by_hash: dict[str, list[str]] = {}
        by_file: dict[str, list[str]] = {}
        sizes: dict[str, int] = {}
        for path, info in graph.items():
            by_hash.setdefault(path[STORE_PREFIX_LEN : STORE_PREFIX_LEN + 32], []).append(path)
            by_file.setdefault(info.file, []).append(path)
            sizes[info.file] = info.size
        return cls(
            graph,
            {k: tuple(v) for k, v in by_hash.items()},
            {k: tuple(v) for k, v in by_file.items()},
            sizes,
        )


def snapshot(rows: Sequence[queries.CacheRow]) -> dict[str, CachedPath]:
    return {
        r.path: CachedPath(
            r.url, r.file_size, r.references, max(r.created_at, r.last_used_at or 0.0)
        )
        for r in rows
    }


async def gather_roots(
    conn: AsyncConnection, keep_builds: int, now: float, *, new_since: float | None = None
) -> dict[str, str]:
    """Hard roots: live pins, the latest builds' .drvs and outputs, and every unfinished step's
    .drv, input .drvs and their outputs. With ``new_since`` (the sweep's re-check): pins and
    the unfinished steps created since then only (the others were roots at the mark)."""
    roots: dict[str, str] = {}
    for pin in pin_rules.live(await queries.fetch_pins(conn), now):
        if new_since is None or pin.created_at >= new_since:
            roots.update((p, RootKind.PIN) for p in pin.paths)
    build_drvs = (
        [] if new_since is not None else await queries.latest_build_roots(conn, keep_builds)
    )
    for drv in (await queries.fetch_derivations(conn, build_drvs)).values():
        roots.setdefault(drv.drv_path, RootKind.BUILD)
        for out in drv.outputs.values():
            roots.setdefault(out, RootKind.BUILD)
    step_drvs = await queries.active_step_drvs(conn, since=new_since)
    infos = await queries.fetch_derivations(conn, step_drvs)
    inputs = sorted({d for info in infos.values() for d in info.input_drvs})
    input_infos = await queries.fetch_derivations(conn, inputs)
    for info in infos.values():
        roots.setdefault(info.drv_path, RootKind.ACTIVE)
        for src in info.input_srcs:
            roots.setdefault(src, RootKind.ACTIVE)
        for dep, outs in info.input_drvs.items():
            roots.setdefault(dep, RootKind.ACTIVE)
            dep_info = input_infos.get(dep)
            if dep_info is not None:
                for name in outs:
                    output = dep_info.outputs.get(name)
                    if output is not None:
                        roots.setdefault(output, RootKind.ACTIVE)
    return roots


class Collector:
    def __init__(
        self,
        engine: AsyncEngine,
        config: RetentionSection,
        main: Cache,
        untrusted: Cache | None,
        usage: UsageRecorder,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self.config = config
        self.caches: dict[str, Cache] = {MAIN: main}
        if untrusted is not None:
            self.caches[UNTRUSTED] = untrusted
        self.storage: Storage = main.storage
        self.gate = main.gate
        self.usage = usage
        self.metrics = metrics if metrics is not None else Metrics()
        self.clock = clock
        self._running = asyncio.Lock()
        self.last: GcReport | None = None
        self.on_phase: Callable[[str], Awaitable[None]] | None = None
        """Tests' seam: awaited with ``marked`` (after the mark, before the sweep) and
        ``doomed`` (after a batch's narinfos are deleted, before its files)."""

    def policies(self) -> dict[str, Policy]:
        grace = self.config.grace_secs
        return {
            MAIN: policy_of(self.config, grace),
            UNTRUSTED: policy_of(self.config.untrusted, grace),
        }

    @contextlib.asynccontextmanager
    async def _exclusive(self) -> AsyncIterator[None]:
        if self._running.locked():
            raise Conflict("a collection is already running on this runner")
        async with self._running:
            if self.engine.dialect.name != "postgresql":
                yield
                return
            async with self.engine.connect() as conn:
                got = (
                    await conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": GC_LOCK})
                ).scalar()
                await conn.commit()
                if not got:
                    raise Conflict("another runner is collecting the cache; try again later")
                try:
                    yield
                finally:
                    with contextlib.suppress(SQLAlchemyError, OSError):
                        await conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": GC_LOCK})
                        await conn.commit()

    async def collect(self, *, dry_run: bool = False, trigger: str = "api") -> GcReport:
        """Mark and (unless ``dry_run``) sweep both caches; Conflict when a collection runs."""
        async with self._exclusive():
            report = await self._collect(dry_run=dry_run, trigger=trigger)
        self.last = report
        if not dry_run:
            for name, part in report.caches.items():
                d = part.decision
                self.metrics.gc_finished(
                    name,
                    part.by_reason,
                    part.bytes_freed,
                    d.roots,
                    {"rooted": d.kept_hard, "recent": d.kept_recent},
                )
            self.metrics.gc_ran(report.finished_at, report.finished_at - report.started_at)
        await self.refresh_sizes()
        return report

    async def sizes(self) -> dict[str, tuple[int, int, int | None]]:
        """Per cache: (paths, bytes of NAR files, quota high watermark or None)."""
        quotas = {
            MAIN: self.config.quota_high_bytes,
            UNTRUSTED: self.config.untrusted.quota_high_bytes,
        }
        out: dict[str, tuple[int, int, int | None]] = {}
        async with self.engine.connect() as conn:
            for name, cache in self.caches.items():
                paths, size = await queries.cache_file_totals(conn, cache.table)
                out[name] = (paths, size, quotas[name])
        return out

    async def refresh_sizes(self) -> None:
        with contextlib.suppress(SQLAlchemyError, OSError):
            for name, (paths, size, quota) in (await self.sizes()).items():
                self.metrics.cache_size(name, paths, size, quota)

    async def _collect(self, *, dry_run: bool, trigger: str) -> GcReport:
        started = self.clock()
        report = GcReport(started, trigger, dry_run)
        if not dry_run:
            report.resumed_files = len(await self.finish_doomed())
        await self.usage.flush()
        now = self.clock()
        async with self.engine.connect() as conn:
            roots = await gather_roots(conn, self.config.keep_builds, now)
            raw = {MAIN: await queries.cache_rows_raw(conn, store_paths)}
            if UNTRUSTED in self.caches:
                raw[UNTRUSTED] = await queries.cache_rows_raw(conn, untrusted_store_paths)
        # Decoding, deciding and indexing 100,000 paths takes seconds of CPU: in a thread, so
        # the event loop keeps serving meanwhile.
        parts, index = await asyncio.to_thread(self._mark, raw, roots, now)
        report.caches.update(parts)
        if not dry_run:
            if self.on_phase is not None:
                await self.on_phase("marked")
            since = now - self.config.grace_secs
            for name in (UNTRUSTED, MAIN):
                if name in report.caches:
                    await self._sweep(name, report, index, since, started)
            await self._prune_pins(now)
        report.finished_at = self.clock()
        if not dry_run:
            await self._record(report)
        log.info(
            "cache collection (%s%s): %d paths deleted, %d bytes freed, %d files deleted",
            trigger,
            ", dry run" if dry_run else "",
            report.paths_deleted,
            report.bytes_freed,
            report.files_deleted,
        )
        return report

    def _mark(
        self, raw: Mapping[str, Sequence[Any]], roots: Mapping[str, str], now: float
    ) -> tuple[dict[str, CacheReport], _Index]:
        """Decide both caches (blocking: run in a thread): the untrusted cache first, whose
        kept paths' references are roots of the main cache."""
        graphs = {name: snapshot(queries.decode_cache_rows(r)) for name, r in raw.items()}
        policies = self.policies()
        parts: dict[str, CacheReport] = {}
        main_roots = dict(roots)
        if UNTRUSTED in graphs:
            decision = decide(graphs[UNTRUSTED], roots, policies[UNTRUSTED], now)
            parts[UNTRUSTED] = CacheReport(decision)
            for path, info in graphs[UNTRUSTED].items():
                if path not in decision.delete:
                    for ref in info.references:
                        main_roots.setdefault(ref, RootKind.REFERENCED)
        parts[MAIN] = CacheReport(decide(graphs[MAIN], main_roots, policies[MAIN], now))
        for name, part in parts.items():
            graph = graphs[name]
            part.listed = [
                (p, str(r), graph[p].size)
                for p, r in list(part.decision.delete.items())[:LISTED_PATHS]
            ]
            part.deleted = len(part.decision.delete)
            part.bytes_freed = part.decision.bytes_freed
            part.by_reason = part.decision.counts()
        # Referrers may live in the other cache (untrusted outputs of main inputs).
        index = _Index.of({**graphs[MAIN], **graphs.get(UNTRUSTED, {})})
        return parts, index

    async def _spared(self, index: _Index, since: float, started: float) -> set[str]:
        """Paths to keep whatever the mark said: published, used or needed since ``since``,
        and their closures."""
        main_used, untrusted_used, files_used = self.usage.used_since(since)
        async with self.engine.connect() as conn:
            fresh = await queries.cache_rows_since(conn, store_paths, since)
            fresh += await queries.cache_rows_since(conn, untrusted_store_paths, since)
            roots = await gather_roots(conn, self.config.keep_builds, started, new_since=since)
        graph: Mapping[str, CachedPath] = index.graph
        if fresh:
            graph = {**index.graph, **snapshot(fresh)}
        keep: set[str] = set(roots) | {r.path for r in fresh}
        for hash_part in main_used | untrusted_used:
            keep.update(index.by_hash.get(hash_part, ()))
        for url in files_used:
            keep.update(index.by_file.get(url, ()))
        return closure(graph, keep)

    async def _sweep(
        self, name: str, report: GcReport, index: _Index, since: float, started: float
    ) -> None:
        cache = self.caches[name]
        part = report.caches[name]
        victims = list(part.decision.delete)
        part.deleted = 0
        part.bytes_freed = 0
        part.by_reason = {reason: 0 for reason in part.by_reason}
        went: set[str] = set()
        batch_size = self.config.sweep_batch
        for i in range(0, len(victims), batch_size):
            batch = victims[i : i + batch_size]
            spared = await self._spared(index, since, started)
            chosen = [p for p in batch if p not in spared]
            part.spared += len(batch) - len(chosen)
            if not chosen:
                continue
            doomed_at = self.clock()
            async with self.engine.begin() as conn:
                gone = await queries.doom_store_paths(
                    conn,
                    cache.table,
                    [p[STORE_PREFIX_LEN : STORE_PREFIX_LEN + 32] for p in chosen],
                    before=since,
                    now=doomed_at,
                )
            part.spared += len(chosen) - len(gone)
            part.deleted += len(gone)
            went.update(path for path, _ in gone)
            for path, _ in gone:
                reason = str(part.decision.delete[path])
                part.by_reason[reason] = part.by_reason.get(reason, 0) + 1
            cache.evicted(p[STORE_PREFIX_LEN : STORE_PREFIX_LEN + 32] for p, _ in gone)
            if self.on_phase is not None:
                await self.on_phase("doomed")
            notes = [(url, doomed_at) for url in sorted({u for _, u in gone})]
            for url in await self._drop_files(notes):
                report.files_deleted += 1
                part.bytes_freed += index.file_size.get(url, 0)
        # The report lists what went, not what the mark chose.
        part.listed = [entry for entry in part.listed if entry[0] in went]

    async def finish_doomed(self, urls: Sequence[str] | None = None) -> list[str]:
        """Delete doomed NAR files no narinfo names (``urls``, or every doom note left by an
        earlier collection); returns the files deleted."""
        async with self.engine.connect() as conn:
            notes = await queries.doomed_files(conn, urls)
        removed: list[str] = []
        batch = self.config.sweep_batch
        for i in range(0, len(notes), batch):
            removed += await self._drop_files(notes[i : i + batch])
        return removed

    async def _drop_files(self, notes: Sequence[tuple[str, float]]) -> list[str]:
        """Under the files' gates: forget the notes of files a narinfo names again, delete
        the others (unless written since they were doomed: another runner published them
        again, looked at next time), then forget their notes."""
        async with self.gate.hold_all([url for url, _ in notes]):
            async with self.engine.begin() as conn:
                used = await queries.files_in_use(conn, [url for url, _ in notes])
                await queries.undoom_files(conn, sorted(used))
            unused = [(url, at) for url, at in notes if url not in used]
            removed, missing, again = await asyncio.to_thread(self._remove, unused)
            async with self.engine.begin() as conn:
                await queries.undoom_files(conn, removed + missing)
                await queries.redoom_files(conn, again, self.clock())
        return removed

    def _remove(self, notes: Sequence[tuple[str, float]]) -> tuple[list[str], list[str], list[str]]:
        """Delete the files (blocking): (removed, already gone, written since doomed)."""
        removed: list[str] = []
        missing: list[str] = []
        again: list[str] = []
        for url, doomed_at in notes:
            written = self.storage.modified_at(url)
            if written is None:
                missing.append(url)
            elif written > doomed_at:
                again.append(url)
            else:
                self.storage.remove(url)
                removed.append(url)
        return removed, missing, again

    async def _prune_pins(self, now: float) -> None:
        async with self.engine.begin() as conn:
            await queries.delete_expired_pins(conn, now)

    async def _record(self, report: GcReport) -> None:
        async with self.engine.begin() as conn:
            await queries.insert_gc_run(
                conn,
                started_at=report.started_at,
                finished_at=report.finished_at,
                trigger=report.trigger,
                paths_deleted=report.paths_deleted,
                bytes_freed=report.bytes_freed,
                summary=json.dumps(report.as_json()),
            )

    async def run(self) -> None:
        """Collect every ``interval_secs`` (the first time after one interval) when
        ``enabled``; refresh the size metrics every ``usage_flush_secs``."""
        next_at = self.clock() + self.config.interval_secs
        while True:
            await self.refresh_sizes()
            await asyncio.sleep(max(0.0, min(self.config.usage_flush_secs, next_at - self.clock())))
            if self.clock() < next_at:
                continue
            next_at = self.clock() + self.config.interval_secs
            if not self.config.enabled:
                continue
            try:
                await self.collect(trigger="schedule")
            except Conflict as exc:
                log.info("scheduled cache collection skipped: %s", exc)
            except (BigtentError, SQLAlchemyError, OSError) as exc:
                log.warning("scheduled cache collection failed: %s", exc)
