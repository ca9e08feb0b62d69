"""The agent's config: ``[agent]`` (where the runner is, what this machine builds, how it
authenticates, its store and disk budget) and its loader, where flags win over file and
environment (docs/agents.md).
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from bigtent.config.base import FileSettings, Section, format_validation, merge, toml_source
from bigtent.errors import ConfigError
from bigtent.protocol import MAX_LIST_ITEMS, MAX_SHORT_TEXT


class OidcProvider(StrEnum):
    """Where ``agent.oidc`` takes the agent's ID token from (docs/github-actions.md)."""

    GITHUB = "github"
    """The GitHub Actions job's ``ACTIONS_ID_TOKEN_REQUEST_URL``/``_TOKEN``."""


class EphemeralSection(Section):
    max_builds: int | None = Field(default=None, ge=1)
    max_idle_secs: float = Field(default=120.0, gt=0)
    max_lifetime_secs: float | None = Field(default=None, gt=0)


class AgentSection(Section):
    runner_url: str = "http://127.0.0.1:8080"
    name: str = ""
    """Default: the host name."""
    systems: list[str] = []
    """Default: the local Nix system plus its extra-platforms."""
    supported_features: list[str] = []
    mandatory_features: list[str] = []
    max_jobs: int = Field(default=1, ge=1, le=MAX_LIST_ITEMS)
    speed_factor: float = Field(default=1.0, gt=0)
    store: str = ""
    """Nix store URI; "" is the default store, ``local?root=DIR`` a separate one."""
    work_dir: Path = Path("/var/lib/bigtent-agent")
    token_file: Path | None = None
    ca_file: Path | None = None
    client_cert_file: Path | None = None
    """mTLS: the agent's certificate chain (PEM), presented to a runner with a client CA."""
    client_key_file: Path | None = None
    """The key of ``client_cert_file`` (default: in the same file)."""
    oidc: OidcProvider | None = None
    """Present the CI job's OIDC ID token instead of a token (``github``); implies ephemeral."""
    audience: str = Field(default="", max_length=MAX_SHORT_TEXT)
    """The ``aud`` to request the ID token for: one of the runner issuer's ``audiences``."""
    launch_id: str | None = Field(default=None, max_length=MAX_SHORT_TEXT)
    """Reported at register (the autoscaler's launch id); ``BIGTENT_LAUNCH_ID``."""
    ephemeral: EphemeralSection | None = None
    sandbox_paths: list[str] = []
    """Extra sandbox paths for builds (``extra-sandbox-paths``), e.g. host tools in tests."""
    extra_nix_options: dict[str, str] = {}
    """Further ``--option NAME VALUE`` pairs for every Nix command the agent runs."""
    untrusted: bool = False
    """Register as an untrusted venue: take only steps of untrusted builds (e.g. a machine
    that runs pull-request code), substituting from the untrusted cache too."""
    probe: bool = True
    """Build a tiny probe derivation at start, before registering, and exit 6 with Nix's
    error and a hint when it fails (``--skip-probe`` sets false)."""
    executor: Literal["serve", "realise"] = "serve"
    """How a step is built: ``serve`` (default) drives long-lived ``nix-store --serve --write``
    processes, one pair per slot; ``realise`` runs one ``nix-store --realise`` per step (for a
    Nix whose serve protocol differs)."""
    min_free_bytes: int = Field(default=0, ge=0, le=2**62)
    """Collect the agent's store (Nix's GC) when its free disk falls below this many bytes;
    0 (the default) never collects (docs/agents.md, "Disk budget")."""
    target_free_bytes: int = Field(default=0, ge=0, le=2**62)
    """How much free disk a collection aims for (default: twice ``min_free_bytes``)."""
    gc_check_secs: float = Field(default=30.0, gt=0, le=86400)
    """How often the agent looks at its free disk (it also looks after every step)."""

    @field_validator("launch_id")
    @classmethod
    def _blank_launch_id_is_none(cls, v: str | None) -> str | None:
        return (v or "").strip() or None

    @model_validator(mode="after")
    def _oidc_needs_audience(self) -> AgentSection:
        if self.oidc is not None:
            if not self.audience.strip():
                raise ValueError(
                    f"oidc = {self.oidc.value!r} needs an audience (agent.audience or "
                    "--audience): one of the runner's [[auth.oidc]] audiences"
                )
            if self.ephemeral is None:
                self.ephemeral = EphemeralSection()  # architecture §6: an OIDC agent is ephemeral
        return self


class AgentConfig(FileSettings):
    agent: AgentSection = AgentSection()


def load_agent_config(path: Path | None = None, **overrides: Any) -> AgentConfig:
    """Load the agent config; ``overrides`` (from flags) win over file and environment."""
    data = toml_source(path)
    try:
        cfg = AgentConfig(**data)
        if overrides:
            merged = cfg.model_dump()
            merge(merged, overrides)
            cfg = AgentConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(format_validation(exc, path)) from exc
    return cfg
