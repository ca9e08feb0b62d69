"""The signed binary cache: verified NAR ingest and narinfo records (upstream lookups are
``upstreams.py``).

Every path enters the cache through one check of its NAR (``NarCheck``: declared size as a
hard stop, the size cap, NAR well-formedness, hash, references found by scanning), whether the
NAR streams in (``Cache.receive``, which compresses it) or an agent put its compressed file in
the storage itself (``Cache.receive_stored``, which decompresses it with a hard stop), and
only then is a narinfo signed and recorded (``Cache.publish``). Nothing is published on any
mismatch (architecture §6: uploads).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import hashlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO

from sqlalchemy import Table
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from bigtent.config import CacheSection
from bigtent.errors import (
    NarMismatch,
    PayloadTooLarge,
    StorageFull,
    StorageUnavailable,
)
from bigtent.nix import base32, narinfo
from bigtent.nix.compression import (
    BoundedDecompressor,
    Compression,
    Compressor,
    DecompressedTooLarge,
    DecompressionError,
)
from bigtent.nix.keys import SecretKey
from bigtent.nix.nar import NarSink
from bigtent.nix.store_path import StorePath
from bigtent.runner.cache.lru import Lru
from bigtent.runner.cache.narcheck import Ingested, NarCheck, check_nar_size, nar_file_name
from bigtent.runner.cache.storage import Staged, Storage
from bigtent.runner.db import queries
from bigtent.runner.db.tables import store_paths, untrusted_store_paths
from bigtent.runner.metrics import Metrics, UploadKind
from bigtent.runner.retention.gate import FileGate
from bigtent.runner.retention.usage import UsageRecorder

log = logging.getLogger(__name__)


STORE_PREFIX = "/nix/store/"
MEMORY_NARINFOS = 20_000
"""Narinfo records kept in memory (about 1 KiB each)."""
MEMORY_DERIVATIONS = 20_000
"""Parsed derivation records kept in memory."""
INLINE_INGEST_BYTES = 1024 * 1024
"""NARs up to this size are verified on the event loop; larger ones in a worker thread."""
INGEST_BATCH_BYTES = 1024 * 1024
"""A large NAR is handed to the worker thread in batches of about this size."""

STORED_READ_BYTES = 1024 * 1024
"""A stored file is read back for verification this much at a time."""
STORED_VERIFY_THREADS = 4
"""Stored files (presigned uploads) are verified in a pool of their own this large: a long
verification of a large NAR must not hold the default thread pool, which everything else
(short compression steps, storage calls, name lookups) shares. More wait their turn."""


MAIN_PATH = "/cache"
UNTRUSTED_PATH = "/cache/untrusted"
"""Where the untrusted cache is served: outputs of untrusted builds (docs/security.md)."""


@dataclass(frozen=True, slots=True)
class StorageFullEvents:
    """How many uploads the NAR storage refused as full since the runner started, the last
    one's time and reason."""

    count: int
    last_at: float
    reason: str


class Cache:
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
        self.engine = engine
        self.gate = gate if gate is not None else FileGate()
        """Shared by both caches and the collector (one storage)."""
        self.usage = usage
        """Where narinfo and NAR requests are counted as uses (retention); None: nowhere."""
        self.metrics = metrics if metrics is not None else Metrics()
        self.storage = storage
        self.key = key
        self.config = config
        self.untrusted = untrusted
        self.table: Table = untrusted_store_paths if untrusted else store_paths
        self.url = public_url.rstrip("/") + (UNTRUSTED_PATH if untrusted else MAIN_PATH)
        self.public_key = key.public_key().to_text()
        self._verify_pool = ThreadPoolExecutor(
            STORED_VERIFY_THREADS, thread_name_prefix="verify-upload"
        )
        self._infos: Lru[narinfo.NarInfo] = Lru(MEMORY_NARINFOS)
        self.storage_full: StorageFullEvents | None = None
        """The NAR storage's last "full" (shown by the dashboard); None: never full."""
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
                out[path] = tuple(STORE_PREFIX + r for r in info.references)
        if rest:
            async with self.engine.connect() as conn:
                out.update(await queries.store_path_references(conn, rest, self.table))
        return out

    async def fetch_narinfo(self, path: str) -> narinfo.NarInfo | None:
        """The signed record of a cached path, or None."""
        info = await self.narinfo_by_hash(StorePath.parse(path).hash_part)
        return info if info is not None and info.store_path == path else None

    async def narinfo_by_hash(self, hash_part: str) -> narinfo.NarInfo | None:
        """The signed record of a cached path by its hash part, or None. A record whose NAR
        file the storage knows to be gone is forgotten on the way (and None answered)."""
        info = self._infos.get(hash_part)
        if info is None:
            async with self.engine.connect() as conn:
                info = await queries.fetch_store_path_by_hash(conn, hash_part, self.table)
            if info is not None:
                self._infos.put(hash_part, info)
        if info is not None and self.storage.surely_missing(info.url):
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

    # ---- ingest ----------------------------------------------------------------------------
    # Two ways in, one verification (``NarCheck``): a NAR streamed to the runner is checked
    # and compressed here (``receive``); a compressed file an agent put in the storage itself
    # (a presigned upload) is read back, decompressed with a hard stop, and checked the same
    # way (``receive_stored``).
    async def receive(
        self,
        chunks: AsyncIterator[bytes],
        *,
        kind: UploadKind,
        declared_size: int,
        declared_hash: bytes,
        candidates: Iterable[str] = (),
        sink: NarSink | None = None,
    ) -> tuple[Ingested, Staged]:
        """Stream a NAR into a temporary file, verifying as it goes.

        Returns what was learned and the staged file; the caller must ``publish`` or
        ``discard`` it. Raises PayloadTooLarge or NarMismatch (and stores nothing) when the NAR
        is larger than declared or allowed, shorter, malformed, or hashes differently.
        ``sink`` sees the NAR's entries as they are parsed (e.g. to hash a file's contents).
        ``kind`` is the door it came in by, for the upload metrics.
        """
        check_nar_size(declared_size, self.config.max_nar_bytes)
        compression = self.config.compression
        compressor = Compressor(compression, self.config.compression_level)
        check = NarCheck(declared_size, declared_hash, candidates, sink)
        # Uncompressed, the stored file is the NAR: its hash is the NAR hash, not a second pass.
        file_sha = hashlib.sha256() if compression is not Compression.NONE else None
        file_size = 0
        try:
            out, staged = self.storage.new_temp()
        except OSError as exc:
            raise self._storage_error(exc) from exc

        def process(chunk: bytes) -> None:
            nonlocal file_size
            check.feed(chunk)
            data = compressor.compress(chunk)
            if data:
                if file_sha is not None:
                    file_sha.update(data)
                file_size += len(data)
                out.write(data)

        def process_all(batch: list[bytes]) -> None:
            for chunk in batch:
                process(chunk)

        # Parsing, hashing, scanning and compressing cost CPU in proportion to the NAR: a
        # large one is processed in a worker thread so the event loop keeps serving. The body
        # arrives in small chunks: they are gathered into batches of INGEST_BATCH_BYTES, and
        # one batch is processed while the next one is received (one thread hop per batch,
        # network and hashing overlapping; at most two batches in memory).
        in_thread = declared_size > INLINE_INGEST_BYTES
        loop = asyncio.get_running_loop()
        pending: asyncio.Future[None] | None = None
        batch: list[bytes] = []
        batched = 0

        async def hand_over() -> None:
            nonlocal pending, batch, batched
            chunks_now, batch, batched = batch, [], 0
            if pending is not None:
                await pending  # in order; raises the previous batch's error
            pending = loop.run_in_executor(None, process_all, chunks_now)

        try:
            with out:
                try:
                    async for chunk in chunks:
                        if not chunk:
                            continue
                        check.count(chunk)
                        if not in_thread:
                            process(chunk)
                            continue
                        batch.append(chunk)
                        batched += len(chunk)
                        if batched >= INGEST_BATCH_BYTES:
                            await hand_over()
                    if batch:
                        await hand_over()
                    if pending is not None:
                        await pending
                finally:
                    if pending is not None:
                        # A batch still in flight writes to `out`: let it end first (its
                        # error, if any, is retrieved here; the first error raised wins).
                        await asyncio.wait([pending])
                        if not pending.cancelled():
                            pending.exception()
                data = compressor.flush()
                if file_sha is not None:
                    file_sha.update(data)
                file_size += len(data)
                out.write(data)
            nar_sha, references = check.finish()
        except OSError as exc:
            if isinstance(exc, ConnectionError):
                # The body broke off (the client went away), not the storage: as it was.
                await staged.discard()
                self.metrics.upload_failed(kind, exc)
                raise
            await staged.discard()
            failure = self._storage_error(exc)
            self.metrics.upload_failed(kind, failure)
            raise failure from exc
        except BaseException as exc:
            await staged.discard()
            self.metrics.upload_failed(kind, exc)
            raise
        self.metrics.upload_verified(kind, declared_size)
        file_hash = file_sha.digest() if file_sha is not None else nar_sha
        return (
            Ingested(
                nar_hash=nar_sha,
                nar_size=declared_size,
                file_name=nar_file_name(file_hash, compression),
                file_hash=file_hash,
                file_size=file_size,
                references=references,
                compression=compression,
            ),
            staged,
        )

    def new_staged(self) -> tuple[BinaryIO, Staged]:
        """A new staged file of the storage (blocking); StorageFull or StorageUnavailable when
        the storage cannot make one."""
        try:
            return self.storage.new_temp()
        except OSError as exc:
            raise self._storage_error(exc) from exc

    def receive_blocking(
        self,
        chunks: Iterable[bytes],
        out: BinaryIO,
        *,
        kind: UploadKind,
        declared_size: int,
        declared_hash: bytes,
        sink: NarSink | None = None,
    ) -> Ingested:
        """``receive`` for a NAR the runner reads itself (a path of its own store): the same
        ``NarCheck`` and compression, written to ``out`` (a file of ``Storage.new_temp``).

        Blocking, for a worker thread: one thread hop for many paths instead of one per
        chunk. The caller discards the staged file on any error."""
        check_nar_size(declared_size, self.config.max_nar_bytes)
        compression = self.config.compression
        compressor = Compressor(compression, self.config.compression_level)
        check = NarCheck(declared_size, declared_hash, (), sink)
        file_sha = hashlib.sha256() if compression is not Compression.NONE else None
        file_size = 0
        try:
            with out:
                for chunk in chunks:
                    check.count(chunk)
                    check.feed(chunk)
                    data = compressor.compress(chunk)
                    if data:
                        if file_sha is not None:
                            file_sha.update(data)
                        file_size += len(data)
                        out.write(data)
                data = compressor.flush()
                if file_sha is not None:
                    file_sha.update(data)
                file_size += len(data)
                out.write(data)
            nar_sha, references = check.finish()
        except OSError as exc:
            failure = self._storage_error(exc)
            self.metrics.upload_failed(kind, failure)
            raise failure from exc
        except BaseException as exc:
            self.metrics.upload_failed(kind, exc)
            raise
        self.metrics.upload_verified(kind, declared_size)
        file_hash = file_sha.digest() if file_sha is not None else nar_sha
        return Ingested(
            nar_hash=nar_sha,
            nar_size=declared_size,
            file_name=nar_file_name(file_hash, compression),
            file_hash=file_hash,
            file_size=file_size,
            references=references,
            compression=compression,
        )

    def _storage_error(self, exc: OSError) -> StorageUnavailable:
        """The error to answer for a NAR the storage could not take: ``StorageFull`` (507,
        counted for alerts) when it has no room, else ``StorageUnavailable`` (503)."""
        reason = exc.strerror or type(exc).__name__
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            self.metrics.storage_full_refused()
            count = self.storage_full.count if self.storage_full is not None else 0
            self.storage_full = StorageFullEvents(count + 1, time.time(), reason)
            log.error("NAR storage is full: %s (upload refused, 507)", reason)
            return StorageFull(f"the runner's NAR storage is full ({reason}); retry later")
        log.error("NAR storage failed: %s", exc)
        return StorageUnavailable(f"the runner's NAR storage failed ({reason}); retry later")

    async def receive_stored(
        self,
        body: BinaryIO,
        staged: Staged,
        *,
        compression: Compression,
        declared_size: int,
        declared_hash: bytes,
        declared_file_size: int,
        declared_file_hash: bytes,
        candidates: Iterable[str] = (),
    ) -> Ingested:
        """Verify a compressed NAR file already in the storage, read from ``body``.

        The file is hashed and counted (a hard stop at its declared size), decompressed with a
        hard stop at the declared NAR size (a decompression bomb costs at most one bounded
        burst of output), and the NAR checked exactly as ``receive`` checks an uploaded one.
        Runs in a worker thread, as long as the NAR takes: no fixed timeout. On any mismatch
        ``staged`` is discarded (the object deleted) and NarMismatch or PayloadTooLarge raised.
        """
        check_nar_size(declared_size, self.config.max_nar_bytes)
        stop = threading.Event()

        def verify() -> tuple[bytes, frozenset[str]]:
            check = NarCheck(declared_size, declared_hash, candidates)
            decompressor = BoundedDecompressor(compression, declared_size)
            file_sha = hashlib.sha256()
            file_size = 0
            try:
                while chunk := body.read(STORED_READ_BYTES):
                    if stop.is_set():
                        raise asyncio.CancelledError
                    file_size += len(chunk)
                    if file_size > declared_file_size:
                        raise PayloadTooLarge(
                            f"the uploaded file is longer than its declared size of "
                            f"{declared_file_size} bytes"
                        )
                    file_sha.update(chunk)
                    for nar_chunk in decompressor.feed(chunk):
                        check.count(nar_chunk)
                        check.feed(nar_chunk)
                decompressor.finish()
            except DecompressedTooLarge as exc:
                raise PayloadTooLarge(
                    f"the uploaded {compression} file decompresses to more than its declared "
                    f"NAR size of {declared_size} bytes"
                ) from exc
            except DecompressionError as exc:
                raise NarMismatch(f"the uploaded file is not valid {compression}: {exc}") from exc
            finally:
                body.close()
            if file_size != declared_file_size:
                raise NarMismatch(
                    f"the uploaded file is {file_size} bytes, not its declared {declared_file_size}"
                )
            if file_sha.digest() != declared_file_hash:
                raise NarMismatch(
                    "file hash mismatch: declared "
                    f"{base32.format_hash('sha256', declared_file_hash)}, got "
                    f"{base32.format_hash('sha256', file_sha.digest())}"
                )
            return check.finish()

        try:
            try:
                loop = asyncio.get_running_loop()
                nar_sha, references = await loop.run_in_executor(self._verify_pool, verify)
            except asyncio.CancelledError:
                stop.set()
                raise
        except BaseException as exc:
            await staged.discard()
            self.metrics.upload_failed(UploadKind.OUTPUT, exc)
            raise
        self.metrics.upload_verified(UploadKind.OUTPUT, declared_size)
        return Ingested(
            nar_hash=nar_sha,
            nar_size=declared_size,
            file_name=nar_file_name(declared_file_hash, compression),
            file_hash=declared_file_hash,
            file_size=declared_file_size,
            references=references,
            compression=compression,
        )

    async def discard(self, staged: Staged) -> None:
        await staged.discard()

    def close(self) -> None:
        """Stop the verification threads (verifications still running are abandoned)."""
        self._verify_pool.shutdown(wait=False, cancel_futures=True)

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
