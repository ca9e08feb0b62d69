"""The ``[forge]`` section: how the reporter talks to forges (docs/ci.md, "Reporting to the
forge"). Which forge a project reports to, and with which credentials, is the project's
(``[[projects]]``); these are the runner-wide limits and timings."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from bigtent.runner.forge.reporting import MAX_JOB_CHECKS


class ForgeSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

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
