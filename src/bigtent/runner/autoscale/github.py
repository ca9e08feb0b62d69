"""The workflow_dispatch client: the autoscaler's one network edge to GitHub.

``POST {api_url}/repos/{owner}/{repo}/actions/workflows/{workflow}/dispatches`` with
``{"ref": ..., "inputs": {...}}``; success is 204 and nothing else. Every other answer, a
timeout (connect or total) and a network error raise ``DispatchFailed``, carrying how long
GitHub asked us to wait (``Retry-After``, or the primary rate limit's reset) when it did.
The token is sent only in the ``Authorization`` header and never appears in an error.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from urllib.parse import quote

import httpx

from bigtent import __version__
from bigtent.config.autoscale import GithubPoolSection
from bigtent.errors import DispatchFailed
from bigtent.tlsctx import httpx_verify

log = logging.getLogger(__name__)

API_VERSION = "2022-11-28"
"""The ``X-GitHub-Api-Version`` the client speaks."""
MAX_ERROR_BODY_BYTES = 4096
"""Of an error answer, at most this much is read (its ``message`` goes into the error)."""


def parse_retry_after(headers: Mapping[str, str], now: float) -> float | None:
    """Seconds GitHub asks us to wait, or None (pure).

    ``Retry-After`` as delta-seconds or an HTTP date (RFC 9110 §10.2.3); otherwise, when the
    primary rate limit is used up (``x-ratelimit-remaining: 0``), until ``x-ratelimit-reset``
    (epoch seconds). Unparsable values count as absent.
    """
    value = headers.get("retry-after")
    if value is not None:
        value = value.strip()
        if value.isdigit():
            return float(value)
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            when = None
        if when is not None and when.tzinfo is not None:
            return max(0.0, when.timestamp() - now)
    if headers.get("x-ratelimit-remaining", "").strip() == "0":
        reset = headers.get("x-ratelimit-reset", "").strip()
        if reset.isdigit():
            return max(0.0, float(reset) - now)
    return None


def dispatch_url(api_url: str, workflow_repository: str, workflow: str) -> str:
    owner, _, repo = workflow_repository.partition("/")
    return (
        f"{api_url.rstrip('/')}/repos/{quote(owner, safe='')}/{quote(repo, safe='')}"
        f"/actions/workflows/{quote(workflow, safe='')}/dispatches"
    )


def error_message(body: bytes) -> str:
    """GitHub's error ``message`` (JSON), else the start of the body, on one line."""
    text = body.decode(errors="replace")
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("message"), str):
        text = doc["message"]
    return " ".join(text.split())[:300]


class GithubWorkflow:
    """Dispatches one pool's workflow. ``transport`` replaces the network (tests)."""

    def __init__(
        self,
        pool: GithubPoolSection,
        token: str,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.pool = pool
        self.url = dispatch_url(pool.api_url, pool.workflow_repository, pool.workflow)
        verify = httpx_verify(
            pool.api_ca_file, f"the autoscale.github api_ca_file of pool {pool.name!r}"
        )
        self._client = httpx.AsyncClient(
            transport=transport,
            verify=verify,
            timeout=httpx.Timeout(
                pool.dispatch_timeout_secs, connect=pool.dispatch_connect_timeout_secs
            ),
            follow_redirects=False,
            trust_env=False,
            headers={
                "Authorization": f"Bearer {token}",
                "Accept": "application/vnd.github+json",
                "X-GitHub-Api-Version": API_VERSION,
                "User-Agent": f"bigtent/{__version__}",
            },
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def dispatch(self, inputs: Mapping[str, str], now: float) -> None:
        """Start one run of the workflow; raise DispatchFailed unless GitHub answered 204.
        ``now`` dates an HTTP-date ``Retry-After``."""
        pool = self.pool
        body = {"ref": pool.ref, "inputs": dict(inputs)}
        where = f"workflow_dispatch of {pool.workflow_label}"
        try:
            async with asyncio.timeout(pool.dispatch_timeout_secs):
                async with self._client.stream("POST", self.url, json=body) as resp:
                    if resp.status_code == 204:
                        return
                    data = bytearray()
                    async for chunk in resp.aiter_bytes():
                        data += chunk
                        if len(data) >= MAX_ERROR_BODY_BYTES:
                            break
                    status = resp.status_code
                    retry = parse_retry_after(resp.headers, now)
        except TimeoutError:
            raise DispatchFailed(
                f"{where}: no answer within {pool.dispatch_timeout_secs:g} s"
            ) from None
        except httpx.TimeoutException as exc:
            raise DispatchFailed(f"{where}: timed out ({type(exc).__name__})") from None
        except httpx.HTTPError as exc:
            raise DispatchFailed(
                f"{where}: cannot reach {pool.api_url}: {type(exc).__name__}: {exc}"
            ) from None
        detail = error_message(bytes(data))
        hint = ""
        if status in (401, 403, 404) and retry is None:
            hint = " (check the token: it needs Actions write access to the workflow repository)"
        if status == 422:
            hint = " (the workflow must declare every input bigtent sends; see docs/autoscaling.md)"
        raise DispatchFailed(
            f"{where}: HTTP {status}: {detail or 'no message'}{hint}",
            status=status,
            retry_after_secs=retry,
        )
