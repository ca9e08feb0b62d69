"""``[auth]``: the configured tokens (``[[auth.tokens]]``), the OIDC issuers whose ID tokens
agents and CI jobs may present (``[[auth.oidc]]``) and the credential-failure limiter
(architecture §6, docs/security.md, docs/oidc.md).
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from bigtent.config.base import Section, web_url


class Role(StrEnum):
    """What a token may do (architecture §6)."""

    AGENT = "agent"
    CLIENT = "client"
    ADMIN = "admin"


class TokenEntry(Section):
    name: str
    role: Role
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    token_file: Path | None = None
    trusted: bool = False
    """A client token whose builds may count as trusted (architecture §6, trust scoping)."""

    @model_validator(mode="after")
    def _one_source(self) -> TokenEntry:
        if (self.sha256 is None) == (self.token_file is None):
            raise ValueError(f"token {self.name!r} needs exactly one of sha256 or token_file")
        return self


class OidcIssuerSection(Section):
    """One ``[[auth.oidc]]`` issuer whose ID tokens agents may present (architecture §6, oidc.md).

    The allow-lists are exact matches; ``repositories`` empty admits nobody, the others restrict
    only when non-empty.
    """

    issuer: str
    """The token's ``iss``, matched exactly; an https URL (GitHub Actions:
    ``https://token.actions.githubusercontent.com``)."""
    audiences: list[str] = Field(min_length=1)
    """A token's ``aud`` must contain one of these."""
    jwks_url: str | None = None
    """Fetch keys here instead of through the issuer's discovery document (https)."""
    ca_file: Path | None = None
    """PEM CA bundle for a self-hosted issuer with a private CA (replaces the system roots)."""
    claims: Literal["github", "gitlab"] = "github"
    """Which claim names carry repository, workflow and ref: ``github`` (also Forgejo/Gitea
    Actions) or ``gitlab``."""
    repositories: list[str] = []
    subjects: list[str] = []
    subject_prefixes: list[str] = []
    workflow_refs: list[str] = []
    refs: list[str] = []
    allow_untrusted: bool = False
    """Agents of this rule are untrusted venues: they take only steps of untrusted builds
    (whose outputs never enter the main cache), never trusted ones (docs/security.md)."""
    build_repositories: list[str] | None = None
    """Repositories whose builds these agents may build; default ``repositories``; ``"*"``:
    any build, also one without a repository."""
    clients: bool = False
    """The ID tokens this rule admits may also act as a client (a CI job's
    ``bigtent-nix-hook --oidc github``, docs/nix-integration.md): upload sources and ``.drv``
    files, submit and follow builds. Those builds are untrusted and carry the job's
    repository."""
    refresh_interval_secs: float = Field(default=60.0, gt=0)
    """At most one key fetch per interval for unknown ``kid``s (a flood causes no flood)."""
    http_timeout_secs: float = Field(default=10.0, gt=0)
    leeway_secs: float = Field(default=60.0, ge=0, le=600)
    """Clock skew tolerated on ``exp``, ``nbf`` and ``iat``."""

    @field_validator("issuer", "jwks_url")
    @classmethod
    def _https_url(cls, v: str | None) -> str | None:
        return None if v is None else web_url(v)  # as given: ``iss`` is matched exactly

    @field_validator(
        "repositories",
        "subjects",
        "subject_prefixes",
        "workflow_refs",
        "refs",
        "build_repositories",
    )
    @classmethod
    def _no_empty_entries(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and any(not item.strip() for item in v):
            raise ValueError("entries must be non-empty (an empty prefix would admit everyone)")
        return v

    @field_validator("audiences")
    @classmethod
    def _no_empty_audience(cls, v: list[str]) -> list[str]:
        if any(not item for item in v):
            raise ValueError("entries must be non-empty")
        return v


class AuthSection(Section):
    tokens: list[TokenEntry] = []
    oidc: list[OidcIssuerSection] = []
    max_failures_per_address: int = Field(default=20, ge=1)
    """Credential failures (401s) one address may cause within ``failure_window_secs``;
    beyond that it is answered 429 until the window passes (docs/security.md)."""
    failure_window_secs: float = Field(default=60.0, gt=0)
    max_tracked_addresses: int = Field(default=10_000, ge=1)
    """Addresses the failure limiter remembers at once (bounded memory)."""
