"""One HTTP call to a forge's REST API, and what its failure means (shared by ``github.py``
and ``forgejo.py``).

Every failure is a :class:`~bigtent.errors.ForgeFailed`: a network error, a timeout or a 5xx
is tried again with backoff; a rate limit (429, or a 403 that says so: GitHub's secondary
limit, or an exhausted primary limit) waits what the forge asked (``Retry-After``,
``x-ratelimit-reset``) and at least a minute when it did not say; 400, 404, 410 and 422 are
permanent (the forge will not take that request as it is). Credentials are only ever sent in
headers and never appear in an error.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import httpx

from bigtent import __version__
from bigtent.errors import ConfigError, ForgeFailed
from bigtent.runner.autoscale.github import error_message, parse_retry_after
from bigtent.secretfile import read_secret_bytes
from bigtent.tlsctx import httpx_verify

MAX_BODY_BYTES = 1 << 20
"""Of any answer, at most this much is read (a check run's answer is a few KiB)."""
SECONDARY_LIMIT_WAIT_SECS = 60.0
"""GitHub's advice when a secondary rate limit answer carries no ``Retry-After``: wait at
least a minute."""
PERMANENT_STATUSES = frozenset({400, 404, 410, 422})


def failure(
    status: int, headers: Mapping[str, str], body: bytes, now: float, where: str, hint: str = ""
) -> ForgeFailed:
    """The error for an HTTP answer other than success (pure)."""
    detail = error_message(body) or "no message"
    retry = parse_retry_after(headers, now)
    limited = status == 429 or (
        status == 403 and (retry is not None or "rate limit" in detail.lower())
    )
    if limited:
        wait = retry if retry is not None else SECONDARY_LIMIT_WAIT_SECS
        return ForgeFailed(
            f"{where}: rate limited (HTTP {status}: {detail}); waiting {wait:.0f} s",
            status=status,
            retry_after_secs=wait,
            rate_limited=True,
        )
    suffix = f" ({hint})" if hint else ""
    return ForgeFailed(
        f"{where}: HTTP {status}: {detail}{suffix}",
        status=status,
        retry_after_secs=retry,
        permanent=status in PERMANENT_STATUSES,
    )


def make_client(
    *,
    ca_file: str | None,
    what: str,
    timeout_secs: float,
    headers: Mapping[str, str],
    transport: httpx.AsyncBaseTransport | None = None,
) -> httpx.AsyncClient:
    """An httpx client for one forge API: its CA (``bigtent.tlsctx``), no proxies from the
    environment, no redirects."""
    return httpx.AsyncClient(
        transport=transport,
        verify=httpx_verify(ca_file or None, what),
        timeout=httpx.Timeout(timeout_secs, connect=min(10.0, timeout_secs)),
        follow_redirects=False,
        trust_env=False,
        headers={"User-Agent": f"bigtent/{__version__}", **headers},
    )


async def call(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    where: str,
    now: float,
    headers: Mapping[str, str] | None = None,
    body: Any = None,
    timeout_secs: float,
    hints: Mapping[int, str] | None = None,
) -> Any:
    """Send one request; the answer's JSON (None for an empty body) on a 2xx, else raise
    ForgeFailed (``hints`` adds a hint to the error of a status)."""
    try:
        async with asyncio.timeout(timeout_secs):
            async with client.stream(method, url, headers=headers, json=body) as resp:
                data = bytearray()
                async for chunk in resp.aiter_bytes():
                    data += chunk
                    if len(data) > MAX_BODY_BYTES:
                        break
                status = resp.status_code
                answer_headers = resp.headers
    except TimeoutError:
        raise ForgeFailed(f"{where}: no answer within {timeout_secs:g} s") from None
    except httpx.TimeoutException as exc:
        raise ForgeFailed(f"{where}: timed out ({type(exc).__name__})") from None
    except httpx.HTTPError as exc:
        raise ForgeFailed(f"{where}: {type(exc).__name__}: {exc}") from None
    if 200 <= status < 300:
        if not data.strip():
            return None
        try:
            return json.loads(bytes(data))
        except ValueError:
            raise ForgeFailed(f"{where}: HTTP {status} with a body that is not JSON") from None
    raise failure(status, answer_headers, bytes(data), now, where, (hints or {}).get(status, ""))


def read_credential(path: str, what: str) -> bytes:
    """A credential file's contents, read when needed (never kept in a config); one that
    cannot be read is a ``ForgeFailed``, which the outbox retries (the file can be fixed)."""
    try:
        return read_secret_bytes(path, what)
    except ConfigError as exc:
        raise ForgeFailed(exc.message) from None
