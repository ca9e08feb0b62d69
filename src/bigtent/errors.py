"""The one error hierarchy: every failure a user can cause or see is a BigtentError.

Each class carries the exit code the CLI uses and the HTTP status the API answers with, so
neither the CLI nor the routes ever decide that themselves (STYLE: errors).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


class BigtentError(Exception):
    """Something went wrong that we can explain to the user."""

    exit_code: int = 1
    http_status: int = 500

    def __init__(self, message: str, *, detail: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail

    def __str__(self) -> str:
        return self.message


QUOTE_CHARS = 200
"""The longest string an error answer quotes: a bad input is shown by a prefix, so a client
cannot make the runner echo (and hold, and log) megabytes of it."""


def clipped(value: Any, limit: int = QUOTE_CHARS) -> Any:
    """``value`` (JSON-like: strings, numbers, lists, dicts) with every string longer than
    ``limit`` characters cut to its first ``limit`` and a note of the length."""
    if isinstance(value, str):
        if len(value) <= limit:
            return value
        return f"{value[:limit]}… ({len(value)} characters)"
    if isinstance(value, list | tuple):
        return [clipped(v, limit) for v in value]
    if isinstance(value, dict):
        return {clipped(k, limit): clipped(v, limit) for k, v in value.items()}
    return value


class ConfigError(BigtentError):
    """The configuration (file, flags or environment) is invalid."""

    exit_code = 2
    http_status = 500


class UsageError(BigtentError):
    """The command line or request is malformed."""

    exit_code = 2
    http_status = 400


class BadRequest(BigtentError):
    """A request's content is invalid (malformed upload, unknown derivation, ...)."""

    exit_code = 1
    http_status = 400


class InvalidParameter(BadRequest):
    """A query parameter the runner validates itself is of the wrong kind or out of range
    (422, as FastAPI answers its own parameters')."""

    http_status = 422


class PayloadTooLarge(BadRequest):
    """An upload is larger than allowed or than it declared."""

    http_status = 413


class NarMismatch(BadRequest):
    """An uploaded NAR is not what its headers declared: another hash, shorter than its
    declared size, or not a well-formed NAR."""


class RangeNotSatisfiable(BadRequest):
    """A byte range asked for lies outside the resource (HTTP 416)."""

    http_status = 416

    def __init__(self, message: str, *, size: int) -> None:
        super().__init__(message, detail={"size": size})
        self.size = size


class Conflict(BigtentError):
    """The request is valid but conflicts with the current state (a stale lease, ...)."""

    http_status = 409


class NotFound(BigtentError):
    """A build, step, store path or agent does not exist."""

    exit_code = 1
    http_status = 404


class AuthError(BigtentError):
    """A credential is missing or invalid (HTTP 401)."""

    exit_code = 3
    http_status = 401


class Forbidden(AuthError):
    """The credential is valid but its role may not do this (HTTP 403)."""

    http_status = 403


class TooManyAuthFailures(AuthError):
    """Too many credential failures came from this address lately (HTTP 429); try again
    after ``retry_after_secs``."""

    http_status = 429

    def __init__(self, message: str, *, retry_after_secs: int) -> None:
        super().__init__(message, detail={"retry_after_secs": retry_after_secs})
        self.retry_after_secs = retry_after_secs


class CredentialUnavailable(AuthError):
    """The agent could not obtain its own credential (a token file it cannot read, a CI job's
    ID token request that failed)."""


class Unavailable(BigtentError):
    """The runner cannot take this request now (a capacity limit); try again later (503)."""

    http_status = 503


class ProtocolError(BigtentError):
    """A peer sent a message that breaks the agent protocol."""

    http_status = 400


class NixError(BigtentError):
    """A Nix command failed."""

    def __init__(
        self,
        message: str,
        *,
        argv: list[str] | None = None,
        status: int | None = None,
        stderr: str = "",
    ) -> None:
        super().__init__(message, detail={"argv": argv, "status": status, "stderr": stderr[-4000:]})
        self.argv = argv or []
        self.status = status
        self.stderr = stderr


class AgentCannotBuild(BigtentError):
    """An agent's start-up probe failed: its store cannot build with its settings. The
    message holds Nix's error and a hint (``agent/probe.py``)."""

    exit_code = 6
    http_status = 500


class StorageUnavailable(BigtentError):
    """The NAR storage (the S3 bucket) could not be reached or answered an error."""

    exit_code = 1
    http_status = 503


class StorageFull(StorageUnavailable):
    """The NAR storage has no room left (ENOSPC, EDQUOT): HTTP 507. Nothing was stored; the
    upload may be tried again once there is room."""

    http_status = 507


class RunnerUnreachable(BigtentError):
    """The runner could not be reached over the network."""

    exit_code = 4
    http_status = 502


class UpstreamUnavailable(BigtentError):
    """An upstream binary cache could not be asked (network error, HTTP 5xx): try again."""

    exit_code = 4
    http_status = 503


class DatabaseError(BigtentError):
    """The runner's database cannot be used: it cannot be reached, or a migration failed."""

    exit_code = 5
    http_status = 503


class SchemaMismatch(DatabaseError):
    """The database's schema is missing, older or newer than this bigtent's
    (``bigtent db migrate`` creates or upgrades it)."""


class BuildFailed(BigtentError):
    """A build finished but not every requested derivation built."""

    exit_code = 1
    http_status = 200


class BuildTimedOut(BigtentError):
    """``bigtent build --timeout`` ran out before the build ended (as ``timeout(1)``)."""

    exit_code = 124
    http_status = 200


class Terminated(BigtentError):
    """The client was told to stop (SIGTERM, e.g. a CI job's timeout): 128 + 15."""

    exit_code = 143
    http_status = 200


class DispatchFailed(BigtentError):
    """A workflow_dispatch call to GitHub failed (HTTP error, rate limit, timeout, network):
    the pool cools down for at least ``retry_after_secs`` when GitHub said so."""

    exit_code = 4
    http_status = 502

    def __init__(
        self, message: str, *, status: int | None = None, retry_after_secs: float | None = None
    ) -> None:
        super().__init__(message, detail={"status": status, "retry_after_secs": retry_after_secs})
        self.status = status
        self.retry_after_secs = retry_after_secs


class ForgeFailed(BigtentError):
    """A call to a forge (GitHub's check runs, Forgejo/Gitea's commit statuses) failed: an HTTP
    error, a rate limit, a timeout, a network error or a credential the forge refused. The
    reporter keeps the report and tries again: after ``retry_after_secs`` when the forge said
    so (``Retry-After``, a rate limit's reset), with backoff otherwise; never again when
    ``permanent`` (the forge will not take it as it is, e.g. 422)."""

    exit_code = 4
    http_status = 502

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retry_after_secs: float | None = None,
        permanent: bool = False,
        rate_limited: bool = False,
    ) -> None:
        super().__init__(
            message,
            detail={
                "status": status,
                "retry_after_secs": retry_after_secs,
                "permanent": permanent,
                "rate_limited": rate_limited,
            },
        )
        self.status = status
        self.retry_after_secs = retry_after_secs
        self.permanent = permanent
        self.rate_limited = rate_limited


@dataclass(frozen=True)
class ErrorBody:
    """The body of an error answer, read as the runner writes it:
    ``{"error": "<message>", "detail": <JSON value>}`` (``parse_error_body``)."""

    error: str | None
    """The runner's message; None when the body is not the runner's JSON."""
    detail: Any
    """Its ``detail``: what the error class carries (validation problems, a retry delay...)."""
    text: str
    """The whole body as text, for a body that is not the runner's (a proxy's HTML page)."""

    @property
    def message(self) -> str | None:
        """The runner's message, else FastAPI's own ``{"detail": "..."}`` text."""
        if self.error is not None:
            return self.error
        return self.detail if isinstance(self.detail, str) else None


def parse_error_body(body: bytes | bytearray | None) -> ErrorBody:
    """What an error answer says: the one reading of the runner's error body, for every
    client of the runner (the CLI's client, the agent's uploads and its WebSocket refusals)."""
    raw = bytes(body or b"")
    text = raw.decode(errors="replace")
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return ErrorBody(error=None, detail=None, text=text)
    error = data.get("error")
    return ErrorBody(
        error=error if isinstance(error, str) else None, detail=data.get("detail"), text=text
    )


def describe(exc: BaseException) -> str:
    """A non-empty reason for ``exc``: its message, else its type, followed by the first
    cause that has a message (``httpx`` errors often carry theirs only in the cause).

    ``exc or type(exc).__name__`` does not do this: an exception is always true, so an empty
    message stayed empty ("uploading … failed: ")."""
    text = str(exc).strip()
    reason = text or type(exc).__name__
    cause = exc.__cause__ or exc.__context__
    seen = 0
    while cause is not None and seen < 5:
        cause_text = str(cause).strip()
        if cause_text and cause_text not in reason:
            return f"{reason}: {cause_text}" if text else f"{reason} ({cause_text})"
        cause = cause.__cause__ or cause.__context__
        seen += 1
    return reason
