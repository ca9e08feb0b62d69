"""What may enter the cache, and how its references are known (DESIGN §6: uploads).

Two doors lead in. Clients upload the .drv files and sources of a build: those are
content-addressed, so the runner recomputes each store path from the received content and its
references and refuses any mismatch — a client cannot plant an arbitrary path. Agents upload
the outputs of the step they hold a lease for, only those paths, and the runner finds their
references itself by scanning the NAR for the hash parts of the build's input closure.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncEngine

from bigtent.errors import BadRequest, Conflict, NotFound
from bigtent.nix import base32
from bigtent.nix.drv import DrvError, parse_drv
from bigtent.nix.narinfo import NarInfo
from bigtent.nix.store_path import (
    StorePath,
    make_fixed_output_path,
    make_source_path,
    make_text_path,
)
from bigtent.runner.cache import Cache, Upstreams, closure
from bigtent.runner.db import queries
from bigtent.runner.scheduler.dispatcher import Scheduler

log = logging.getLogger(__name__)

MAX_DRV_BYTES = 64 * 1024 * 1024
"""A .drv larger than this is refused (nixpkgs' largest are a few MB)."""


@dataclass
class _RootFile:
    """NAR sink: hashes the contents of a root regular file and optionally keeps them."""

    keep: bool
    is_file: bool = False
    executable: bool = False
    sha256: hashlib._Hash = field(default_factory=hashlib.sha256)
    content: bytearray = field(default_factory=bytearray)

    def directory(self, path: tuple[bytes, ...]) -> None:
        pass

    def file_start(self, path: tuple[bytes, ...], executable: bool, size: int) -> None:
        if path == ():
            self.is_file = True
            self.executable = executable
            if self.keep and size > MAX_DRV_BYTES:
                raise BadRequest(f"derivation of {size} bytes exceeds {MAX_DRV_BYTES}")

    def file_data(self, data: bytes) -> None:
        if self.is_file:
            self.sha256.update(data)
            if self.keep:
                self.content.extend(data)

    def file_end(self) -> None:
        pass

    def symlink(self, path: tuple[bytes, ...], target: bytes) -> None:
        pass


def parse_declared(nar_hash: str | None, nar_size: str | None) -> tuple[bytes, int]:
    """The declared NAR hash and size of an upload, from its headers."""
    if not nar_hash or not nar_size:
        raise BadRequest("upload needs X-Nar-Hash and X-Nar-Size headers")
    try:
        digest = base32.parse_hash(nar_hash, "sha256")
    except ValueError as exc:
        raise BadRequest(f"bad X-Nar-Hash {nar_hash!r}: {exc}") from exc
    if not nar_size.isdigit():
        raise BadRequest(f"bad X-Nar-Size {nar_size!r}")
    return digest, int(nar_size)


async def _drain(chunks: AsyncIterator[bytes]) -> None:
    async for _ in chunks:
        pass


def _parse_path(text: str, what: str) -> StorePath:
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
    sp = _parse_path(basename, "bad store path")
    if await cache.present([sp.path]):
        await _drain(chunks)
        return False
    declared_hash, declared_size = parse_declared(nar_hash, nar_size)
    is_drv = sp.name.endswith(".drv")
    sink = _RootFile(keep=is_drv)
    got, temp = await cache.receive(
        chunks, declared_size=declared_size, declared_hash=declared_hash, sink=sink
    )
    try:
        drv = None
        if is_drv:
            if not sink.is_file:
                raise BadRequest(f"{sp.path} is not a regular file")
            try:
                drv = parse_drv(sink.content.decode())
            except (UnicodeDecodeError, DrvError) as exc:
                raise BadRequest(f"{sp.path} is not a valid derivation: {exc}") from exc
            refs = set(drv.references)
            ca = f"text:sha256:{base32.encode(sink.sha256.digest())}"
            expected = {make_text_path(sp.name, sink.sha256.digest(), refs): ca}
        else:
            refs = {_parse_path(r, "bad reference").path for r in (references or "").split()}
            self_ref = sp.path in refs
            others = refs - {sp.path}
            ca_r = f"fixed:r:sha256:{base32.encode(got.nar_hash)}"
            expected = {make_source_path(sp.name, got.nar_hash, others, self_ref): ca_r}
            if sink.is_file and not self_ref:
                flat = sink.sha256.digest()
                expected[make_text_path(sp.name, flat, others)] = (
                    f"text:sha256:{base32.encode(flat)}"
                )
                if not others:
                    expected[make_fixed_output_path(sp.name, "flat", "sha256", flat)] = (
                        f"fixed:sha256:{base32.encode(flat)}"
                    )
        if sp.path not in expected:
            raise BadRequest(
                f"{sp.path} does not match its content and references: only content-addressed "
                "paths (.drv files, sources) may be uploaded by clients"
            )
        missing = sorted((refs - {sp.path}) - await cache.present(list(refs - {sp.path})))
        if missing:
            raise BadRequest(
                f"references of {sp.path} are not in the cache yet (upload them first): "
                + ", ".join(missing[:5]),
            )
        if drv is not None:
            outputs = drv.output_paths
            if not all(outputs.values()):
                raise BadRequest(
                    f"{sp.path}: content-addressed (floating) derivations are not supported"
                )
            async with engine.begin() as conn:
                await queries.insert_derivation(
                    conn,
                    queries.DrvInfo(
                        drv_path=sp.path,
                        name=sp.name[: -len(".drv")],
                        system=drv.system,
                        required_features=drv.required_features,
                        outputs=outputs,
                        input_drvs=dict(drv.input_drvs),
                        input_srcs=tuple(drv.input_srcs),
                    ),
                )
        await cache.publish(temp, sp, got, refs, ca=expected[sp.path])
    except BaseException:
        cache.discard(temp)
        raise
    return True


async def ingest_output(
    cache: Cache,
    upstreams: Upstreams,
    scheduler: Scheduler,
    lease_id: str,
    output_name: str,
    chunks: AsyncIterator[bytes],
    *,
    nar_hash: str | None,
    nar_size: str | None,
) -> NarInfo | None:
    """Accept an output NAR from the holder of a current lease (DESIGN §6).

    Only outputs of the leased step's derivation are accepted; references are found by
    scanning for the input closure's hash parts (plus the step's own outputs).
    """
    node = scheduler.lease_holder(lease_id)
    if node is None:
        raise Conflict("lease is not current: the step was reassigned or finished")
    path = node.outputs.get(output_name)
    if path is None:
        raise BadRequest(f"{output_name!r} is not an output of {node.drv_path}")
    declared_hash, declared_size = parse_declared(nar_hash, nar_size)
    if await cache.present([path]):
        await _drain(chunks)
        return None
    async with cache.engine.connect() as conn:
        drvs = await queries.fetch_derivations(conn, [node.drv_path])
        drv = drvs.get(node.drv_path)
        if drv is None:
            raise NotFound(f"derivation {node.drv_path} is not known")
        inputs_info = await queries.fetch_derivations(conn, list(drv.input_drvs))
    inputs = set(drv.input_srcs)
    for input_drv, names in drv.input_drvs.items():
        info = inputs_info.get(input_drv)
        if info is not None:
            inputs.update(info.outputs[n] for n in names if n in info.outputs)
    candidates = await closure(cache, upstreams, inputs) | set(drv.outputs.values())
    by_hash = {StorePath.parse(c).hash_part: c for c in candidates}
    got, temp = await cache.receive(
        chunks, declared_size=declared_size, declared_hash=declared_hash, candidates=by_hash
    )
    try:
        refs = {by_hash[h] for h in got.references}
        published = await cache.publish(
            temp, StorePath.parse(path), got, refs, deriver=node.drv_path
        )
    except BaseException:
        cache.discard(temp)
        raise
    log.info("step %d: received %s (%d bytes)", node.id, path, got.nar_size)
    return published
