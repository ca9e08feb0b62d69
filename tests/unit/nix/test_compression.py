"""NAR file compression and the bounded decompressor (no I/O): round trips in any chunking,
a hard stop at the limit however the input was made, and only complete streams accepted."""

from __future__ import annotations

import lzma
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from bigtent.nix.compression import (
    MAX_BURST_BYTES,
    BoundedDecompressor,
    Compression,
    Compressor,
    DecompressedTooLarge,
    DecompressionError,
    compress_whole,
    compressed_size_bound,
    decompress_all,
)


def compress(data: bytes, compression: Compression, level: int = 3) -> bytes:
    c = Compressor(compression, level)
    return c.compress(data) + c.flush()


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(st.binary(min_size=1, max_size=3000), min_size=1, max_size=4),
    compression=st.sampled_from(list(Compression)),
    level=st.integers(1, 9),
)
def test_a_whole_file_decompresses_as_a_streamed_one(
    data: list[bytes], compression: Compression, level: int
) -> None:
    # Files made one after another by the same (reused) compressor are each complete.
    files = [compress_whole(d, compression, level) for d in data]
    for d, file in zip(data, files, strict=True):
        out, _ = feed_in_pieces(BoundedDecompressor(compression, len(d)), file, 7)
        assert out == d
        assert decompress_all(file, compression, len(d)) == decompress_all(
            compress(d, compression, level), compression, len(d)
        )
        assert len(file) <= compressed_size_bound(len(d), compression)


def test_whole_files_from_threads_at_once_are_each_complete() -> None:
    data = [bytes([i]) * 500 + bytes(range(256)) * i for i in range(16)]
    with ThreadPoolExecutor(4) as pool:
        files = list(
            pool.map(lambda d: [compress_whole(d, Compression.ZSTD, 3) for _ in range(50)], data)
        )
    for d, made in zip(data, files, strict=True):
        assert {decompress_all(f, Compression.ZSTD, len(d)) for f in made} == {d}


def feed_in_pieces(dec: BoundedDecompressor, data: bytes, step: int) -> tuple[bytes, int]:
    """Everything ``dec`` yields for ``data`` fed ``step`` bytes at a time, and the largest
    single chunk it yielded."""
    out = bytearray()
    largest = 0
    for i in range(0, len(data), step):
        for chunk in dec.feed(data[i : i + step]):
            largest = max(largest, len(chunk))
            out += chunk
    dec.finish()
    return bytes(out), largest


@settings(max_examples=60, deadline=None)
@given(
    data=st.binary(max_size=20_000) | st.builds(lambda n: b"ab" * n, st.integers(0, 100_000)),
    compression=st.sampled_from(list(Compression)),
    step=st.integers(1, 70_000),
    level=st.integers(1, 9),
)
def test_round_trip_in_any_chunking(
    data: bytes, compression: Compression, step: int, level: int
) -> None:
    file = compress(data, compression, level)
    out, _ = feed_in_pieces(BoundedDecompressor(compression, len(data)), file, step)
    assert out == data
    assert len(file) <= compressed_size_bound(len(data), compression)


@pytest.mark.parametrize("compression", [Compression.ZSTD, Compression.XZ])
def test_the_bound_holds_for_incompressible_data(compression: Compression) -> None:
    for size in (0, 1, 1000, 128 * 1024 + 7, 1024 * 1024):
        data = os.urandom(size)
        assert len(compress(data, compression, 6)) <= compressed_size_bound(size, compression)


def test_none_is_the_nar_itself() -> None:
    assert compress(b"nar", Compression.NONE) == b"nar"
    assert compressed_size_bound(1234, Compression.NONE) == 1234


@pytest.mark.parametrize("compression", [Compression.ZSTD, Compression.XZ])
def test_a_bomb_stops_at_the_limit_without_expanding(compression: Compression) -> None:
    """A small file that expands to 256 MiB (zstd) or 64 MiB (xz): refused after at most one
    bounded burst."""
    if compression is Compression.ZSTD:
        cobj = zstandard.ZstdCompressor(level=3).compressobj()
        zeros = bytes(1 << 20)
        bomb = b"".join([*(cobj.compress(zeros) for _ in range(256)), cobj.flush()])
    else:
        lz = lzma.LZMACompressor(format=lzma.FORMAT_XZ, preset=1)
        zeros = bytes(1 << 20)
        bomb = b"".join([*(lz.compress(zeros) for _ in range(64)), lz.flush()])
    assert len(bomb) < 64 * 1024
    dec = BoundedDecompressor(compression, 10_000)
    largest = 0
    started = time.monotonic()
    with pytest.raises(DecompressedTooLarge):
        for chunk in dec.feed(bomb):
            largest = max(largest, len(chunk))
    assert dec.produced <= 10_000 + MAX_BURST_BYTES
    assert largest <= MAX_BURST_BYTES
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("compression", list(Compression))
def test_exactly_the_limit_is_fine_one_more_byte_is_not(compression: Compression) -> None:
    data = os.urandom(5000)
    file = compress(data, compression)
    assert decompress_all(file, compression, 5000) == data
    with pytest.raises(DecompressedTooLarge):
        decompress_all(file, compression, 4999)


@pytest.mark.parametrize("compression", [Compression.ZSTD, Compression.XZ])
@pytest.mark.parametrize("cut", [1, 4, 12, 100])
def test_truncated_streams_are_refused(compression: Compression, cut: int) -> None:
    data = os.urandom(300) + b"a" * 50_000
    if compression is Compression.ZSTD:
        # With a content checksum, the last 4 bytes carry no data: cut them and only the
        # frame's end is missing.
        file = zstandard.ZstdCompressor(level=3, write_checksum=True).compress(data)
    else:
        file = compress(data, compression)
    with pytest.raises(DecompressionError, match="truncated"):
        feed_in_pieces(BoundedDecompressor(compression, len(data)), file[:-cut], 7)


@pytest.mark.parametrize("compression", [Compression.ZSTD, Compression.XZ])
def test_trailing_garbage_and_empty_files_are_refused(compression: Compression) -> None:
    file = compress(b"hello", compression)
    for bad in (file + b"garbage!", file + b"\0"):
        with pytest.raises(DecompressionError):
            decompress_all(bad, compression, 100)
    with pytest.raises(DecompressionError, match="empty"):
        decompress_all(b"", compression, 100)
    with pytest.raises(DecompressionError):
        decompress_all(b"not compressed at all", compression, 100)


@pytest.mark.parametrize("compression", [Compression.ZSTD, Compression.XZ])
@pytest.mark.parametrize("step", [1, 5, 1 << 16])
def test_concatenated_streams_are_one_file(compression: Compression, step: int) -> None:
    file = compress(b"first ", compression) + compress(b"second", compression)
    out, _ = feed_in_pieces(BoundedDecompressor(compression, 12), file, step)
    assert out == b"first second"
