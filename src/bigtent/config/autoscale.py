"""The ``[[autoscale.github]]`` pools: their config model, the start-up checks against the
``[[auth.oidc]]`` issuers, and loading each pool's dispatch token (docs/autoscaling.md).

The model validates each pool on its own (URLs, names, limits); ``check_pools`` validates what
needs the rest of the config (the issuer that will admit the pool's agents), so a pool that
could never register an agent stops the runner at start with a message saying why.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator

from bigtent import __version__
from bigtent.config.auth import OidcIssuerSection
from bigtent.config.base import GIT_REF, NAME, REPOSITORY, Section, comma_free_names, web_url
from bigtent.errors import ConfigError
from bigtent.protocol import MAX_LIST_ITEMS
from bigtent.secretfile import read_secret_file

GITHUB_API_URL = "https://api.github.com"
_WORKFLOW = re.compile(r"[A-Za-z0-9_.-]+\.ya?ml|[0-9]+")
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+_-]{0,63}")


class GithubPoolSection(Section):
    """One ``[[autoscale.github]]`` pool: ephemeral agents launched through GitHub's
    ``workflow_dispatch`` when runnable work waits that no connected agent can take."""

    name: str
    """The pool's name, also its agents' base name (``NAME-gh<run>.<attempt>-<id>``)."""
    systems: list[str] = Field(min_length=1, max_length=MAX_LIST_ITEMS)
    supported_features: list[str] = Field(default=[], max_length=MAX_LIST_ITEMS)
    mandatory_features: list[str] = Field(default=[], max_length=MAX_LIST_ITEMS)
    max_jobs: int = Field(default=1, ge=1, le=MAX_LIST_ITEMS)
    """Slots of one launched agent."""
    allowed_build_repositories: list[str] = Field(min_length=1, max_length=1000)
    """Repositories whose builds the pool's agents may take (architecture §6): demand counts only
    their steps. The workflow's own repository need not be among them."""
    max_inflight: int = Field(default=4, ge=1, le=1000)
    """Launches at most pending (dispatched, agent not registered yet) at once."""
    launch_ttl_secs: float = Field(default=900.0, gt=0)
    """A launch whose agent has not registered by then expires (counted as failed)."""
    cooldown_secs: float = Field(default=30.0, ge=0)
    """No dispatch for this long after a failed one (longer when GitHub says Retry-After)."""
    poll_interval_secs: float = Field(default=10.0, gt=0)
    """How often the demand is looked at without a wake-up (new runnable work wakes it)."""
    workflow_repository: str
    """``owner/repo`` holding the agent workflow."""
    workflow: str = "bigtent-agent.yml"
    """The workflow's file name under ``.github/workflows`` or its numeric id."""
    ref: str = "main"
    """Branch or tag to run the workflow from."""
    token: SecretStr | None = None
    """A token allowed to dispatch the workflow (prefer ``token_file``)."""
    token_file: Path | None = None
    runner_url: str
    """The URL the launched agents dial (``https://``): this runner as CI reaches it."""
    audience: str = Field(min_length=1, max_length=256)
    """The audience the agents ask for their ID token; one of an OIDC issuer's audiences."""
    bigtent_version: str = __version__
    """The bigtent version the workflow installs; it must speak this runner's protocol."""
    api_url: str = GITHUB_API_URL
    """GitHub's REST API (GitHub Enterprise: ``https://HOST/api/v3``)."""
    api_ca_file: Path | None = None
    """PEM CA bundle for an API with a private CA (replaces the system roots)."""
    dispatch_timeout_secs: float = Field(default=30.0, gt=0)
    """The whole dispatch request, connection included."""
    dispatch_connect_timeout_secs: float = Field(default=10.0, gt=0)

    @field_validator("name")
    @classmethod
    def _valid_name(cls, v: str) -> str:
        if not NAME.fullmatch(v):
            raise ValueError(
                "must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        return v

    @field_validator("systems", "supported_features", "mandatory_features")
    @classmethod
    def _valid_features(cls, v: list[str]) -> list[str]:
        # The workflow receives these comma-joined: a comma or space inside one would split it.
        return comma_free_names(v)

    @field_validator("allowed_build_repositories")
    @classmethod
    def _valid_repositories(cls, v: list[str]) -> list[str]:
        for item in v:
            if not REPOSITORY.fullmatch(item):
                raise ValueError(f"entries must be owner/repo ({item!r})")
        return v

    @field_validator("workflow_repository")
    @classmethod
    def _valid_workflow_repository(cls, v: str) -> str:
        if not REPOSITORY.fullmatch(v):
            raise ValueError("must be owner/repo")
        return v

    @field_validator("workflow")
    @classmethod
    def _valid_workflow(cls, v: str) -> str:
        if not _WORKFLOW.fullmatch(v):
            raise ValueError("must be a workflow file name (NAME.yml) or a numeric workflow id")
        return v

    @field_validator("ref")
    @classmethod
    def _valid_ref(cls, v: str) -> str:
        if not GIT_REF.fullmatch(v):
            raise ValueError("must be a branch or tag name")
        return v

    @field_validator("bigtent_version")
    @classmethod
    def _valid_version(cls, v: str) -> str:
        if not _VERSION.fullmatch(v):
            raise ValueError("must be a version such as 0.1.0")
        return v

    @field_validator("runner_url")
    @classmethod
    def _valid_runner_url(cls, v: str) -> str:
        why = "agents launched in CI reach the runner over the network"
        return web_url(v, why=why).rstrip("/")

    @field_validator("api_url")
    @classmethod
    def _valid_api_url(cls, v: str) -> str:
        return web_url(v, why="the dispatch token travels in it").rstrip("/")

    @field_validator("audience")
    @classmethod
    def _valid_audience(cls, v: str) -> str:
        if v != v.strip() or "," in v:
            raise ValueError("must have no surrounding whitespace or commas")
        return v

    @model_validator(mode="after")
    def _one_token_source(self) -> GithubPoolSection:
        if (self.token is None) == (self.token_file is None):
            raise ValueError(f"pool {self.name!r} needs exactly one of token or token_file")
        return self

    @property
    def workflow_label(self) -> str:
        """``owner/repo/workflow@ref``, as logs and the API name the dispatch target."""
        return f"{self.workflow_repository}/{self.workflow}@{self.ref}"


class AutoscaleSection(Section):
    github: list[GithubPoolSection] = []
    min_tick_interval_secs: float = Field(default=1.0, ge=0)
    """New runnable work wakes the autoscaler, but it looks at the demand at most this often
    (a burst of new steps is one pass)."""


def _key(index: int, field: str) -> str:
    return f"config key autoscale.github.{index}.{field}"


def check_pools(pools: Sequence[GithubPoolSection], issuers: Sequence[OidcIssuerSection]) -> None:
    """Start-up checks that need more than one pool (pure; raises ConfigError).

    Pool names are unique (they name the agents and the launches). Each pool's agents must be
    admitted by some ``[[auth.oidc]]`` issuer: one whose ``audiences`` hold the pool's
    ``audience``, whose ``repositories`` allow the ``workflow_repository`` (the repository
    claim of the workflow's job), and which restricts ``subjects``/``subject_prefixes`` or
    ``workflow_refs`` — a repository alone would let any workflow of it register as the pool.
    A ``workflow_refs`` list must name a workflow of the workflow repository.
    """
    seen: set[str] = set()
    for i, pool in enumerate(pools):
        if pool.name in seen:
            raise ConfigError(f"{_key(i, 'name')}: pool {pool.name!r} is configured twice")
        seen.add(pool.name)
        _check_issuer(i, pool, issuers)


def _restricts_workflow(rule: OidcIssuerSection) -> bool:
    return bool(rule.subjects or rule.subject_prefixes or rule.workflow_refs)


def _check_issuer(i: int, pool: GithubPoolSection, issuers: Sequence[OidcIssuerSection]) -> None:
    by_audience = [r for r in issuers if pool.audience in r.audiences]
    if not by_audience:
        known = sorted({a for r in issuers for a in r.audiences})
        raise ConfigError(
            f"{_key(i, 'audience')}: {pool.audience!r} is not an audience of any [[auth.oidc]] "
            f"issuer (configured: {', '.join(known) or 'no issuers'}); add it to the GitHub "
            "issuer's audiences, or the pool's agents can never register"
        )
    allowing = [r for r in by_audience if pool.workflow_repository in r.repositories]
    if not allowing:
        names = ", ".join(r.issuer for r in by_audience)
        raise ConfigError(
            f"{_key(i, 'workflow_repository')}: {pool.workflow_repository!r} is not in the "
            f"repositories of the issuer(s) with audience {pool.audience!r} ({names}); add it "
            "there, or the pool's agents are refused at register"
        )
    restricting = [r for r in allowing if _restricts_workflow(r)]
    if not restricting:
        names = ", ".join(r.issuer for r in allowing)
        raise ConfigError(
            f"config key autoscale.github.{i} (pool {pool.name!r}): the issuer admitting its "
            f"agents ({names}) must restrict subjects, subject_prefixes or workflow_refs (e.g. "
            f'workflow_refs = ["{pool.workflow_repository}/.github/workflows/{pool.workflow}'
            f'@refs/heads/{pool.ref}"]): a repository alone lets any of its workflows '
            "register as this pool"
        )
    prefix = f"{pool.workflow_repository}/"
    if all(r.workflow_refs and not any(w.startswith(prefix) for w in r.workflow_refs)
           for r in restricting):  # fmt: skip
        raise ConfigError(
            f"config key autoscale.github.{i} (pool {pool.name!r}): the workflow_refs of the "
            f"issuer admitting its agents name no workflow of {pool.workflow_repository}: its "
            "agents would be refused at register"
        )


def load_token(index: int, pool: GithubPoolSection) -> str:
    """The pool's dispatch token: ``token``, or ``token_file`` read once at start."""
    if pool.token is not None:
        secret = pool.token.get_secret_value().strip()
        if not secret:
            raise ConfigError(f"{_key(index, 'token')}: is empty")
        return secret
    assert pool.token_file is not None  # the model requires one of the two
    what = f"autoscale.github.{index}.token_file"
    return read_secret_file(pool.token_file, what, one_token=True)
