"""Bearer tokens: random secrets with a role, stored only as SHA-256 digests (DESIGN §6)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from bigtent.config import Role, TokenEntry
from bigtent.errors import AuthError, ConfigError, Forbidden

TOKEN_PREFIX = "bt_"


def generate_token() -> str:
    """A new random token (256 bits), printable once and never stored in clear by the runner."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    """The hex SHA-256 digest under which a token is stored."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Principal:
    """Who made a request: the token's name and role."""

    name: str
    role: Role

    def allows(self, needed: Role) -> bool:
        """``admin`` may do everything; otherwise the role must match."""
        return self.role is Role.ADMIN or self.role is needed


@dataclass(frozen=True, slots=True)
class _Entry:
    name: str
    role: Role
    digest: bytes


class TokenRegistry:
    """Checks bearer tokens against configured digests in constant time."""

    def __init__(self, entries: Iterable[_Entry]) -> None:
        self._entries = list(entries)

    @classmethod
    def from_config(cls, tokens: Iterable[TokenEntry]) -> TokenRegistry:
        entries = []
        for t in tokens:
            if t.sha256 is not None:
                digest = t.sha256
            else:
                assert t.token_file is not None
                try:
                    digest = token_digest(t.token_file.read_text().strip())
                except OSError as exc:
                    raise ConfigError(
                        f"config key auth.tokens[{t.name}].token_file: cannot read "
                        f"{t.token_file}: {exc.strerror}"
                    ) from exc
            entries.append(_Entry(t.name, t.role, bytes.fromhex(digest)))
        return cls(entries)

    @property
    def enabled(self) -> bool:
        """With no tokens configured the runner is open (only sensible on loopback)."""
        return bool(self._entries)

    def authenticate(self, token: str | None) -> Principal:
        """The principal for ``token``; raise AuthError when missing or unknown."""
        if not self.enabled:
            return Principal("anonymous", Role.ADMIN)
        if not token:
            raise AuthError("missing bearer token")
        digest = hashlib.sha256(token.encode()).digest()
        found: _Entry | None = None
        for entry in self._entries:  # compare against all: no early exit
            if hmac.compare_digest(entry.digest, digest):
                found = entry
        if found is None:
            raise AuthError("invalid token")
        return Principal(found.name, found.role)

    def require(self, token: str | None, role: Role) -> Principal:
        """Authenticate and check the role; raise AuthError (401) or Forbidden (403)."""
        principal = self.authenticate(token)
        if not principal.allows(role):
            raise Forbidden(f"token role {principal.role} may not do this (needs {role})")
        return principal
