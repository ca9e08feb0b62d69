"""NAR storage in an S3 bucket (``[cache] storage = "s3"``): boto3, called from worker threads.

Why boto3 in threads rather than an asyncio client (aiobotocore/aioboto3): the S3 calls per
NAR are few (a HEAD, a GET streamed back for verification, a server-side copy, a DELETE, or
one managed upload) and their bodies are processed in worker threads anyway (hashing and
decompressing cost CPU); presigning is local computation. boto3 is the reference client, is
what the tests' S3 server (moto) itself depends on, and brings no second HTTP stack, while
aiobotocore pins botocore to a narrow range that conflicts with moto's and adds aiohttp.

Checksums: botocore >= 1.36 adds CRC32 checksums to every upload and validates them on
downloads by default, which many S3-compatible services refuse or lack; both are set to
``when_required`` (the NAR and file hashes are verified by the runner itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

import boto3
import botocore.config
import botocore.exceptions
from boto3.s3.transfer import TransferConfig
from starlette.responses import RedirectResponse, Response, StreamingResponse

from bigtent.config import S3Section
from bigtent.errors import ConfigError, NotFound, StorageUnavailable
from bigtent.runner.cache.s3keys import incoming_prefix, nar_key
from bigtent.runner.cache.storage import Staged, clear_staging_dir, new_staging_file

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)

READ_CHUNK_BYTES = 1024 * 1024
"""Objects are read back (verification, proxying) this much at a time."""
MULTIPART_THRESHOLD_BYTES = 64 * 1024 * 1024
"""Uploads and copies larger than this go in parts (S3 refuses single PUTs over 5 GiB)."""
NAR_CONTENT_TYPE = "application/x-nix-nar"


def _failure(what: str, exc: Exception) -> StorageUnavailable:
    """A storage error for the API and the logs: what failed and S3's error code or the
    connection problem (never credentials: botocore's messages carry none)."""
    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {})
        reason = f"{err.get('Code', '?')}: {err.get('Message', '')}".rstrip(": ")
    else:
        reason = str(exc) or type(exc).__name__
    return StorageUnavailable(f"S3 storage: {what} failed ({reason})")


def _missing(exc: botocore.exceptions.ClientError) -> bool:
    code = exc.response.get("Error", {}).get("Code", "")
    return code in ("404", "NoSuchKey", "NotFound")


class _Body:
    """An object's streamed body whose read errors (a connection cut, a read timeout) are
    ``StorageUnavailable``, as every other storage failure is."""

    def __init__(self, body: Any, key: str) -> None:
        self._body = body
        self._key = key

    def read(self, size: int = -1) -> bytes:
        try:
            return cast(bytes, self._body.read(size))
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            raise _failure(f"reading {self._key}", exc) from exc

    def close(self) -> None:
        self._body.close()

    def __enter__(self) -> _Body:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True, slots=True)
class IncomingObject:
    """An object an agent uploaded (``incoming/...``), not yet verified."""

    key: str
    last_modified: float


def expired_incoming(objects: Sequence[IncomingObject], now: float, ttl_secs: float) -> list[str]:
    """Keys of presigned uploads older than ``ttl_secs``: their agents never completed them
    (pure: the sweeper's decision)."""
    return sorted(o.key for o in objects if now - o.last_modified > ttl_secs)


class S3Staged:
    """A file headed for the bucket: a local staging file (a NAR the runner received and
    compressed itself) or an object an agent uploaded to ``incoming/`` (``source_key``)."""

    def __init__(
        self, storage: S3Storage, *, path: str | None = None, source_key: str | None = None
    ) -> None:
        self._storage = storage
        self.path = path
        self.source_key = source_key

    async def commit(self, name: str) -> None:
        key = self._storage.key(name)
        if self.path is not None:
            await asyncio.to_thread(self._storage.put_file, self.path, key)
            await self.discard()
        elif self.source_key is not None:
            await asyncio.to_thread(self._storage.move, self.source_key, key)

    async def discard(self) -> None:
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        if self.source_key is not None:
            await asyncio.to_thread(self._storage.delete, self.source_key)


class S3Storage:
    """NAR files as objects ``<prefix>nar/...`` in one bucket; files the runner compresses
    itself are staged in ``tmp_dir`` first."""

    def __init__(
        self,
        config: S3Section,
        tmp_dir: Path,
        *,
        client: S3Client | None = None,
        presign_client: S3Client | None = None,
    ) -> None:
        self.config = config
        self.bucket = config.bucket
        self.prefix = config.prefix
        self.tmp_dir = tmp_dir
        clear_staging_dir(tmp_dir)
        self.client = client or _make_client(config, config.endpoint_url)
        self.presign_client = presign_client or (
            _make_client(config, config.public_endpoint_url)
            if config.public_endpoint_url
            else self.client
        )
        self._transfer = TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD_BYTES,
            multipart_chunksize=MULTIPART_THRESHOLD_BYTES,
            max_concurrency=4,
        )

    # ---- Storage -------------------------------------------------------------------------
    def new_temp(self) -> tuple[BinaryIO, Staged]:
        out, path = new_staging_file(self.tmp_dir)
        return out, S3Staged(self, path=path)

    def local_path(self, name: str) -> Path | None:
        return None

    def surely_missing(self, name: str) -> bool:
        return False

    def remove(self, name: str) -> None:
        with contextlib.suppress(ValueError):
            self.delete(self.key(name))

    def open_file(self, name: str) -> BinaryIO:
        try:
            key = self.key(name)
        except ValueError as exc:
            raise FileNotFoundError(name) from exc
        opened = self.open_object(key)
        if opened is None:
            raise FileNotFoundError(name)
        return opened[1]

    # ---- keys and URLs -------------------------------------------------------------------
    def key(self, name: str) -> str:
        """The key of published NAR ``name``; ValueError for anything but a NAR file name."""
        return nar_key(self.prefix, name)

    def presigned_get(self, name: str, *, head: bool = False) -> str:
        """A short-lived URL to fetch published NAR ``name`` (ValueError for a bad name)."""
        return self.presign_client.generate_presigned_url(
            "head_object" if head else "get_object",
            Params={"Bucket": self.bucket, "Key": self.key(name)},
            ExpiresIn=self.config.presigned_get_secs,
        )

    def presigned_put(self, key: str, size: int) -> tuple[str, dict[str, str]]:
        """A URL (and the headers to send with it) to PUT exactly ``size`` bytes at ``key``:
        the length is signed, so S3 refuses a body of any other size."""
        url = self.presign_client.generate_presigned_url(
            "put_object",
            Params={"Bucket": self.bucket, "Key": key, "ContentLength": size},
            ExpiresIn=self.config.presigned_put_secs,
        )
        return url, {"Content-Length": str(size)}

    # ---- blocking operations (call from worker threads) ----------------------------------
    def check_bucket(self) -> None:
        """Raise ConfigError when the bucket cannot be used (at start, a clear message)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            where = self.config.endpoint_url or "AWS"
            raise ConfigError(
                f"config key cache.s3.bucket: cannot use bucket {self.bucket!r} at {where}: "
                f"{_failure('HEAD bucket', exc).message}; check bucket, endpoint_url, region "
                "and credentials"
            ) from exc

    def _object(self, method: str, key: str) -> dict[str, Any] | None:
        """The answer of ``head_object`` or ``get_object`` (``method``: ``HEAD`` or ``GET``)
        for object ``key``, or None when there is none; StorageUnavailable on any other
        failure."""
        call = self.client.head_object if method == "HEAD" else self.client.get_object
        try:
            return cast(dict[str, Any], call(Bucket=self.bucket, Key=key))
        except botocore.exceptions.ClientError as exc:
            if _missing(exc):
                return None
            raise _failure(f"{method} {key}", exc) from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise _failure(f"{method} {key}", exc) from exc

    def head(self, key: str) -> int | None:
        """The size of object ``key``, or None when there is none."""
        got = self._object("HEAD", key)
        return None if got is None else int(got["ContentLength"])

    def modified_at(self, name: str) -> float | None:
        got = self._object("HEAD", self.key(name))
        return None if got is None else float(got["LastModified"].timestamp())

    def open_object(self, key: str) -> tuple[int, BinaryIO] | None:
        """Size and body of object ``key``, or None when there is none."""
        got = self._object("GET", key)
        if got is None:
            return None
        return int(got["ContentLength"]), cast(BinaryIO, _Body(got["Body"], key))

    def put_file(self, path: str, key: str) -> None:
        """Upload a local file to ``key`` unless an object is there already (NAR files are
        content-addressed: the same name is the same bytes)."""
        if self.head(key) is not None:
            return
        try:
            self.client.upload_file(
                path,
                self.bucket,
                key,
                ExtraArgs={"ContentType": NAR_CONTENT_TYPE},
                Config=self._transfer,
            )
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise _failure(f"upload of {key}", exc) from exc
        except boto3.exceptions.S3UploadFailedError as exc:
            raise StorageUnavailable(f"S3 storage: upload of {key} failed ({exc})") from exc

    def move(self, source: str, key: str) -> None:
        """Copy ``source`` to ``key`` inside the bucket (unless ``key`` exists: same content),
        then delete ``source``."""
        if self.head(key) is None:
            try:
                self._copy(source, key)
            except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
                raise _failure(f"copy of {source} to {key}", exc) from exc
        self.delete(source)

    def take(self, source: str, key: str) -> bool:
        """Copy an agent's upload ``source`` to the runner's own ``key`` and delete ``source``;
        False when there is no ``source``. S3 copies one version of an object, so ``key``
        then holds fixed bytes whatever is PUT to ``source`` later: the runner verifies and
        publishes ``key``, never ``source`` (docs/security.md, presigned uploads)."""
        try:
            self._copy(source, key)
        except botocore.exceptions.ClientError as exc:
            if _missing(exc):
                return False
            raise _failure(f"copy of {source} to {key}", exc) from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise _failure(f"copy of {source} to {key}", exc) from exc
        self.delete(source)
        return True

    def _copy(self, source: str, key: str) -> None:
        """A server-side copy of ``source`` to ``key`` as a NAR object (botocore errors raised)."""
        self.client.copy(
            {"Bucket": self.bucket, "Key": source},
            self.bucket,
            key,
            ExtraArgs={"ContentType": NAR_CONTENT_TYPE, "MetadataDirective": "REPLACE"},
            Config=self._transfer,
        )

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise _failure(f"DELETE {key}", exc) from exc

    def list_incoming(self) -> list[IncomingObject]:
        out = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=incoming_prefix(self.prefix)
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    modified = obj.get("LastModified")
                    out.append(
                        IncomingObject(
                            obj.get("Key", ""), modified.timestamp() if modified else 0.0
                        )
                    )
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise _failure("listing incoming/", exc) from exc
        return out

    # ---- async -----------------------------------------------------------------------------
    async def stream(self, name: str) -> tuple[int, AsyncIterator[bytes]] | None:
        """Size and contents of published NAR ``name`` (proxy serving), or None."""
        try:
            key = self.key(name)
        except ValueError:
            return None
        opened = await asyncio.to_thread(self.open_object, key)
        if opened is None:
            return None
        size, body = opened

        async def chunks() -> AsyncIterator[bytes]:
            try:
                while chunk := await asyncio.to_thread(body.read, READ_CHUNK_BYTES):
                    yield chunk
            finally:
                body.close()

        return size, chunks()

    async def sweep_incoming(self, now: float) -> int:
        """Delete presigned uploads never completed; returns how many."""
        objects = await asyncio.to_thread(self.list_incoming)
        expired = expired_incoming(objects, now, self.config.incoming_ttl_secs)
        for key in expired:
            await asyncio.to_thread(self.delete, key)
        if expired:
            log.info("deleted %d presigned upload(s) never completed", len(expired))
        return len(expired)

    async def run_sweeper(self) -> None:
        """Sweep ``incoming/`` every ``sweep_interval_secs`` (the runner's lifespan task);
        a failed sweep is logged and tried again next time."""
        while True:
            try:
                await self.sweep_incoming(time.time())
            except StorageUnavailable as exc:
                log.warning("sweeping incoming uploads: %s", exc)
            await asyncio.sleep(self.config.sweep_interval_secs)


def _make_client(config: S3Section, endpoint_url: str | None) -> S3Client:
    credentials = config.credentials()
    session = boto3.session.Session()
    options: dict[str, Any] = {}
    if credentials is not None:
        options["aws_access_key_id"], options["aws_secret_access_key"] = credentials
    client_config = botocore.config.Config(
        signature_version="s3v4",
        s3={"addressing_style": config.addressing_style},
        retries={"max_attempts": 5, "mode": "standard"},
        max_pool_connections=config.max_connections,
        connect_timeout=10,
        read_timeout=60,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return session.client(
        "s3",
        region_name=config.region,
        endpoint_url=endpoint_url,
        config=client_config,
        **options,
    )


def iter_file(body: BinaryIO, chunk_bytes: int = READ_CHUNK_BYTES) -> Iterator[bytes]:
    """Chunks of a blocking body until its end."""
    while chunk := body.read(chunk_bytes):
        yield chunk


async def s3_nar_response(storage: S3Storage, name: str, *, head: bool) -> Response:
    """``/cache/nar/<file>`` from the bucket: a 302 to a presigned URL (Nix's curl follows
    it) or, with ``serve = "proxy"``, the object streamed through the runner."""
    if storage.config.serve == "redirect":
        try:
            url = storage.presigned_get(name, head=head)
        except ValueError as exc:
            raise NotFound("no such NAR") from exc
        return RedirectResponse(url, status_code=302, headers={"Cache-Control": "no-store"})
    if head:
        try:
            size = await asyncio.to_thread(storage.head, storage.key(name))
        except ValueError:
            size = None
        if size is None:
            raise NotFound("no such NAR")
        return Response(media_type=NAR_CONTENT_TYPE, headers={"Content-Length": str(size)})
    streamed = await storage.stream(name)
    if streamed is None:
        raise NotFound("no such NAR")
    size, chunks = streamed
    return StreamingResponse(
        chunks, media_type=NAR_CONTENT_TYPE, headers={"Content-Length": str(size)}
    )
