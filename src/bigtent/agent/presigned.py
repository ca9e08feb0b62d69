"""Presigned uploads, the agent's side: compress an output's NAR into the cache's file format,
ask the runner for a presigned URL, PUT the file straight to the bucket, report it (docs/api.md).

The runner verifies everything the agent declares (NAR hash and size, file hash and size,
the NAR's form and references) before it signs anything; the agent only saves the runner the
bandwidth and the compression.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from pydantic import ValidationError

from bigtent import protocol as p
from bigtent.nix.base32 import format_hash
from bigtent.nix.compression import Compression, Compressor

MEMORY_FILE_BYTES = 1024 * 1024
"""A compressed file up to this size stays in memory; a larger one goes to a temporary file
in the agent's work dir (``uploads/``)."""
FILE_CHUNK_BYTES = 256 * 1024
COMPLETE_BASE_SECS = 300.0
COMPLETE_MIN_BYTES_PER_SEC = 4 * 1024 * 1024
"""The runner verifies an upload before it answers ``complete``: the agent waits
``COMPLETE_BASE_SECS`` plus the NAR's size at this rate, so a large NAR is never cut off by a
fixed timeout."""


def complete_timeout_secs(nar_size: int) -> float:
    """How long to wait for the runner's answer to ``complete`` (it verifies the NAR first)."""
    return COMPLETE_BASE_SECS + nar_size / COMPLETE_MIN_BYTES_PER_SEC


@dataclass
class PreparedFile:
    """An output's NAR, hashed, and its compressed file, in memory or in ``path``."""

    nar_hash: str
    nar_size: int
    compression: Compression
    file_hash: str
    file_size: int
    data: bytes | None = None
    path: Path | None = None

    def declaration(self) -> p.UploadDeclaration:
        return p.UploadDeclaration(
            nar_hash=self.nar_hash,
            nar_size=self.nar_size,
            compression=str(self.compression),
            file_hash=self.file_hash,
            file_size=self.file_size,
        )

    def body(self) -> bytes | AsyncIterator[bytes]:
        """The file for one PUT: the bytes, or the temporary file streamed from the start."""
        if self.data is not None:
            return self.data
        assert self.path is not None
        return _stream_file(self.path)

    def remove(self) -> None:
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


class _Builder:
    """Hashes NAR chunks, compresses them, hashes the file, keeps it in memory until it
    grows past ``MEMORY_FILE_BYTES``, then spills it to a temporary file."""

    def __init__(self, compression: Compression, level: int, tmp_dir: Path) -> None:
        self.compression = compression
        self._compressor = Compressor(compression, level)
        self._nar_sha = hashlib.sha256()
        self._file_sha = hashlib.sha256()
        self.nar_size = 0
        self.file_size = 0
        self._memory = bytearray()
        self._tmp_dir = tmp_dir
        self._file: tempfile._TemporaryFileWrapper[bytes] | None = None
        self.path: Path | None = None

    def _write(self, data: bytes) -> None:
        if not data:
            return
        self._file_sha.update(data)
        self.file_size += len(data)
        if self._file is None and self.file_size <= MEMORY_FILE_BYTES:
            self._memory += data
            return
        if self._file is None:
            self._tmp_dir.mkdir(parents=True, exist_ok=True)
            # Kept open across feeds and closed in finish/abandon: no context manager fits.
            self._file = tempfile.NamedTemporaryFile(  # noqa: SIM115
                dir=self._tmp_dir, suffix=".upload", delete=False
            )
            self.path = Path(self._file.name)
            self._file.write(self._memory)
            self._memory = bytearray()
        self._file.write(data)

    def feed(self, chunk: bytes) -> None:
        self._nar_sha.update(chunk)
        self.nar_size += len(chunk)
        self._write(self._compressor.compress(chunk))

    def finish(self) -> PreparedFile:
        self._write(self._compressor.flush())
        if self._file is not None:
            self._file.close()
        return PreparedFile(
            nar_hash=format_hash("sha256", self._nar_sha.digest()),
            nar_size=self.nar_size,
            compression=self.compression,
            file_hash=format_hash("sha256", self._file_sha.digest()),
            file_size=self.file_size,
            data=None if self.path is not None else bytes(self._memory),
            path=self.path,
        )

    def abandon(self) -> None:
        if self._file is not None:
            self._file.close()
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


async def prepare_from_iter(
    chunks: Iterator[bytes], compression: Compression, level: int, tmp_dir: Path
) -> PreparedFile:
    """Hash and compress a NAR produced by a blocking iterator (``dump_path``), in a worker
    thread: it costs CPU in proportion to the NAR."""
    builder = _Builder(compression, level, tmp_dir)

    def run() -> PreparedFile:
        try:
            for chunk in chunks:
                builder.feed(chunk)
            return builder.finish()
        except BaseException:
            builder.abandon()
            raise

    return await asyncio.to_thread(run)


async def prepare_from_stream(
    chunks: AsyncIterator[bytes], compression: Compression, level: int, tmp_dir: Path
) -> PreparedFile:
    """As ``prepare_from_iter``, for a NAR streamed by ``nix-store --dump``."""
    builder = _Builder(compression, level, tmp_dir)
    try:
        async for chunk in chunks:
            await asyncio.to_thread(builder.feed, chunk)
        return builder.finish()
    except BaseException:
        builder.abandon()
        raise
    finally:
        if isinstance(chunks, AsyncGenerator):
            await chunks.aclose()


async def _stream_file(path: Path) -> AsyncGenerator[bytes, None]:
    file = await asyncio.to_thread(path.open, "rb")
    try:
        while chunk := await asyncio.to_thread(file.read, FILE_CHUNK_BYTES):
            yield chunk
    finally:
        file.close()


def parse_plan(response: httpx.Response) -> p.UploadPlan:
    """The runner's ``presign`` answer; ValueError when it is not one."""
    try:
        return p.UploadPlan.model_validate_json(response.content)
    except ValidationError as exc:
        raise ValueError(f"the runner's presign answer is not an upload plan: {exc}") from exc


def bucket_status_is_retried(status: int) -> bool:
    """Whether a failed PUT to the bucket is tried again (with a fresh presigned URL): 5xx,
    408, 429, and 403 (the URL expired before the upload started, or the clock is off)."""
    return status >= 500 or status in (403, 408, 429)


def remove_stale_uploads(tmp_dir: Path) -> None:
    """Temporary files left by an agent that stopped mid-upload."""
    if tmp_dir.is_dir():
        for leftover in tmp_dir.glob("*.upload"):
            with contextlib.suppress(OSError):
                os.unlink(leftover)
