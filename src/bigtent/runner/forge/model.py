"""What a report to a forge says, independent of the forge (pure data, no I/O).

The CI side (projects, webhooks, evaluations) builds an :class:`EvalReport` whenever an
evaluation or one of its jobs changes state and hands it to a :class:`Reporter`; the reporting
side turns it into GitHub check runs or Forgejo/Gitea commit statuses, stores what is still to
be sent (so a final status survives a runner restart) and sends it with retries.

Names on the forge are stable across commits (never a build or evaluation id in a name), so
that branch protection can require them: ``bigtent/<project>/eval`` for the evaluation and
``bigtent/<project>/<attr path>`` for a job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from bigtent.config.forge import ForgeTarget


class EvalState(StrEnum):
    """Where an evaluation stands, as a forge sees it."""

    QUEUED = "queued"  # triggered, not evaluating yet
    EVALUATING = "evaluating"
    BUILDING = "building"  # evaluated; its build runs
    SUCCEEDED = "succeeded"  # every job succeeded
    FAILED = "failed"  # evaluated; at least one job failed
    EVAL_ERROR = "eval_error"  # Nix could not evaluate (the error is the result)
    CANCELLED = "cancelled"  # superseded by a newer commit, or cancelled by a user


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class JobReport:
    attr: str  # attribute path, e.g. "checks.x86_64-linux.fmt"
    state: JobState
    drv_path: str = ""
    url: str = ""  # dashboard page of the job's step (or build)
    log_tail: str = ""  # the end of the failed step's log (failed jobs only)
    summary: str = ""  # one line, e.g. "failed after 12 s on agent-3" or "dependency X failed"


@dataclass(frozen=True, slots=True)
class EvalReport:
    """Everything a forge is told about one evaluation of one commit."""

    project: str
    target: ForgeTarget
    commit_sha: str
    evaluation_id: int
    state: EvalState
    url: str = ""  # dashboard page of the evaluation
    error: str = ""  # Nix's full message for EVAL_ERROR
    jobs: tuple[JobReport, ...] = field(default=())


class Reporter(Protocol):
    """Accepts reports; never raises for forge trouble (it stores, retries and logs)."""

    async def report(self, report: EvalReport) -> None: ...
