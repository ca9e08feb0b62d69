"""Upload a built step's outputs (architecture "How a build flows" 6, "S3 storage").

Two ways, behind one interface (``OutputUpload``), tried in order for each output:

- ``PresignedUpload``, when the runner takes presigned uploads (``registered``): the NAR is
  compressed and hashed (``agent/presigned.py``), then presign, PUT to the bucket, complete.
  The runner may answer that it wants this output by PUT instead (the next way).
- ``PutUpload``: the NAR hashed (first pass), then streamed to
  ``PUT /api/v1/agent/upload/{lease}/{output}`` (second pass, or kept in memory if small).

Each way's try is repeated as a whole by one retry loop (``Uploads.retrying``): a connection
error, a timeout or a retryable status is tried again with ``UPLOAD_BACKOFF`` for at most
``UPLOAD_RETRY_LEASE_FACTOR`` lease times, so a short network cut does not turn a good build
into an ``upload_failure``; other 4xx answers are final (``UploadError``). Both endpoints are
idempotent (the runner answers with its existing record when it has the path already).
NARs are produced and hashed in Python from the store's real path; ``nix-store --dump`` only
for stores this filesystem cannot read.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, assert_never

import httpx

from bigtent.agent import presigned
from bigtent.agent.credentials import CredentialSource
from bigtent.agent.nardigest import NAR_CHUNK_BYTES, hash_local, hash_stream, stream_local
from bigtent.agent.quickhttp import BodyTooLarge, QuickHttp
from bigtent.agent.stepstore import CacheSettings, join_runner_url
from bigtent.backoff import Backoff
from bigtent.errors import CredentialUnavailable, NixError, describe, parse_error_body
from bigtent.nix.base32 import format_hash
from bigtent.nix.compression import Compression
from bigtent.nix.nar import dump_path
from bigtent.nix.store import NixStore
from bigtent.protocol import (
    NAR_HASH_HEADER,
    NAR_SIZE_HEADER,
    PRESIGN_SUFFIX,
    Assign,
    OutputInfo,
    StepId,
    UploadMethod,
)

log = logging.getLogger(__name__)

UPLOAD_BACKOFF = Backoff(base=0.5, cap=8.0, jitter_low=0.5)
"""The delay before retrying a failed upload: 0.5 s, doubling on each try up to 8 s, each
delay times a jitter in [0.5, 1)."""
UPLOAD_RETRY_LEASE_FACTOR = 2.0
"""An output upload is retried for at most this many lease times (``registered.lease_secs``)
after its first try: longer, and the runner has re-queued the step anyway. An abort (the
session learnt the lease is gone, or the agent stops) ends the retries at once."""
UPLOAD_RETRY_STATUSES = frozenset({408, 429})
"""Client-error statuses that are transient; every 5xx is retried too, other 4xx are final
(400 bad NAR, 409 lease not current, 413 too large)."""
MAX_ANSWER_BYTES = 1024 * 1024
"""The runner's answer to an upload is a small JSON record; a larger one is left to httpx."""
UPLOADS_DIR = "uploads"
"""Under the work dir: compressed output files waiting for a presigned upload."""

Attempt = httpx.Response | str | None
"""One try's end: the runner's answer, why it failed when it may be tried again (a message),
or None (the runner wants the output the next way)."""


class UploadError(Exception):
    """An output NAR could not be uploaded; the message is for the step's ``error``."""


def upload_status_is_retried(status: int) -> bool:
    """Whether an upload answered with HTTP ``status`` is tried again: 5xx (the runner, or a
    proxy in front of it, is in trouble: 502/503/504) and 408/429; other 4xx are final."""
    return status >= 500 or status in UPLOAD_RETRY_STATUSES


def upload_error_is_retried(exc: BaseException) -> bool:
    """Whether an upload that raised ``exc`` is tried again: the connection failed or broke,
    or timed out. Anything else (a bad URL, the NAR unreadable) is final."""
    return isinstance(
        exc,
        httpx.TimeoutException | httpx.NetworkError | httpx.RemoteProtocolError | httpx.ProxyError,
    )


def upload_retry_secs(lease_secs: float) -> float:
    """How long after its first try an output upload is retried at most."""
    return lease_secs * UPLOAD_RETRY_LEASE_FACTOR


@dataclass(frozen=True, slots=True)
class Output:
    """One output to upload: its name, store path and upload URL (relative to the runner)."""

    name: str
    path: str
    url: str

    @property
    def what(self) -> str:
        return f"output {self.name} ({self.path})"


class OutputUpload(Protocol):
    """One way to upload an output."""

    async def upload(self, store: NixStore, output: Output) -> OutputInfo | None:
        """The runner's record of the output, or None when it wants the output the next way.
        Raises ``UploadError`` when the upload failed for good."""
        ...


class Uploads:
    """What both ways share: the runner's address, the HTTP client, the credential, the
    retry loop and how a runner's answer is judged."""

    def __init__(
        self,
        *,
        runner_url: str,
        work_dir: Path,
        http: httpx.AsyncClient,
        credentials: CredentialSource | None,
        rand: Callable[[], float],
        quick: QuickHttp | None = None,
    ) -> None:
        self.runner_url = runner_url
        self._quick = quick
        """Sends the PUTs of NARs kept in memory (``agent/quickhttp.py``), httpx the rest."""
        self.work_dir = work_dir
        self.http = http
        self._credentials = credentials
        self._rand = rand

    async def upload_all(
        self, store: NixStore, assign: Assign, cache: CacheSettings
    ) -> list[OutputInfo]:
        """Upload every output of ``assign``, each the first way the runner takes."""
        retry_secs = upload_retry_secs(cache.lease_secs)
        ways: list[OutputUpload] = []
        if cache.upload_compression is not None:
            ways.append(
                PresignedUpload(
                    self,
                    assign.step_id,
                    retry_secs,
                    cache.upload_compression,
                    cache.compression_level,
                )
            )
        ways.append(PutUpload(self, assign.step_id, retry_secs))
        outputs = []
        for name, path in sorted(assign.outputs.items()):
            url = assign.upload_urls.get(name)
            if url is None:
                raise UploadError(f"the assignment has no upload URL for output {name!r}")
            output = Output(name, path, url)
            for way in ways:
                if (info := await way.upload(store, output)) is not None:
                    outputs.append(info)
                    break
        return outputs

    def url(self, url: str) -> str:
        return join_runner_url(self.runner_url, url)

    async def retrying(
        self,
        attempt_once: Callable[[], Awaitable[Attempt]],
        step_id: StepId,
        retry_secs: float,
    ) -> httpx.Response | None:
        """Run ``attempt_once`` until it gives an answer (a response, or None), retrying what
        it reports as retryable with backoff for at most ``retry_secs``."""
        deadline = time.monotonic() + retry_secs
        attempt = 0
        while True:
            failure = await attempt_once()
            if failure is None or isinstance(failure, httpx.Response):
                return failure
            delay = UPLOAD_BACKOFF.delay(attempt, self._rand())
            attempt += 1
            if time.monotonic() + delay > deadline:
                raise UploadError(
                    f"{failure}; gave up after {attempt} tries in {retry_secs:g} s"
                    if attempt > 1
                    else failure
                )
            log.warning(
                "step %s: %s; retrying in %.1f s (try %d)", step_id, failure, delay, attempt + 1
            )
            await asyncio.sleep(delay)

    async def authorize(self, headers: dict[str, str]) -> str | None:
        """Put a usable credential into ``headers`` (a CI job's ID token is replaced when close
        to expiry); why not, when none could be had (tried again like a network error)."""
        if self._credentials is None:
            return None
        try:
            token = await self._credentials.credential(fresh=False)
        except CredentialUnavailable as exc:
            return f"cannot get the agent's credential for the upload: {exc}"
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return None

    async def send(
        self,
        method: str,
        url: str,
        what: str,
        *,
        headers: dict[str, str],
        content: bytes | AsyncIterator[bytes] | None = None,
        body: dict[str, object] | None = None,
        timeout: float | None = None,
    ) -> httpx.Response | str:
        """One request to the runner: its success response, or why it failed when it may be
        tried again. Raises ``UploadError`` when the failure is final."""
        if self._quick is not None and isinstance(content, bytes) and timeout is None:
            try:
                answer = await self._quick.request(method, url, headers, content, MAX_ANSWER_BYTES)
            except BodyTooLarge:
                answer = None  # not the runner's answer: httpx sends it again (idempotent)
            if answer is not None:
                head, data = answer
                sent = httpx.Request(method, url)
                response = httpx.Response(
                    head.status, headers=head.headers, content=data, request=sent
                )
                return _judged(response, what)
        try:
            response = await self.http.request(
                method,
                url,
                content=content,
                json=body,
                headers=headers,
                timeout=httpx.USE_CLIENT_DEFAULT
                if timeout is None
                else httpx.Timeout(timeout, connect=10.0),
            )
        except httpx.HTTPError as exc:
            return _retried_or_final(exc, f"uploading {what} failed: {describe(exc)}")
        except (OSError, ValueError, NixError) as exc:
            raise UploadError(f"uploading {what} failed: {exc}") from exc
        finally:
            if isinstance(content, AsyncGenerator):
                await content.aclose()
        return _judged(response, what)


def _judged(response: httpx.Response, what: str) -> httpx.Response | str:
    """A runner's answer: itself when a success, why it failed when it may be tried again;
    raises ``UploadError`` when the failure is final."""
    if response.is_success:
        return response
    message = f"runner refused {what}: HTTP {response.status_code}: {_error_text(response)}"
    if upload_status_is_retried(response.status_code):
        return message
    raise UploadError(message)


@dataclass(frozen=True, slots=True)
class PutUpload:
    """The NAR hashed, then PUT to the runner (``OutputUpload``); never answers None."""

    uploads: Uploads
    step_id: StepId
    retry_secs: float

    async def upload(self, store: NixStore, output: Output) -> OutputInfo:
        real = store.real_path(output.path)
        readable = _readable(real)
        kept: list[bytes] | None = None
        try:
            if readable:
                digest, size, kept = await hash_local(real)
            else:
                log.debug("%s is not readable here; using nix-store --dump", real)
                digest, size = await hash_stream(store.dump(output.path))
        except (OSError, ValueError, NixError) as exc:
            raise UploadError(f"cannot read {output.what}: {exc}") from exc
        small = b"".join(kept) if kept is not None else None

        def body() -> bytes | AsyncIterator[bytes]:
            """The NAR for one try: kept in memory when small, else streamed from the start."""
            if small is not None:
                return small
            return stream_local(real) if readable else store.dump(output.path)

        nar_hash = format_hash("sha256", digest)
        headers = {
            NAR_HASH_HEADER: nar_hash,
            NAR_SIZE_HEADER: str(size),
            "Content-Length": str(size),
            "Content-Type": "application/x-nix-nar",
        }
        url = self.uploads.url(output.url)

        async def attempt() -> Attempt:
            unauthorized = await self.uploads.authorize(headers)
            if unauthorized is not None:
                return unauthorized
            return await self.uploads.send("PUT", url, output.what, headers=headers, content=body())

        response = await self.uploads.retrying(attempt, self.step_id, self.retry_secs)
        assert response is not None  # a PUT try never answers None
        return OutputInfo(
            name=output.name,
            path=output.path,
            nar_hash=nar_hash,
            nar_size=size,
            references=_references(response),
        )


@dataclass(frozen=True, slots=True)
class PresignedUpload:
    """The NAR compressed and hashed, then presign, PUT to the bucket, complete, retried as a
    whole (a fresh URL each time) (``OutputUpload``). None when the runner answers that it
    takes this output by PUT."""

    uploads: Uploads
    step_id: StepId
    retry_secs: float
    compression: Compression
    level: int

    async def upload(self, store: NixStore, output: Output) -> OutputInfo | None:
        real = store.real_path(output.path)
        tmp_dir = self.uploads.work_dir / UPLOADS_DIR
        try:
            if _readable(real):
                prepared = await presigned.prepare_from_iter(
                    dump_path(real, NAR_CHUNK_BYTES), self.compression, self.level, tmp_dir
                )
            else:
                prepared = await presigned.prepare_from_stream(
                    store.dump(output.path), self.compression, self.level, tmp_dir
                )
        except (OSError, ValueError, NixError) as exc:
            raise UploadError(f"cannot read {output.what}: {exc}") from exc
        try:
            answer = await self.uploads.retrying(
                lambda: self._try(output.url, prepared, output.what),
                self.step_id,
                self.retry_secs,
            )
        finally:
            prepared.remove()
        if answer is None:
            return None
        return OutputInfo(
            name=output.name,
            path=output.path,
            nar_hash=prepared.nar_hash,
            nar_size=prepared.nar_size,
            references=_references(answer),
        )

    async def _try(self, url: str, prepared: presigned.PreparedFile, what: str) -> Attempt:
        """One presign, PUT, complete. Raises ``UploadError`` when the failure is final."""
        uploads = self.uploads
        auth: dict[str, str] = {}
        unauthorized = await uploads.authorize(auth)
        if unauthorized is not None:
            return unauthorized
        declaration = prepared.declaration().model_dump(mode="json")
        answer = await uploads.send(
            "POST", uploads.url(url) + PRESIGN_SUFFIX, what, headers=auth, body=declaration
        )
        if not isinstance(answer, httpx.Response):
            return answer
        try:
            plan = presigned.parse_plan(answer)
        except ValueError as exc:
            raise UploadError(f"uploading {what}: {exc}") from exc
        match plan.method:
            case UploadMethod.PUT:
                return None
            case UploadMethod.CACHED:
                return answer
            case UploadMethod.PRESIGNED:
                pass
            case _:
                assert_never(plan.method)
        # The bucket gets only what the runner signed: no runner credential goes there.
        try:
            put = await uploads.http.put(plan.url, content=prepared.body(), headers=plan.headers)
        except httpx.HTTPError as exc:
            return _retried_or_final(exc, f"uploading {what} to the bucket failed: {describe(exc)}")
        except OSError as exc:
            raise UploadError(f"uploading {what} failed: {exc}") from exc
        if not put.is_success:
            message = f"the bucket refused {what}: HTTP {put.status_code}: {put.text[:300]}"
            if presigned.bucket_status_is_retried(put.status_code):
                return message
            raise UploadError(message)
        return await uploads.send(
            "POST",
            uploads.url(plan.complete_url),
            what,
            headers=auth,
            body=declaration,
            timeout=presigned.complete_timeout_secs(prepared.nar_size),
        )


def _readable(real: Path) -> bool:
    return os.path.lexists(real) and os.access(real, os.R_OK, follow_symlinks=False)


def _retried_or_final(exc: httpx.HTTPError, message: str) -> str:
    """``message`` when a request that raised ``exc`` is tried again; else ``UploadError``."""
    if upload_error_is_retried(exc):
        return message
    raise UploadError(message) from exc


def _error_text(response: httpx.Response) -> str:
    """The runner's ``{"error": ...}`` text, else the start of the body."""
    answer = parse_error_body(response.content)
    if answer.error is None:
        return answer.text[:1000]
    return answer.error + (f" ({answer.detail})" if answer.detail else "")


def _references(response: httpx.Response) -> list[str]:
    """The references the runner found in the NAR, as full store paths (best effort)."""
    try:
        data = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return []
    refs = data.get("references") if isinstance(data, dict) else None
    if not isinstance(refs, list):
        return []
    paths = [r if r.startswith("/") else f"/nix/store/{r}" for r in refs if isinstance(r, str)]
    return [p for p in paths if p.startswith("/nix/store/") and p.count("/") == 3]
