"""Run one assigned step: build the .drv, stream its log, upload its outputs, report a result.

Two ways to build (agent config ``executor``):

- ``serve`` (default): each slot keeps two long-lived ``nix-store --serve --write`` processes
  (``bigtent.nix.serve``). The agent reads the step's .drv and its input .drvs from the runner's
  cache over HTTP (``DrvCache``; no .drv enters the store), asks the *substituter* process to
  make the inputs valid (``cmdQueryValidPaths`` with substitute), then the *builder* process to
  build the ``BasicDerivation`` (``cmdBuildDerivation``). Two processes because a serve process
  turns substitution off for good at its first build (``getBuildSettings`` sets
  ``useSubstitutes = false``; checked on Nix 2.8). No Nix process starts per step.
- ``realise``: one ``nix-store --realise`` per step, which substitutes the .drv closure and the
  inputs from the runner's cache itself.

Output NARs are produced and hashed in Python from the store's real path, so the only other Nix
process is the ``nix-store --dump`` fallback for stores this filesystem cannot read.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import random
import re
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterator,
    Mapping,
)
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, assert_never

import httpx

from bigtent.agent import presigned
from bigtent.agent.credentials import CredentialSource, as_credential_source
from bigtent.agent.drvfetch import DrvCache, DrvFetchError
from bigtent.config import AgentSection
from bigtent.errors import (
    ConfigError,
    CredentialUnavailable,
    NixError,
    describe,
    parse_error_body,
)
from bigtent.nix.base32 import format_hash
from bigtent.nix.compression import Compression
from bigtent.nix.nar import dump_path
from bigtent.nix.serve import (
    BasicDerivation,
    BuildOptions,
    BuildStatus,
    ServeConnection,
    ServeProtocolError,
)
from bigtent.nix.store import NixStore, RealiseResult, RealiseStatus
from bigtent.protocol import (
    MAX_ERROR_CHARS,
    MAX_LOG_LINE_CHARS,
    MAX_LOG_LINES_PER_BATCH,
    NAR_HASH_HEADER,
    NAR_SIZE_HEADER,
    PRESIGN_SUFFIX,
    Assign,
    LeaseId,
    Log,
    Outcome,
    OutputInfo,
    Registered,
    Result,
    StepId,
    Timings,
    UploadMethod,
)
from bigtent.storebudget import StepRoots

log = logging.getLogger(__name__)

LOG_FLUSH_SECS = 0.1
"""A log batch is sent at most this long after its first line arrived."""
LOG_BATCH_LINES = 500
"""A log batch is sent as soon as it has this many lines."""
LOG_BATCH_CHARS = 128 * 1024
"""...or this many characters: even fully JSON-escaped (6 bytes a character) a batch stays
under ``MAX_MESSAGE_BYTES``."""
LOG_BACKLOG_LINES = 20 * LOG_BATCH_LINES
"""Unsent lines beyond which the build's log reader waits for the runner (backpressure)."""
NAR_CHUNK_BYTES = 256 * 1024
SMALL_NAR_BYTES = 1024 * 1024
"""NARs up to this size are hashed on the event loop and kept in memory between hashing and
uploading; larger ones are hashed in a thread and read again for the upload."""
UPLOAD_RETRY_START_SECS = 0.5
"""The first delay before retrying a failed upload; it doubles on each try..."""
UPLOAD_RETRY_CAP_SECS = 8.0
"""...up to this (each delay times a jitter in [0.5, 1))."""
UPLOAD_RETRY_LEASE_FACTOR = 2.0
"""An output upload is retried for at most this many lease times (``registered.lease_secs``)
after its first try: longer, and the runner has re-queued the step anyway. An abort (the
session learnt the lease is gone, or the agent stops) ends the retries at once."""
UPLOAD_RETRY_STATUSES = frozenset({408, 429})
"""Client-error statuses that are transient; every 5xx is retried too, other 4xx are final
(400 bad NAR, 409 lease not current, 413 too large)."""
UPLOADS_DIR = "uploads"
"""Under the work dir: compressed output files waiting for a presigned upload."""
XDG_CACHE_DIR = "xdg-cache"
"""Under the work dir: Nix's binary-cache lookup cache, private to this agent."""
NIX_CA_BUNDLE = "nix-ca-bundle.pem"
"""Under the work dir, with ``ca_file`` set: the certificates Nix trusts (``NIX_SSL_CERT_FILE``)."""
NIX_DEFAULT_CA_FILES = (
    "/etc/ssl/certs/ca-certificates.crt",
    "/nix/var/nix/profiles/default/etc/ssl/certs/ca-bundle.crt",
)
"""Where Nix looks for the system's CA bundle when ``NIX_SSL_CERT_FILE`` is not set."""

SERVE_BACKSTOP_SECS = 30
"""A build Nix has not ended this long after its own timeout is killed (``timed_out``)."""
SERVE_CLOSE_SECS = 5

SendLog = Callable[[Log], Awaitable[object]]
T = TypeVar("T")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@dataclass(frozen=True, slots=True)
class CacheSettings:
    """The binary caches a step substitutes from, as the runner announced in ``registered``."""

    cache_url: str
    cache_public_key: str
    upstreams: tuple[tuple[str, str], ...] = ()
    """(url, public key) of each upstream cache, in order of preference."""
    lease_secs: float = 60.0
    """The runner's lease time: bounds how long an output upload is retried."""
    upload_compression: Compression | None = None
    """Set when the runner takes presigned uploads (``registered.presigned_uploads``): the
    compression output files must have. None: PUT each NAR to the runner."""
    compression_level: int = 0

    @classmethod
    def from_registered(cls, registered: Registered, runner_url: str) -> CacheSettings:
        compression = None
        if registered.presigned_uploads:
            try:
                compression = Compression(registered.compression)
            except ValueError:
                log.warning(
                    "the runner asks for %r files, which this agent cannot write: "
                    "uploading NARs to the runner instead",
                    registered.compression,
                )
        return cls(
            cache_url=join_runner_url(runner_url, registered.cache_url),
            cache_public_key=registered.cache_public_key,
            upstreams=tuple((u.url, u.public_key) for u in registered.upstreams),
            lease_secs=registered.lease_secs,
            upload_compression=compression,
            compression_level=registered.compression_level,
        )


def join_runner_url(runner_url: str, url: str) -> str:
    """Absolute URLs stay as they are; relative ones are on the runner."""
    if "://" in url:
        return url
    return runner_url.rstrip("/") + "/" + url.lstrip("/")


def nix_options(section: AgentSection, cache: CacheSettings) -> dict[str, str]:
    """``--option`` pairs for a step's realise: the runner's cache first, then upstreams.

    ``system-features`` is what the agent advertises (when it advertises any).
    ``narinfo-cache-negative-ttl = 0``: a path this agent once found missing (e.g. the output of
    a step it was building when the step moved elsewhere) may be in the cache a minute later.
    The agent's ``extra_nix_options`` come last and win.
    """
    urls = [cache.cache_url, *(url for url, _ in cache.upstreams)]
    keys = [cache.cache_public_key, *(key for _, key in cache.upstreams)]
    options = {
        "substituters": " ".join(u for u in urls if u),
        "trusted-public-keys": " ".join(k for k in keys if k),
        "narinfo-cache-negative-ttl": "0",
        # Build here, never on remote builders the host's nix.conf may name.
        "builders": "",
    }
    if section.sandbox_paths:
        options["extra-sandbox-paths"] = " ".join(section.sandbox_paths)
    features = sorted({*section.supported_features, *section.mandatory_features})
    if features:
        # Nix refuses a derivation whose requiredSystemFeatures its `system-features` lack;
        # the agent builds exactly what it advertises.
        options["system-features"] = " ".join(features)
    options.update(section.extra_nix_options)
    return options


def step_store(
    section: AgentSection, cache: CacheSettings, cache_dir: str, *, bin_dir: str = ""
) -> NixStore:
    """The store a step (or the start-up probe) builds in: the agent's store URI, its
    ``nix_options`` and environment (``nix_env``)."""
    return NixStore(
        store=section.store,
        options=nix_options(section, cache),
        env=nix_env(section, cache_dir),
        bin_dir=bin_dir,
    )


def nix_env(section: AgentSection, cache_dir: str) -> dict[str, str]:
    """Environment of the agent's Nix processes for a slot (``cache_dir``, e.g. ``slot-0``).

    ``XDG_CACHE_HOME`` per slot: Nix 2.8 processes sharing one ``binary-cache-v6.sqlite`` race
    on it ("constraint failed"). With ``ca_file``, ``NIX_SSL_CERT_FILE`` names the bundle of the
    runner's CA and the system's roots (``write_nix_ca_bundle``): Nix 2.8 reads no
    ``SSL_CERT_FILE`` and ignores ``--option ssl-cert-file``, so without it Nix could not
    substitute from a runner whose certificate a private CA signed.
    """
    env = {"XDG_CACHE_HOME": str(section.work_dir / XDG_CACHE_DIR / cache_dir)}
    if section.ca_file is not None:
        env["NIX_SSL_CERT_FILE"] = str(section.work_dir / NIX_CA_BUNDLE)
    return env


def nix_ca_bundle(ca_pem: str, system_pem: str | None) -> str:
    """The certificates for Nix's ``NIX_SSL_CERT_FILE``: the agent's ``ca_file`` (the runner's
    CA) first, then the system roots Nix would use otherwise, so upstream caches with public
    certificates still verify. Nix reads one file for every https substituter."""
    parts = [ca_pem.strip() + "\n"]
    if system_pem and system_pem.strip():
        parts.append(system_pem.strip() + "\n")
    return "\n".join(parts)


def system_ca_file(
    env: Mapping[str, str], exists: Callable[[str], bool] = os.path.exists
) -> str | None:
    """The CA bundle Nix uses on its own: ``NIX_SSL_CERT_FILE``, else the first
    of ``NIX_DEFAULT_CA_FILES`` that exists."""
    given = env.get("NIX_SSL_CERT_FILE")
    if given:
        return given
    return next((f for f in NIX_DEFAULT_CA_FILES if exists(f)), None)


def write_nix_ca_bundle(section: AgentSection, env: Mapping[str, str]) -> Path | None:
    """With ``ca_file`` set, write ``WORK/nix-ca-bundle.pem`` (``nix_ca_bundle``), the
    ``NIX_SSL_CERT_FILE`` of every Nix process the agent runs (``nix_env``); ``None`` without
    ``ca_file``."""
    if section.ca_file is None:
        return None
    try:
        ca_pem = section.ca_file.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"config key agent.ca_file: cannot read {section.ca_file}: {exc}"
        ) from exc
    if "-----BEGIN CERTIFICATE-----" not in ca_pem:
        raise ConfigError(f"config key agent.ca_file: {section.ca_file} holds no PEM certificate")
    system_pem: str | None = None
    system = system_ca_file(env)
    if system is not None:
        try:
            system_pem = Path(system).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            log.warning(
                "cannot read the system CA bundle %s (%s): Nix trusts only %s",
                system,
                exc,
                section.ca_file,
            )
    path = section.work_dir / NIX_CA_BUNDLE
    tmp = path.with_name(f".{NIX_CA_BUNDLE}.{os.getpid()}.tmp")
    try:
        section.work_dir.mkdir(parents=True, exist_ok=True)
        tmp.write_text(nix_ca_bundle(ca_pem, system_pem))
        tmp.replace(path)
    except OSError as exc:
        raise ConfigError(
            f"cannot write {path} (the CA bundle for Nix): {exc}; check agent.work_dir"
        ) from exc
    return path


def outcome_of(status: RealiseStatus) -> Outcome:
    """Classify a realise: Nix exiting 1 (inputs not substitutable, store trouble) is a
    ``prepare_failure`` (infrastructure, retried elsewhere); the rest map one to one."""
    match status:
        case RealiseStatus.SUCCESS:
            return Outcome.SUCCESS
        case RealiseStatus.BUILD_FAILURE:
            return Outcome.BUILD_FAILURE
        case RealiseStatus.TIMED_OUT:
            return Outcome.TIMED_OUT
        case RealiseStatus.LOG_LIMIT:
            return Outcome.LOG_LIMIT
        case RealiseStatus.ABORTED:
            return Outcome.ABORTED
        case RealiseStatus.OTHER_FAILURE:
            return Outcome.PREPARE_FAILURE
        case _:
            assert_never(status)


def realise_status_of(status: BuildStatus | int) -> RealiseStatus:
    """What ``nix-store --realise`` would have made of a ``BuildResult`` status, so that both
    executors classify a step the same way (``outcome_of``): Nix's exit status is 100 plus bits
    for permanent failure, timeout, hash mismatch and check mismatch, and 1 for anything else
    (transient failures such as a failed fixed-output fetch, dependency and misc failures)."""
    match status:
        case (
            BuildStatus.BUILT
            | BuildStatus.SUBSTITUTED
            | BuildStatus.ALREADY_VALID
            | BuildStatus.RESOLVES_TO_ALREADY_VALID
        ):
            return RealiseStatus.SUCCESS
        case (
            BuildStatus.PERMANENT_FAILURE
            | BuildStatus.OUTPUT_REJECTED
            | BuildStatus.NOT_DETERMINISTIC
        ):
            return RealiseStatus.BUILD_FAILURE
        case BuildStatus.TIMED_OUT:
            return RealiseStatus.TIMED_OUT
        case BuildStatus.LOG_LIMIT_EXCEEDED:
            return RealiseStatus.LOG_LIMIT
        case _:
            return RealiseStatus.OTHER_FAILURE


def exit_code_of(status: BuildStatus | int) -> int:
    """The exit status ``nix-store --realise`` would have had (reported in ``result``)."""
    match status:
        case BuildStatus.PERMANENT_FAILURE:
            return 100
        case BuildStatus.TIMED_OUT:
            return 101
        case BuildStatus.OUTPUT_REJECTED:
            return 102
        case BuildStatus.NOT_DETERMINISTIC:
            return 104
        case _:
            return 0 if realise_status_of(status) is RealiseStatus.SUCCESS else 1


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


def upload_backoff_secs(attempt: int, rand: float) -> float:
    """Delay before upload retry ``attempt`` (0 first): ``0.5 s · 2^attempt`` capped at
    ``UPLOAD_RETRY_CAP_SECS``, times a jitter in [0.5, 1) from ``rand`` in [0, 1)."""
    base = min(UPLOAD_RETRY_CAP_SECS, UPLOAD_RETRY_START_SECS * 2.0 ** min(attempt, 32))
    return base * (0.5 + rand / 2)


def upload_retry_secs(lease_secs: float) -> float:
    """How long after its first try an output upload is retried at most."""
    return lease_secs * UPLOAD_RETRY_LEASE_FACTOR


def plain_error(message: str) -> str:
    """Nix's error message without colours, as ``error: …``."""
    text = _ANSI.sub("", message).strip()
    return text if text.startswith("error:") or not text else f"error: {text}"


class LogBatcher:
    """Collects a step's log lines and sends them as ``log`` batches.

    A batch goes out ``LOG_FLUSH_SECS`` after its first line, or at once when it reaches
    ``LOG_BATCH_LINES`` lines or ``LOG_BATCH_CHARS`` characters — never one message per line.
    ``add`` is the realise line sink; ``run`` is the sender, ended by ``close`` after a final
    flush. A failed send drops that batch (the log is best effort; the result is not).
    """

    def __init__(
        self,
        step_id: StepId,
        lease_id: LeaseId,
        send: SendLog,
        *,
        flush_secs: float = LOG_FLUSH_SECS,
        batch_lines: int = LOG_BATCH_LINES,
        batch_chars: int = LOG_BATCH_CHARS,
    ) -> None:
        self._step_id = step_id
        self._lease_id = lease_id
        self._send = send
        self._flush_secs = flush_secs
        self._batch_lines = min(batch_lines, MAX_LOG_LINES_PER_BATCH)
        self._batch_chars = batch_chars
        self._lines: list[str] = []
        self._chars = 0
        self._pending = asyncio.Event()
        self._full = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._closed = False
        self.lines_seen = 0

    def add(self, line: str) -> Awaitable[None] | None:
        """Queue one line; returns an awaitable only when the backlog is too long."""
        if len(line) > MAX_LOG_LINE_CHARS:
            line = line[: MAX_LOG_LINE_CHARS - 3] + "..."
        self._lines.append(line)
        self._chars += len(line)
        self.lines_seen += 1
        self._pending.set()
        self._drained.clear()
        if len(self._lines) >= self._batch_lines or self._chars >= self._batch_chars:
            self._full.set()
        if len(self._lines) >= LOG_BACKLOG_LINES:
            return self._wait_drained()
        return None

    async def _wait_drained(self) -> None:
        await self._drained.wait()

    def close(self) -> None:
        """No more lines: ``run`` sends what is left and returns."""
        self._closed = True
        self._pending.set()
        self._full.set()

    async def run(self) -> None:
        while True:
            await self._pending.wait()
            if not self._full.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._full.wait(), self._flush_secs)
            await self._flush()
            if self._closed and not self._lines:
                return

    async def _flush(self) -> None:
        while self._lines:
            batch: list[str] = []
            size = 0
            for line in self._lines:
                if batch and (len(batch) >= self._batch_lines or size >= self._batch_chars):
                    break
                batch.append(line)
                size += len(line)
            del self._lines[: len(batch)]
            self._chars -= size
            await self._send(Log(step_id=self._step_id, lease_id=self._lease_id, lines=batch))
        self._pending.clear()
        self._full.clear()
        self._drained.set()


class UploadError(Exception):
    """An output NAR could not be uploaded; the message is for the step's ``error``."""


@dataclass(slots=True)
class _ServeSlot:
    """The serve processes of one slot, and the store settings they were started with."""

    key: tuple[object, ...]
    substituter: ServeConnection | None = None
    """Only ever substitutes: a serve process stops substituting at its first build."""
    builder: ServeConnection | None = None

    def connections(self) -> list[ServeConnection]:
        return [c for c in (self.substituter, self.builder) if c is not None]


class _Stopped(Exception):
    """A serve command was cut short (abort, log limit, backstop); its process was killed."""

    def __init__(self, status: RealiseStatus, error: str) -> None:
        super().__init__(error)
        self.status = status
        self.error = error


class _Fallback(Exception):
    """The serve executor cannot build this step (e.g. floating CA outputs): realise it."""


class Executor:
    """Runs assignments for one agent: a ``NixStore`` (and serve processes) per slot, one
    shared HTTP client, one LRU of parsed derivations."""

    def __init__(
        self,
        section: AgentSection,
        *,
        http: httpx.AsyncClient,
        token: str | CredentialSource | None,
        nix_bin_dir: str = "",
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._section = section
        self._http = http
        self._credentials = as_credential_source(token)
        self._nix_bin_dir = nix_bin_dir
        self._rand = rand
        self._busy_slots: set[int] = set()
        self._serve: dict[int, _ServeSlot] = {}
        self._stale_slots: set[int] = set()
        """Busy slots whose serve processes stop when their step ends (``release_idle``)."""
        self.roots: StepRoots | None = None
        """GC roots for the running steps' paths, when the agent collects its store."""
        self.drvs = DrvCache(http)
        presigned.remove_stale_uploads(section.work_dir / UPLOADS_DIR)
        write_nix_ca_bundle(section, os.environ)

    def nix_store(self, cache: CacheSettings, slot: int = 0) -> NixStore:
        """The store a step builds in, with the runner's caches as substituters; each
        concurrent step gets its slot's environment (``nix_env``)."""
        return step_store(self._section, cache, f"slot-{slot}", bin_dir=self._nix_bin_dir)

    def _take_slot(self) -> int:
        slot = next(i for i in range(len(self._busy_slots) + 1) if i not in self._busy_slots)
        self._busy_slots.add(slot)
        return slot

    async def aclose(self) -> None:
        """Stop every serve process (the agent is exiting)."""
        slots, self._serve = list(self._serve.values()), {}
        for conn in (c for s in slots for c in s.connections()):
            await conn.close(SERVE_CLOSE_SECS)

    async def release_idle(self) -> None:
        """Stop the serve processes of idle slots, so that their temporary GC roots (every
        path they ever substituted or built) stop holding paths (before a collection). Busy
        slots' processes are stopped when their step ends, for the next collection."""
        self._stale_slots.update(s for s in self._serve if s in self._busy_slots)
        idle = [slot for slot in self._serve if slot not in self._busy_slots]
        await self._close_slots(idle)

    async def _close_slots(self, slots: list[int]) -> None:
        entries = [self._serve.pop(slot) for slot in slots if slot in self._serve]
        for conn in (c for e in entries for c in e.connections()):
            await conn.close(SERVE_CLOSE_SECS)

    @property
    def serve_processes(self) -> list[ServeConnection]:
        """The live serve processes (for tests and metrics)."""
        return [c for s in self._serve.values() for c in s.connections() if c.alive]

    async def run(
        self, assign: Assign, cache: CacheSettings, *, send_log: SendLog, abort: asyncio.Event
    ) -> Result:
        """Build ``assign.drv_path`` and upload its outputs; never raises for a step failure.

        ``abort`` set by the session kills the build (or stops the upload): outcome ``aborted``.
        """
        slot = self._take_slot()
        if self.roots is not None:
            self.roots.add(assign.step_id, [assign.drv_path, *assign.outputs.values()])
        try:
            if self._section.executor == "serve":
                try:
                    return await self._run_serve(
                        assign, cache, slot, send_log=send_log, abort=abort
                    )
                except _Fallback as exc:
                    log.info("step %s: %s; realising it instead", assign.step_id, exc)
            return await self._run(assign, cache, slot, send_log=send_log, abort=abort)
        finally:
            self._busy_slots.discard(slot)
            if self.roots is not None:
                self.roots.remove(assign.step_id)
            if slot in self._stale_slots:
                self._stale_slots.discard(slot)
                await self._close_slots([slot])

    async def _run(
        self,
        assign: Assign,
        cache: CacheSettings,
        slot: int,
        *,
        send_log: SendLog,
        abort: asyncio.Event,
    ) -> Result:
        store = self.nix_store(cache, slot)
        started = time.monotonic()
        build_started: float | None = None
        batcher = LogBatcher(assign.step_id, assign.lease_id, send_log)

        def on_line(line: str) -> Awaitable[None] | None:
            nonlocal build_started
            # Nix announces the build itself; before that it substitutes the .drv and inputs.
            if build_started is None and line.startswith("building '"):
                build_started = time.monotonic()
            return batcher.add(line)

        log.info("step %s (%s): realising", assign.step_id, assign.drv_path)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(batcher.run())
                try:
                    realised = await store.realise(
                        [assign.drv_path],
                        on_line=on_line,
                        timeout_secs=assign.timeout_secs,
                        max_silent_secs=assign.max_silent_secs,
                        max_log_bytes=assign.max_log_bytes,
                        abort=abort,
                    )
                finally:
                    batcher.close()
        except* NixError as group:
            # Nix could not even start (not installed, bad store URI): the agent's problem.
            exc = group.exceptions[0]
            assert isinstance(exc, NixError)
            realised = RealiseResult(RealiseStatus.OTHER_FAILURE, exc.status, error=str(exc))
        return await self._finish(assign, cache, store, realised, started, build_started, abort)

    # ---- serve ----------------------------------------------------------------------------
    async def _run_serve(
        self,
        assign: Assign,
        cache: CacheSettings,
        slot: int,
        *,
        send_log: SendLog,
        abort: asyncio.Event,
    ) -> Result:
        store = self.nix_store(cache, slot)
        started = time.monotonic()
        batcher = LogBatcher(assign.step_id, assign.lease_id, send_log)
        log_limit = asyncio.Event()
        log_bytes = 0

        def on_line(line: str) -> Awaitable[None] | None:
            nonlocal log_bytes
            log_bytes += len(line) + 1
            if log_bytes > assign.max_log_bytes:
                log_limit.set()
                return None
            return batcher.add(line)

        log.info("step %s (%s): building (serve)", assign.step_id, assign.drv_path)
        build_started: list[float] = []
        fallback: _Fallback | None = None
        async with asyncio.TaskGroup() as tg:
            tg.create_task(batcher.run())
            try:
                realised = await self._serve_step(
                    assign, cache, store, slot, on_line, abort, log_limit, build_started
                )
            except _Fallback as exc:
                fallback = exc
            finally:
                batcher.close()
        if fallback is not None:
            raise fallback
        return await self._finish(
            assign,
            cache,
            store,
            realised,
            started,
            build_started[0] if build_started else None,
            abort,
        )

    async def _serve_step(
        self,
        assign: Assign,
        cache: CacheSettings,
        store: NixStore,
        slot: int,
        on_line: Callable[[str], Awaitable[None] | None],
        abort: asyncio.Event,
        log_limit: asyncio.Event,
        build_started: list[float],
    ) -> RealiseResult:
        """Fetch the derivation, substitute its inputs, build it: a ``RealiseResult``."""
        try:
            drv_path = assign.drv_path
            drv = await _until(self.drvs.get(cache.cache_url, drv_path), abort)
            if any(not out.path for out in drv.outputs.values()):
                raise _Fallback("it has floating content-addressed outputs")
            if drv.output_paths != assign.outputs:
                raise DrvFetchError(
                    f"{drv_path} has outputs {drv.output_paths}, the assignment {assign.outputs}"
                )
            input_drvs = await _until(
                asyncio.gather(*(self.drvs.get(cache.cache_url, d) for d in drv.input_drvs)),
                abort,
            )
            inputs = set(drv.input_srcs)
            for (path, wanted), input_drv in zip(drv.input_drvs.items(), input_drvs, strict=True):
                for name in wanted:
                    out = input_drv.outputs.get(name)
                    if out is None:
                        raise DrvFetchError(f"{path} has no output {name!r}")
                    if not out.path:
                        raise _Fallback(f"its input {path} has floating content-addressed outputs")
                    inputs.add(out.path)
            if self.roots is not None:
                self.roots.add(assign.step_id, inputs)
            if inputs:
                substituter = await self._connection(slot, store, "substituter")
                valid = await self._command(
                    substituter, substituter.query_valid_paths(inputs), on_line, abort, log_limit
                )
                missing = sorted(inputs - valid)
                if missing:
                    more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
                    return RealiseResult(
                        RealiseStatus.OTHER_FAILURE,
                        1,
                        error="error: cannot substitute the inputs "
                        + ", ".join(missing[:3])
                        + more
                        + f" from {cache.cache_url} or the upstream caches",
                    )
            builder = await self._connection(slot, store, "builder")
            options = BuildOptions(
                max_silent_secs=int(max(1, assign.max_silent_secs)),
                build_timeout_secs=int(max(1, assign.timeout_secs)),
                max_log_bytes=assign.max_log_bytes,
            )
            build_started.append(time.monotonic())
            result = await self._command(
                builder,
                builder.build_derivation(drv_path, BasicDerivation.of(drv, inputs), options),
                on_line,
                abort,
                log_limit,
                backstop=assign.timeout_secs + SERVE_BACKSTOP_SECS,
            )
        except _Stopped as stop:
            return RealiseResult(stop.status, None, error=stop.error)
        except (DrvFetchError, NixError) as exc:
            # Includes ServeProtocolError: the process died or spoke nonsense (it is replaced).
            code = exc.status if isinstance(exc, NixError) and exc.status else 1
            return RealiseResult(RealiseStatus.OTHER_FAILURE, code, error=str(exc))
        status = realise_status_of(result.status)
        return RealiseResult(
            status,
            exit_code_of(result.status),
            error="" if status is RealiseStatus.SUCCESS else plain_error(result.error_msg),
        )

    async def _connection(self, slot: int, store: NixStore, role: str) -> ServeConnection:
        """The slot's live serve process for ``role``, (re)started if needed; processes
        started with other settings (the runner announced other caches) are replaced."""
        key = (store.store, tuple(sorted(store.options.items())), tuple(sorted(store.env.items())))
        entry = self._serve.get(slot)
        if entry is None or entry.key != key:
            if entry is not None:
                for conn in entry.connections():
                    await conn.close(SERVE_CLOSE_SECS)
            entry = self._serve[slot] = _ServeSlot(key)
        old: ServeConnection | None = getattr(entry, role)
        if old is not None and old.alive:
            return old
        if old is not None:
            await old.wait_closed()
        proc, stderr_fd = await store.spawn_serve()
        conn = ServeConnection(proc, stderr_fd)
        setattr(entry, role, conn)
        try:
            await asyncio.wait_for(conn.handshake(), SERVE_CLOSE_SECS * 6)
        except (TimeoutError, ServeProtocolError) as exc:
            conn.kill()
            await conn.wait_closed()
            if isinstance(exc, TimeoutError):
                raise ServeProtocolError("nix-store --serve did not answer its handshake") from exc
            raise
        log.debug("slot %d: started %s (serve protocol %#x)", slot, role, conn.server_version)
        return conn

    async def _command(
        self,
        conn: ServeConnection,
        op: Awaitable[T],
        on_line: Callable[[str], Awaitable[None] | None],
        abort: asyncio.Event,
        log_limit: asyncio.Event,
        backstop: float | None = None,
    ) -> T:
        """Run one serve command with its log going to ``on_line``; an abort, the log limit or
        the backstop kills the process (it is restarted for the next step) and raises
        ``_Stopped``."""
        conn.sink = on_line
        task = asyncio.ensure_future(op)
        stops = {
            asyncio.ensure_future(abort.wait()): (RealiseStatus.ABORTED, "aborted"),
            asyncio.ensure_future(log_limit.wait()): (
                RealiseStatus.LOG_LIMIT,
                "error: the build log exceeded its limit",
            ),
        }
        try:
            done, _ = await asyncio.wait(
                {task, *stops}, timeout=backstop, return_when=asyncio.FIRST_COMPLETED
            )
            if task in done:
                value = task.result()
                conn.drain_log()
                return value
            stopped = next((stops[t] for t in stops if t in done), None)
            status, error = stopped or (
                RealiseStatus.TIMED_OUT,
                f"error: the build did not end {SERVE_BACKSTOP_SECS} s after its timeout",
            )
            conn.kill()
            raise _Stopped(status, error)
        finally:
            conn.sink = None
            for t in (task, *stops):
                t.cancel()
            await asyncio.wait({task, *stops})
            if not conn.alive:
                await conn.wait_closed()

    async def _finish(
        self,
        assign: Assign,
        cache: CacheSettings,
        store: NixStore,
        realised: RealiseResult,
        started: float,
        build_started: float | None,
        abort: asyncio.Event,
    ) -> Result:
        """Report a failed build, or upload the outputs of a successful one."""
        built = time.monotonic()
        if build_started is None:
            timings = Timings(prepare_secs=built - started)
        else:
            timings = Timings(
                prepare_secs=build_started - started, build_secs=built - build_started
            )
        outcome = outcome_of(realised.status)
        if outcome is not Outcome.SUCCESS:
            log.info(
                "step %s (%s): %s (exit %s) %s",
                assign.step_id,
                assign.drv_path,
                outcome,
                realised.exit_code,
                realised.error,
            )
            return self._result(assign, outcome, realised.exit_code, realised.error, timings)

        # Race the upload against an abort; both are awaited before returning.
        upload = asyncio.ensure_future(self._upload_all(store, assign, cache))
        aborted = asyncio.ensure_future(abort.wait())
        try:
            await asyncio.wait({upload, aborted}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (upload, aborted):
                if not task.done():
                    task.cancel()
            await asyncio.wait({upload, aborted})
        timings = timings.model_copy(update={"upload_secs": time.monotonic() - built})
        if upload.cancelled():
            return self._result(assign, Outcome.ABORTED, None, "aborted during upload", timings)
        failure = upload.exception()
        if isinstance(failure, UploadError):
            log.warning("step %s (%s): upload failed: %s", assign.step_id, assign.drv_path, failure)
            return self._result(
                assign, Outcome.UPLOAD_FAILURE, realised.exit_code, str(failure), timings
            )
        outputs = upload.result()
        log.info("step %s (%s): success", assign.step_id, assign.drv_path)
        return self._result(assign, Outcome.SUCCESS, realised.exit_code, "", timings, outputs)

    @staticmethod
    def _result(
        assign: Assign,
        outcome: Outcome,
        exit_code: int | None,
        error: str,
        timings: Timings,
        outputs: list[OutputInfo] | None = None,
    ) -> Result:
        if len(error) > MAX_ERROR_CHARS:
            error = error[: MAX_ERROR_CHARS - 3] + "..."
        return Result(
            step_id=assign.step_id,
            lease_id=assign.lease_id,
            outcome=outcome,
            exit_code=exit_code,
            error=error,
            timings=timings,
            outputs=outputs or [],
        )

    # ---- upload ---------------------------------------------------------------------------
    async def _upload_all(
        self, store: NixStore, assign: Assign, cache: CacheSettings
    ) -> list[OutputInfo]:
        retry_secs = upload_retry_secs(cache.lease_secs)
        outputs = []
        for name, path in sorted(assign.outputs.items()):
            url = assign.upload_urls.get(name)
            if url is None:
                raise UploadError(f"the assignment has no upload URL for output {name!r}")
            if cache.upload_compression is not None:
                info = await self._upload_presigned(
                    store, assign, name, path, url, retry_secs, cache
                )
                if info is not None:
                    outputs.append(info)
                    continue
            outputs.append(await self._upload_one(store, assign, name, path, url, retry_secs))
        return outputs

    async def _upload_presigned(
        self,
        store: NixStore,
        assign: Assign,
        name: str,
        path: str,
        url: str,
        retry_secs: float,
        cache: CacheSettings,
    ) -> OutputInfo | None:
        """Compress and hash the NAR, then presign, PUT to the bucket and complete, retried
        as a whole (a fresh URL each time) like a direct upload. None when the runner answers
        that it takes this output by PUT (``_upload_one`` then uploads it)."""
        assert cache.upload_compression is not None
        real = store.real_path(path)
        readable = os.path.lexists(real) and os.access(real, os.R_OK, follow_symlinks=False)
        tmp_dir = self._section.work_dir / UPLOADS_DIR
        compression, level = cache.upload_compression, cache.compression_level
        try:
            if readable:
                prepared = await presigned.prepare_from_iter(
                    dump_path(real, NAR_CHUNK_BYTES), compression, level, tmp_dir
                )
            else:
                prepared = await presigned.prepare_from_stream(
                    store.dump(path), compression, level, tmp_dir
                )
        except (OSError, ValueError, NixError) as exc:
            raise UploadError(f"cannot read output {name} ({path}): {exc}") from exc
        try:
            outcome = await self._retrying(
                lambda: self._presigned_try(url, prepared, f"output {name} ({path})"),
                assign,
                retry_secs,
            )
        finally:
            prepared.remove()
        if outcome is None:
            return None
        return OutputInfo(
            name=name,
            path=path,
            nar_hash=prepared.nar_hash,
            nar_size=prepared.nar_size,
            references=_references(outcome),
        )

    async def _presigned_try(
        self, url: str, prepared: presigned.PreparedFile, what: str
    ) -> httpx.Response | str | None:
        """One presign, PUT, complete: the runner's record, a retryable failure's message,
        or None when the runner wants the NAR PUT to it. Raises ``UploadError`` when final."""
        auth: dict[str, str] = {}
        unauthorized = await self._authorize(auth)
        if unauthorized is not None:
            return unauthorized
        base = join_runner_url(self._section.runner_url, url)
        declaration = prepared.declaration().model_dump(mode="json")
        answer = await self._post(base + PRESIGN_SUFFIX, declaration, auth, what, None)
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
            put = await self._http.put(plan.url, content=prepared.body(), headers=plan.headers)
        except httpx.HTTPError as exc:
            message = f"uploading {what} to the bucket failed: {describe(exc)}"
            if upload_error_is_retried(exc):
                return message
            raise UploadError(message) from exc
        except OSError as exc:
            raise UploadError(f"uploading {what} failed: {exc}") from exc
        if not put.is_success:
            message = f"the bucket refused {what}: HTTP {put.status_code}: {put.text[:300]}"
            if presigned.bucket_status_is_retried(put.status_code):
                return message
            raise UploadError(message)
        complete_url = join_runner_url(self._section.runner_url, plan.complete_url)
        timeout = presigned.complete_timeout_secs(prepared.nar_size)
        return await self._post(complete_url, declaration, auth, what, timeout)

    async def _post(
        self,
        url: str,
        body: dict[str, object],
        headers: dict[str, str],
        what: str,
        timeout: float | None,
    ) -> httpx.Response | str:
        """A JSON POST to the runner: its success response, or why it failed when it may be
        tried again. Raises ``UploadError`` when the failure is final."""
        try:
            if timeout is None:
                response = await self._http.post(url, json=body, headers=headers)
            else:
                response = await self._http.post(
                    url, json=body, headers=headers, timeout=httpx.Timeout(timeout, connect=10.0)
                )
        except httpx.HTTPError as exc:
            message = f"uploading {what} failed: {describe(exc)}"
            if upload_error_is_retried(exc):
                return message
            raise UploadError(message) from exc
        if response.is_success:
            return response
        message = f"runner refused {what}: HTTP {response.status_code}: {_error_text(response)}"
        if upload_status_is_retried(response.status_code):
            return message
        raise UploadError(message)

    async def _retrying(
        self,
        attempt_once: Callable[[], Awaitable[httpx.Response | str | None]],
        assign: Assign,
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
            delay = upload_backoff_secs(attempt, self._rand())
            attempt += 1
            if time.monotonic() + delay > deadline:
                raise UploadError(
                    f"{failure}; gave up after {attempt} tries in {retry_secs:g} s"
                    if attempt > 1
                    else failure
                )
            log.warning(
                "step %s: %s; retrying in %.1f s (try %d)",
                assign.step_id,
                failure,
                delay,
                attempt + 1,
            )
            await asyncio.sleep(delay)

    async def _upload_one(
        self, store: NixStore, assign: Assign, name: str, path: str, url: str, retry_secs: float
    ) -> OutputInfo:
        """Hash the NAR (first pass), then PUT it streamed (second pass, or kept if small).

        A connection error, a timeout or a retryable status (``upload_status_is_retried``) is
        tried again, the NAR streamed anew each time, with backoff, for at most ``retry_secs``
        after the first try: a short network cut must not turn a good build into an
        ``upload_failure``. The PUT is idempotent (the runner answers with its existing record
        when it has the path already). The caller cancels this on an abort.
        """
        real = store.real_path(path)
        readable = os.path.lexists(real) and os.access(real, os.R_OK, follow_symlinks=False)
        kept: list[bytes] | None = None
        try:
            if readable:
                digest, size, kept = await _hash_local(real)
            else:
                log.debug("%s is not readable here; using nix-store --dump", real)
                digest, size = await _hash_async(store.dump(path))
        except (OSError, ValueError, NixError) as exc:
            raise UploadError(f"cannot read output {name} ({path}): {exc}") from exc
        small = b"".join(kept) if kept is not None else None

        def body() -> bytes | AsyncIterator[bytes]:
            """The NAR for one try: kept in memory when small, else streamed from the start."""
            if small is not None:
                return small
            return _stream_local(real) if readable else store.dump(path)

        nar_hash = format_hash("sha256", digest)
        headers = {
            NAR_HASH_HEADER: nar_hash,
            NAR_SIZE_HEADER: str(size),
            "Content-Length": str(size),
            "Content-Type": "application/x-nix-nar",
        }
        full_url = join_runner_url(self._section.runner_url, url)
        what = f"output {name} ({path})"

        async def attempt() -> httpx.Response | str:
            unauthorized = await self._authorize(headers)
            if unauthorized is not None:
                return unauthorized
            return await self._put(full_url, body(), headers, what)

        response = await self._retrying(attempt, assign, retry_secs)
        assert response is not None  # _put never answers None
        return OutputInfo(
            name=name,
            path=path,
            nar_hash=nar_hash,
            nar_size=size,
            references=_references(response),
        )

    async def _authorize(self, headers: dict[str, str]) -> str | None:
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

    async def _put(
        self,
        url: str,
        content: bytes | AsyncIterator[bytes],
        headers: dict[str, str],
        what: str,
    ) -> httpx.Response | str:
        """One upload try: the runner's success response, or why it failed when it may be
        tried again. Raises ``UploadError`` when the failure is final."""
        try:
            response = await self._http.put(url, content=content, headers=headers)
        except httpx.HTTPError as exc:
            message = f"uploading {what} failed: {describe(exc)}"
            if upload_error_is_retried(exc):
                return message
            raise UploadError(message) from exc
        except (OSError, ValueError, NixError) as exc:
            raise UploadError(f"uploading {what} failed: {exc}") from exc
        finally:
            if isinstance(content, AsyncGenerator):
                await content.aclose()
        if response.is_success:
            return response
        message = f"runner refused {what}: HTTP {response.status_code}: {_error_text(response)}"
        if upload_status_is_retried(response.status_code):
            return message
        raise UploadError(message)


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


async def _hash_local(real: Path) -> tuple[bytes, int, list[bytes] | None]:
    """sha256 and size of the NAR of ``real``; the chunks too when it is small.

    The first ``SMALL_NAR_BYTES`` are produced on the event loop (a small path costs no thread
    hop); the rest of a large NAR is hashed in a worker thread.
    """
    hasher = hashlib.sha256()
    size = 0
    chunks: list[bytes] = []
    it = dump_path(real, NAR_CHUNK_BYTES)
    for chunk in it:
        hasher.update(chunk)
        size += len(chunk)
        chunks.append(chunk)
        if size > SMALL_NAR_BYTES:
            break
    else:
        return hasher.digest(), size, chunks

    def rest() -> int:
        n = 0
        for chunk in it:
            hasher.update(chunk)
            n += len(chunk)
        return n

    size += await asyncio.to_thread(rest)
    return hasher.digest(), size, None


async def _stream_local(real: Path) -> AsyncGenerator[bytes, None]:
    """The NAR of ``real`` as an async stream, each chunk read in a worker thread."""
    it = dump_path(real, NAR_CHUNK_BYTES)
    try:
        while (chunk := await asyncio.to_thread(_next_or_none, it)) is not None:
            yield chunk
    finally:
        if isinstance(it, Generator):
            it.close()


def _next_or_none(it: Iterator[bytes]) -> bytes | None:
    return next(it, None)


async def _hash_async(chunks: AsyncIterator[bytes]) -> tuple[bytes, int]:
    hasher = hashlib.sha256()
    size = 0
    try:
        async for chunk in chunks:
            hasher.update(chunk)
            size += len(chunk)
    finally:
        if isinstance(chunks, AsyncGenerator):
            await chunks.aclose()
    return hasher.digest(), size


async def _until(op: Awaitable[T], abort: asyncio.Event) -> T:
    """``op``, unless ``abort`` is set first (then ``_Stopped``)."""
    task = asyncio.ensure_future(op)
    aborted = asyncio.ensure_future(abort.wait())
    try:
        done, _ = await asyncio.wait({task, aborted}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        raise _Stopped(RealiseStatus.ABORTED, "aborted")
    finally:
        for t in (task, aborted):
            t.cancel()
        await asyncio.wait({task, aborted})
