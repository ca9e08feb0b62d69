"""NAR file compression as Nix binary caches use it (``Compression: zstd | xz | none``): a
streaming compressor, and a decompressor with a hard stop at a declared size (pure, no I/O).

The bounded decompressor is what lets the runner read a compressed file it did not write (an
agent's presigned upload) without trusting it: whatever the input, it never holds more than
about ``MAX_BURST_BYTES`` of output at once and raises ``DecompressedTooLarge`` as soon as the
output passes the limit, so a small file that expands to terabytes costs nothing.
"""

from __future__ import annotations

import lzma
import threading
from collections.abc import Iterator
from enum import StrEnum
from typing import Any

import zstandard


class Compression(StrEnum):
    """A narinfo's ``Compression`` value; also ``[cache] compression``."""

    ZSTD = "zstd"
    XZ = "xz"
    NONE = "none"


EXTENSIONS = {Compression.ZSTD: ".zst", Compression.XZ: ".xz", Compression.NONE: ""}
"""The file name suffix after ``.nar`` for each compression (``nar/<hash>.nar.zst``)."""

ZSTD_INPUT_SLICE_BYTES = 1024
"""Compressed zstd input is fed to the decoder at most this much at a time. One zstd block
(at most 128 KiB of output) takes at least 4 bytes (an RLE block), so one slice yields at most
32 MiB: the bound on the output held at once, however the input was made."""
XZ_OUTPUT_CHUNK_BYTES = 1024 * 1024
"""The xz decoder is asked for at most this much output per call (``max_length``)."""
MAX_BURST_BYTES = ZSTD_INPUT_SLICE_BYTES * 32 * 1024 + 128 * 1024
"""The most output one ``feed`` step can produce before the limit is checked."""


class DecompressionError(ValueError):
    """The input is not a complete, valid stream of its compression."""


class DecompressedTooLarge(DecompressionError):
    """The input decompresses to more than the limit (a decompression bomb, or a lie)."""


def compressed_size_bound(nar_size: int, compression: Compression) -> int:
    """The largest file a NAR of ``nar_size`` bytes can honestly compress to: exactly the NAR
    for ``none``; for zstd and xz the NAR plus the formats' worst-case overhead on
    incompressible data (zstd: ``ZSTD_COMPRESSBOUND``, 1/256 plus a little; xz: a few bytes
    per 64 KiB chunk plus headers), rounded up generously."""
    if compression is Compression.NONE:
        return nar_size
    return nar_size + nar_size // 128 + 64 * 1024


def xz_preset(level: int) -> int:
    """The xz preset for a configured compression level (zstd's scale goes past xz's 9)."""
    return min(level, 9)


class Compressor:
    """Streaming compression of a NAR into a cache file."""

    def __init__(self, compression: Compression, level: int) -> None:
        self.compression = compression
        self._obj: Any
        if compression is Compression.ZSTD:
            self._obj = zstandard.ZstdCompressor(level=level).compressobj()
        elif compression is Compression.XZ:
            self._obj = lzma.LZMACompressor(format=lzma.FORMAT_XZ, preset=xz_preset(level))
        else:
            self._obj = None

    def compress(self, data: bytes) -> bytes:
        return self._obj.compress(data) if self._obj is not None else data

    def flush(self) -> bytes:
        return self._obj.flush() if self._obj is not None else b""


_whole = threading.local()
"""Each thread's zstd compressors by level, for ``compress_whole`` (one is not thread-safe)."""


def compress_whole(data: bytes, compression: Compression, level: int) -> bytes:
    """``data`` compressed as one complete file, as a ``Compressor`` fed it all would make
    (for zstd one frame, which also records its content size): for a small NAR held whole,
    without a streaming compressor's set-up per file (~40 us for zstd, more than a NAR of a
    few hundred bytes costs to compress). The zstd compressor of a level is made once per
    thread and reused: each ``compress`` call is a frame of its own."""
    if compression is Compression.ZSTD:
        compressors: dict[int, zstandard.ZstdCompressor] = _whole.__dict__.setdefault("zstd", {})
        compressor = compressors.get(level)
        if compressor is None:
            compressor = compressors[level] = zstandard.ZstdCompressor(level=level)
        return compressor.compress(data)
    if compression is Compression.XZ:
        return lzma.compress(data, format=lzma.FORMAT_XZ, preset=xz_preset(level))
    return data


class BoundedDecompressor:
    """Decompresses a cache file fed in pieces, refusing to produce more than ``max_bytes``.

    ``feed`` yields output chunks; ``finish`` checks that the input ended at the end of a
    complete stream (a truncated file, or bytes after the last frame, are errors, as they are
    for Nix). Concatenated zstd frames and xz streams are accepted (both formats allow them).
    """

    def __init__(self, compression: Compression, max_bytes: int) -> None:
        self.compression = compression
        self.max_bytes = max_bytes
        self.produced = 0
        self.streams = 0
        """Complete zstd frames or xz streams seen so far."""
        self._obj: Any = self._new()
        self._in_stream = False
        """Whether a zstd frame or xz stream has started and not ended."""

    def _new(self) -> Any:
        if self.compression is Compression.ZSTD:
            return zstandard.ZstdDecompressor().decompressobj(write_size=128 * 1024)
        if self.compression is Compression.XZ:
            return lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        return None

    def _count(self, out: bytes) -> bytes:
        self.produced += len(out)
        if self.produced > self.max_bytes:
            raise DecompressedTooLarge(f"the file decompresses to more than {self.max_bytes} bytes")
        return out

    def feed(self, data: bytes) -> Iterator[bytes]:
        """The output ``data`` adds (possibly none), in chunks of bounded size."""
        if not data:
            return
        if self.compression is Compression.NONE:
            yield self._count(data)
        elif self.compression is Compression.ZSTD:
            yield from self._feed_zstd(memoryview(data))
        else:
            yield from self._feed_xz(data)

    def _end_stream(self) -> bytes:
        """A frame or stream ended: the input after it (to start the next one with)."""
        rest: bytes = self._obj.unused_data
        self.streams += 1
        self._in_stream = False
        self._obj = self._new()
        return rest

    def _feed_zstd(self, data: memoryview) -> Iterator[bytes]:
        pos = 0
        while pos < len(data):
            piece = data[pos : pos + ZSTD_INPUT_SLICE_BYTES]
            try:
                out = self._obj.decompress(piece)
            except zstandard.ZstdError as exc:
                raise DecompressionError(f"invalid zstd data: {exc}") from exc
            self._in_stream = True
            pos += len(piece)
            if self._obj.eof:
                pos -= len(self._end_stream())
            if out:
                yield self._count(out)

    def _feed_xz(self, data: bytes) -> Iterator[bytes]:
        pending = data
        while pending or not self._obj.needs_input:
            try:
                out = self._obj.decompress(pending, max_length=XZ_OUTPUT_CHUNK_BYTES)
            except lzma.LZMAError as exc:
                raise DecompressionError(f"invalid xz data: {exc}") from exc
            self._in_stream = True
            pending = b""
            if self._obj.eof:
                pending = self._end_stream()
            if out:
                yield self._count(out)

    def finish(self) -> None:
        """Raise unless the input ended exactly at the end of a stream."""
        if self.compression is Compression.NONE:
            return
        if self._in_stream:
            raise DecompressionError(f"the {self.compression} data is truncated")
        if self.streams == 0:
            raise DecompressionError(f"the file is empty: no {self.compression} data")


def decompress_all(data: bytes, compression: Compression, max_bytes: int) -> bytes:
    """All of ``data`` decompressed, bounded by ``max_bytes`` (small files: .drv NARs)."""
    dec = BoundedDecompressor(compression, max_bytes)
    out = b"".join(dec.feed(data))
    dec.finish()
    return out
