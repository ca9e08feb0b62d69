"""An output's NAR, produced in Python from the store's real path: its SHA-256 and size, and
the NAR again as an async stream (for the upload)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator
from pathlib import Path

from bigtent.nix.nar import dump_path

NAR_CHUNK_BYTES = 256 * 1024
SMALL_NAR_BYTES = 1024 * 1024
"""NARs up to this size are hashed on the event loop and kept in memory between hashing and
uploading; larger ones are hashed in a thread and read again for the upload."""


async def hash_local(real: Path) -> tuple[bytes, int, list[bytes] | None]:
    """sha256 and size of the NAR of ``real``; the chunks too when it is small.

    The first ``SMALL_NAR_BYTES`` are produced on the event loop (a small path costs no thread
    hop); the rest of a large NAR is hashed in a worker thread.
    """
    hasher = hashlib.sha256()
    size = 0
    chunks: list[bytes] = []
    it = dump_path(real, NAR_CHUNK_BYTES)
    for chunk in it:
        hasher.update(chunk)
        size += len(chunk)
        chunks.append(chunk)
        if size > SMALL_NAR_BYTES:
            break
    else:
        return hasher.digest(), size, chunks

    def rest() -> int:
        n = 0
        for chunk in it:
            hasher.update(chunk)
            n += len(chunk)
        return n

    size += await asyncio.to_thread(rest)
    return hasher.digest(), size, None


async def stream_local(real: Path) -> AsyncGenerator[bytes, None]:
    """The NAR of ``real`` as an async stream, each chunk read in a worker thread."""
    it = dump_path(real, NAR_CHUNK_BYTES)
    try:
        while (chunk := await asyncio.to_thread(_next_or_none, it)) is not None:
            yield chunk
    finally:
        if isinstance(it, Generator):
            it.close()


def _next_or_none(it: Iterator[bytes]) -> bytes | None:
    return next(it, None)


async def hash_stream(chunks: AsyncIterator[bytes]) -> tuple[bytes, int]:
    """sha256 and size of a NAR read from ``chunks`` (``nix-store --dump``), which is closed."""
    hasher = hashlib.sha256()
    size = 0
    try:
        async for chunk in chunks:
            hasher.update(chunk)
            size += len(chunk)
    finally:
        if isinstance(chunks, AsyncGenerator):
            await chunks.aclose()
    return hasher.digest(), size
