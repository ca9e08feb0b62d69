"""Agents' outputs: the one door for the outputs of a leased step, whichever way their NAR
arrives (a PUT to the runner, a presigned upload to the bucket, an SSH builder's store). Only
outputs of the leased step's derivation enter; their references are found by scanning the NAR
for the hash parts of the build's input closure."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

from bigtent.errors import BadRequest, BigtentError, Conflict, NotFound
from bigtent.nix.narinfo import NarInfo
from bigtent.nix.store_path import StorePath
from bigtent.runner.cache.ingest import drain, parse_declared
from bigtent.runner.cache.narcheck import Ingested, check_nar_size
from bigtent.runner.cache.service import Cache
from bigtent.runner.cache.storage import Staged
from bigtent.runner.cache.upstreams import Upstreams, closure
from bigtent.runner.metrics import UploadKind
from bigtent.runner.scheduler.service import Scheduler

log = logging.getLogger(__name__)


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
        await drain(chunks, cache.config.max_nar_bytes)

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
    the path is known to be cached already (for a trusted step: known to this runner's
    memory; a record only the database has is found, and kept, by the insert), gathers the
    reference candidates (the input closure and the step's outputs), lets ``receive`` verify
    the NAR, checks the lease again (it may have run out meanwhile) and signs and records it.
    Nothing is published on any failure.

    A trusted step publishes to ``cache``. An untrusted step publishes to ``untrusted`` (its
    own key, its own index): a path the main cache holds already is kept as it is there.
    """
    node = scheduler.lease_holder(lease_id)
    if node is None:
        raise Conflict("lease is not current: the step was reassigned or finished")
    path = node.outputs.get(output_name)
    if path is None:
        raise BadRequest(f"{output_name!r} is not an output of {node.drv_path}")
    check_nar_size(declared_size, cache.config.max_nar_bytes)
    target = cache
    also: Cache | None = None
    if not node.req.trusted:
        if untrusted is None:
            raise BigtentError(f"step {node.id} is untrusted but the untrusted cache is not set up")
        target = also = untrusted
    if also is None:
        # A trusted step's output is new almost always: memory answers for a path this runner
        # published or served, and the database is not asked. A path another runner (or an
        # earlier process) recorded is found by the insert in ``publish``, which keeps and
        # answers the first record: the same answer, after the NAR was verified.
        existing = await cache.remembered_narinfo(path)
    else:
        # An untrusted step's output is kept as the main cache has it: both are asked.
        existing = await cache.fetch_narinfo(path)
        if existing is None:
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
