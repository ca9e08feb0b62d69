"""OIDC ID tokens as agent credentials: signature, keys and time claims (architecture §6).

``OidcVerifier.verify(token)`` is the one entry point. In order:

1. The unverified header: ``alg`` must be RS256 (``none`` and HMAC never reach a key), ``kid``
   must be present, ``crit`` must be absent. ``jku``/``x5u``/``jwk`` headers are ignored: keys
   only ever come from the configured issuer.
2. The unverified ``iss`` picks the issuer; it must equal a configured ``issuer`` exactly.
3. The key for ``kid`` comes from that issuer's cached JWKS. The JWKS is found through
   ``<issuer>/.well-known/openid-configuration`` (whose ``issuer`` must be the issuer and whose
   ``jwks_uri`` must be on the issuer's origin: scheme, host and port) or the configured
   ``jwks_url``. On an unknown ``kid`` (or keys older than an hour) the JWKS is fetched again,
   but at most once per ``refresh_interval_secs`` per issuer, and concurrent verifications
   share one in-flight fetch: a flood of random ``kid``s causes no flood of fetches.
4. PyJWT checks the RS256 signature, ``iss`` and ``aud`` (one of ``audiences``), with
   ``algorithms`` given explicitly; ``exp``, ``nbf`` and ``iat`` are checked against the
   injected clock with ``leeway_secs``; ``sub`` must be present.
5. ``policy.check`` applies the issuer's allow-lists and returns the ``AgentIdentity``.

Failures raise ``AuthError`` subclasses with a short public reason; the detail is logged with
the ``kid``, ``iss`` and ``sub`` (never the token).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey
from jwt.algorithms import RSAAlgorithm

from bigtent import __version__
from bigtent.config import OidcIssuerSection
from bigtent.errors import AuthError, ConfigError
from bigtent.runner.auth import policy
from bigtent.runner.auth.policy import AgentIdentity, PolicyDenied
from bigtent.tlsctx import httpx_verify

log = logging.getLogger(__name__)

ALGORITHMS = ("RS256",)
"""The only signature algorithms accepted (architecture §6); checked before any key lookup."""
DISCOVERY_PATH = "/.well-known/openid-configuration"
MAX_TOKEN_CHARS = 16 * 1024
MAX_DOCUMENT_BYTES = 1024 * 1024
"""Largest discovery document or JWKS read from an issuer."""
MAX_KEYS = 100
MIN_RSA_BITS = 2048
KEYS_MAX_AGE_SECS = 3600.0
"""Keys older than this are fetched again before use (so keys removed at the issuer go)."""


class InvalidToken(AuthError):
    """An ID token that is malformed, wrongly signed, expired or not meant for this runner."""


class IssuerUnavailable(AuthError):
    """The issuer's keys could not be fetched; the agent may try again later (HTTP 503)."""

    exit_code = 4
    http_status = 503


@dataclass(frozen=True, slots=True)
class _Seen:
    """The unverified header and claims a refusal is logged with."""

    kid: Any = None
    iss: Any = None
    sub: Any = None


class _FetchError(Exception):
    """Why a discovery or JWKS fetch failed (logged, never shown to the agent)."""


class _Issuer:
    """Per-issuer key cache and refresh bookkeeping."""

    def __init__(self, rule: OidcIssuerSection, client: httpx.AsyncClient) -> None:
        self.rule = rule
        self.client = client
        self.keys: dict[str, RSAPublicKey] = {}
        self.fetched_at: float | None = None
        """When the current keys were fetched (clock time)."""
        self.attempted_at: float | None = None
        """When the last fetch started, successful or not: the refresh floor counts from it."""
        self.failed = False
        self.jwks_uri: str | None = rule.jwks_url
        self.inflight: asyncio.Task[None] | None = None


def _origin(url: str) -> tuple[str, str, int | None] | None:
    try:
        u = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return None
    default = {"https": 443, "http": 80}.get(u.scheme)
    return (u.scheme, u.host.lower(), u.port or default)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _short(value: Any) -> str:
    """A log-safe rendering of an attacker-controlled value."""
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "…"


def parse_jwks(doc: Mapping[str, Any]) -> dict[str, RSAPublicKey]:
    """The usable RS256 verification keys of a JWKS document, by ``kid``.

    Keys without a ``kid``, of another type, use or algorithm, shorter than 2048 bits, or with
    a ``kid`` seen before are skipped.
    """
    entries = doc.get("keys")
    if not isinstance(entries, list):
        raise _FetchError("JWKS has no keys list")
    keys: dict[str, RSAPublicKey] = {}
    for jwk in entries[:MAX_KEYS]:
        if not isinstance(jwk, dict):
            continue
        kid = jwk.get("kid")
        if not isinstance(kid, str) or not kid or kid in keys:
            continue
        if jwk.get("kty") != "RSA" or jwk.get("use", "sig") != "sig":
            continue
        if jwk.get("alg", ALGORITHMS[0]) not in ALGORITHMS:
            continue
        try:
            key = RSAAlgorithm.from_jwk(jwk)
        except (jwt.PyJWTError, ValueError, KeyError, TypeError) as exc:
            log.debug("skipping JWKS key %s: %s", _short(kid), exc)
            continue
        if isinstance(key, RSAPrivateKey):
            key = key.public_key()
        if key.key_size < MIN_RSA_BITS:
            log.debug("skipping JWKS key %s: %d bits", _short(kid), key.key_size)
            continue
        keys[kid] = key
    return keys


class OidcVerifier:
    """Verifies agents' OIDC ID tokens against the configured ``[[auth.oidc]]`` issuers.

    ``transport`` replaces the network for every issuer (tests); ``clock`` gives the time for
    token time claims and the refresh floor.
    """

    def __init__(
        self,
        issuers: Sequence[OidcIssuerSection],
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self._issuers: dict[str, _Issuer] = {}
        for rule in issuers:
            if rule.issuer in self._issuers:
                raise ConfigError(f"config key auth.oidc: issuer {rule.issuer} is listed twice")
            self._issuers[rule.issuer] = _Issuer(rule, self._client(rule, transport))

    @staticmethod
    def _client(
        rule: OidcIssuerSection, transport: httpx.AsyncBaseTransport | None
    ) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=transport,
            verify=httpx_verify(rule.ca_file, f"the auth.oidc ca_file of {rule.issuer}"),
            timeout=httpx.Timeout(rule.http_timeout_secs),
            follow_redirects=False,
            headers={"User-Agent": f"bigtent/{__version__}", "Accept": "application/json"},
        )

    @property
    def enabled(self) -> bool:
        return bool(self._issuers)

    async def aclose(self) -> None:
        for st in self._issuers.values():
            if st.inflight is not None:
                st.inflight.cancel()
            await st.client.aclose()

    async def __aenter__(self) -> OidcVerifier:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def admits_clients(self, identity: AgentIdentity) -> bool:
        """Whether the rule of the identity's issuer lets its tokens act as a client."""
        st = self._issuers.get(identity.issuer)
        return st is not None and st.rule.clients

    async def verify(self, token: str) -> AgentIdentity:
        """The identity of the CI job that minted ``token``; raise AuthError when refused."""
        if not token or len(token) > MAX_TOKEN_CHARS:
            raise self._refuse("malformed token", f"token length {len(token)}")
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise self._refuse("malformed token", str(exc)) from None
        kid = header.get("kid")
        iss = unverified.get("iss")
        sub = unverified.get("sub")
        where = _Seen(kid, iss, sub)

        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise self._refuse("token algorithm not allowed", f"alg {_short(alg)}", where)
        if "crit" in header:
            raise self._refuse("token has critical extensions", "crit header", where)
        if not isinstance(kid, str) or not kid:
            raise self._refuse("token has no key id", "no kid", where)
        st = self._issuers.get(iss) if isinstance(iss, str) else None
        if st is None:
            raise self._refuse("token issuer not accepted", "iss is not configured", where)

        key = await self._key(st, kid, where)
        claims = self._decode(token, key, st.rule, where)
        try:
            identity = policy.check(claims, st.rule)
        except PolicyDenied as exc:
            log.warning(
                "OIDC token refused: %s; kid=%s iss=%s sub=%s repository=%s",
                exc.message,
                *(_short(v) for v in (kid, iss, sub)),
                _short(claims.get("repository", claims.get("project_path"))),
            )
            raise
        log.info(
            "OIDC token accepted: kid=%s iss=%s sub=%s repository=%s",
            *(_short(v) for v in (kid, iss, identity.subject, identity.repository)),
        )
        return identity

    def _refuse(
        self,
        public: str,
        detail: str,
        where: _Seen = _Seen(),
        *,
        error: type[AuthError] = InvalidToken,
    ) -> AuthError:
        log.warning(
            "OIDC token refused: %s (%s); kid=%s iss=%s sub=%s",
            public,
            detail,
            *(_short(v) for v in (where.kid, where.iss, where.sub)),
        )
        return error(public)

    def _decode(
        self, token: str, key: RSAPublicKey, rule: OidcIssuerSection, where: _Seen
    ) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=list(ALGORITHMS),
                audience=rule.audiences,
                issuer=rule.issuer,
                options={
                    "require": ["iss", "aud", "exp", "iat", "sub"],
                    # Times are checked below against the injected clock.
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.InvalidSignatureError:
            raise self._refuse("invalid token signature", "signature", where) from None
        except jwt.InvalidAudienceError as exc:
            raise self._refuse("token audience not accepted", str(exc), where) from None
        except jwt.InvalidIssuerError as exc:
            raise self._refuse("token issuer not accepted", str(exc), where) from None
        except jwt.MissingRequiredClaimError as exc:
            raise self._refuse(f"token has no {exc.claim} claim", str(exc), where) from None
        except jwt.PyJWTError as exc:
            raise self._refuse("invalid token", str(exc), where) from None

        now = self._clock()
        leeway = rule.leeway_secs
        times = [claims.get("exp"), claims.get("nbf", 0), claims.get("iat")]
        if not all(_is_number(t) for t in times):
            raise self._refuse("malformed token", "exp, nbf or iat is not a number", where)
        exp, nbf, iat = (float(t) for t in times)
        if now > exp + leeway:
            raise self._refuse("token expired", f"exp {exp}, now {now:.0f}", where)
        if nbf > now + leeway or iat > now + leeway:
            raise self._refuse("token not yet valid", f"nbf {nbf}, iat {iat}, now {now:.0f}", where)
        if not isinstance(claims.get("sub"), str) or not claims["sub"]:
            raise self._refuse("token has no sub claim", "sub empty or not a string", where)
        return claims

    # --- keys -------------------------------------------------------------------------------

    async def _key(self, st: _Issuer, kid: str, where: _Seen) -> RSAPublicKey:
        now = self._clock()
        stale = st.fetched_at is None or now - st.fetched_at >= KEYS_MAX_AGE_SECS
        key = st.keys.get(kid)
        if key is not None and not stale:
            return key
        try:
            await self._refresh(st, now)
        except _FetchError as exc:
            if kid in st.keys:  # the issuer is down: keep using a known key
                log.warning(
                    "OIDC keys of %s not refreshed, using cached ones: %s", st.rule.issuer, exc
                )
                return st.keys[kid]
            raise self._refuse(
                "OIDC issuer keys unavailable", str(exc), where, error=IssuerUnavailable
            ) from None
        key = st.keys.get(kid)
        if key is not None:
            return key
        if st.failed:
            raise self._refuse(
                "OIDC issuer keys unavailable",
                "last key fetch failed",
                where,
                error=IssuerUnavailable,
            )
        raise self._refuse("unknown signing key", "kid not in the issuer's JWKS", where)

    async def _refresh(self, st: _Issuer, now: float) -> None:
        """Fetch the issuer's keys unless a fetch started less than the interval ago; share an
        in-flight fetch. Raise _FetchError when the fetch this call waited for failed."""
        task = st.inflight
        if task is None:
            floor = st.rule.refresh_interval_secs
            if st.attempted_at is not None and now - st.attempted_at < floor:
                return
            st.attempted_at = now
            task = st.inflight = asyncio.create_task(self._fetch_keys(st))

            def done(t: asyncio.Task[None]) -> None:
                if st.inflight is t:
                    st.inflight = None
                if not t.cancelled():
                    t.exception()  # retrieved here; each waiter re-raises its own

            task.add_done_callback(done)
        await asyncio.shield(task)

    async def _fetch_keys(self, st: _Issuer) -> None:
        try:
            if st.jwks_uri is None:
                st.jwks_uri = await self._discover(st)
            keys = parse_jwks(await self._get_json(st, st.jwks_uri))
            if not keys:
                raise _FetchError(f"no usable RS256 keys at {st.jwks_uri}")
        except Exception as exc:
            st.failed = True
            st.jwks_uri = st.rule.jwks_url  # discover again next time
            if not isinstance(exc, _FetchError):  # a bug or an odd failure: still a 503
                log.exception("OIDC keys of %s: unexpected error", st.rule.issuer)
                raise _FetchError(f"unexpected {type(exc).__name__}") from exc
            log.warning("OIDC keys of %s could not be fetched: %s", st.rule.issuer, exc)
            raise
        st.keys = keys
        st.fetched_at = self._clock()
        st.failed = False
        log.info("OIDC keys of %s fetched: kids %s", st.rule.issuer, sorted(keys))

    async def _discover(self, st: _Issuer) -> str:
        issuer = st.rule.issuer
        doc = await self._get_json(st, issuer.rstrip("/") + DISCOVERY_PATH)
        if doc.get("issuer") != issuer:
            raise _FetchError(f"discovery document names issuer {_short(doc.get('issuer'))}")
        uri = doc.get("jwks_uri")
        if not isinstance(uri, str) or _origin(uri) != _origin(issuer):
            raise _FetchError(f"discovery jwks_uri {_short(uri)} is not on the issuer's origin")
        return uri

    async def _get_json(self, st: _Issuer, url: str) -> dict[str, Any]:
        body = bytearray()
        try:
            async with asyncio.timeout(st.rule.http_timeout_secs):
                async with st.client.stream("GET", url) as resp:
                    if resp.status_code != 200:
                        raise _FetchError(f"HTTP {resp.status_code} from {url}")
                    async for chunk in resp.aiter_bytes():
                        body += chunk
                        if len(body) > MAX_DOCUMENT_BYTES:
                            raise _FetchError(f"{url} is larger than {MAX_DOCUMENT_BYTES} bytes")
        except TimeoutError:
            raise _FetchError(f"{url} timed out") from None
        except httpx.HTTPError as exc:
            raise _FetchError(f"{url}: {type(exc).__name__}: {exc}") from None
        try:
            doc = json.loads(body)
        except ValueError:
            raise _FetchError(f"{url} is not JSON") from None
        if not isinstance(doc, dict):
            raise _FetchError(f"{url} is not a JSON object")
        return doc
