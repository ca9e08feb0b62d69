"""The signed binary cache: narinfo records over a NAR storage (upstream lookups are
``upstreams.py``).

NARs come in through ``NarIntake`` (``intake.py``: one verification, whichever way they
arrive), and only then is a narinfo signed and recorded (``Cache.publish``). Nothing is
published on any mismatch (architecture §6: uploads).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import Table
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from bigtent.config import CacheSection
from bigtent.nix import base32, narinfo
from bigtent.nix.keys import SecretKey
from bigtent.nix.store_path import StorePath
from bigtent.runner.cache.intake import NarIntake
from bigtent.runner.cache.lru import Lru
from bigtent.runner.cache.narcheck import Ingested
from bigtent.runner.cache.storage import Staged, Storage
from bigtent.runner.db import queries
from bigtent.runner.db.tables import store_paths, untrusted_store_paths
from bigtent.runner.metrics import Metrics
from bigtent.runner.retention.gate import FileGate
from bigtent.runner.retention.usage import UsageRecorder

log = logging.getLogger(__name__)


STORE_PREFIX = "/nix/store/"
MEMORY_NARINFOS = 20_000
"""Narinfo records kept in memory (about 1 KiB each)."""
MEMORY_DERIVATIONS = 20_000
"""Parsed derivation records kept in memory."""


MAIN_PATH = "/cache"
UNTRUSTED_PATH = "/cache/untrusted"
"""Where the untrusted cache is served: outputs of untrusted builds (docs/security.md)."""


class Cache(NarIntake):
    """A binary cache of the runner: storage plus a narinfo index in the database.

    The runner has two: the main cache (``/cache``, index ``store_paths``, the main key) and
    the untrusted cache (``/cache/untrusted``, index ``untrusted_store_paths``, its own key)
    for outputs of untrusted steps. They share the NAR storage (files named by their own hash)
    and the derivations table; each sees only its own index.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        storage: Storage,
        key: SecretKey,
        config: CacheSection,
        public_url: str,
        metrics: Metrics | None = None,
        *,
        untrusted: bool = False,
        gate: FileGate | None = None,
        usage: UsageRecorder | None = None,
    ) -> None:
        super().__init__(storage, config, metrics if metrics is not None else Metrics())
        self.engine = engine
        self.gate = gate if gate is not None else FileGate()
        """Shared by both caches and the collector (one storage)."""
        self.usage = usage
        """Where narinfo and NAR requests are counted as uses (retention); None: nowhere."""
        self.key = key
        self.untrusted = untrusted
        self.table: Table = untrusted_store_paths if untrusted else store_paths
        self.url = public_url.rstrip("/") + (UNTRUSTED_PATH if untrusted else MAIN_PATH)
        self.public_key = key.public_key().to_text()
        self._infos: Lru[narinfo.NarInfo] = Lru(MEMORY_NARINFOS)
        self._drvs: Lru[queries.DrvInfo] = Lru(MEMORY_DERIVATIONS)

    # ---- queries ---------------------------------------------------------------------------
    # A published narinfo and a recorded derivation never change, so recently used ones are
    # kept in memory: agents and Nix clients ask for the same few paths again and again.
    def _remembered(self, path: str) -> narinfo.NarInfo | None:
        info = self._infos.get(path[len(STORE_PREFIX) : len(STORE_PREFIX) + 32])
        return info if info is not None and info.store_path == path else None

    async def present(self, paths: Iterable[str]) -> set[str]:
        """Which of ``paths`` the cache holds."""
        wanted = list(paths)
        files: dict[str, str] = {}
        for p in wanted:
            info = self._remembered(p)
            if info is not None:
                files[p] = info.url
        rest = [p for p in wanted if p not in files]
        if rest:
            async with self.engine.connect() as conn:
                files.update(await queries.store_path_files(conn, rest, self.table))
        # A path whose NAR file is gone (storage lost under the runner) is not present: it is
        # forgotten, so it is rebuilt or uploaded again.
        gone = [p for p, url in files.items() if self.storage.surely_missing(url)]
        for path in gone:
            info = await self.fetch_narinfo(path)  # forgets it
            if info is not None:  # came back meanwhile
                gone.remove(path)
        found = set(files) - set(gone)
        if self.usage is not None:
            # Asking whether a path is cached (a client before uploading, planning a build)
            # counts as a use, as a narinfo request does (retention, docs/cache.md).
            for path in found:
                self.usage.narinfo(
                    path[len(STORE_PREFIX) : len(STORE_PREFIX) + 32], untrusted=self.untrusted
                )
        return found

    async def references_of(self, paths: Sequence[str]) -> dict[str, tuple[str, ...]]:
        """Full reference paths of cached paths (missing ones are absent from the result)."""
        out: dict[str, tuple[str, ...]] = {}
        rest = []
        for path in paths:
            info = self._remembered(path)
            if info is None:
                rest.append(path)
            else:
                out[path] = tuple([STORE_PREFIX + r for r in info.references])
        if rest:
            async with self.engine.connect() as conn:
                out.update(await queries.store_path_references(conn, rest, self.table))
        return out

    async def fetch_narinfo(self, path: str) -> narinfo.NarInfo | None:
        """The signed record of a cached path, or None."""
        info = await self.narinfo_by_hash(StorePath.parse(path).hash_part)
        return info if info is not None and info.store_path == path else None

    async def remembered_narinfo(self, path: str) -> narinfo.NarInfo | None:
        """``fetch_narinfo`` from memory only: the record of a path this runner published or
        looked up recently, or None without asking the database (the path may still be
        recorded there). A record whose NAR file is gone is forgotten, as there."""
        hash_part = StorePath.parse(path).hash_part
        info = self._infos.get(hash_part)
        if info is None or info.store_path != path:
            return None
        return await self._unless_missing(info)

    async def narinfo_by_hash(self, hash_part: str) -> narinfo.NarInfo | None:
        """The signed record of a cached path by its hash part, or None. A record whose NAR
        file the storage knows to be gone is forgotten on the way (and None answered)."""
        info = self._infos.get(hash_part)
        if info is None:
            async with self.engine.connect() as conn:
                info = await queries.fetch_store_path_by_hash(conn, hash_part, self.table)
            if info is not None:
                self._infos.put(hash_part, info)
        return None if info is None else await self._unless_missing(info)

    async def _unless_missing(self, info: narinfo.NarInfo) -> narinfo.NarInfo | None:
        if self.storage.surely_missing(info.url):
            await self.forget(info, "its NAR file is missing from the storage")
            return None
        return info

    async def forget(self, info: narinfo.NarInfo, why: str) -> bool:
        """Delete a path's narinfo, so the path is built or uploaded again; False when it was
        already gone. Its NAR file, if any, stays (other paths may share it)."""
        hash_part = StorePath.parse(info.store_path).hash_part
        self._infos.drop(hash_part)
        async with self.engine.begin() as conn:
            forgot = await queries.forget_store_path(conn, hash_part, self.table)
        if forgot:
            self.metrics.nar_forgotten()
            log.warning("forgot %s from the cache: %s", info.store_path, why)
        return forgot

    async def narinfo_text(self, hash_part: str) -> str | None:
        info = await self.narinfo_by_hash(hash_part)
        if info is None:
            return None
        if self.usage is not None:
            self.usage.narinfo(hash_part, untrusted=self.untrusted)
        return narinfo.render(info)

    def nar_requested(self, file_name: str) -> None:
        """Count a request for NAR file ``file_name`` (``nar/...``) as a use of its paths."""
        if self.usage is not None:
            self.usage.nar(file_name)

    def evicted(self, hash_parts: Iterable[str]) -> None:
        """Narinfos a collection deleted (after its commit): stop serving them from memory."""
        for hash_part in hash_parts:
            self._infos.drop(hash_part)

    async def derivations(self, drv_paths: Sequence[str]) -> dict[str, queries.DrvInfo]:
        """Recorded derivations among ``drv_paths`` (unknown ones are absent)."""
        out: dict[str, queries.DrvInfo] = {}
        rest = []
        for path in drv_paths:
            drv = self._drvs.get(path)
            if drv is None:
                rest.append(path)
            else:
                out[path] = drv
        if rest:
            async with self.engine.connect() as conn:
                fetched = await queries.fetch_derivations(conn, rest)
            for path, drv in fetched.items():
                self._drvs.put(path, drv)
            out.update(fetched)
        return out

    def remember_derivations(self, drvs: Iterable[queries.DrvInfo]) -> None:
        """Derivations just recorded (after their commit): the derivations of a build's
        .drv uploads are looked up again at once (the next .drv's inputs, the output's
        candidates), so memory answers instead of the database. Their texts stay out of
        memory: only a dispatch reads them, from the database."""
        for drv in drvs:
            self._drvs.put(drv.drv_path, dataclasses.replace(drv, text=None) if drv.text else drv)

    async def publish(
        self,
        staged: Staged,
        store_path: StorePath,
        got: Ingested,
        references: Iterable[str],
        *,
        deriver: str | None = None,
        ca: str | None = None,
        record: Callable[[AsyncConnection], Awaitable[None]] | None = None,
    ) -> narinfo.NarInfo:
        """Move a verified NAR into place, sign its narinfo and record it (idempotent).

        ``record`` runs in the same transaction as the narinfo insert, for facts that must
        exist exactly when the path does (a derivation's parsed form).
        """
        signed = self._signed(Publication(staged, store_path, got, references, deriver, ca))
        # The file and its narinfo go in under the file's gate: a collection deleting a
        # doomed file of that name waits (docs/cache.md, "Crash-safe collection").
        async with self.gate.hold(got.file_name):
            await staged.commit(got.file_name)
            async with self.engine.begin() as conn:
                inserted = await queries.insert_store_path(
                    conn, signed, created_at=time.time(), table=self.table
                )
                if not inserted:
                    # Published concurrently (two steps with the same output): the first
                    # record is what Nix clients have been served; keep serving exactly that.
                    existing = await queries.fetch_store_path_by_hash(
                        conn, store_path.hash_part, self.table
                    )
                    if existing is not None:
                        signed = existing
                if record is not None:
                    await record(conn)
        self._infos.put(store_path.hash_part, signed)
        log.debug("published %s (%d bytes)", store_path.path, got.nar_size)
        return signed

    def _signed(self, item: Publication) -> narinfo.NarInfo:
        got = item.got
        info = narinfo.NarInfo(
            store_path=item.store_path.path,
            url=got.file_name,
            compression=str(got.compression),
            file_hash=base32.format_hash("sha256", got.file_hash),
            file_size=got.file_size,
            nar_hash=base32.format_hash("sha256", got.nar_hash),
            nar_size=got.nar_size,
            references=tuple(sorted({StorePath.parse(r).basename for r in item.references})),
            deriver=StorePath.parse(item.deriver).basename if item.deriver else None,
            sigs=(),
            ca=item.ca,
        )
        return dataclasses.replace(info, sigs=(self.key.sign(info.fingerprint()),))

    async def publish_many(
        self,
        items: Sequence[Publication],
        *,
        record: Callable[[AsyncConnection], Awaitable[None]] | None = None,
    ) -> dict[str, narinfo.NarInfo]:
        """``publish`` for many verified NARs at once: every file moved into place first,
        then every narinfo signed and recorded in ONE transaction (with ``record``'s facts),
        then remembered. A failure anywhere publishes none of them (files already moved stay
        as unreferenced files, as after a failed ``publish``): a narinfo is never recorded
        without its NAR. ``items`` come references first; each item's references must be in
        the cache already or earlier in ``items`` (the caller checks). Returns the recorded
        narinfo of each path (the first record, for a path published concurrently)."""
        # Signing costs ~0.1 ms of CPU a path: a batch is signed in a worker thread.
        signed = await asyncio.to_thread(lambda: [self._signed(item) for item in items])
        # Under the files' gates, as ``publish``: a collection never deletes one of them
        # between its move into place and its narinfo's commit.
        async with self.gate.hold_all([item.got.file_name for item in items]):
            for item in items:
                await item.staged.commit(item.got.file_name)
            async with self.engine.begin() as conn:
                recorded = await queries.insert_store_paths(
                    conn, signed, created_at=time.time(), table=self.table
                )
                if record is not None:
                    await record(conn)
        for path, info in recorded.items():
            self._infos.put(StorePath.parse(path).hash_part, info)
        log.debug("published %d paths", len(items))
        return recorded


@dataclass(frozen=True, slots=True)
class Publication:
    """A verified NAR waiting to be published: its staged file and its narinfo's facts."""

    staged: Staged
    store_path: StorePath
    got: Ingested
    references: Iterable[str]
    deriver: str | None = None
    ca: str | None = None
