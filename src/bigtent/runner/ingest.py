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

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from bigtent.errors import BadRequest, Conflict, NotFound, PayloadTooLarge
from bigtent.nix import base32
from bigtent.nix.drv import Derivation, DrvError, parse_drv
from bigtent.nix.narinfo import NarInfo
from bigtent.nix.store_path import (
    StorePath,
    make_fixed_output_path,
    make_source_path,
    make_text_path,
)
from bigtent.protocol import MAX_REFERENCES
from bigtent.runner.cache import Cache, Ingested, Upstreams, closure
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
    try:
        digest = base32.parse_hash(nar_hash, "sha256")
    except ValueError as exc:
        raise BadRequest(f"bad X-Nar-Hash {nar_hash[:100]!r}: {exc}") from exc
    # ASCII digits only: str.isdigit() also accepts other scripts' digits, and int() of a
    # few thousand digits raises instead of answering.
    if not (nar_size.isascii() and nar_size.isdigit() and len(nar_size) <= _MAX_SIZE_DIGITS):
        raise BadRequest(
            f"bad X-Nar-Size {nar_size[:40]!r}: expected the NAR size in bytes as a decimal integer"
        )
    size = int(nar_size)
    if size > max_nar_bytes:
        raise PayloadTooLarge(f"declared NAR size {size} exceeds max_nar_bytes {max_nar_bytes}")
    return digest, size


async def _drain(chunks: AsyncIterator[bytes], max_bytes: int) -> None:
    """Read and drop the body of an upload that is not needed (the path is cached already),
    bounded like any upload."""
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(f"upload is larger than max_nar_bytes {max_bytes}")


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
        await _drain(chunks, cache.config.max_nar_bytes)
        return False
    declared_hash, declared_size = parse_declared(nar_hash, nar_size, cache.config.max_nar_bytes)
    is_drv = sp.name.endswith(".drv")
    claimed = set() if is_drv else _parse_references(references)
    sink = _RootFile(keep=is_drv)
    got, temp = await cache.receive(
        chunks, declared_size=declared_size, declared_hash=declared_hash, sink=sink
    )
    try:
        drv = None
        if is_drv:
            drv = _parse_derivation(sp, sink)
            refs = set(drv.references)
        else:
            refs = claimed
        ca = _content_address(sp, got, sink, refs)
        others = refs - {sp.path}
        missing = sorted(others - await cache.present(list(others)))
        if missing:
            raise BadRequest(
                f"references of {sp.path} are not in the cache yet (upload them first): "
                + ", ".join(missing[:5]),
            )
        record = None
        if drv is not None:
            outputs = drv.output_paths
            if not all(outputs.values()):
                raise BadRequest(
                    f"{sp.path}: content-addressed (floating) derivations are not supported"
                )
            info = queries.DrvInfo(
                drv_path=sp.path,
                name=sp.name[: -len(".drv")],
                system=drv.system,
                required_features=drv.required_features,
                outputs=outputs,
                input_drvs=dict(drv.input_drvs),
                input_srcs=tuple(drv.input_srcs),
            )

            async def record(conn: AsyncConnection) -> None:
                # In the store path's transaction: a derivation is known to builds exactly
                # when its .drv is in the cache.
                await queries.insert_derivation(conn, info)

        await cache.publish(temp, sp, got, refs, ca=ca, record=record)
    except BaseException:
        cache.discard(temp)
        raise
    return True


def _parse_references(references: str | None) -> set[str]:
    text = references or ""
    words = text.split()
    if len(words) > MAX_REFERENCES:
        raise BadRequest(f"X-Nar-References lists more than {MAX_REFERENCES} paths")
    return {_parse_path(r, "bad reference in X-Nar-References").path for r in words}


def _parse_derivation(sp: StorePath, sink: _RootFile) -> Derivation:
    if not sink.is_file:
        raise BadRequest(f"{sp.path} is not a regular file")
    try:
        return parse_drv(sink.content.decode())
    except (UnicodeDecodeError, DrvError) as exc:
        raise BadRequest(f"{sp.path} is not a valid derivation: {exc}") from exc


def _content_address(sp: StorePath, got: Ingested, sink: _RootFile, refs: set[str]) -> str:
    """The ``CA`` of ``sp`` when its path is what its content and references make it.

    Nix's rules: a text path (``.drv`` files, ``builtins.toFile``) and a flat fixed-output
    path are the sha256 of one plain, non-executable file; a source path
    (``nix-store --add``, path literals) is the sha256 of the NAR. The same content with the
    executable bit set is a different NAR for the same path, so it is refused.
    """
    others = refs - {sp.path}
    self_ref = sp.path in refs
    plain_file = sink.is_file and not sink.executable
    expected: dict[str, str] = {}
    if sp.name.endswith(".drv"):
        if not plain_file:
            raise BadRequest(f"{sp.path} must be a plain (non-executable) file")
        flat = sink.sha256.digest()
        expected[make_text_path(sp.name, flat, others)] = f"text:sha256:{base32.encode(flat)}"
    else:
        expected[make_source_path(sp.name, got.nar_hash, others, self_ref)] = (
            f"fixed:r:sha256:{base32.encode(got.nar_hash)}"
        )
        if plain_file and not self_ref:
            flat = sink.sha256.digest()
            expected[make_text_path(sp.name, flat, others)] = f"text:sha256:{base32.encode(flat)}"
            if not others:
                expected[make_fixed_output_path(sp.name, "flat", "sha256", flat)] = (
                    f"fixed:sha256:{base32.encode(flat)}"
                )
    ca = expected.get(sp.path)
    if ca is None:
        if sink.is_file and sink.executable:
            why = " (an executable file is not a text or flat path)"
        else:
            why = ""
        raise BadRequest(
            f"{sp.path} does not match its content and references{why}: only "
            "content-addressed paths (.drv files, sources) may be uploaded by clients"
        )
    return ca


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
) -> NarInfo:
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
    declared_hash, declared_size = parse_declared(nar_hash, nar_size, cache.config.max_nar_bytes)
    existing = await cache.fetch_narinfo(path)
    if existing is not None:
        # Built before (another step, or an earlier attempt): what is signed stays.
        await _drain(chunks, cache.config.max_nar_bytes)
        return existing
    drv = (await cache.derivations([node.drv_path])).get(node.drv_path)
    if drv is None:
        raise NotFound(f"derivation {node.drv_path} is not known")
    inputs_info = await cache.derivations(list(drv.input_drvs))
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
        if scheduler.lease_holder(lease_id) is not node:
            # The lease ran out (or the step was reassigned) while the NAR streamed in.
            raise Conflict("lease is not current: the step was reassigned or finished")
        refs = {by_hash[h] for h in got.references}
        published = await cache.publish(
            temp, StorePath.parse(path), got, refs, deriver=node.drv_path
        )
    except BaseException:
        cache.discard(temp)
        raise
    log.info("step %d: received %s (%d bytes)", node.id, path, got.nar_size)
    return published
