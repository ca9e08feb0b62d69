"""The upload of a closure: what the runner lacks, in dependency order, NARs serialised
straight from the store, small paths in batches and large ones streamed on their own, a few
requests in flight (architecture §1 step 1).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bigtent.client.api import RunnerClient
from bigtent.client.outage import riding_out
from bigtent.errors import BigtentError, NixError
from bigtent.graphs import CycleError, dependencies_first
from bigtent.narbatch import entry_header
from bigtent.nix import base32
from bigtent.nix.nar import dump_path
from bigtent.nix.store import NixStore, PathInfo

if TYPE_CHECKING:
    from bigtent.client.observer import BuildObserver

log = logging.getLogger(__name__)


MISSING_BATCH = 1000
"""Store paths per ``POST /paths/missing`` request."""


UPLOAD_CONCURRENCY = 4
"""Upload requests in flight at once (each still waits for its references)."""


BATCH_PATHS = 256
BATCH_BYTES = 8 * 1024 * 1024
"""A batch upload carries at most this many paths and this much NAR (the runner takes up to
``narbatch.MAX_BATCH_PATHS`` paths and a 16 MiB body)."""
BATCH_PATH_BYTES = 1024 * 1024
"""A path with a larger NAR has its own streamed upload (``PUT /paths/{basename}``)."""


def nar_hash_to_nix32(nar_hash: str) -> str:
    """``sha256:<nix32>`` for any spelling Nix prints (SRI ``sha256-<b64>`` on 2.8, hex, nix32)."""
    try:
        return base32.format_hash("sha256", base32.parse_hash(nar_hash, "sha256"))
    except ValueError as exc:
        raise NixError(f"Nix reported an unexpected NAR hash {nar_hash!r}: {exc}") from exc


def upload_order(infos: Sequence[PathInfo], missing: Sequence[str]) -> list[PathInfo]:
    """The missing paths, every one after the missing paths it references (docs/api.md: the
    runner accepts a path only once its references are in the cache).

    Ties are broken by path, so the order is deterministic; self-references are ignored.
    """
    by_path = {i.path: i for i in infos}
    wanted = set(missing)
    unknown = wanted - by_path.keys()
    if unknown:
        raise BigtentError(
            f"runner asked for paths outside the closure: {', '.join(sorted(unknown))}"
        )
    try:
        order = dependencies_first({p: by_path[p].references for p in wanted})
    except CycleError as exc:
        stuck = ", ".join(str(p) for p in exc.nodes[:5])
        raise BigtentError(f"reference cycle among store paths: {stuck}") from None
    return [by_path[p] for p in order]


async def upload_closure(
    client: RunnerClient,
    store: NixStore,
    drvs: Sequence[str],
    observer: BuildObserver,
    *,
    concurrency: int = UPLOAD_CONCURRENCY,
) -> int:
    """Upload the derivations' closure paths the runner lacks; return how many were uploaded."""
    infos = await store.path_info(drvs, recursive=True, derivation=True)
    paths = [i.path for i in infos]
    missing: list[str] = []
    for start in range(0, len(paths), MISSING_BATCH):
        batch = paths[start : start + MISSING_BATCH]
        missing += await riding_out(functools.partial(client.missing_paths, batch), observer)
    if not missing:
        observer.on_phase(f"runner has all {len(paths)} paths of the closure")
        return 0
    order = upload_order(infos, missing)
    observer.on_phase(f"uploading {len(order)} of {len(paths)} closure paths")
    await _upload_in_order(client, store, order, observer, max(1, concurrency))
    return len(order)


@dataclass(frozen=True, slots=True)
class UploadJob:
    """One upload request: a batch of small paths (``POST /paths/batch``), or one path's
    own streamed ``PUT``."""

    paths: tuple[PathInfo, ...]
    batched: bool


def upload_jobs(
    order: Sequence[PathInfo],
    *,
    max_paths: int = BATCH_PATHS,
    max_bytes: int = BATCH_BYTES,
    path_bytes: int = BATCH_PATH_BYTES,
) -> list[UploadJob]:
    """``order`` (references first) cut, in order, into uploads: runs of paths of at most
    ``path_bytes`` each as batches of at most ``max_paths`` paths and ``max_bytes`` of NAR,
    and every larger path alone. A batch ends before a large path, so every job's
    references are in it or in jobs before it."""
    jobs: list[UploadJob] = []
    run: list[PathInfo] = []
    size = 0
    for info in order:
        if info.nar_size > path_bytes:
            if run:
                jobs.append(UploadJob(tuple(run), True))
                run, size = [], 0
            jobs.append(UploadJob((info,), False))
            continue
        if run and (len(run) >= max_paths or size + info.nar_size > max_bytes):
            jobs.append(UploadJob(tuple(run), True))
            run, size = [], 0
        run.append(info)
        size += info.nar_size
    if run:
        jobs.append(UploadJob(tuple(run), True))
    return jobs


class _NoBatchRoute(Exception):
    """The runner has no batch route (older than it): upload path by path."""


async def _upload_in_order(
    client: RunnerClient,
    store: NixStore,
    order: Sequence[PathInfo],
    observer: BuildObserver,
    concurrency: int,
) -> None:
    """Upload in batches where the runner takes them, else path by path."""
    done: set[str] = set()
    if client.batch_uploads:
        try:
            await _run_jobs(client, store, upload_jobs(order), observer, concurrency, done)
            return
        except _NoBatchRoute:
            log.debug("the runner has no batch upload route: uploading path by path")
            client.batch_uploads = False
    rest = [UploadJob((info,), False) for info in order if info.path not in done]
    await _run_jobs(client, store, rest, observer, concurrency, done, total=len(order))


async def _run_jobs(
    client: RunnerClient,
    store: NixStore,
    jobs: Sequence[UploadJob],
    observer: BuildObserver,
    concurrency: int,
    done: set[str],
    *,
    total: int | None = None,
) -> None:
    """Run the uploads concurrently, each only after the uploads of the paths its paths
    reference (outside itself); ``done`` collects the paths uploaded."""
    uploaded = {info.path: asyncio.Event() for job in jobs for info in job.paths}
    count = total if total is not None else len(uploaded)
    slots = asyncio.Semaphore(concurrency)

    async def upload_one(job: UploadJob) -> None:
        mine = {info.path for info in job.paths}
        for info in job.paths:
            for ref in info.references:
                if ref not in mine and ref in uploaded:
                    await uploaded[ref].wait()
        async with slots:
            # An upload is idempotent: a batch is sent again as it is, a single path
            # streamed anew from the store on each try.
            if job.batched:
                body = await _batch_body(store, job.paths)
                if not await riding_out(lambda: client.upload_paths(body), observer):
                    raise _NoBatchRoute
            else:
                info = job.paths[0]
                nar_hash, references = declared(info)
                await riding_out(
                    lambda: client.upload_path(
                        info.path,
                        _nar_chunks(store, info.path),
                        nar_hash=nar_hash,
                        nar_size=info.nar_size,
                        references=references,
                    ),
                    observer,
                )
        for info in job.paths:
            log.debug("uploaded %s", info.path)
            done.add(info.path)
            uploaded[info.path].set()
        observer.on_upload(len(done), count)

    try:
        async with asyncio.TaskGroup() as tg:
            for job in jobs:
                tg.create_task(upload_one(job))
    except BaseExceptionGroup as group:
        raise first_leaf(group) from None


def declared(info: PathInfo) -> tuple[str, list[str]]:
    """What an upload declares of a path besides its size: its NAR hash in Nix's base-32
    form and its references' basenames (a single ``PUT`` and a batch entry alike)."""
    return nar_hash_to_nix32(info.nar_hash), [r.rsplit("/", 1)[-1] for r in info.references]


async def _batch_body(store: NixStore, infos: Sequence[PathInfo]) -> bytes:
    """The batch body (``narbatch``) of ``infos``, their NARs read in one worker thread;
    ``nix-store --dump`` for a path that cannot be read directly."""
    nars = await asyncio.to_thread(_read_nars, store, infos)
    parts: list[bytes] = []
    for info, nar in zip(infos, nars, strict=True):
        if nar is None:
            nar = b"".join([piece async for piece in _nar_chunks(store, info.path)])
        nar_hash, references = declared(info)
        basename = info.path.rsplit("/", 1)[-1]
        parts.append(entry_header(basename, nar_hash, len(nar), references))
        parts.append(nar)
    return b"".join(parts)


def _read_nars(store: NixStore, infos: Sequence[PathInfo]) -> list[bytes | None]:
    """The NAR of each path serialised from the filesystem (blocking); None for one that
    cannot be read directly."""
    out: list[bytes | None] = []
    for info in infos:
        try:
            out.append(b"".join(dump_path(store.real_path(info.path))))
        except OSError as exc:
            log.debug("cannot read %s directly (%s); using nix-store --dump", info.path, exc)
            out.append(None)
    return out


def first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


async def _nar_chunks(store: NixStore, path: str) -> AsyncIterator[bytes]:
    """The NAR of ``path``, serialised here from the filesystem (no Nix process per path);
    ``nix-store --dump`` only when the path cannot be read directly."""
    chunks: Iterator[bytes] = dump_path(store.real_path(path))
    try:
        first = await asyncio.to_thread(_next_chunk, chunks)
    except OSError as exc:
        log.debug("cannot read %s directly (%s); using nix-store --dump", path, exc)
        async for piece in store.dump(path):
            yield piece
        return
    try:
        chunk: bytes | None = first
        while chunk is not None:
            yield chunk
            chunk = await asyncio.to_thread(_next_chunk, chunks)
    except OSError as exc:
        raise BigtentError(f"cannot read store path {path}: {exc}") from exc


def _next_chunk(chunks: Iterator[bytes]) -> bytes | None:
    return next(chunks, None)
