"""``[[projects]]`` and ``[evaluation]``: the CI projects a runner evaluates and the bounds of
an evaluation (docs/ci.md). A project added through the API (``POST /api/v1/projects``) is the
same model, stored in the database.

Secrets (webhook secret, forge token, GitHub App key) are files, read when needed: a project
never holds a secret inline.
"""

from __future__ import annotations

import os
import re
from enum import StrEnum
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from bigtent.config.base import GIT_REF, NAME, REPOSITORY, Section, is_loopback
from bigtent.config.forge import ForgeKind, ForgeTarget
from bigtent.secretfile import read_secret_bytes

_ATTR = re.compile(r"[A-Za-z0-9_'-]+(\.[A-Za-z0-9_'-]+)*")
GIT_SCHEMES = frozenset({"https", "http", "git", "ssh", "file"})

DEFAULT_API_URLS = {"github": "https://api.github.com"}


class Evaluate(StrEnum):
    FLAKE = "flake"
    """Flake outputs (``flake_attrs``), recursing into attribute sets."""
    FILE = "file"
    """A Nix file of the repository (``file``), optionally one attribute of it (``attr``)."""


class ForgeChoice(StrEnum):
    GITHUB = "github"
    FORGEJO = "forgejo"
    GITEA = "gitea"
    NONE = "none"


class ProjectSection(Section):
    """One ``[[projects]]`` entry: a git repository bigtent evaluates and builds."""

    name: str
    url: str
    """Where the runner fetches from: ``https://``, ``ssh://``, ``git://`` or ``file://``."""
    branches: list[str] = Field(default=[], max_length=1000)
    """Branches whose pushes are built; empty: the repository's default branch."""
    evaluate: Evaluate = Evaluate.FLAKE
    flake_attrs: list[str] = Field(default=["checks", "hydraJobs"], min_length=1, max_length=16)
    """Flake outputs whose derivations are the jobs, recursing into attribute sets (for
    ``checks`` only the systems in ``systems``)."""
    systems: list[str] = Field(default=["x86_64-linux"], min_length=1, max_length=16)
    file: str = "default.nix"
    """For ``evaluate = "file"``: the Nix file, relative to the repository's root."""
    attr: str = ""
    """For ``evaluate = "file"``: the attribute whose derivations are the jobs (empty: all)."""
    forge: ForgeChoice = ForgeChoice.NONE
    forge_api_url: str = ""
    """Default ``https://api.github.com`` for GitHub; required for Forgejo/Gitea."""
    repository: str = ""
    """``owner/name`` on the forge; also the builds' repository (agent scopes)."""
    github_app_id: int | None = Field(default=None, ge=1)
    github_app_key_file: Path | None = None
    github_installation_id: int | None = Field(default=None, ge=1)
    forge_token_file: Path | None = None
    forge_ca_file: Path | None = None
    webhook_secret_file: Path | None = None
    """The shared secret of the forge's webhook; without it the project takes no webhooks."""
    poll_interval_secs: float | None = Field(default=None, ge=5, le=86400)
    """Poll the branches with ``git ls-remote`` this often (for repositories without
    webhooks); unset: no polling."""
    require_approval_for_outside: bool = False
    """Pull requests from forks by authors who are not owners, members or collaborators wait
    for an admin's ``POST /api/v1/evaluations/{id}/approve`` before anything is evaluated or
    built."""
    priority: int = Field(default=0, ge=-1000, le=1000)

    @field_validator("name")
    @classmethod
    def _valid_name(cls, v: str) -> str:
        if not NAME.fullmatch(v):
            raise ValueError("letters, digits, '.', '_' and '-', at most 64, no leading symbol")
        return v

    @field_validator("url")
    @classmethod
    def _valid_url(cls, v: str) -> str:
        url = urlsplit(v)
        if url.scheme not in GIT_SCHEMES or (url.scheme != "file" and not url.hostname):
            raise ValueError("must be a git URL: https://, ssh://, git:// or file://")
        if url.password or (url.scheme in ("http", "https") and url.username is not None):
            # A token is often put in the user name (https://ghp_…@github.com/o/r): it would be
            # shown by GET /api/v1/projects, the dashboard and git's error messages.
            raise ValueError(
                "must not carry credentials (use an SSH key or a git credential helper)"
            )
        return v

    @field_validator("branches")
    @classmethod
    def _valid_branches(cls, v: list[str]) -> list[str]:
        for b in v:
            if not GIT_REF.fullmatch(b) or b.startswith(("-", "refs/")):
                raise ValueError(f"not a branch name: {b!r} (give names, not refs/heads/…)")
        return v

    @field_validator("flake_attrs", "systems")
    @classmethod
    def _valid_names(cls, v: list[str]) -> list[str]:
        for item in v:
            if not re.fullmatch(r"[A-Za-z0-9_-]+", item):
                raise ValueError(f"not an attribute name: {item!r}")
        return v

    @field_validator("file")
    @classmethod
    def _valid_file(cls, v: str) -> str:
        parts = v.split("/")
        if v.startswith("/") or ".." in parts or not v or any(c in v for c in '"$\\\n'):
            raise ValueError("must be a path inside the repository (relative, no '..')")
        return v

    @field_validator("attr")
    @classmethod
    def _valid_attr(cls, v: str) -> str:
        if v and not _ATTR.fullmatch(v):
            raise ValueError(f"not an attribute path: {v!r}")
        return v

    @field_validator("repository")
    @classmethod
    def _valid_repository(cls, v: str) -> str:
        if v and not REPOSITORY.fullmatch(v):
            raise ValueError("must be owner/name")
        return v

    @model_validator(mode="after")
    def _forge_complete(self) -> ProjectSection:
        if self.forge is ForgeChoice.NONE:
            return self
        if not self.repository:
            raise ValueError(f"forge = {self.forge.value!r} needs repository = 'owner/name'")
        if self.forge is ForgeChoice.GITHUB:
            if self.github_app_id is None or self.github_app_key_file is None:
                raise ValueError('forge = "github" needs github_app_id and github_app_key_file')
        else:
            if not self.forge_api_url:
                raise ValueError(f"forge = {self.forge.value!r} needs forge_api_url")
            if self.forge_token_file is None:
                raise ValueError(f"forge = {self.forge.value!r} needs forge_token_file")
        if self.forge_api_url:
            url = urlsplit(self.forge_api_url)
            if url.scheme not in ("https", "http") or not url.hostname:
                raise ValueError("forge_api_url must be an http(s):// URL")
        return self

    def secret_files(self) -> dict[str, Path]:
        """The project's ``*_file`` settings that are set: name -> path."""
        files = {
            "webhook_secret_file": self.webhook_secret_file,
            "forge_token_file": self.forge_token_file,
            "forge_ca_file": self.forge_ca_file,
            "github_app_key_file": self.github_app_key_file,
        }
        return {k: v for k, v in files.items() if v is not None}

    def public_json(self) -> dict[str, object]:
        """The settings as clients (not admins) see them: no file paths of secrets."""
        data = self.model_dump(mode="json")
        for key in self.secret_files():
            data[key] = "(set)"
        return data

    def target(self) -> ForgeTarget | None:
        """Where this project's results are reported (None: nowhere)."""
        if self.forge is ForgeChoice.NONE:
            return None
        kind = ForgeKind(self.forge.value)
        api_url = (self.forge_api_url or DEFAULT_API_URLS.get(self.forge.value, "")).rstrip("/")
        return ForgeTarget(
            kind=kind,
            api_url=api_url,
            repository=self.repository,
            app_id=self.github_app_id,
            app_key_file=str(self.github_app_key_file) if self.github_app_key_file else None,
            installation_id=self.github_installation_id,
            token_file=str(self.forge_token_file) if self.forge_token_file else None,
            ca_file=str(self.forge_ca_file) if self.forge_ca_file else None,
        )

    def webhook_secret(self) -> bytes | None:
        """The webhook secret (None: no webhooks for this project). ConfigError when the file
        cannot be read or is empty."""
        if self.webhook_secret_file is None:
            return None
        return read_secret_bytes(
            self.webhook_secret_file, f"webhook_secret_file of project {self.name}"
        )


_URL_CREDENTIALS = re.compile(r"(?i)\b((?:https?|git|ssh|ftps?)://)[^/\s@]+@")


def redact_url_credentials(text: str) -> str:
    """``text`` with the user name and password of every URL in it replaced by ``***`` (git's
    error messages name the URL they failed on, and are shown to clients and forges)."""
    return _URL_CREDENTIALS.sub(r"\1***@", text)


def api_project_problem(project: ProjectSection, secrets_dir: Path | None) -> str | None:
    """Why a project added through the API (by an admin token, not the operator's config)
    is refused, None when it is not (pure but for resolving symbolic links).

    The runner reads a project's ``*_file`` settings and sends the forge token to
    ``forge_api_url``: an API project may name files only inside ``secrets_dir``
    (``evaluation.api_secrets_dir``; none configured: no secret files at all), may not clone
    ``file://`` repositories of the runner's host, and sends its token over https only
    (plain http only to a loopback address)."""
    for key, path in project.secret_files().items():
        if secrets_dir is None:
            return (
                f"{key}: projects added through the API cannot name files unless the runner "
                "sets evaluation.api_secrets_dir"
            )
        root = os.path.realpath(secrets_dir)
        real = os.path.realpath(path)
        if not path.is_absolute() or os.path.commonpath([root, real]) != root or real == root:
            return f"{key}: must be a file inside evaluation.api_secrets_dir ({secrets_dir})"
    if urlsplit(project.url).scheme == "file":
        return "url: file:// repositories are only for projects of the runner's config"
    if project.forge_api_url:
        api = urlsplit(project.forge_api_url)
        if api.scheme != "https" and not is_loopback(api.hostname or ""):
            return "forge_api_url: must be https:// (http:// only to a loopback address)"
    return None


class EvalSandboxKind(StrEnum):
    BWRAP = "bwrap"
    """The evaluating Nix process runs under bubblewrap with an allow-list file system."""
    NONE = "none"
    """No sandbox: the project's Nix code can read every file the runner can (its signing
    key included). Unsafe for untrusted code (pull requests from forks)."""


class EvaluationSection(Section):
    """``[evaluation]``: how the runner evaluates projects (docs/ci.md)."""

    max_memory_mib: int = Field(default=4096, ge=64, le=1024 * 1024)
    """Address-space limit of the evaluating Nix process, set by the operating system
    (``RLIMIT_AS``): Nix fails with "out of memory" at the limit, reported as such."""
    timeout_secs: float = Field(default=1800.0, gt=0, le=86400)
    """Wall-clock limit of one evaluation (Nix is killed)."""
    max_concurrent: int = Field(default=2, ge=1, le=64)
    """Evaluations running at once on this runner."""
    max_jobs: int = Field(default=100_000, ge=1, le=1_000_000)
    """Jobs one evaluation may have; more is an evaluation error."""
    webhook_max_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    """Largest webhook body taken (413 above it, before it is read)."""
    replay_window_secs: float = Field(default=7 * 86400.0, ge=60)
    """How long webhook delivery ids are remembered (a replayed delivery is refused)."""
    watch_interval_secs: float = Field(default=0.5, gt=0, le=60)
    """How often the state of building evaluations' jobs is read to report changes."""
    api_secrets_dir: Path | None = None
    """The only directory whose files projects added through the API may name as their
    ``*_file`` settings (unset: such projects have no secret files: no webhooks, no forge)."""

    sandbox: EvalSandboxKind = EvalSandboxKind.BWRAP
    """How the evaluating Nix process is isolated from the runner's files (docs/security.md
    "CI evaluation"). With ``bwrap`` missing or failing its start-up probe the runner
    evaluates trusted commits only and refuses untrusted ones."""
    network: bool = True
    """The evaluation keeps the network (flake inputs are fetched); false: none at all."""
