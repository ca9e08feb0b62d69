"""Derivations the agent reads straight from the runner's binary cache, without Nix.

The serve executor needs a step's parsed .drv (and the output paths of its input derivations)
but not the .drv closure in its store. A .drv is content-addressed, so what comes over HTTP is
checked against the path itself: the text store path recomputed from the file's contents and
its references (input .drvs and sources) must be the path we asked for. That makes signatures
unnecessary here, and a parsed derivation can be kept for as long as we like.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import lzma
from collections import OrderedDict
from dataclasses import dataclass

import httpx
import zstandard

from bigtent.agent.quickhttp import BodyTooLarge, QuickHttp
from bigtent.nix import narinfo
from bigtent.nix.base32 import format_hash
from bigtent.nix.drv import Derivation, DrvError, parse_drv
from bigtent.nix.nar import NarError, NarValidator
from bigtent.nix.store_path import StorePath, make_text_path

MAX_DRV_BYTES = 64 * 1024 * 1024
"""A .drv (and its NAR, compressed or not) larger than this is refused."""
DRV_CACHE_ENTRIES = 4096
DRV_CACHE_BYTES = 128 * 1024 * 1024
"""The LRU of parsed derivations keeps at most this many entries and this much .drv text."""


class DrvFetchError(Exception):
    """The .drv could not be fetched or is not what its path says."""


@dataclass(slots=True)
class _FileSink:
    """Collects the single regular file a .drv's NAR holds."""

    data: bytearray
    is_file: bool = False
    executable: bool = False
    other: bool = False

    def directory(self, path: tuple[bytes, ...]) -> None:
        self.other = True

    def file_start(self, path: tuple[bytes, ...], executable: bool, size: int) -> None:
        if path:
            self.other = True
        self.is_file = not path
        self.executable = executable
        if size > MAX_DRV_BYTES:
            raise NarError(f"a .drv of {size} bytes")

    def file_data(self, data: bytes) -> None:
        if self.is_file:
            self.data += data

    def file_end(self) -> None:
        pass

    def symlink(self, path: tuple[bytes, ...], target: bytes) -> None:
        self.other = True


def drv_from_nar(drv_path: str, nar: bytes) -> tuple[Derivation, int]:
    """Parse the .drv a NAR holds and check it is ``drv_path``; -> (derivation, text size)."""
    sink = _FileSink(bytearray())
    try:
        validator = NarValidator(sink)
        validator.feed(nar)
        validator.finish()
    except NarError as exc:
        raise DrvFetchError(f"{drv_path}: bad NAR: {exc}") from exc
    if not sink.is_file or sink.other or sink.executable:
        raise DrvFetchError(f"{drv_path}: the NAR is not one plain file")
    content = bytes(sink.data)
    return drv_from_text(drv_path, content, "the contents served"), len(content)


def drv_from_text(drv_path: str, content: bytes, what: str) -> Derivation:
    """Parse a .drv's text and check it is ``drv_path``: the text store path recomputed from
    the text and its references must be the path itself (``what`` names the text's origin in
    the error)."""
    try:
        drv = parse_drv(content.decode())
        sp = StorePath.parse(drv_path)
    except (UnicodeDecodeError, DrvError, ValueError) as exc:
        raise DrvFetchError(f"{drv_path}: {exc}") from exc
    expected = make_text_path(sp.name, hashlib.sha256(content).digest(), drv.references)
    if expected != drv_path:
        raise DrvFetchError(f"{drv_path}: {what} are those of {expected}")
    return drv


def decompress(data: bytes, compression: str) -> bytes:
    try:
        if compression in ("", "none"):
            out = data
        elif compression == "zstd":
            parts = bytearray()
            with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)) as reader:
                while len(parts) <= MAX_DRV_BYTES and (chunk := reader.read(1 << 20)):
                    parts += chunk
            out = bytes(parts)
        elif compression == "xz":
            out = lzma.LZMADecompressor().decompress(data, MAX_DRV_BYTES + 1)
        else:
            raise DrvFetchError(f"unsupported NAR compression {compression!r}")
    except (zstandard.ZstdError, lzma.LZMAError) as exc:
        raise DrvFetchError(f"cannot decompress the NAR ({compression}): {exc}") from exc
    if len(out) > MAX_DRV_BYTES:
        raise DrvFetchError(f"a .drv NAR larger than {MAX_DRV_BYTES} bytes")
    return out


class DrvCache:
    """Fetches parsed derivations from a binary cache over HTTP, remembering them (LRU).

    With ``quick`` the GETs go through it (``agent/quickhttp.py``), and through ``http``
    when it declines (a redirect, no connection)."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        quick: QuickHttp | None = None,
        max_entries: int = DRV_CACHE_ENTRIES,
        max_bytes: int = DRV_CACHE_BYTES,
    ) -> None:
        self._http = http
        self._quick = quick
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[Derivation, int]] = OrderedDict()
        self._bytes = 0
        self._pending: dict[str, asyncio.Task[Derivation]] = {}
        """Fetches under way, asked for or started ahead (``_prefetch_inputs``)."""
        self.fetches = 0

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, cache_url: str, drv_path: str) -> Derivation:
        """The parsed derivation; fetched once however many ask for it at the same time."""
        hit = self._entries.get(drv_path)
        if hit is not None:
            self._entries.move_to_end(drv_path)
            return hit[0]
        pending = self._pending.get(drv_path)
        if pending is None:
            pending = self._start(cache_url.rstrip("/"), drv_path)
        # Shielded: a step that is aborted stops waiting; the fetch goes on for the others.
        return await asyncio.shield(pending)

    async def aclose(self) -> None:
        """Cancel the fetches under way (the agent is exiting)."""
        pending, self._pending = list(self._pending.values()), {}
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def _start(self, base: str, drv_path: str) -> asyncio.Task[Derivation]:
        task = asyncio.get_running_loop().create_task(self._load(base, drv_path))
        self._pending[drv_path] = task

        def done(t: asyncio.Task[Derivation]) -> None:
            if self._pending.get(drv_path) is t:
                del self._pending[drv_path]
            if not t.cancelled():
                t.exception()  # retrieved: an unawaited prefetch's failure is not an error

        task.add_done_callback(done)
        return task

    async def _load(self, base: str, drv_path: str) -> Derivation:
        drv, size = await self._fetch(base, drv_path)
        if drv_path not in self._entries:
            self._entries[drv_path] = (drv, size)
            self._bytes += size
        while self._entries and (
            len(self._entries) > self._max_entries or self._bytes > self._max_bytes
        ):
            _, (_, old) = self._entries.popitem(last=False)
            self._bytes -= old
        return drv

    def _prefetch_inputs(self, base: str, drv_path: str, info: narinfo.NarInfo) -> None:
        """Start fetching the input .drvs a .drv's narinfo names among its references, while
        its own NAR is fetched: the serve way needs them next (one round trip less per
        step). Each is checked against its path like any other."""
        store_dir = drv_path.rsplit("/", 1)[0]
        for ref in info.references:
            path = f"{store_dir}/{ref}"
            wanted = ref.endswith(".drv") and path != drv_path
            if wanted and path not in self._entries and path not in self._pending:
                self._start(base, path)

    async def _fetch(self, base: str, drv_path: str) -> tuple[Derivation, int]:
        try:
            sp = StorePath.parse(drv_path)
        except ValueError as exc:
            raise DrvFetchError(str(exc)) from exc
        self.fetches += 1
        text = await self._get(f"{base}/{sp.hash_part}.narinfo", drv_path)
        try:
            info = narinfo.parse(text.decode())
        except (UnicodeDecodeError, ValueError) as exc:
            raise DrvFetchError(f"{drv_path}: bad narinfo: {exc}") from exc
        self._prefetch_inputs(base, drv_path, info)
        url = info.url if "://" in info.url else f"{base}/{info.url.lstrip('/')}"
        nar = decompress(await self._get(url, drv_path), info.compression)
        nar_hash = format_hash("sha256", hashlib.sha256(nar).digest())
        if len(nar) != info.nar_size or nar_hash != info.nar_hash:
            raise DrvFetchError(f"{drv_path}: the NAR does not match its narinfo")
        return drv_from_nar(drv_path, nar)

    async def _get(self, url: str, drv_path: str) -> bytes:
        if self._quick is not None:
            try:
                got = await self._quick.get(url, MAX_DRV_BYTES)
            except BodyTooLarge as exc:
                raise DrvFetchError(f"{drv_path}: {url} is larger than {MAX_DRV_BYTES}") from exc
            if got is not None:
                status, content = got
                _check_status(status, url, drv_path)
                return content
        try:
            # A cache whose NARs live in S3 answers with a redirect to a presigned URL.
            async with self._http.stream("GET", url, follow_redirects=True) as response:
                _check_status(response.status_code, url, drv_path)
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_DRV_BYTES:
                        raise DrvFetchError(f"{drv_path}: {url} is larger than {MAX_DRV_BYTES}")
                return bytes(body)
        except httpx.HTTPError as exc:
            raise DrvFetchError(f"{drv_path}: {url}: {exc}") from exc


def _check_status(status: int, url: str, drv_path: str) -> None:
    if status == 404:
        raise DrvFetchError(f"{drv_path} is not in the cache ({url}: HTTP 404)")
    if not 200 <= status < 300:
        raise DrvFetchError(f"{drv_path}: {url}: HTTP {status}")
