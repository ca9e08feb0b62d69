"""Bearer tokens: random secrets with a role, stored only as SHA-256 digests (architecture §6),
in ``runner.toml`` or in the database (created and revoked through the API)."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, replace

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from bigtent.config import Role, RunnerConfig, TokenEntry, is_loopback
from bigtent.errors import AuthError, BadRequest, ConfigError, Conflict, Forbidden, NotFound
from bigtent.runner.db import queries
from bigtent.runner.db.notify import ChangeFeed, LocalFeed
from bigtent.runner.db.queries import StoredToken
from bigtent.secretfile import read_secret_file

log = logging.getLogger(__name__)

TOKEN_PREFIX = "bt_"


def generate_token() -> str:
    """A new random token (256 bits), printable once and never stored in clear by the runner."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    """The hex SHA-256 digest under which a token is stored."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Principal:
    """Who made a request: the token's name and role, and whether a client token is trusted
    (its builds may count as trusted, architecture §6)."""

    name: str
    role: Role
    trusted: bool = False
    repository: str | None = None
    """Set for a CI job's ID token acting as a client: the repository its builds carry."""

    def allows(self, needed: Role) -> bool:
        """``admin`` may do everything; otherwise the role must match."""
        return self.role is Role.ADMIN or self.role is needed


@dataclass(frozen=True, slots=True)
class _Entry:
    name: str
    role: Role
    digest: bytes
    trusted: bool = False


class TokenRegistry:
    """Checks bearer tokens in constant time against the configured digests and an in-memory
    copy of the database's unrevoked ones (``replace_stored``, called after every change: no
    database query per request)."""

    def __init__(self, entries: Iterable[_Entry]) -> None:
        self._entries = tuple(entries)
        self._stored: tuple[_Entry, ...] = ()

    @classmethod
    def from_config(cls, tokens: Iterable[TokenEntry]) -> TokenRegistry:
        entries = []
        for t in tokens:
            if t.sha256 is not None:
                digest = t.sha256
            else:
                assert t.token_file is not None
                what = f"auth.tokens[{t.name}].token_file"
                digest = token_digest(read_secret_file(t.token_file, what))
            entries.append(_Entry(t.name, t.role, bytes.fromhex(digest), t.trusted))
        return cls(entries)

    @property
    def config_names(self) -> frozenset[str]:
        """Names of the ``[[auth.tokens]]``: stored tokens may not reuse them."""
        return frozenset(e.name for e in self._entries)

    def is_valid(self, name: str) -> bool:
        """Whether a token of this name is accepted now (configured, or stored and not
        revoked): a machine id bound to a token that is no longer valid may be rebound."""
        return any(e.name == name for e in self._entries + self._stored)

    def replace_stored(self, tokens: Iterable[StoredToken]) -> None:
        """Replace the copy of the database's tokens (revoked ones are skipped). One
        assignment: a request sees the old copy or the new one, never a mix."""
        self._stored = tuple(
            _Entry(t.name, Role(t.role), bytes.fromhex(t.sha256), t.trusted)
            for t in tokens
            if t.revoked_at is None
        )

    def forget_stored(self, name: str) -> None:
        """Stop accepting the stored token ``name`` now (before its revocation commits)."""
        self._stored = tuple(e for e in self._stored if e.name != name)

    @property
    def enabled(self) -> bool:
        """With no tokens configured or stored the runner is open (only sensible on
        loopback)."""
        return bool(self._entries or self._stored)

    def authenticate(self, token: str | None) -> Principal:
        """The principal for ``token``; raise AuthError when missing or unknown."""
        if not self.enabled:
            return Principal("anonymous", Role.ADMIN)
        if not token:
            raise AuthError("missing bearer token")
        return self.authenticate_digest(hashlib.sha256(token.encode()).digest())

    def authenticate_digest(self, digest: bytes) -> Principal:
        """The principal whose token has this SHA-256 digest (a dashboard session keeps the
        digest, never the token, and checks it again on every request: a revoked token's
        sessions end with it)."""
        if not self.enabled:
            return Principal("anonymous", Role.ADMIN)
        found: _Entry | None = None
        for entry in self._entries + self._stored:  # compare against all: no early exit
            if hmac.compare_digest(entry.digest, digest):
                found = entry
        if found is None:
            raise AuthError("invalid token")
        return Principal(found.name, found.role, found.trusted)

    def require(self, token: str | None, role: Role) -> Principal:
        """Authenticate and check the role; raise AuthError (401) or Forbidden (403)."""
        principal = self.authenticate(token)
        if not principal.allows(role):
            raise Forbidden(f"token role {principal.role} may not do this (needs {role})")
        return principal


def plaintext_refusal(config: RunnerConfig) -> str | None:
    """Why tokens may not be used on this runner's transport (architecture §6), or None."""
    r = config.runner
    if r.tls is not None or (r.allow_plaintext and is_loopback(r.host)):
        return None
    return (
        "the runner serves plain HTTP: configure [runner.tls], or allow_plaintext = true "
        "on a loopback listen address"
    )


class TokenStore:
    """Tokens in the database: create, list and revoke them, and keep the registry's copy in
    step with every change (docs/security.md)."""

    def __init__(
        self,
        engine: AsyncEngine,
        registry: TokenRegistry,
        config: RunnerConfig,
        feed: ChangeFeed | None = None,
    ) -> None:
        self.engine = engine
        self.registry = registry
        self.config = config
        self.feed: ChangeFeed = feed if feed is not None else LocalFeed()
        """Tells other runners on the same database to ``reload`` after a change."""

    async def load(self) -> None:
        """Copy the unrevoked tokens into the registry at start. Stored tokens need a safe
        transport just as configured ones do."""
        async with self.engine.connect() as conn:
            stored = await queries.fetch_tokens(conn, active_only=True)
        if stored and (reason := plaintext_refusal(self.config)):
            raise ConfigError(f"tokens are stored in the database but {reason}")
        self.registry.replace_stored(stored)
        if stored:
            log.info("loaded %d stored tokens", len(stored))

    async def create(
        self, role: Role, name: str | None, *, trusted: bool, created_by: str, now: float
    ) -> tuple[StoredToken, str]:
        """A new token and its secret (returned once, never stored)."""
        if reason := plaintext_refusal(self.config):
            raise Conflict(f"cannot store a token: {reason}")
        if trusted and role is Role.AGENT:
            raise BadRequest("only client and admin tokens can be trusted")
        name = name or f"{role}-{secrets.token_hex(3)}"
        if name in self.registry.config_names:
            raise Conflict(f"token name {name!r} is taken by a token in runner.toml")
        secret = generate_token()
        token = StoredToken(
            name=name,
            role=str(role),
            sha256=token_digest(secret),
            trusted=trusted,
            created_by=created_by,
            created_at=now,
            revoked_at=None,
        )
        try:
            async with self.engine.begin() as conn:
                if not await queries.insert_token(conn, token):
                    raise Conflict(f"token name {name!r} is taken (revoked names stay taken)")
                active = await queries.fetch_tokens(conn, active_only=True)
                await self.feed.publish(conn)
        except IntegrityError as exc:  # a concurrent create of the same name
            raise Conflict(f"token name {name!r} is taken") from exc
        self.registry.replace_stored(active)
        log.info("token %s (role %s) created by %s", name, role, created_by)
        return token, secret

    async def fetch_all(self) -> list[StoredToken]:
        """Every stored token, revoked ones included."""
        async with self.engine.connect() as conn:
            return await queries.fetch_tokens(conn)

    async def revoke(self, name: str, *, revoked_by: str, now: float) -> StoredToken:
        """Revoke ``name``: the registry stops accepting it before the change commits, and
        is reloaded from the database afterwards (also when the commit fails)."""
        if name in self.registry.config_names:
            raise Conflict(
                f"token {name!r} is configured in runner.toml: remove it there and restart"
            )
        try:
            async with self.engine.begin() as conn:
                token = await queries.fetch_token(conn, name)
                if token is None:
                    raise NotFound(f"no stored token {name!r}")
                self.registry.forget_stored(name)
                await queries.revoke_token(conn, name, revoked_at=now)
                active = await queries.fetch_tokens(conn, active_only=True)
                await self.feed.publish(conn)
        except Exception:
            # Not revoked after all, or unknown: the database says which tokens hold. If it
            # cannot say, the token stays forgotten (fail closed) until the next change.
            with contextlib.suppress(Exception):
                await self.reload()
            raise
        self.registry.replace_stored(active)
        if token.revoked_at is None:
            log.info("token %s revoked by %s", name, revoked_by)
            token = replace(token, revoked_at=now)
        return token

    async def reload(self) -> None:
        """Copy the database's unrevoked tokens again (another runner changed them)."""
        async with self.engine.connect() as conn:
            self.registry.replace_stored(await queries.fetch_tokens(conn, active_only=True))
