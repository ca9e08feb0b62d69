"""The upload of a closure: what the runner lacks, in dependency order, NARs serialised
straight from the store, a few in flight (architecture §1 step 1).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import TYPE_CHECKING

from bigtent.client.api import RunnerClient
from bigtent.client.outage import riding_out
from bigtent.errors import BigtentError, NixError
from bigtent.graphs import CycleError, dependencies_first
from bigtent.nix import base32
from bigtent.nix.nar import dump_path
from bigtent.nix.store import NixStore, PathInfo

if TYPE_CHECKING:
    from bigtent.client.observer import BuildObserver

log = logging.getLogger(__name__)


MISSING_BATCH = 1000
"""Store paths per ``POST /paths/missing`` request."""


UPLOAD_CONCURRENCY = 4
"""NAR uploads in flight at once (each still waits for its references)."""


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


async def _upload_in_order(
    client: RunnerClient,
    store: NixStore,
    order: Sequence[PathInfo],
    observer: BuildObserver,
    concurrency: int,
) -> None:
    """Upload concurrently, each path only after the uploads of the paths it references."""
    uploaded = {info.path: asyncio.Event() for info in order}
    slots = asyncio.Semaphore(concurrency)
    done = 0

    async def upload_one(info: PathInfo) -> None:
        nonlocal done
        for ref in info.references:
            if ref != info.path and ref in uploaded:
                await uploaded[ref].wait()
        async with slots:
            # An upload is idempotent: streamed anew from the store on each try.
            await riding_out(
                lambda: client.upload_path(
                    info.path,
                    _nar_chunks(store, info.path),
                    nar_hash=nar_hash_to_nix32(info.nar_hash),
                    nar_size=info.nar_size,
                    references=[r.rsplit("/", 1)[-1] for r in info.references],
                ),
                observer,
            )
        log.debug("uploaded %s", info.path)
        uploaded[info.path].set()
        done += 1
        observer.on_upload(done, len(order))

    try:
        async with asyncio.TaskGroup() as tg:
            for info in order:
                tg.create_task(upload_one(info))
    except BaseExceptionGroup as group:
        raise first_leaf(group) from None


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
