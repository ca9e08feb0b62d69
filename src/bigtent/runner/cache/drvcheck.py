"""What a .drv must be to enter the cache (architecture §6: uploads): well-formed and within
the limits, at the store path its content and references make, and naming the output paths
Nix computes for it (hashDerivationModulo over its already uploaded inputs), so a client
cannot claim an output path it does not own."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncEngine

from bigtent.errors import BadRequest, BigtentError
from bigtent.nix import base32
from bigtent.nix.compression import BoundedDecompressor, Compression
from bigtent.nix.drv import (
    Derivation,
    DrvError,
    OutputKind,
    derivation_kind,
    expected_output_paths,
    hash_derivation_modulo,
    parse_drv,
    unparse_drv,
)
from bigtent.nix.nar import NarError, NarValidator
from bigtent.nix.store_path import (
    StorePath,
    make_fixed_output_path,
    make_source_path,
    make_text_path,
)
from bigtent.protocol import MAX_LIST_ITEMS, MAX_SHORT_TEXT
from bigtent.runner.cache.narcheck import Ingested
from bigtent.runner.cache.service import Cache
from bigtent.runner.db import queries

log = logging.getLogger(__name__)


MAX_DRV_BYTES = 64 * 1024 * 1024
"""A .drv larger than this is refused (nixpkgs' largest are a few MB)."""


@dataclass
class RootFile:
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


def parse_derivation(sp: StorePath, sink: RootFile) -> tuple[Derivation, str]:
    if not sink.is_file:
        raise BadRequest(f"{sp.path} is not a regular file")
    try:
        text = sink.content.decode()
        return parse_drv(text), text
    except (UnicodeDecodeError, DrvError) as exc:
        raise BadRequest(f"{sp.path} is not a valid derivation: {exc}") from exc


async def check_derivation(
    cache: Cache, engine: AsyncEngine, sp: StorePath, drv: Derivation, text: str
) -> queries.DrvInfo:
    """The record of an uploaded derivation, once it is known to be one Nix could have written
    (its inputs are in the cache already): the checks are pure, this gathers their inputs."""
    inline = len(text) <= INLINE_DRV_CHECK_CHARS
    if inline:
        features = check_form(sp, drv, text)
    else:
        features = await asyncio.to_thread(check_form, sp, drv, text)
    hashes = await _fetch_input_hash_modulos(cache, engine, sp, drv)
    if inline:
        return check_outputs(sp, drv, hashes, features, text)
    return await asyncio.to_thread(check_outputs, sp, drv, hashes, features, text)


INLINE_DRV_CHECK_CHARS = 1024 * 1024
"""Derivations up to this size are checked on the event loop; larger ones in a thread."""


def check_form(sp: StorePath, drv: Derivation, text: str) -> frozenset[str]:
    """Refuse a .drv that is not in the exact form Nix writes, is of a kind bigtent does not
    build, or exceeds what the agent protocol can carry; return its required features."""
    try:
        canonical = unparse_drv(drv)
        kind = derivation_kind(drv)
        features = drv.required_features
    except DrvError as exc:
        raise BadRequest(f"{sp.path} is not a valid derivation: {exc}") from exc
    if canonical != text:
        raise BadRequest(
            f"{sp.path} is not in the form Nix writes derivations in (sorted, without "
            "duplicates, escaped as Nix does): refusing a hand-made .drv"
        )
    if kind is not OutputKind.INPUT_ADDRESSED and kind is not OutputKind.FIXED:
        what = "content-addressed (floating)" if kind is OutputKind.FLOATING else kind.value
        raise BadRequest(f"{sp.path}: {what} derivations are not supported")
    _check_limits(sp, drv, features)
    return features


def check_outputs(
    sp: StorePath,
    drv: Derivation,
    hashes: Mapping[str, bytes],
    features: frozenset[str],
    text: str,
) -> queries.DrvInfo:
    """Nix's checkDerivationOutputs: each output path must be the one Nix computes from the
    derivation and its inputs' hashes modulo, and `$<output>` must name it. Returns the
    record, with the derivation's own hash modulo for its dependents and its ``text``."""
    name = sp.name[: -len(".drv")]
    try:
        expected = expected_output_paths(drv, name, hashes)
        hash_modulo = hash_derivation_modulo(drv, hashes, drv_name=name)
    except DrvError as exc:
        raise BadRequest(f"{sp.path} is not a valid derivation: {exc}") from exc
    for output, path in sorted(drv.output_paths.items()):
        if path != expected[output]:
            raise BadRequest(
                f"{sp.path}: output {output!r} is {path}, but Nix computes {expected[output]} "
                "from this derivation and its inputs; a .drv may only claim its own output paths",
                detail={"output": output, "claimed": path, "expected": expected[output]},
            )
        if drv.env.get(output) != path:
            raise BadRequest(
                f"{sp.path}: environment variable {output!r} must be the output path {path}, "
                "as Nix requires"
            )
    return queries.DrvInfo(
        drv_path=sp.path,
        name=name,
        system=drv.system,
        required_features=features,
        outputs=drv.output_paths,
        input_drvs=dict(drv.input_drvs),
        input_srcs=tuple(drv.input_srcs),
        hash_modulo=hash_modulo.hex(),
        text=text,
    )


def _check_limits(sp: StorePath, drv: Derivation, features: frozenset[str]) -> None:
    """Refuse what could not be sent to an agent later (protocol.Assign and Register limits)."""
    if len(drv.outputs) > MAX_LIST_ITEMS:
        raise BadRequest(
            f"{sp.path} has {len(drv.outputs)} outputs; at most {MAX_LIST_ITEMS} are supported"
        )
    if len(features) > MAX_LIST_ITEMS:
        raise BadRequest(
            f"{sp.path} requires {len(features)} system features; at most {MAX_LIST_ITEMS} "
            "are supported"
        )
    for what, values in [("output name", drv.outputs), ("system feature", features)]:
        for value in sorted(values):
            if len(value) > MAX_SHORT_TEXT:
                raise BadRequest(
                    f"{sp.path} has a {what} of {len(value)} characters; at most "
                    f"{MAX_SHORT_TEXT} are supported: {value[:40]!r}..."
                )
    if len(drv.system) > MAX_SHORT_TEXT:
        raise BadRequest(
            f"{sp.path} has a system of {len(drv.system)} characters; at most "
            f"{MAX_SHORT_TEXT} are supported"
        )


async def _fetch_input_hash_modulos(
    cache: Cache, engine: AsyncEngine, sp: StorePath, drv: Derivation
) -> dict[str, bytes]:
    """The hash modulo of each input derivation of ``drv``, which are recorded already (they
    are references, uploaded first). Rows recorded before the hash was stored (migration
    0002) get it computed from their .drv in the cache storage, and filled in."""
    return await input_hash_modulos(cache, engine, sp, drv.input_drvs)


async def input_hash_modulos(
    cache: Cache, engine: AsyncEngine, sp: StorePath, input_drvs: Mapping[str, Iterable[str]]
) -> dict[str, bytes]:
    """The hash modulo of each of ``input_drvs`` (recorded derivations, with the outputs
    used of each), for the derivation ``sp`` (named in errors)."""
    infos = await cache.derivations(list(input_drvs))
    hashes: dict[str, bytes] = {}
    legacy: list[str] = []
    for path, outputs in sorted(input_drvs.items()):
        info = infos.get(path)
        if info is None:
            raise BadRequest(f"{sp.path}: input {path} is not a derivation known to the cache")
        unknown = sorted(set(outputs) - set(info.outputs))
        if unknown:
            raise BadRequest(f"{sp.path}: input {path} has no output {unknown[0]!r}")
        if info.hash_modulo is None:
            legacy.append(path)
        else:
            hashes[path] = bytes.fromhex(info.hash_modulo)
    if legacy:
        try:
            hashes.update(await _load_legacy_hash_modulos(cache, engine, legacy))
        except (DrvError, NarError, OSError, UnicodeDecodeError, ValueError) as exc:
            raise BigtentError(
                f"{sp.path}: could not compute the hash of an input derivation recorded "
                f"before hashes were stored: {exc}"
            ) from exc
    return hashes


async def _load_legacy_hash_modulos(
    cache: Cache, engine: AsyncEngine, paths: list[str]
) -> dict[str, bytes]:
    """Hashes modulo of derivations recorded without one, computed from their cached .drv
    files (depth first, as inputs need theirs) and stored for next time."""
    hashes: dict[str, bytes] = {}
    parsed: dict[str, Derivation] = {}
    expanded: set[str] = set()
    stack = list(paths)
    while stack:
        path = stack[-1]
        if path in hashes:
            stack.pop()
            continue
        drv = parsed.get(path)
        if drv is None:
            # Ask the database, not the cache's memory: another upload may have filled it in.
            async with engine.connect() as conn:
                info = (await queries.fetch_derivations(conn, [path])).get(path)
            if info is None:
                raise ValueError(f"{path} is not a recorded derivation")
            if info.hash_modulo is not None:
                hashes[path] = bytes.fromhex(info.hash_modulo)
                stack.pop()
                continue
            drv = parsed[path] = parse_drv(await _load_cached_drv(cache, path))
            if len(parsed) > MAX_LEGACY_DERIVATIONS:
                raise ValueError(f"more than {MAX_LEGACY_DERIVATIONS} derivations without hashes")
        pending = [i for i in sorted(drv.input_drvs) if i not in hashes]
        if pending:
            # Back at an expanded derivation, every input pushed above it has been hashed,
            # unless the inputs lead back to it (impossible for honest text paths).
            if path in expanded:
                raise ValueError(f"{path} depends on itself")
            expanded.add(path)
            stack.extend(pending)
            continue
        name = StorePath.parse(path).name[: -len(".drv")]
        # Recorded before output paths were checked at upload: check them now, so nothing
        # new is built on a derivation that claims outputs that are not its own.
        if expected_output_paths(drv, name, hashes) != drv.output_paths:
            raise ValueError(f"{path} claims output paths that Nix does not give it")
        digest = hash_derivation_modulo(drv, hashes, drv_name=name)
        async with engine.begin() as conn:
            await queries.set_derivation_hash_modulo(conn, path, digest.hex())
        log.info("computed the hash modulo of %s (recorded before it was stored)", path)
        hashes[path] = digest
        stack.pop()
    return hashes


MAX_LEGACY_DERIVATIONS = 100_000
"""Bound on the derivations read back from storage for one upload (a nixpkgs closure)."""


async def _load_cached_drv(cache: Cache, path: str) -> str:
    info = await cache.fetch_narinfo(path)
    if info is None:
        raise ValueError(f"{path} is not in the cache")
    sp = StorePath.parse(path)
    try:
        compression = Compression(info.compression)
    except ValueError as exc:
        raise ValueError(f"{path}: unknown compression {info.compression!r}") from exc

    def read() -> str:
        sink = RootFile(keep=True)
        validator = NarValidator(sink)
        decompressor = BoundedDecompressor(compression, info.nar_size)
        try:
            file = cache.storage.open_file(info.url)
        except FileNotFoundError as exc:
            raise ValueError(f"{path}: its NAR {info.url} is not in the cache storage") from exc
        with file:
            while chunk := file.read(64 * 1024):
                for data in decompressor.feed(chunk):
                    validator.feed(data)
        decompressor.finish()
        validator.finish()
        if not sink.is_file:
            raise ValueError(f"{sp.path} is not a regular file")
        return sink.content.decode()

    return await asyncio.to_thread(read)


def content_address(sp: StorePath, got: Ingested, sink: RootFile, refs: set[str]) -> str:
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
