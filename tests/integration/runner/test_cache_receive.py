"""``Cache.receive`` on large NARs: processed in batches in a worker thread while the next
batch is received; the same result as inline, and nothing left behind on any error. On small
NARs: held whole and staged once checked; the same result as streamed, nothing staged for a
bad one."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import BinaryIO, NoReturn

import pytest
import zstandard

from bigtent.config import CacheSection
from bigtent.errors import BadRequest, PayloadTooLarge, StorageFull
from bigtent.nix.compression import Compression, decompress_all
from bigtent.nix.keys import generate_key
from bigtent.nix.nar import dump_path
from bigtent.runner.cache import intake as cache_module
from bigtent.runner.cache.narcheck import Ingested, nar_file_name
from bigtent.runner.cache.service import Cache
from bigtent.runner.cache.storage import LocalStaged, LocalStorage, Staged
from bigtent.runner.db.migrate import create_engine
from bigtent.runner.metrics import UploadKind

HASH_PART = "0c2kb5l5lrafkvr8nfbq4ps3zb6z2qkb"
CHUNK = 64 * 1024


@pytest.fixture
def big_nar(tmp_path: Path) -> bytes:
    """A NAR of about 5 MiB whose contents name a store hash part across a batch boundary."""
    rng = random.Random(5)
    tree = tmp_path / "tree"
    tree.mkdir()
    head = rng.randbytes(cache_module.INGEST_BATCH_BYTES - 200)
    (tree / "a").write_bytes(head + f"/nix/store/{HASH_PART}-dep".encode() + rng.randbytes(4 << 20))
    (tree / "b").write_bytes(b"text " * 50_000)
    return b"".join(dump_path(tree))


def make_cache(tmp_path: Path, compression: Compression) -> Cache:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path}/db.sqlite")
    config = CacheSection(compression=compression)
    return Cache(engine, LocalStorage(tmp_path / "cache"), generate_key("t-1"), config, "http://x")


async def chunks_of(data: bytes, size: int = CHUNK) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def leftovers(tmp_path: Path) -> list[Path]:
    return list((tmp_path / "cache" / "tmp").iterdir())


@pytest.mark.parametrize("compression", [Compression.NONE, Compression.ZSTD])
async def test_a_large_nar_in_small_chunks_is_received_whole(
    tmp_path: Path, big_nar: bytes, compression: Compression
) -> None:
    cache = make_cache(tmp_path, compression)
    digest = hashlib.sha256(big_nar).digest()
    got, temp = await cache.receive(
        chunks_of(big_nar),
        kind=UploadKind.OUTPUT,
        declared_size=len(big_nar),
        declared_hash=digest,
        candidates=[HASH_PART, "1" * 32],
    )
    assert len(big_nar) > 4 * cache_module.INGEST_BATCH_BYTES
    assert got.nar_hash == digest and got.nar_size == len(big_nar)
    assert got.references == {HASH_PART}
    assert isinstance(temp, LocalStaged)
    stored = Path(temp.path).read_bytes()
    assert got.file_size == len(stored) and got.file_hash == hashlib.sha256(stored).digest()
    if compression is Compression.ZSTD:
        stored = zstandard.ZstdDecompressor().decompressobj().decompress(stored)
    assert stored == big_nar
    await temp.discard()
    await cache.engine.dispose()


def _corrupt_structure(nar: bytes) -> bytes:
    """The second file's name token mangled: malformed, well past the first batch."""
    at = nar.index(b"\x01\x00\x00\x00\x00\x00\x00\x00b\x00")
    return nar[:at] + b"\x01\x00\x00\x00\x00\x00\x00\x00!\x00" + nar[at + 10 :]


def _cases(nar: bytes) -> Iterator[tuple[str, bytes, type[Exception], str]]:
    flipped = bytearray(nar)
    flipped[len(nar) // 2] ^= 0xFF
    yield "hash mismatch", bytes(flipped), BadRequest, "hash mismatch"
    yield "malformed late", _corrupt_structure(nar), BadRequest, "malformed NAR"
    yield "longer than declared", nar + b"\0" * 8, PayloadTooLarge, "longer than"
    yield "shorter than declared", nar[:-8], BadRequest, "shorter than"


@pytest.mark.parametrize("case", ["hash mismatch", "malformed late", "longer", "shorter"])
async def test_a_bad_large_nar_is_refused_and_leaves_nothing(
    tmp_path: Path, big_nar: bytes, case: str
) -> None:
    cache = make_cache(tmp_path, Compression.ZSTD)
    [(_, body, error, message)] = [c for c in _cases(big_nar) if c[0].startswith(case)]
    with pytest.raises(error, match=message):
        await cache.receive(
            chunks_of(body),
            kind=UploadKind.OUTPUT,
            declared_size=len(big_nar),
            declared_hash=hashlib.sha256(big_nar).digest(),
        )
    assert leftovers(tmp_path) == []
    await cache.engine.dispose()


async def test_a_failure_while_a_batch_is_in_flight_waits_for_it(
    tmp_path: Path, big_nar: bytes
) -> None:
    """The upload breaks off (the client went away) while a batch is being processed: the
    batch finishes before the temporary file is closed and removed."""
    cache = make_cache(tmp_path, Compression.ZSTD)

    async def broken() -> AsyncIterator[bytes]:
        async for chunk in chunks_of(big_nar[: 3 * cache_module.INGEST_BATCH_BYTES]):
            yield chunk
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        await cache.receive(
            broken(),
            kind=UploadKind.OUTPUT,
            declared_size=len(big_nar),
            declared_hash=hashlib.sha256(big_nar).digest(),
        )
    assert leftovers(tmp_path) == []
    await cache.engine.dispose()


@pytest.mark.parametrize("fails", ["new_temp", "write"])
async def test_an_upload_refused_for_full_storage_is_read_to_its_end_first(
    tmp_path: Path, big_nar: bytes, monkeypatch: pytest.MonkeyPatch, fails: str
) -> None:
    """Whether the storage cannot make the staged file or cannot write it, the rest of the
    body is read before StorageFull is raised (a connection closed with unread bytes is
    reset, and the client would never see the 507)."""
    cache = make_cache(tmp_path, Compression.NONE)
    full = OSError(errno.ENOSPC, "No space left on device")
    if fails == "new_temp":

        def no_temp() -> NoReturn:
            raise full

        monkeypatch.setattr(cache.storage, "new_temp", no_temp)
    else:

        def no_room(self: cache_module.StoredFile, chunk: bytes) -> NoReturn:
            raise full

        monkeypatch.setattr(cache_module.StoredFile, "write", no_room)
    sent = 0

    async def counted() -> AsyncIterator[bytes]:
        nonlocal sent
        async for chunk in chunks_of(big_nar):
            sent += len(chunk)
            yield chunk

    with pytest.raises(StorageFull):
        await cache.receive(
            counted(),
            kind=UploadKind.OUTPUT,
            declared_size=len(big_nar),
            declared_hash=hashlib.sha256(big_nar).digest(),
        )
    assert sent == len(big_nar)
    assert leftovers(tmp_path) == []
    await cache.engine.dispose()


# ---- small NARs: held whole, compressed in one call, written in one --------------------------
@pytest.fixture
def small_nar(tmp_path: Path) -> bytes:
    """A NAR of a few hundred bytes, as most outputs are, naming a store hash part."""
    tree = tmp_path / "small"
    tree.mkdir()
    (tree / "a").write_text(f"1-2 /nix/store/{HASH_PART}-dep\n")
    (tree / "b").write_text("text\n" * 20)
    nar = b"".join(dump_path(tree))
    assert len(nar) <= cache_module.WHOLE_NAR_BYTES
    return nar


@pytest.mark.parametrize("compression", list(Compression))
@pytest.mark.parametrize("chunk", [7, CHUNK])
async def test_a_small_nar_is_received_as_a_streamed_one_is(
    tmp_path: Path,
    small_nar: bytes,
    compression: Compression,
    chunk: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = make_cache(tmp_path, compression)
    digest = hashlib.sha256(small_nar).digest()

    async def receive() -> tuple[Ingested, bytes]:
        got, staged = await cache.receive(
            chunks_of(small_nar, chunk),
            kind=UploadKind.OUTPUT,
            declared_size=len(small_nar),
            declared_hash=digest,
            candidates=[HASH_PART, "1" * 32],
        )
        assert isinstance(staged, LocalStaged)
        stored = Path(staged.path).read_bytes()
        await staged.discard()
        return got, stored

    whole, stored = await receive()
    assert whole.nar_hash == digest and whole.nar_size == len(small_nar)
    assert whole.references == {HASH_PART}
    assert whole.file_size == len(stored) and whole.file_hash == hashlib.sha256(stored).digest()
    assert whole.file_name == nar_file_name(whole.file_hash, compression)
    assert decompress_all(stored, compression, len(small_nar)) == small_nar
    monkeypatch.setattr(cache_module, "WHOLE_NAR_BYTES", 0)  # the streamed way
    streamed, streamed_file = await receive()
    assert (
        dataclasses.replace(
            streamed,
            file_name=whole.file_name,
            file_hash=whole.file_hash,
            file_size=whole.file_size,
        )
        == whole
    )
    assert decompress_all(streamed_file, compression, len(small_nar)) == small_nar
    if compression is Compression.NONE:
        assert streamed == whole and streamed_file == stored
    assert leftovers(tmp_path) == []
    assert _verified(cache) == 2
    await cache.engine.dispose()


def _verified(cache: Cache) -> float:
    value = cache.metrics.registry.get_sample_value(
        "bigtent_uploads_verified_total", {"kind": "output"}
    )
    return value or 0.0


def _failed(cache: Cache) -> float:
    return sum(
        s.value
        for m in cache.metrics.registry.collect()
        for s in m.samples
        if s.name == "bigtent_upload_failures_total" and s.labels.get("kind") == "output"
    )


@pytest.mark.parametrize("case", ["hash mismatch", "malformed late", "longer", "shorter"])
async def test_a_bad_small_nar_is_refused_and_stages_nothing(
    tmp_path: Path, small_nar: bytes, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = make_cache(tmp_path, Compression.ZSTD)
    staged_files = 0
    new_temp = cache.storage.new_temp

    def counted() -> tuple[BinaryIO, Staged]:
        nonlocal staged_files
        staged_files += 1
        return new_temp()

    monkeypatch.setattr(cache.storage, "new_temp", counted)
    [(_, body, error, message)] = [c for c in _cases(small_nar) if c[0].startswith(case)]
    if case == "hash mismatch":  # a byte of a file's contents (the middle one is structure)
        body = small_nar.replace(b"text", b"TEXT", 1)
    with pytest.raises(error, match=message):
        await cache.receive(
            chunks_of(body, 16),
            kind=UploadKind.OUTPUT,
            declared_size=len(small_nar),
            declared_hash=hashlib.sha256(small_nar).digest(),
        )
    assert staged_files == 0 and leftovers(tmp_path) == []
    assert _failed(cache) == 1 and _verified(cache) == 0
    await cache.engine.dispose()


class _FullFile(io.BytesIO):
    def write(self, data: object) -> NoReturn:
        raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("fails", ["new_temp", "write"])
async def test_a_small_nar_refused_for_full_storage_leaves_nothing(
    tmp_path: Path, small_nar: bytes, monkeypatch: pytest.MonkeyPatch, fails: str
) -> None:
    cache = make_cache(tmp_path, Compression.ZSTD)
    new_temp = cache.storage.new_temp

    def full() -> tuple[BinaryIO, Staged]:
        if fails == "new_temp":
            raise OSError(errno.ENOSPC, "No space left on device")
        out, staged = new_temp()
        out.close()
        return _FullFile(), staged

    monkeypatch.setattr(cache.storage, "new_temp", full)
    with pytest.raises(StorageFull, match="No space left on device"):
        await cache.receive(
            chunks_of(small_nar),
            kind=UploadKind.OUTPUT,
            declared_size=len(small_nar),
            declared_hash=hashlib.sha256(small_nar).digest(),
        )
    assert leftovers(tmp_path) == []
    assert cache.storage_full is not None and cache.storage_full.count == 1
    await cache.engine.dispose()
