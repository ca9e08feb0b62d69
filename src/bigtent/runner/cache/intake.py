"""A NAR on its way into the cache: streamed in and verified, or read back from the storage
and verified (architecture §6: uploads).

Every path enters the cache through one check of its NAR (``NarCheck``: declared size as a
hard stop, the size cap, NAR well-formedness, hash, references found by scanning), whether the
NAR streams in (``NarIntake.receive``, which compresses it) or an agent put its compressed
file in the storage itself (``NarIntake.receive_stored``, which decompresses it with a hard
stop). What passes is staged, for ``Cache.publish`` (``service.py``) to sign and record.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO

from bigtent.config import CacheSection
from bigtent.errors import (
    NarMismatch,
    PayloadTooLarge,
    StorageFull,
    StorageUnavailable,
)
from bigtent.nix import base32
from bigtent.nix.compression import (
    BoundedDecompressor,
    Compression,
    Compressor,
    DecompressedTooLarge,
    DecompressionError,
    compress_whole,
)
from bigtent.nix.nar import NarSink
from bigtent.runner.cache.narcheck import Ingested, NarCheck, check_nar_size, nar_file_name
from bigtent.runner.cache.storage import Staged, Storage
from bigtent.runner.metrics import Metrics, UploadKind

log = logging.getLogger(__name__)

WHOLE_NAR_BYTES = 64 * 1024
"""NARs up to this size (most outputs and .drv files) are held whole while they are checked,
then compressed in one call and written in one (``NarIntake.receive``)."""
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


@dataclass(frozen=True, slots=True)
class StorageFullEvents:
    """How many uploads the NAR storage refused as full since the runner started, the last
    one's time and reason."""

    count: int
    last_at: float
    reason: str


class StoredFile:
    """The file a NAR is stored as, written as the NAR is received: compressed as configured,
    counted, and hashed (uncompressed, the file is the NAR: its hash is the NAR hash, not a
    second pass)."""

    def __init__(self, out: BinaryIO, compression: Compression, level: int) -> None:
        self.out = out
        self.compression = compression
        self.size = 0
        self._compressor = Compressor(compression, level)
        self._sha = hashlib.sha256() if compression is not Compression.NONE else None

    def write(self, nar_chunk: bytes) -> None:
        self._put(self._compressor.compress(nar_chunk))

    def flush(self) -> None:
        """Write what the compressor holds back (once, after the last chunk)."""
        self._put(self._compressor.flush())

    def _put(self, data: bytes) -> None:
        if data:
            if self._sha is not None:
                self._sha.update(data)
            self.size += len(data)
            self.out.write(data)

    def ingested(self, nar_hash: bytes, nar_size: int, references: frozenset[str]) -> Ingested:
        """What was learned, once the NAR checked out as ``nar_hash``."""
        file_hash = self._sha.digest() if self._sha is not None else nar_hash
        return stored_as(nar_hash, nar_size, references, file_hash, self.size, self.compression)


def stored_as(
    nar_hash: bytes,
    nar_size: int,
    references: frozenset[str],
    file_hash: bytes,
    file_size: int,
    compression: Compression,
) -> Ingested:
    """What was learned of a checked NAR stored as a file of ``file_hash`` and ``file_size``
    (the file's name follows from its hash)."""
    return Ingested(
        nar_hash=nar_hash,
        nar_size=nar_size,
        file_name=nar_file_name(file_hash, compression),
        file_hash=file_hash,
        file_size=file_size,
        references=references,
        compression=compression,
    )


class NarIntake:
    """The way in of a cache: NARs verified into staged files of its storage."""

    def __init__(self, storage: Storage, config: CacheSection, metrics: Metrics) -> None:
        self.metrics = metrics
        self.storage = storage
        self.config = config
        self._verify_pool = ThreadPoolExecutor(
            STORED_VERIFY_THREADS, thread_name_prefix="verify-upload"
        )
        self.storage_full: StorageFullEvents | None = None
        """The NAR storage's last "full" (shown by the dashboard); None: never full."""

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
        """Stream a NAR into a temporary file, verifying as it goes (a small one, at most
        ``WHOLE_NAR_BYTES``, is held whole and staged once it checked out).

        Returns what was learned and the staged file; the caller must ``publish`` or
        ``discard`` it. Raises PayloadTooLarge or NarMismatch (and stores nothing) when the NAR
        is larger than declared or allowed, shorter, malformed, or hashes differently.
        ``sink`` sees the NAR's entries as they are parsed (e.g. to hash a file's contents).
        ``kind`` is the door it came in by, for the upload metrics.
        """
        check_nar_size(declared_size, self.config.max_nar_bytes)
        compression = self.config.compression
        check = NarCheck(declared_size, declared_hash, candidates, sink)
        if declared_size <= WHOLE_NAR_BYTES:
            return await self._receive_whole(chunks, check, kind)
        try:
            out, staged = self.new_staged()
        except StorageUnavailable:
            await _discard_rest(chunks, declared_size)  # the answer must reach the client
            raise
        stored = StoredFile(out, compression, self.config.compression_level)

        def process(chunk: bytes) -> None:
            check.feed(chunk)
            stored.write(chunk)

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
                stored.flush()
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
            await _discard_rest(chunks, declared_size)  # the answer must reach the client
            raise failure from exc
        except BaseException as exc:
            await staged.discard()
            self.metrics.upload_failed(kind, exc)
            raise
        self.metrics.upload_verified(kind, declared_size)
        return stored.ingested(nar_sha, declared_size, references), staged

    async def _receive_whole(
        self, chunks: AsyncIterator[bytes], check: NarCheck, kind: UploadKind
    ) -> tuple[Ingested, Staged]:
        """``receive`` for a NAR of at most ``WHOLE_NAR_BYTES``: checked as it arrives and held
        whole, then compressed in one call (``compress_whole``: no streaming compressor set up
        for a few hundred bytes) and written to a new staged file in one write. A NAR that
        fails its check stages nothing."""
        parts: list[bytes] = []
        try:
            async for chunk in chunks:
                if not chunk:
                    continue
                check.count(chunk)
                check.feed(chunk)
                parts.append(chunk)
            nar_sha, references = check.finish()
        except BaseException as exc:
            self.metrics.upload_failed(kind, exc)
            raise
        nar = parts[0] if len(parts) == 1 else b"".join(parts)
        compression = self.config.compression
        data = compress_whole(nar, compression, self.config.compression_level)
        # Uncompressed, the file is the NAR: its hash is the NAR hash.
        file_hash = nar_sha if compression is Compression.NONE else hashlib.sha256(data).digest()
        out, staged = self.new_staged()
        try:
            with out:
                out.write(data)
        except OSError as exc:
            await staged.discard()
            failure = self._storage_error(exc)
            self.metrics.upload_failed(kind, failure)
            raise failure from exc
        except BaseException as exc:
            await staged.discard()
            self.metrics.upload_failed(kind, exc)
            raise
        self.metrics.upload_verified(kind, check.declared_size)
        ingested = stored_as(
            nar_sha, check.declared_size, references, file_hash, len(data), compression
        )
        return ingested, staged

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
        check = NarCheck(declared_size, declared_hash, (), sink)
        stored = StoredFile(out, self.config.compression, self.config.compression_level)
        try:
            with out:
                for chunk in chunks:
                    check.count(chunk)
                    check.feed(chunk)
                    stored.write(chunk)
                stored.flush()
            nar_sha, references = check.finish()
        except OSError as exc:
            failure = self._storage_error(exc)
            self.metrics.upload_failed(kind, failure)
            raise failure from exc
        except BaseException as exc:
            self.metrics.upload_failed(kind, exc)
            raise
        self.metrics.upload_verified(kind, declared_size)
        return stored.ingested(nar_sha, declared_size, references)

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
        return stored_as(
            nar_sha, declared_size, references, declared_file_hash, declared_file_size, compression
        )

    async def discard(self, staged: Staged) -> None:
        await staged.discard()

    def close(self) -> None:
        """Stop the verification threads (verifications still running are abandoned)."""
        self._verify_pool.shutdown(wait=False, cancel_futures=True)


DISCARD_SECS = 30.0
"""How long the rest of a refused upload's body is read (and thrown away) at most."""


async def _discard_rest(chunks: AsyncIterator[bytes], limit: int) -> None:
    """Read and drop what is left of ``chunks``, up to ``limit`` bytes and ``DISCARD_SECS``;
    a body that broke off (any error) or goes on past either is simply left. For an upload
    refused because the storage failed: closing a connection with unread bytes resets it, and
    the client would see a broken connection instead of the 503/507 and its reason. ``limit``
    is the declared size, which passed the size limit."""
    left = limit
    with contextlib.suppress(Exception):  # the upload is refused already: nothing to add
        async with asyncio.timeout(DISCARD_SECS):
            async for chunk in chunks:
                left -= len(chunk)
                if left < 0:
                    return
