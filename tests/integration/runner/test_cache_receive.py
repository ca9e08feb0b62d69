"""``Cache.receive`` on large NARs: processed in batches in a worker thread while the next
batch is received; the same result as inline, and nothing left behind on any error."""

from __future__ import annotations

import errno
import hashlib
import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import NoReturn

import pytest
import zstandard

from bigtent.config import CacheSection
from bigtent.errors import BadRequest, PayloadTooLarge, StorageFull
from bigtent.nix.compression import Compression
from bigtent.nix.keys import generate_key
from bigtent.nix.nar import dump_path
from bigtent.runner.cache import intake as cache_module
from bigtent.runner.cache.service import Cache
from bigtent.runner.cache.storage import LocalStaged, LocalStorage
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
