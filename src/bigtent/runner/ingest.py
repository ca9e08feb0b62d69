"""What may enter the cache, and how its references are known (architecture §6: uploads).

Two doors lead in. Clients upload the .drv files and sources of a build: those are
content-addressed, so the runner recomputes each store path from the received content and its
references and refuses any mismatch — a client cannot plant an arbitrary path. A .drv's
output paths are recomputed too, as Nix does (hashDerivationModulo over the already uploaded
inputs), so a client cannot claim an output path it does not own: agents may upload exactly
those outputs, and the runner signs them. Agents upload the outputs of the step they hold a
lease for, only those paths, and the runner finds their references itself by scanning the NAR
for the hash parts of the build's input closure.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from bigtent.errors import BadRequest, BigtentError, Conflict, NotFound, PayloadTooLarge
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
from bigtent.nix.narinfo import NarInfo
from bigtent.nix.store_path import (
    StorePath,
    make_fixed_output_path,
    make_source_path,
    make_text_path,
)
from bigtent.protocol import MAX_LIST_ITEMS, MAX_REFERENCES, MAX_SHORT_TEXT
from bigtent.runner.cache import Cache, Ingested, Publication, Upstreams, closure
from bigtent.runner.db import queries
from bigtent.runner.metrics import UploadKind
from bigtent.runner.scheduler.service import Scheduler
from bigtent.runner.storage import Staged

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
            drv, text = _parse_derivation(sp, sink)
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
            info = await _check_derivation(cache, engine, sp, drv, text)

            async def record(conn: AsyncConnection) -> None:
                # In the store path's transaction: a derivation is known to builds exactly
                # when its .drv is in the cache.
                await queries.insert_derivation(conn, info)

        await cache.publish(staged, sp, got, refs, ca=ca, record=record)
    except BaseException:
        await cache.discard(staged)
        raise
    return True


@dataclass(frozen=True, slots=True)
class ClientPath:
    """A content-addressed path the runner reads itself (e.g. from its evaluation store), with
    what Nix declares about it: its NAR's hash and size and its references."""

    path: str
    nar_hash: bytes
    nar_size: int
    references: frozenset[str]
    """Full store paths, the path itself excluded (a content-addressed path has no self
    reference the runner accepts)."""
    nar: Callable[[], Iterable[bytes]]
    """The NAR's bytes (blocking: called in a worker thread)."""


CLOSURE_BATCH_PATHS = 200
"""Paths of a closure verified together and recorded in one transaction."""
CLOSURE_BATCH_BYTES = 64 * 1024 * 1024
"""A batch holds at most this much declared NAR size (unless one path alone is larger)."""
VERIFY_THREADS = 3
"""Worker threads verifying the paths of one batch (each a share of it)."""


@dataclass(slots=True)
class _Verified:
    """A path of a batch, its NAR verified and staged, its derivation parsed (if one)."""

    item: ClientPath
    sp: StorePath
    got: Ingested
    staged: Staged
    refs: set[str]
    ca: str
    drv: Derivation | None = None
    features: frozenset[str] = frozenset()


async def ingest_client_closure(
    cache: Cache,
    engine: AsyncEngine,
    paths: Sequence[ClientPath],
    *,
    batch_paths: int = CLOSURE_BATCH_PATHS,
) -> int:
    """Accept many content-addressed paths at once, with every check ``ingest_client_path``
    makes, in batches (at most ``batch_paths`` paths, ``CLOSURE_BATCH_BYTES`` of NARs): the
    NARs verified (``NarCheck``: declared hash and size, well-formedness), compressed and
    staged by ``VERIFY_THREADS`` worker threads, their content addresses and derivations
    checked, then published together (``Cache.publish_many``: files first,
    then one transaction for every narinfo and derivation row of the batch).

    ``paths`` must come references first; a reference must be in the cache or earlier in
    ``paths``. Paths already cached are skipped. A failure stops the ingest: batches before it
    are published, nothing of the failing batch is. Returns the number of paths published.
    """
    if batch_paths < 1:
        raise ValueError(f"batch_paths must be at least 1 (got {batch_paths})")
    present = await cache.present([p.path for p in paths])
    todo = [p for p in paths if p.path not in present]
    available = set(present)
    hashes: dict[str, bytes] = {}
    """Hash modulo of the derivations published by this call (their dependents need them)."""
    for batch in closure_batches(todo, batch_paths, CLOSURE_BATCH_BYTES):
        await _ingest_batch(cache, engine, batch, available, hashes)
    return len(todo)


def closure_batches(
    paths: Sequence[ClientPath], max_paths: int, max_bytes: int
) -> list[Sequence[ClientPath]]:
    """``paths`` cut, in order, into batches of at most ``max_paths`` paths and, unless one
    path alone is larger, at most ``max_bytes`` of declared NAR size (a batch's derivations
    are held in memory until it is published)."""
    batches: list[Sequence[ClientPath]] = []
    start = 0
    size = 0
    for i, p in enumerate(paths):
        if i > start and (i - start >= max_paths or size + p.nar_size > max_bytes):
            batches.append(paths[start:i])
            start, size = i, 0
        size += p.nar_size
    if start < len(paths):
        batches.append(paths[start:])
    return batches


async def _ingest_batch(
    cache: Cache,
    engine: AsyncEngine,
    batch: Sequence[ClientPath],
    available: set[str],
    hashes: dict[str, bytes],
) -> None:
    staged: list[Staged] = []
    t_start = time.monotonic()
    try:
        # A few worker threads, each verifying a share of the batch: creating the staged
        # files and reading the store are system calls that run without the GIL.
        # Every share ends (a failed one stops the others early) before anything staged is
        # discarded, even when this task is cancelled: no thread stages a file afterwards.
        share = -(-len(batch) // VERIFY_THREADS)
        stop = threading.Event()
        work = asyncio.gather(
            *(
                asyncio.to_thread(_verify_paths, cache, batch[i : i + share], staged, stop)
                for i in range(0, len(batch), share)
            ),
            return_exceptions=True,
        )
        try:
            parts = await asyncio.shield(work)
        except asyncio.CancelledError:
            stop.set()
            await asyncio.wait([work])
            raise
        errors = [p for p in parts if isinstance(p, BaseException)]
        if errors:
            # The share that failed first, not the ones it stopped.
            raise next((e for e in errors if not isinstance(e, _Stopped)), errors[0])
        verified = [v for part in parts if not isinstance(part, BaseException) for v in part]
        _check_order(verified, available)
        drvs = [v for v in verified if v.drv is not None]
        ours = {v.sp.path for v in drvs}
        wanted: dict[str, set[str]] = {}
        for v in drvs:
            assert v.drv is not None
            for path, outputs in v.drv.input_drvs.items():
                if path not in hashes and path not in ours:
                    wanted.setdefault(path, set()).update(outputs)
        if wanted:
            first = drvs[0]
            assert first.drv is not None
            hashes.update(await _input_hash_modulos(cache, engine, first.sp, wanted))
        t_verified = time.monotonic()
        infos = await asyncio.to_thread(_check_batch_outputs, drvs, hashes)
        rows = list(infos.values())
        t_checked = time.monotonic()

        async def record(conn: AsyncConnection) -> None:
            await queries.insert_derivations(conn, rows)

        await cache.publish_many(
            [Publication(v.staged, v.sp, v.got, v.refs, ca=v.ca) for v in verified],
            record=record if rows else None,
        )
    except BaseException:
        for st in staged:
            await cache.discard(st)
        raise
    for path, info in infos.items():
        assert info.hash_modulo is not None
        hashes[path] = bytes.fromhex(info.hash_modulo)
    available.update(v.sp.path for v in verified)
    log.debug(
        "published %d paths: verified in %.3f s, derivations checked in %.3f s, recorded in %.3f s",
        len(verified),
        t_verified - t_start,
        t_checked - t_verified,
        time.monotonic() - t_checked,
    )


def _verify_paths(
    cache: Cache, paths: Sequence[ClientPath], staged: list[Staged], stop: threading.Event
) -> list[_Verified]:
    """Verify and stage each NAR of ``paths`` (blocking), check its content address and, for
    a derivation, its form. ``staged`` collects the staged files as they are made, for the
    caller to discard on failure; ``stop`` ends the work early (another share failed)."""
    try:
        return _verify_each(cache, paths, staged, stop)
    except BaseException:
        stop.set()
        raise


class _Stopped(Exception):
    """A share of a batch stopped because another share failed."""


def _verify_each(
    cache: Cache, paths: Sequence[ClientPath], staged: list[Staged], stop: threading.Event
) -> list[_Verified]:
    out: list[_Verified] = []
    for item in paths:
        if stop.is_set():
            raise _Stopped
        sp = _parse_path(item.path, "bad store path")
        is_drv = sp.name.endswith(".drv")
        sink = _RootFile(keep=is_drv)
        file, st = cache.new_staged()
        staged.append(st)
        got = cache.receive_blocking(
            item.nar(),
            file,
            kind=UploadKind.SOURCE,
            declared_size=item.nar_size,
            declared_hash=item.nar_hash,
            sink=sink,
        )
        drv = None
        text = ""
        features: frozenset[str] = frozenset()
        if is_drv:
            drv, text = _parse_derivation(sp, sink)
            refs = set(drv.references)
        else:
            refs = set(item.references)
        ca = _content_address(sp, got, sink, refs)
        if drv is not None:
            features = _check_form(sp, drv, text)
        out.append(_Verified(item, sp, got, st, refs, ca, drv, features))
    return out


def _check_order(verified: Sequence[_Verified], available: set[str]) -> None:
    """Each path's references are ``available`` (cached, or published before) or earlier in
    ``verified``: a narinfo is never recorded before those of its references."""
    seen = set(available)
    for v in verified:
        missing = sorted(v.refs - {v.sp.path} - seen)
        if missing:
            raise BadRequest(
                f"references of {v.sp.path} are not in the cache yet (ingest them first): "
                + ", ".join(missing[:5]),
            )
        seen.add(v.sp.path)


def _check_batch_outputs(
    drvs: Sequence[_Verified], hashes: Mapping[str, bytes]
) -> dict[str, queries.DrvInfo]:
    """``_check_outputs`` of each derivation of a batch, in order: each one's hash modulo
    is known to the derivations after it (blocking, pure)."""
    known = dict(hashes)
    out: dict[str, queries.DrvInfo] = {}
    for v in drvs:
        assert v.drv is not None
        inputs = {p: known[p] for p in v.drv.input_drvs if p in known}
        missing = sorted(set(v.drv.input_drvs) - inputs.keys())
        if missing:
            raise BadRequest(
                f"{v.sp.path}: input {missing[0]} is not a derivation known to the cache"
            )
        info = _check_outputs(v.sp, v.drv, inputs, v.features)
        assert info.hash_modulo is not None
        known[v.sp.path] = bytes.fromhex(info.hash_modulo)
        out[v.sp.path] = info
    return out


def _parse_references(references: str | None) -> set[str]:
    text = references or ""
    words = text.split()
    if len(words) > MAX_REFERENCES:
        raise BadRequest(f"X-Nar-References lists more than {MAX_REFERENCES} paths")
    return {_parse_path(r, "bad reference in X-Nar-References").path for r in words}


def _parse_derivation(sp: StorePath, sink: _RootFile) -> tuple[Derivation, str]:
    if not sink.is_file:
        raise BadRequest(f"{sp.path} is not a regular file")
    try:
        text = sink.content.decode()
        return parse_drv(text), text
    except (UnicodeDecodeError, DrvError) as exc:
        raise BadRequest(f"{sp.path} is not a valid derivation: {exc}") from exc


async def _check_derivation(
    cache: Cache, engine: AsyncEngine, sp: StorePath, drv: Derivation, text: str
) -> queries.DrvInfo:
    """The record of an uploaded derivation, once it is known to be one Nix could have written
    (its inputs are in the cache already): the checks are pure, this gathers their inputs."""
    inline = len(text) <= INLINE_DRV_CHECK_CHARS
    if inline:
        features = _check_form(sp, drv, text)
    else:
        features = await asyncio.to_thread(_check_form, sp, drv, text)
    hashes = await _fetch_input_hash_modulos(cache, engine, sp, drv)
    if inline:
        return _check_outputs(sp, drv, hashes, features)
    return await asyncio.to_thread(_check_outputs, sp, drv, hashes, features)


INLINE_DRV_CHECK_CHARS = 1024 * 1024
"""Derivations up to this size are checked on the event loop; larger ones in a thread."""


def _check_form(sp: StorePath, drv: Derivation, text: str) -> frozenset[str]:
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


def _check_outputs(
    sp: StorePath, drv: Derivation, hashes: Mapping[str, bytes], features: frozenset[str]
) -> queries.DrvInfo:
    """Nix's checkDerivationOutputs: each output path must be the one Nix computes from the
    derivation and its inputs' hashes modulo, and `$<output>` must name it. Returns the
    record, with the derivation's own hash modulo for its dependents."""
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
    return await _input_hash_modulos(cache, engine, sp, drv.input_drvs)


async def _input_hash_modulos(
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
        sink = _RootFile(keep=True)
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
    untrusted: Cache | None = None,
) -> NarInfo:
    """Accept an output NAR from the holder of a current lease (architecture §6).

    Only outputs of the leased step's derivation are accepted; references are found by
    scanning for the input closure's hash parts (plus the step's own outputs). An untrusted
    step's outputs go to the ``untrusted`` cache, never to ``cache`` (docs/security.md).
    """
    node = scheduler.lease_holder(lease_id)
    if node is None:
        raise Conflict("lease is not current: the step was reassigned or finished")
    if output_name not in node.outputs:
        raise BadRequest(f"{output_name!r} is not an output of {node.drv_path}")
    declared_hash, declared_size = parse_declared(nar_hash, nar_size, cache.config.max_nar_bytes)
    return await ingest_leased_output(
        cache,
        upstreams,
        scheduler,
        lease_id,
        output_name,
        chunks,
        declared_hash=declared_hash,
        declared_size=declared_size,
        untrusted=untrusted,
    )


async def ingest_leased_output(
    cache: Cache,
    upstreams: Upstreams,
    scheduler: Scheduler,
    lease_id: str,
    output_name: str,
    chunks: AsyncIterator[bytes],
    *,
    declared_hash: bytes,
    declared_size: int,
    untrusted: Cache | None = None,
) -> NarInfo:
    """The verified path of ``ingest_output`` once the declared hash and size are known: also
    the door for outputs the runner built itself on an SSH builder (``sshvenue``), so they
    pass the same checks (current lease, an output of the leased drv, size caps, hash and
    size while streaming, references found by the runner's own scan) before they are signed.

    A trusted step publishes to ``cache``. An untrusted step publishes to ``untrusted`` (its
    own key, its own index): a path the main cache holds already is kept as it is there, and
    its inputs' references are looked up in both caches.
    """

    async def receive(candidates: Mapping[str, str]) -> tuple[Ingested, Staged]:
        # Either cache verifies into the shared storage; the step's trust decides where the
        # result is published.
        return await cache.receive(
            chunks,
            kind=UploadKind.OUTPUT,
            declared_size=declared_size,
            declared_hash=declared_hash,
            candidates=candidates,
        )

    async def skip() -> None:
        await _drain(chunks, cache.config.max_nar_bytes)

    return await publish_leased_output(
        cache,
        upstreams,
        scheduler,
        lease_id,
        output_name,
        declared_size,
        receive,
        skip,
        untrusted=untrusted,
    )


Receive = Callable[[Mapping[str, str]], Awaitable[tuple[Ingested, Staged]]]
"""Verifies a NAR given the reference candidates (hash part -> path); returns it staged."""


async def publish_leased_output(
    cache: Cache,
    upstreams: Upstreams,
    scheduler: Scheduler,
    lease_id: str,
    output_name: str,
    declared_size: int,
    receive: Receive,
    skip: Callable[[], Awaitable[None]],
    *,
    via: str = "a PUT to the runner",
    untrusted: Cache | None = None,
) -> NarInfo:
    """Publish an output of a leased step, whichever way its NAR arrives (a PUT to the
    runner, or a presigned upload to the bucket): the one door for agent outputs.

    Checks the lease and the output name, returns the existing record (after ``skip``) when
    the path is cached already, gathers the reference candidates (the input closure and the
    step's outputs), lets ``receive`` verify the NAR, checks the lease again (it may have run
    out meanwhile) and signs and records it. Nothing is published on any failure.

    A trusted step publishes to ``cache``. An untrusted step publishes to ``untrusted`` (its
    own key, its own index): a path the main cache holds already is kept as it is there.
    """
    node = scheduler.lease_holder(lease_id)
    if node is None:
        raise Conflict("lease is not current: the step was reassigned or finished")
    path = node.outputs.get(output_name)
    if path is None:
        raise BadRequest(f"{output_name!r} is not an output of {node.drv_path}")
    cache.check_declared_size(declared_size)
    target = cache
    also: Cache | None = None
    if not node.req.trusted:
        if untrusted is None:
            raise BigtentError(f"step {node.id} is untrusted but the untrusted cache is not set up")
        target = also = untrusted
    existing = await cache.fetch_narinfo(path)
    if existing is None and also is not None:
        existing = await also.fetch_narinfo(path)
    if existing is not None:
        # Built before (another step, or an earlier attempt): what is signed stays.
        await skip()
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
    candidates = await closure(cache, upstreams, inputs, also=also) | set(drv.outputs.values())
    by_hash = {StorePath.parse(c).hash_part: c for c in candidates}
    got, staged = await receive(by_hash)
    try:
        if scheduler.lease_holder(lease_id) is not node:
            # The lease ran out (or the step was reassigned) while the NAR was verified.
            raise Conflict("lease is not current: the step was reassigned or finished")
        refs = {by_hash[h] for h in got.references}
        published = await target.publish(
            staged, StorePath.parse(path), got, refs, deriver=node.drv_path
        )
    except BaseException:
        await target.discard(staged)
        raise
    log.info(
        "step %d: received %s (%d bytes) by %s%s",
        node.id,
        path,
        got.nar_size,
        via,
        "" if node.req.trusted else " into the untrusted cache",
    )
    return published
