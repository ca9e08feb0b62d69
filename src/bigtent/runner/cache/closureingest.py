"""A client's closure in batches (``ingest_client_closure``): each batch's paths verified in a
small thread pool, dependencies before dependents, and published together. Nix CI's
evaluations bring their .drv files in this way from the runner's store, and clients theirs in
batch upload bodies (``ingest_client_batch``, ``POST /api/v1/paths/batch``)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from bigtent.errors import BadRequest
from bigtent.narbatch import BatchEntry
from bigtent.nix.drv import Derivation
from bigtent.nix.store_path import StorePath
from bigtent.runner.cache.drvcheck import (
    RootFile,
    check_form,
    check_outputs,
    content_address,
    input_hash_modulos,
    parse_derivation,
)
from bigtent.runner.cache.ingest import parse_path
from bigtent.runner.cache.narcheck import Ingested, check_nar_size, declared_hash
from bigtent.runner.cache.service import Cache, Publication
from bigtent.runner.cache.storage import Staged
from bigtent.runner.db import queries
from bigtent.runner.metrics import UploadKind

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ClientPath:
    """A content-addressed path the runner reads itself (e.g. from its evaluation store), with
    what Nix declares about it: its NAR's hash and size and its references."""

    path: str
    nar_hash: bytes
    nar_size: int
    references: frozenset[str]
    """Full store paths (ignored for a .drv, whose references are its inputs). The path
    itself only as a source path's self reference (part of its store path)."""
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
    text: str = ""
    """The derivation's text (recorded for assignments)."""


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


async def ingest_client_batch(
    cache: Cache, engine: AsyncEngine, entries: Sequence[BatchEntry]
) -> int:
    """Accept the paths of one batch upload (``narbatch``), with every check of a single
    upload, all or none: published in one transaction, or refused as a whole with the
    failing path named. A reference must be cached or earlier in ``entries``; paths already
    cached are skipped. Returns the number of paths published."""
    paths = [_client_path(entry, cache.config.max_nar_bytes) for entry in entries]
    seen: set[str] = set()
    for p in paths:
        if p.path in seen:  # once as a basename, once as a full path
            raise BadRequest(f"batch upload: {p.path} is sent twice")
        seen.add(p.path)
    return await ingest_client_closure(cache, engine, paths, batch_paths=max(1, len(paths)))


def _client_path(entry: BatchEntry, max_nar_bytes: int) -> ClientPath:
    """A batch entry's declarations parsed as a single upload's headers are (``ingest``)."""
    sp = parse_path(entry.path, "bad store path")
    digest = declared_hash(entry.nar_hash, f"{sp.path}: bad nar_hash")
    check_nar_size(entry.nar_size, max_nar_bytes)
    refs = (  # at most MAX_REFERENCES: the parser (``narbatch``) bounds them
        frozenset()
        if sp.name.endswith(".drv")
        else frozenset(parse_path(r, f"{sp.path}: bad reference").path for r in entry.references)
    )
    nar = entry.nar
    return ClientPath(sp.path, digest, entry.nar_size, refs, lambda: (nar,))


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
        ours_all = {v.sp.path for v in verified}
        outside = {r for v in verified for r in v.refs} - ours_all - available
        if outside:
            # References cached before this ingest (a batch upload's earlier requests).
            available.update(await cache.present(outside))
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
            hashes.update(await input_hash_modulos(cache, engine, first.sp, wanted))
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
    cache.remember_derivations(rows)
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
        try:
            out.append(_verify_one(cache, item, staged))
        except BadRequest as exc:
            # A batch's error names its path (a single upload's names it by its URL).
            if item.path not in exc.message:
                exc.message = f"{item.path}: {exc.message}"
                exc.args = (exc.message,)
            raise
    return out


def _verify_one(cache: Cache, item: ClientPath, staged: list[Staged]) -> _Verified:
    sp = parse_path(item.path, "bad store path")
    is_drv = sp.name.endswith(".drv")
    sink = RootFile(keep=is_drv)
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
        drv, text = parse_derivation(sp, sink)
        refs = set(drv.references)
    else:
        refs = set(item.references)
    ca = content_address(sp, got, sink, refs)
    if drv is not None:
        features = check_form(sp, drv, text)
    return _Verified(item, sp, got, st, refs, ca, drv, features, text)


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
    """``check_outputs`` of each derivation of a batch, in order: each one's hash modulo
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
        info = check_outputs(v.sp, v.drv, inputs, v.features, v.text)
        assert info.hash_modulo is not None
        known[v.sp.path] = bytes.fromhex(info.hash_modulo)
        out[v.sp.path] = info
    return out
