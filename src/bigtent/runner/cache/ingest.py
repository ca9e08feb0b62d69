"""What may enter the cache, and how its references are known (architecture §6: uploads).

Two doors lead in. Clients upload the .drv files and sources of a build: those are
content-addressed, so the runner recomputes each store path from the received content and its
references and refuses any mismatch — a client cannot plant an arbitrary path. A .drv's
output paths are recomputed too, as Nix does (hashDerivationModulo over the already uploaded
inputs), so a client cannot claim an output path it does not own: agents may upload exactly
those outputs, and the runner signs them. Agents upload the outputs of the step they hold a
lease for, only those paths, and the runner finds their references itself by scanning the NAR
for the hash parts of the build's input closure.

This module is the clients' door for one path (``ingest_client_path``) and what every door
parses of an upload's headers; ``closureingest`` brings a whole closure in from a store,
``outputs`` is the agents' door and ``drvcheck`` judges a .drv.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from bigtent.errors import BadRequest
from bigtent.nix.store_path import StorePath
from bigtent.protocol import MAX_REFERENCES
from bigtent.runner.cache.drvcheck import (
    RootFile,
    check_derivation,
    content_address,
    parse_derivation,
)
from bigtent.runner.cache.narcheck import check_nar_size, declared_hash
from bigtent.runner.cache.service import Cache
from bigtent.runner.db import queries
from bigtent.runner.metrics import UploadKind

_MAX_SIZE_DIGITS = 19
"""X-Nar-Size has at most this many digits (it fits a signed 64-bit integer)."""


def parse_declared(
    nar_hash: str | None, nar_size: str | None, max_nar_bytes: int
) -> tuple[bytes, int]:
    """The declared NAR hash and size of an upload, from its headers.

    The size is checked against ``max_nar_bytes`` here, before any of the body is read.
    """
    if not nar_hash or not nar_size:
        raise BadRequest("upload needs X-Nar-Hash and X-Nar-Size headers")
    digest = declared_hash(nar_hash, "bad X-Nar-Hash")
    # ASCII digits only: str.isdigit() also accepts other scripts' digits, and int() of a
    # few thousand digits raises instead of answering.
    if not (nar_size.isascii() and nar_size.isdigit() and len(nar_size) <= _MAX_SIZE_DIGITS):
        raise BadRequest(
            f"bad X-Nar-Size {nar_size[:40]!r}: expected the NAR size in bytes as a decimal integer"
        )
    size = int(nar_size)
    check_nar_size(size, max_nar_bytes)
    return digest, size


async def drain(chunks: AsyncIterator[bytes], max_bytes: int) -> None:
    """Read and drop the body of an upload that is not needed (the path is cached already),
    bounded like any upload."""
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        check_nar_size(size, max_bytes, declared=False)


def parse_path(text: str, what: str) -> StorePath:
    try:
        return StorePath.parse(text) if text.startswith("/") else StorePath.parse_basename(text)
    except ValueError as exc:
        raise BadRequest(f"{what}: {exc}") from exc


async def ingest_client_path(
    cache: Cache,
    engine: AsyncEngine,
    basename: str,
    chunks: AsyncIterator[bytes],
    *,
    nar_hash: str | None,
    nar_size: str | None,
    references: str | None,
) -> bool:
    """Accept a content-addressed path from a client. Returns False when already cached."""
    sp = parse_path(basename, "bad store path")
    if await cache.present([sp.path]):
        await drain(chunks, cache.config.max_nar_bytes)
        return False
    declared_hash, declared_size = parse_declared(nar_hash, nar_size, cache.config.max_nar_bytes)
    is_drv = sp.name.endswith(".drv")
    claimed = set() if is_drv else _parse_references(references)
    sink = RootFile(keep=is_drv)
    got, staged = await cache.receive(
        chunks,
        kind=UploadKind.SOURCE,
        declared_size=declared_size,
        declared_hash=declared_hash,
        sink=sink,
    )
    try:
        drv = None
        text = ""
        if is_drv:
            drv, text = parse_derivation(sp, sink)
            refs = set(drv.references)
        else:
            refs = claimed
        ca = content_address(sp, got, sink, refs)
        others = refs - {sp.path}
        missing = sorted(others - await cache.present(list(others)))
        if missing:
            raise BadRequest(
                f"references of {sp.path} are not in the cache yet (upload them first): "
                + ", ".join(missing[:5]),
            )
        record = None
        recorded: list[queries.DrvInfo] = []
        if drv is not None:
            info = await check_derivation(cache, engine, sp, drv, text)
            recorded.append(info)

            async def record(conn: AsyncConnection) -> None:
                # In the store path's transaction: a derivation is known to builds exactly
                # when its .drv is in the cache.
                await queries.insert_derivation(conn, info)

        await cache.publish(staged, sp, got, refs, ca=ca, record=record)
    except BaseException:
        await cache.discard(staged)
        raise
    cache.remember_derivations(recorded)
    return True


def _parse_references(references: str | None) -> set[str]:
    text = references or ""
    words = text.split()
    if len(words) > MAX_REFERENCES:
        raise BadRequest(f"X-Nar-References lists more than {MAX_REFERENCES} paths")
    return {parse_path(r, "bad reference in X-Nar-References").path for r in words}
