"""The ``[forge]`` section: how the reporter talks to forges (docs/ci.md, "Reporting to the
forge"), and the forge a project reports to (``ForgeTarget``, made from its ``[[projects]]``
entry). Which forge a project reports to, and with which credentials, is the project's; the
section holds the runner-wide limits and timings."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from pydantic import Field

from bigtent.config.base import Section

MAX_JOB_CHECKS = 47
"""Per-job checks per evaluation (failed jobs only), as nixbot and buildbot-nix cap them: more
would be noise on the pull request and would run into the forge's rate limits."""


class ForgeKind(StrEnum):
    GITHUB = "github"
    FORGEJO = "forgejo"  # Gitea speaks the same commit-status API
    GITEA = "gitea"


@dataclass(frozen=True, slots=True)
class ForgeTarget:
    """Where to report: one repository on one forge, and the credentials to do it with.

    Secrets are files, read when needed; never inline values.
    """

    kind: ForgeKind
    api_url: str  # e.g. https://api.github.com or https://forgejo.example/api/v1
    repository: str  # "owner/name"
    # GitHub App: the app id, its private key (PEM) file, optionally the installation id
    # (looked up from the repository when absent).
    app_id: int | None = None
    app_key_file: str | None = None
    installation_id: int | None = None
    # Forgejo/Gitea: an access token file.
    token_file: str | None = None
    ca_file: str | None = None  # private CA of a self-hosted forge


class ForgeSection(Section):
    max_job_checks: int = Field(default=MAX_JOB_CHECKS, ge=0, le=1000)
    """Failed jobs that get a check run (GitHub) or commit status (Forgejo) of their own, per
    evaluation; the evaluation's summary names the others."""
    log_tail_chars: int = Field(default=16_000, ge=0, le=60_000)
    """Of a failed job's log, at most this much (its end) goes into its check run."""
    min_update_interval_secs: float = Field(default=10.0, ge=0)
    """A change of text only (the counters of a running evaluation) is sent at most this
    often per evaluation; a new check or a change of status (queued, in progress, completed)
    is sent at once."""
    request_timeout_secs: float = Field(default=30.0, gt=0)
    retry_base_secs: float = Field(default=2.0, gt=0)
    """The first retry after a failed call waits this long, doubling up to
    ``retry_max_secs`` (longer when the forge says ``Retry-After``)."""
    retry_max_secs: float = Field(default=600.0, gt=0)
    give_up_after_secs: float = Field(default=86_400.0, gt=0)
    """A report the forge has refused or not answered for this long is dropped (logged)."""
    keep_secs: float = Field(default=7 * 86_400.0, gt=0)
    """A finished evaluation's record of its check runs is kept this long, so that a Re-run
    updates the same check runs."""
