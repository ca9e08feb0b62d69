"""Presigned uploads: agents put output files straight into the S3 bucket, and the runner
verifies them before anything is published (architecture §6: uploads; docs/security.md).

``presign`` hands out a short-lived PUT URL only to the holder of a current lease, only for
an output of the leased step's derivation, for exactly the declared file size (signed), at a
key the runner derives from the lease and the declared NAR hash (``s3keys``). ``complete``
first takes the upload: a server-side copy to a key of the runner's own (no URL was signed
for it) and a delete of the upload. It then reads that copy back and verifies it through the
same checks as a NAR PUT to the runner (``outputs.publish_leased_output`` and
``NarIntake.receive_stored``); only then is that same copy moved to its content-addressed name and
its narinfo signed. What is published is what was verified: an agent that PUTs other bytes
with its URL meanwhile writes an upload nobody reads. Any failure deletes both objects.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from bigtent import protocol as p
from bigtent.errors import BadRequest, BigtentError, Conflict, PayloadTooLarge, StorageUnavailable
from bigtent.nix.compression import Compression, compressed_size_bound
from bigtent.nix.narinfo import NarInfo
from bigtent.runner.cache.narcheck import Ingested, check_nar_size, declared_hash
from bigtent.runner.cache.outputs import publish_leased_output
from bigtent.runner.cache.s3 import S3Staged, S3Storage
from bigtent.runner.cache.s3keys import incoming_key, verifying_key
from bigtent.runner.cache.service import Cache
from bigtent.runner.cache.storage import Staged
from bigtent.runner.cache.upstreams import Upstreams
from bigtent.runner.scheduler.service import Scheduler

log = logging.getLogger(__name__)

UPLOAD_PATH = "/api/v1/agent/upload/{lease}/{output}"


@dataclass(frozen=True, slots=True)
class Declared:
    """An ``UploadDeclaration`` checked against the runner's limits and settings."""

    nar_hash: bytes
    nar_size: int
    compression: Compression
    file_hash: bytes
    file_size: int


def check_declaration(
    body: p.UploadDeclaration, *, max_nar_bytes: int, compression: Compression
) -> Declared:
    """Parse and bound what an agent declares (pure): hashes are sha256, the NAR is within
    ``max_nar_bytes``, the compression is the cache's, and the file is no larger than that
    NAR could compress to (the signed upload size is bounded by the NAR size)."""
    hashes = {}
    for field in ("nar_hash", "file_hash"):
        hashes[field] = declared_hash(getattr(body, field), f"bad {field}")
    check_nar_size(body.nar_size, max_nar_bytes)
    if body.compression != compression:
        raise BadRequest(
            f"this cache stores {compression} files, not {body.compression[:16]!r}",
            detail={"compression": str(compression)},
        )
    if compression is Compression.NONE and body.file_size != body.nar_size:
        raise BadRequest(
            f"an uncompressed file is the NAR itself: its size must be {body.nar_size}, "
            f"not {body.file_size}"
        )
    bound = compressed_size_bound(body.nar_size, compression)
    if body.file_size > bound:
        raise PayloadTooLarge(
            f"declared file size {body.file_size} is more than a {body.nar_size}-byte NAR "
            f"compresses to with {compression} (at most {bound})"
        )
    return Declared(
        hashes["nar_hash"], body.nar_size, compression, hashes["file_hash"], body.file_size
    )


def record_json(info: NarInfo) -> dict[str, object]:
    """How an upload's answer describes the published path (the direct PUT's answer too)."""
    return {
        "path": info.store_path,
        "nar_hash": info.nar_hash,
        "nar_size": info.nar_size,
        "references": [f"/nix/store/{r}" for r in info.references],
    }


class PresignedUploads:
    """The runner's side of presigned uploads (``storage`` is None with local storage: then
    every ``presign`` answers "PUT it to the runner")."""

    def __init__(
        self,
        cache: Cache,
        upstreams: Upstreams,
        scheduler: Scheduler,
        storage: S3Storage | None,
        *,
        enabled: bool = True,
        untrusted: Cache | None = None,
    ) -> None:
        self.cache = cache
        self.untrusted = untrusted
        """Where untrusted steps' outputs are published (docs/security.md, trust scoping)."""
        self.upstreams = upstreams
        self.scheduler = scheduler
        self.storage = storage if enabled else None
        self._inflight: dict[str, asyncio.Future[NarInfo]] = {}

    def _declared(self, body: p.UploadDeclaration) -> Declared:
        return check_declaration(
            body,
            max_nar_bytes=self.cache.config.max_nar_bytes,
            compression=self.cache.config.compression,
        )

    def _leased_output(self, lease_id: str, output_name: str) -> str:
        """The output path, when ``lease_id`` is current and ``output_name`` is an output of
        its step's derivation (the same refusals as a direct PUT)."""
        node = self.scheduler.lease_holder(lease_id)
        if node is None:
            raise Conflict("lease is not current: the step was reassigned or finished")
        path = node.outputs.get(output_name)
        if path is None:
            raise BadRequest(f"{output_name!r} is not an output of {node.drv_path}")
        return path

    async def presign(
        self, lease_id: str, output_name: str, body: p.UploadDeclaration
    ) -> p.UploadPlan:
        path = self._leased_output(lease_id, output_name)
        upload_url = UPLOAD_PATH.format(lease=lease_id, output=output_name)
        if self.storage is None:
            return p.UploadPlan(method=p.UploadMethod.PUT, url=upload_url)
        declared = self._declared(body)
        existing = await self.cache.fetch_narinfo(path)
        node = self.scheduler.lease_holder(lease_id)
        if existing is None and self.untrusted is not None and node and not node.req.trusted:
            existing = await self.untrusted.fetch_narinfo(path)
        if existing is not None:
            return p.UploadPlan(
                method=p.UploadMethod.CACHED,
                path=existing.store_path,
                nar_hash=existing.nar_hash,
                nar_size=existing.nar_size,
                references=[f"/nix/store/{r}" for r in existing.references],
            )
        key = incoming_key(self.storage.prefix, lease_id, declared.nar_hash, declared.compression)
        url, headers = self.storage.presigned_put(key, declared.file_size)
        log.debug("lease %s: presigned %s (%d bytes)", lease_id, key, declared.file_size)
        return p.UploadPlan(
            method=p.UploadMethod.PRESIGNED,
            url=url,
            headers=headers,
            complete_url=upload_url + p.COMPLETE_SUFFIX,
            expires_secs=self.storage.config.presigned_put_secs,
        )

    async def complete(self, lease_id: str, output_name: str, body: p.UploadDeclaration) -> NarInfo:
        """Verify and publish an uploaded file. A repeated ``complete`` while the first is
        still verifying waits for the same verification; after it, it gets the record."""
        storage = self.storage
        if storage is None:
            raise BadRequest("this runner takes outputs by PUT; it issues no presigned uploads")
        self._leased_output(lease_id, output_name)
        declared = self._declared(body)
        key = incoming_key(storage.prefix, lease_id, declared.nar_hash, declared.compression)
        running = self._inflight.get(key)
        if running is not None:
            return await asyncio.shield(running)
        future: asyncio.Future[NarInfo] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            info = await self._verify(storage, key, lease_id, output_name, declared)
        except BaseException as exc:
            if isinstance(exc, BigtentError):
                future.set_exception(exc)
            else:
                future.set_exception(Conflict("the verification was interrupted; try again"))
            future.exception()  # retrieved: no "never retrieved" warning when none waits
            raise
        else:
            future.set_result(info)
            return info
        finally:
            del self._inflight[key]

    async def _verify(
        self, storage: S3Storage, key: str, lease_id: str, output_name: str, declared: Declared
    ) -> NarInfo:
        # The runner's own copy of the upload: verified, then published (``S3Staged``).
        taken = verifying_key(key, secrets.token_hex(16))
        staged = S3Staged(storage, source_key=taken)

        async def forget() -> None:
            """Delete the upload (if still there) and the runner's copy (idempotent)."""
            await asyncio.to_thread(storage.delete, key)
            await staged.discard()

        async def receive(candidates: Mapping[str, str]) -> tuple[Ingested, Staged]:
            if not await asyncio.to_thread(storage.take, key, taken):
                raise Conflict(
                    "no uploaded file for this declaration: PUT it to the presigned URL first"
                )
            opened = await asyncio.to_thread(storage.open_object, taken)
            if opened is None:
                raise StorageUnavailable(f"S3 storage: {taken} vanished while being verified")
            size, obj = opened
            if size != declared.file_size:
                obj.close()
                raise BadRequest(
                    f"the uploaded file is {size} bytes, not its declared {declared.file_size}"
                )
            got = await self.cache.receive_stored(
                obj,
                staged,
                compression=declared.compression,
                declared_size=declared.nar_size,
                declared_hash=declared.nar_hash,
                declared_file_size=declared.file_size,
                declared_file_hash=declared.file_hash,
                candidates=candidates,
            )
            return got, staged

        try:
            return await publish_leased_output(
                self.cache,
                self.upstreams,
                self.scheduler,
                lease_id,
                output_name,
                declared.nar_size,
                receive,
                forget,
                via="a presigned upload",
                untrusted=self.untrusted,
            )
        except BaseException as exc:
            # Whatever failed, the object is never published: delete it (idempotent).
            try:
                await forget()
            except StorageUnavailable as gone:
                log.warning("could not delete refused upload %s: %s", key, gone)
            if isinstance(exc, BigtentError):
                log.warning("lease %s: refused upload of %s: %s", lease_id, output_name, exc)
            raise
