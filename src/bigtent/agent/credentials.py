"""Where an agent's bearer credential comes from: a static token, a token file, or the OIDC ID
token of the CI job the agent runs in (architecture §6, §7 ``--oidc github``).

The session asks its ``CredentialSource`` for a fresh credential at every (re)connect, and the
executor for a usable one before every upload try. A static token never changes; a token file
is read again at every connect (so a rotated file takes effect then); a CI job's ID token
expires within minutes, so a new one is fetched for every connect and whenever the one in hand
is close to its ``exp``. Another CI system (GitLab, Forgejo) is one more class with the same
two methods.

Credentials are never logged or printed: errors name the variable, the URL's host and the HTTP
status, never a token.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, assert_never
from urllib.parse import urlencode, urlsplit, urlunsplit

import httpx

from bigtent.config import AgentSection, OidcProvider
from bigtent.errors import ConfigError, CredentialUnavailable
from bigtent.secretfile import read_secret_file

log = logging.getLogger(__name__)

ACTIONS_URL_VAR = "ACTIONS_ID_TOKEN_REQUEST_URL"
ACTIONS_TOKEN_VAR = "ACTIONS_ID_TOKEN_REQUEST_TOKEN"
AGENT_TOKEN_VAR = "BIGTENT_AGENT_TOKEN"
REFRESH_MARGIN_SECS = 120.0
"""An ID token is replaced once less than this is left before its ``exp`` (or half its
lifetime, when that is shorter)."""
FETCH_TIMEOUT_SECS = 30.0
"""One ID token request, connect to last byte."""
FETCH_CONNECT_TIMEOUT_SECS = 10.0
FETCH_RETRY_DELAYS_SECS = (1.0, 3.0)
"""Pauses between the tries of an ID token request that failed on the network or with a 5xx
or 429: three tries in all."""
MAX_ID_TOKEN_CHARS = 64 * 1024
_REASON_CHARS = 200


_TOKEN_HINT = "check the agent token and its role"


class CredentialSource(Protocol):
    """The agent's bearer credential: ``None`` when the agent presents none."""

    @property
    def refusal_hint(self) -> str:
        """What to check when the runner refuses this credential (one log line)."""
        ...

    async def credential(self, *, fresh: bool) -> str | None:
        """``fresh``: at a (re)connect, a newly obtained credential where the source can make
        one; otherwise one valid long enough for an upload. Raises ``CredentialUnavailable``."""
        ...


# ---- static and file ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class StaticToken:
    """A token given once (``BIGTENT_AGENT_TOKEN``, tests)."""

    token: str

    def __repr__(self) -> str:
        return "StaticToken(<hidden>)"

    @property
    def refusal_hint(self) -> str:
        return _TOKEN_HINT

    async def credential(self, *, fresh: bool) -> str | None:
        return self.token


class TokenFile:
    """A token read from a file: at start (a bad file is a ``ConfigError`` then) and again at
    every connect; uploads use the value read at the last connect."""

    def __init__(self, path: Path, what: str = "token file") -> None:
        self.path = path
        self._what = what
        self._token = read_secret_file(path, what)

    def __repr__(self) -> str:
        return f"TokenFile({str(self.path)!r})"

    @property
    def refusal_hint(self) -> str:
        return _TOKEN_HINT

    async def credential(self, *, fresh: bool) -> str | None:
        if fresh:
            try:
                self._token = read_secret_file(self.path, self._what)
            except ConfigError as exc:
                raise CredentialUnavailable(exc.message) from exc
        return self._token


# ---- GitHub Actions ----------------------------------------------------------------------
def id_token_request_url(request_url: str, audience: str) -> str:
    """``ACTIONS_ID_TOKEN_REQUEST_URL`` with ``audience=AUD`` added to its query string (which
    GitHub already fills, e.g. ``?api-version=2.0``): ``&`` after an existing query, ``?``
    otherwise; the audience is percent-encoded."""
    parts = urlsplit(request_url)
    query = parts.query.rstrip("&")
    added = urlencode({"audience": audience})
    return urlunsplit(parts._replace(query=f"{query}&{added}" if query else added))


@dataclass(frozen=True, slots=True)
class TokenTimes:
    """The unverified ``iat`` and ``exp`` of a JWT (wall-clock seconds), for timing only."""

    issued_at: float | None
    expires_at: float | None


def unverified_claims(token: str) -> dict[str, Any]:
    """A JWT's payload, NOT verified: only for timing and log lines (the runner verifies).
    Empty when the token is not a JWT with a JSON object payload."""
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        data = json.loads(base64.urlsafe_b64decode(payload.encode("ascii")))
    except (ValueError, binascii.Error, UnicodeEncodeError):
        return {}
    return data if isinstance(data, dict) else {}


def token_times(token: str) -> TokenTimes:
    claims = unverified_claims(token)

    def number(key: str) -> float | None:
        value = claims.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        return float(value)

    return TokenTimes(issued_at=number("iat"), expires_at=number("exp"))


def still_usable(times: TokenTimes, now: float, margin_secs: float = REFRESH_MARGIN_SECS) -> bool:
    """Whether a token may be presented again at ``now`` instead of fetching a new one.

    It must have an ``exp`` and more than the refresh margin left before it: ``margin_secs``,
    or half its lifetime (``exp - iat``) when that is shorter, so a short-lived token is still
    used for a while. A token without ``exp`` is never reused.
    """
    if times.expires_at is None:
        return False
    margin = margin_secs
    if times.issued_at is not None and times.expires_at > times.issued_at:
        margin = min(margin, (times.expires_at - times.issued_at) / 2)
    return times.expires_at - now > margin


def _retryable_status(status: int) -> bool:
    return status == 429 or status >= 500


class GithubActionsToken:
    """The ID token of the GitHub Actions job the agent runs in (``--oidc github``).

    GitHub gives a job with ``permissions: id-token: write`` two variables: the URL to ask and a
    bearer token for asking. ``GET URL&audience=AUD`` with ``Authorization: bearer TOKEN``
    answers ``{"value": "<JWT>"}``.
    """

    def __init__(
        self,
        request_url: str,
        request_token: str,
        audience: str,
        *,
        clock: Callable[[], float] = time.time,
        transport: httpx.AsyncBaseTransport | None = None,
        retry_delays_secs: Sequence[float] = FETCH_RETRY_DELAYS_SECS,
        timeout_secs: float = FETCH_TIMEOUT_SECS,
    ) -> None:
        self._url = id_token_request_url(request_url, audience)
        parts = urlsplit(request_url)
        # Host and port only: never log userinfo a URL might carry.
        self._host = (parts.hostname or "?") + (f":{parts.port}" if parts.port else "")
        self._request_token = request_token
        self.audience = audience
        self._clock = clock
        self._transport = transport
        self._retry_delays = tuple(retry_delays_secs)
        self._timeout_secs = timeout_secs
        self._token: str | None = None
        self._times = TokenTimes(None, None)
        self._lock = asyncio.Lock()
        self.fetches = 0
        """ID tokens fetched so far (successful requests)."""

    def __repr__(self) -> str:
        return f"GithubActionsToken(audience={self.audience!r}, host={self._host!r})"

    @property
    def refusal_hint(self) -> str:
        return (
            f"check that audience {self.audience!r} is one of the runner's [[auth.oidc]] "
            "audiences and that its allow-lists admit this repository, workflow and ref "
            "(docs/github-actions.md)"
        )

    async def credential(self, *, fresh: bool) -> str | None:
        async with self._lock:  # concurrent uploads share one fetch
            if not fresh and self._token is not None and still_usable(self._times, self._clock()):
                return self._token
            token = await self._fetch()
            self._token, self._times = token, token_times(token)
            return token

    async def _fetch(self) -> str:
        attempt = 0
        while True:
            try:
                return await self._fetch_once()
            except _Retryable as exc:
                if attempt >= len(self._retry_delays):
                    raise CredentialUnavailable(
                        f"{exc.message}; gave up after {attempt + 1} tries"
                    ) from exc
                delay = self._retry_delays[attempt]
                attempt += 1
                log.warning("%s; trying again in %.1f s", exc.message, delay)
                await asyncio.sleep(delay)

    async def _fetch_once(self) -> str:
        what = f"requesting the GitHub Actions ID token from {self._host}"
        headers = {
            "Authorization": f"bearer {self._request_token}",
            "Accept": "application/json",
        }
        try:
            async with (
                asyncio.timeout(self._timeout_secs),
                httpx.AsyncClient(
                    transport=self._transport,
                    timeout=httpx.Timeout(
                        self._timeout_secs,
                        connect=min(FETCH_CONNECT_TIMEOUT_SECS, self._timeout_secs),
                    ),
                    follow_redirects=False,
                ) as client,
            ):
                response = await client.get(self._url, headers=headers)
        except TimeoutError as exc:
            raise _Retryable(f"{what} timed out after {self._timeout_secs:g} s") from exc
        except httpx.HTTPError as exc:
            raise _Retryable(f"{what} failed: {type(exc).__name__}: {exc}") from exc
        if response.status_code != 200:
            message = f"{what} failed: HTTP {response.status_code}: {_reason(response)}" + _hint(
                response.status_code
            )
            if _retryable_status(response.status_code):
                raise _Retryable(message)
            raise CredentialUnavailable(message)
        try:
            value = response.json().get("value")
        except (ValueError, AttributeError):
            value = None
        if not isinstance(value, str) or not value or len(value) > MAX_ID_TOKEN_CHARS:
            raise CredentialUnavailable(f'{what}: the answer holds no token (no "value")')
        self.fetches += 1
        claims = unverified_claims(value)
        times = token_times(value)
        left = "?" if times.expires_at is None else f"{times.expires_at - self._clock():.0f}"
        log.info(
            "got a GitHub Actions ID token for audience %r (sub %r, expires in %s s)",
            self.audience,
            str(claims.get("sub", "?"))[:200],
            left,
        )
        return value


class _Retryable(CredentialUnavailable):
    """A failure of one ID token request that another try may cure."""


def _reason(response: httpx.Response) -> str:
    text = " ".join(response.text.split())
    return text[:_REASON_CHARS] or response.reason_phrase or "no reason given"


def _hint(status: int) -> str:
    if status in (401, 403):
        return " (does the job have `permissions: id-token: write`?)"
    return ""


def github_actions_token(
    env: Mapping[str, str], audience: str, **kwargs: Any
) -> GithubActionsToken:
    """The GitHub Actions source from the job's environment; a ``ConfigError`` that says what
    to do when the job was not given the variables (no ``id-token: write`` permission)."""
    url = env.get(ACTIONS_URL_VAR, "").strip()
    token = env.get(ACTIONS_TOKEN_VAR, "").strip()
    missing = [
        name for name, value in ((ACTIONS_URL_VAR, url), (ACTIONS_TOKEN_VAR, token)) if not value
    ]
    if missing:
        raise ConfigError(
            f"--oidc github needs {' and '.join(missing)} in the environment, which GitHub "
            "Actions sets only in a job with `permissions: id-token: write` "
            "(see docs/github-actions.md)"
        )
    parts = urlsplit(url)
    try:
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a port that is not a number
        valid = False
    if not valid:
        raise ConfigError(f"{ACTIONS_URL_VAR} is not an http(s) URL")
    if not audience:
        raise ConfigError("--oidc github needs an audience (--audience or agent.audience)")
    return GithubActionsToken(url, token, audience, **kwargs)


# ---- choosing one ------------------------------------------------------------------------
def load_credentials(
    section: AgentSection, env: Mapping[str, str], *, token_file_flag: Path | None = None
) -> CredentialSource | None:
    """The agent's credential source from its config, flags and environment.

    ``agent.oidc`` (``--oidc``) takes the CI job's ID token and admits no token besides.
    Otherwise: ``--token-file``, then ``BIGTENT_AGENT_TOKEN``, then ``agent.token_file``;
    None when there is no credential at all (a runner without auth).
    """
    env_token = env.get(AGENT_TOKEN_VAR, "")
    if section.oidc is not None:
        if section.token_file is not None or env_token:
            given = "agent.token_file" if section.token_file is not None else AGENT_TOKEN_VAR
            raise ConfigError(
                f"agent.oidc = {section.oidc.value!r} and {given} are both given: "
                "an agent presents one credential; drop one"
            )
        match section.oidc:
            case OidcProvider.GITHUB:
                return github_actions_token(env, section.audience)
            case _:
                assert_never(section.oidc)
    if token_file_flag is not None:
        return TokenFile(token_file_flag)
    if env_token:
        return StaticToken(env_token)
    if section.token_file is not None:
        return TokenFile(section.token_file, "config key agent.token_file")
    return None


def as_credential_source(token: str | CredentialSource | None) -> CredentialSource | None:
    """A plain token string (tests, callers of old) as a ``StaticToken``."""
    if isinstance(token, str):
        return StaticToken(token) if token else None
    return token


__all__ = [
    "ACTIONS_TOKEN_VAR",
    "ACTIONS_URL_VAR",
    "CredentialSource",
    "GithubActionsToken",
    "StaticToken",
    "TokenFile",
    "TokenTimes",
    "as_credential_source",
    "github_actions_token",
    "id_token_request_url",
    "load_credentials",
    "still_usable",
    "token_times",
    "unverified_claims",
]
