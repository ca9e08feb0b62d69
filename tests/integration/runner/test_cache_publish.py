"""Publishing the same path twice keeps the first record, in the database and in memory."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

from bigtent.config import CacheSection
from bigtent.nix import narinfo
from bigtent.nix.keys import generate_key
from bigtent.nix.nar import dump_path
from bigtent.nix.store_path import StorePath
from bigtent.runner.cache.service import Cache
from bigtent.runner.cache.storage import LocalStorage
from bigtent.runner.db.migrate import create_engine
from bigtent.runner.metrics import UploadKind

PATH = StorePath.parse("/nix/store/" + "b" * 32 + "-out")


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def test_second_publish_of_a_path_returns_the_first_record(
    tmp_path: Path, database_url: str
) -> None:
    engine = create_engine(database_url)
    key = generate_key("t-1")
    cache = Cache(engine, LocalStorage(tmp_path / "cache"), key, CacheSection(), "http://x")
    published: list[narinfo.NarInfo] = []
    for content in (b"first build\n", b"second, different build\n"):
        src = tmp_path / f"f{len(published)}"
        src.write_bytes(content)
        nar = b"".join(dump_path(src))
        got, temp = await cache.receive(
            _chunks(nar),
            kind=UploadKind.OUTPUT,
            declared_size=len(nar),
            declared_hash=hashlib.sha256(nar).digest(),
        )
        published.append(await cache.publish(temp, PATH, got, []))
    first, second = published
    assert second == first
    text = await cache.narinfo_text(PATH.hash_part)
    assert text is not None and narinfo.parse(text) == first
    # A fresh cache object (as after a restart) serves the same record from the database.
    fresh = Cache(engine, LocalStorage(tmp_path / "cache"), key, CacheSection(), "http://x")
    assert await fresh.narinfo_text(PATH.hash_part) == text
    await engine.dispose()
