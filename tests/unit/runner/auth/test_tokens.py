"""The token registry: configured and stored digests, revocation, constant-time comparison."""

from __future__ import annotations

import contextlib
import hmac
from pathlib import Path

import pytest

from bigtent.config import Role, TokenEntry
from bigtent.errors import AuthError, ConfigError, Forbidden
from bigtent.runner.auth.tokens import (
    Principal,
    TokenRegistry,
    generate_token,
    token_digest,
)
from bigtent.runner.db.queries import StoredToken

ADMIN = generate_token()
AGENT = generate_token()
CI = generate_token()
OLD = generate_token()


def stored(
    name: str, secret: str, role: Role, *, trusted: bool = False, revoked_at: float | None = None
) -> StoredToken:
    return StoredToken(
        name=name,
        role=str(role),
        sha256=token_digest(secret),
        trusted=trusted,
        created_by="admin",
        created_at=1.0,
        revoked_at=revoked_at,
    )


def registry() -> TokenRegistry:
    reg = TokenRegistry.from_config(
        [
            TokenEntry(name="admin", role=Role.ADMIN, sha256=token_digest(ADMIN)),
            TokenEntry(name="build-01", role=Role.AGENT, sha256=token_digest(AGENT)),
        ]
    )
    reg.replace_stored(
        [
            stored("ci", CI, Role.CLIENT, trusted=True),
            stored("old", OLD, Role.CLIENT, revoked_at=5.0),
        ]
    )
    return reg


@pytest.mark.parametrize(
    ("secret", "principal"),
    [
        (ADMIN, Principal("admin", Role.ADMIN)),
        (AGENT, Principal("build-01", Role.AGENT)),
        (CI, Principal("ci", Role.CLIENT, trusted=True)),
    ],
    ids=["admin-in-config", "agent-in-config", "trusted-client-stored"],
)
def test_config_and_stored_tokens_authenticate(secret: str, principal: Principal) -> None:
    assert registry().authenticate(secret) == principal


@pytest.mark.parametrize(
    "secret",
    [None, "", OLD, "bt_nope", ADMIN + "x"],
    ids=["none", "empty", "revoked", "unknown", "admin-plus-a-byte"],
)
def test_missing_unknown_and_revoked_tokens_are_refused(secret: str | None) -> None:
    with pytest.raises(AuthError) as info:
        registry().authenticate(secret)
    assert info.value.http_status == 401


def test_roles() -> None:
    reg = registry()
    assert reg.require(ADMIN, Role.AGENT).name == "admin"  # admin may do everything
    assert reg.require(CI, Role.CLIENT).name == "ci"
    with pytest.raises(Forbidden):
        reg.require(CI, Role.ADMIN)
    with pytest.raises(Forbidden):
        reg.require(AGENT, Role.CLIENT)


def test_revocation_takes_effect_at_once() -> None:
    reg = registry()
    reg.forget_stored("ci")
    with pytest.raises(AuthError):
        reg.authenticate(CI)
    reg.replace_stored([stored("ci", CI, Role.CLIENT, revoked_at=9.0)])
    with pytest.raises(AuthError):
        reg.authenticate(CI)
    assert reg.authenticate(ADMIN).name == "admin"  # configured tokens are untouched


def test_stored_tokens_enable_auth_and_names_are_reserved() -> None:
    assert not TokenRegistry.from_config([]).enabled
    reg = TokenRegistry.from_config([])
    assert reg.authenticate(None) == Principal("anonymous", Role.ADMIN)
    reg.replace_stored([stored("ci", CI, Role.CLIENT)])
    assert reg.enabled
    with pytest.raises(AuthError):
        reg.authenticate(None)
    assert registry().config_names == {"admin", "build-01"}


def test_every_digest_is_compared(monkeypatch: pytest.MonkeyPatch) -> None:
    """No early exit: a match on the first entry compares as many digests as no match."""
    calls: list[int] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    reg = registry()
    for secret in (ADMIN, CI, "bt_nope"):
        calls.clear()
        with contextlib.suppress(AuthError):
            reg.authenticate(secret)
        assert len(calls) == 3  # two configured, one stored unrevoked


def test_token_file_is_hashed_at_load(tmp_path: Path) -> None:
    f = tmp_path / "tok"
    f.write_text(CI + "\n")
    reg = TokenRegistry.from_config(
        [TokenEntry(name="ci", role=Role.CLIENT, token_file=f, trusted=True)]
    )
    assert reg.authenticate(CI) == Principal("ci", Role.CLIENT, trusted=True)
    with pytest.raises(ConfigError, match="cannot read"):
        TokenRegistry.from_config(
            [TokenEntry(name="x", role=Role.CLIENT, token_file=tmp_path / "none")]
        )
