"""The signed binary cache: verified NAR ingest, narinfo records, and upstream lookups.

Every path enters the cache through ``Cache.ingest``, which checks the NAR while it streams
(declared size and hash, the size cap, NAR well-formedness), compresses it, finds its
references by scanning, and only then signs and records a narinfo. Nothing is published on
any mismatch (DESIGN §6: uploads).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import lzma
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import httpx
import zstandard
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from bigtent.config import CacheSection, Compression, Upstream
from bigtent.errors import BadRequest, ConfigError, PayloadTooLarge, UpstreamUnavailable
from bigtent.nix import base32, narinfo
from bigtent.nix.keys import SecretKey, parse_public_key
from bigtent.nix.nar import NarError, NarSink, NarValidator, ReferenceScanner
from bigtent.nix.store_path import StorePath
from bigtent.runner.db import queries
from bigtent.runner.storage import Storage

log = logging.getLogger(__name__)

_EXTENSIONS = {Compression.ZSTD: ".zst", Compression.XZ: ".xz", Compression.NONE: ""}


STORE_PREFIX = "/nix/store/"
MEMORY_NARINFOS = 20_000
"""Narinfo records kept in memory (about 1 KiB each)."""
MEMORY_DERIVATIONS = 20_000
"""Parsed derivation records kept in memory."""
INLINE_INGEST_BYTES = 1024 * 1024
"""NARs up to this size are verified on the event loop; larger ones in a worker thread."""
INGEST_BATCH_BYTES = 1024 * 1024
"""A large NAR is handed to the worker thread in batches of about this size."""
MEMORY_UPSTREAM_NARINFOS = 100_000
"""Upstream narinfo records (paths an upstream has) kept in memory."""

_V = TypeVar("_V")


class _Lru(Generic[_V]):
    """A bounded map that forgets the least recently used entry."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[str, _V] = OrderedDict()

    def get(self, key: str) -> _V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: str, value: _V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        if len(self._items) > self.size:
            self._items.popitem(last=False)


class _Compressor:
    def __init__(self, compression: Compression, level: int) -> None:
        self._obj: Any
        if compression is Compression.ZSTD:
            self._obj = zstandard.ZstdCompressor(level=level).compressobj()
        elif compression is Compression.XZ:
            self._obj = lzma.LZMACompressor(preset=min(level, 9))
        else:
            self._obj = None

    def compress(self, data: bytes) -> bytes:
        return self._obj.compress(data) if self._obj is not None else data

    def flush(self) -> bytes:
        return self._obj.flush() if self._obj is not None else b""


@dataclass(frozen=True, slots=True)
class Ingested:
    """What ingest learned about a NAR, before it is recorded."""

    nar_hash: bytes
    nar_size: int
    file_name: str
    file_hash: bytes
    file_size: int
    references: frozenset[str]
    """Hash parts found by the reference scan (a subset of the candidates)."""


class Cache:
    """The runner's binary cache: storage plus the narinfo index in the database."""

    def __init__(
        self,
        engine: AsyncEngine,
        storage: Storage,
        key: SecretKey,
        config: CacheSection,
        public_url: str,
    ) -> None:
        self.engine = engine
        self.storage = storage
        self.key = key
        self.config = config
        self.url = public_url.rstrip("/") + "/cache"
        self.public_key = key.public_key().to_text()
        self._infos: _Lru[narinfo.NarInfo] = _Lru(MEMORY_NARINFOS)
        self._drvs: _Lru[queries.DrvInfo] = _Lru(MEMORY_DERIVATIONS)

    # ---- queries ---------------------------------------------------------------------------
    # A published narinfo and a recorded derivation never change, so recently used ones are
    # kept in memory: agents and Nix clients ask for the same few paths again and again.
    def _remembered(self, path: str) -> narinfo.NarInfo | None:
        info = self._infos.get(path[len(STORE_PREFIX) : len(STORE_PREFIX) + 32])
        return info if info is not None and info.store_path == path else None

    async def present(self, paths: Iterable[str]) -> set[str]:
        """Which of ``paths`` the cache holds."""
        wanted = list(paths)
        found = {p for p in wanted if self._remembered(p) is not None}
        rest = [p for p in wanted if p not in found]
        if rest:
            async with self.engine.connect() as conn:
                found |= await queries.present_store_paths(conn, rest)
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
                out.update(await queries.store_path_references(conn, rest))
        return out

    async def fetch_narinfo(self, path: str) -> narinfo.NarInfo | None:
        """The signed record of a cached path, or None."""
        info = await self.narinfo_by_hash(StorePath.parse(path).hash_part)
        return info if info is not None and info.store_path == path else None

    async def narinfo_by_hash(self, hash_part: str) -> narinfo.NarInfo | None:
        info = self._infos.get(hash_part)
        if info is None:
            async with self.engine.connect() as conn:
                info = await queries.fetch_store_path_by_hash(conn, hash_part)
            if info is not None:
                self._infos.put(hash_part, info)
        return info

    async def narinfo_text(self, hash_part: str) -> str | None:
        info = await self.narinfo_by_hash(hash_part)
        return narinfo.render(info) if info is not None else None

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
    async def receive(
        self,
        chunks: AsyncIterator[bytes],
        *,
        declared_size: int,
        declared_hash: bytes,
        candidates: Iterable[str] = (),
        sink: NarSink | None = None,
    ) -> tuple[Ingested, str]:
        """Stream a NAR into a temporary file, verifying as it goes.

        Returns what was learned and the temporary handle; the caller must ``publish`` or
        ``discard`` it. Raises PayloadTooLarge or BadRequest (and stores nothing) when the NAR
        is larger than declared or allowed, shorter, malformed, or hashes differently.
        ``sink`` sees the NAR's entries as they are parsed (e.g. to hash a file's contents).
        """
        if declared_size > self.config.max_nar_bytes:
            raise PayloadTooLarge(
                f"declared NAR size {declared_size} exceeds max_nar_bytes "
                f"{self.config.max_nar_bytes}"
            )
        compression = self.config.compression
        compressor = _Compressor(compression, self.config.compression_level)
        # Uncompressed, the stored file is the NAR: its hash is the NAR hash, not a second pass.
        file_sha = hashlib.sha256() if compression is not Compression.NONE else None
        validator = NarValidator(sink) if sink is not None else NarValidator()
        scanner = ReferenceScanner(candidates)
        size = 0
        file_size = 0
        out, temp = self.storage.new_temp()

        def process(chunk: bytes) -> None:
            nonlocal file_size
            try:
                validator.feed(chunk)
            except NarError as exc:
                raise BadRequest(f"malformed NAR: {exc}") from exc
            scanner.feed(chunk)
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
                        size += len(chunk)
                        if size > declared_size:
                            raise PayloadTooLarge(
                                f"NAR is longer than its declared size of {declared_size} bytes"
                            )
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
            if size != declared_size:
                raise BadRequest(f"NAR is {size} bytes, shorter than its declared {declared_size}")
            nar_sha = validator.sha256()
            if nar_sha != declared_hash:
                raise BadRequest(
                    "NAR hash mismatch: declared "
                    f"{base32.format_hash('sha256', declared_hash)}, got "
                    f"{base32.format_hash('sha256', nar_sha)}"
                )
            try:
                validator.finish()
            except NarError as exc:
                raise BadRequest(f"malformed NAR: {exc}") from exc
        except BaseException:
            self.storage.discard(temp)
            raise
        file_hash = file_sha.digest() if file_sha is not None else nar_sha
        name = f"nar/{base32.encode(file_hash)}.nar{_EXTENSIONS[compression]}"
        return (
            Ingested(
                nar_hash=nar_sha,
                nar_size=size,
                file_name=name,
                file_hash=file_hash,
                file_size=file_size,
                references=frozenset(scanner.found),
            ),
            temp,
        )

    def discard(self, temp: str) -> None:
        self.storage.discard(temp)

    async def publish(
        self,
        temp: str,
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
        refs = tuple(sorted({StorePath.parse(r).basename for r in references}))
        info = narinfo.NarInfo(
            store_path=store_path.path,
            url=got.file_name,
            compression=str(self.config.compression),
            file_hash=base32.format_hash("sha256", got.file_hash),
            file_size=got.file_size,
            nar_hash=base32.format_hash("sha256", got.nar_hash),
            nar_size=got.nar_size,
            references=refs,
            deriver=StorePath.parse(deriver).basename if deriver else None,
            sigs=(),
            ca=ca,
        )
        signed = dataclasses.replace(info, sigs=(self.key.sign(info.fingerprint()),))
        await asyncio.to_thread(self.storage.commit, temp, got.file_name)
        async with self.engine.begin() as conn:
            inserted = await queries.insert_store_path(conn, signed, created_at=time.time())
            if not inserted:
                # Published concurrently (two steps with the same output): the first record
                # is what Nix clients have been served; keep serving exactly that.
                existing = await queries.fetch_store_path_by_hash(conn, store_path.hash_part)
                if existing is not None:
                    signed = existing
            if record is not None:
                await record(conn)
        self._infos.put(store_path.hash_part, signed)
        log.debug("published %s (%d bytes)", store_path.path, got.nar_size)
        return signed


class Upstreams:
    """Other binary caches (e.g. the public NixOS cache) asked for narinfo before building.

    Lookups run concurrently with a bounded number in flight and time out. A narinfo counts
    only when it is signed by that upstream's configured key. Paths found are remembered (a
    path an upstream has does not disappear); absences are not. An upstream that does not
    answer is an error (``UpstreamUnavailable``), never "absent": treating it as absent would
    rebuild everything it holds.
    """

    def __init__(
        self,
        upstreams: Sequence[Upstream],
        max_in_flight: int,
        timeout_secs: float,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.upstreams = list(upstreams)
        self._keys = []
        for i, up in enumerate(self.upstreams):
            try:
                self._keys.append(parse_public_key(up.public_key))
            except ValueError as exc:
                raise ConfigError(f"config key cache.upstreams[{i}].public_key: {exc}") from exc
        self._sem = asyncio.Semaphore(max_in_flight)
        self._client = httpx.AsyncClient(timeout=timeout_secs, transport=transport)
        self._known: _Lru[narinfo.NarInfo] = _Lru(MEMORY_UPSTREAM_NARINFOS)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def lookup(self, path: str) -> narinfo.NarInfo | None:
        """The first upstream's signed narinfo for ``path``, or None when no upstream has it.

        Raises UpstreamUnavailable when an upstream cannot be asked (network error, 5xx).
        """
        remembered = self._known.get(path)
        if remembered is not None:
            return remembered
        hash_part = StorePath.parse(path).hash_part
        for up, key in zip(self.upstreams, self._keys, strict=True):
            url = f"{up.url.rstrip('/')}/{hash_part}.narinfo"
            try:
                async with self._sem:
                    resp = await self._client.get(url)
            except httpx.HTTPError as exc:
                raise UpstreamUnavailable(
                    f"upstream cache {up.url} did not answer: {exc or type(exc).__name__}"
                ) from exc
            if resp.status_code in (403, 404):  # absent (S3-backed caches answer 403)
                continue
            if resp.status_code != 200:
                raise UpstreamUnavailable(
                    f"upstream cache {up.url} answered HTTP {resp.status_code} for {url}"
                )
            try:
                info = narinfo.parse(resp.text)
            except ValueError as exc:
                log.warning("upstream %s sent a bad narinfo for %s: %s", up.url, path, exc)
                continue
            if info.store_path != path:
                continue
            fingerprint = info.fingerprint()
            if not any(key.verify(fingerprint, sig) for sig in info.sigs):
                log.warning("upstream %s: %s is not signed by %s", up.url, path, key.name)
                continue
            self._known.put(path, info)
            return info
        return None

    async def have_all(self, paths: Sequence[str]) -> bool:
        """Whether upstreams hold every one of ``paths``."""
        if not self.upstreams or not paths:
            return False
        results = await asyncio.gather(*(self.lookup(p) for p in paths))
        return all(r is not None for r in results)


async def closure(cache: Cache, upstreams: Upstreams, roots: Iterable[str]) -> set[str]:
    """All paths reachable by references from ``roots`` through the cache and upstreams."""
    seen: set[str] = set()
    frontier = [r for r in set(roots)]
    while frontier:
        seen.update(frontier)
        known = await cache.references_of(frontier)
        nxt: set[str] = set()
        missing = [p for p in frontier if p not in known]
        for refs in known.values():
            nxt.update(refs)
        infos = await asyncio.gather(*(upstreams.lookup(p) for p in missing))
        for info in infos:
            if info is not None:
                nxt.update(f"/nix/store/{r}" for r in info.references)
        frontier = [p for p in nxt if p not in seen]
    return seen
