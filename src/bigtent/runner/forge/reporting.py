"""What a forge should show for an evaluation, and what changed since it was last told (pure).

An :class:`~bigtent.runner.forge.model.EvalReport` becomes a small set of *checks*: one summary
check for the evaluation (``bigtent/<project>/eval``) and one per failed job
(``bigtent/<project>/<attr path>``), at most ``max_job_checks`` of those; a job that once had a
check keeps it for that evaluation (a re-run turns it green again). On GitHub a check is a
check run; on Forgejo/Gitea a commit status (:func:`commit_status`).

Names never carry a build or evaluation id, so branch protection can require them; the
evaluation id goes into the check run's ``external_id`` (``"<evaluation id>"`` for the summary,
``"<evaluation id>/<attr path>"`` for a job), which GitHub hands back with a Re-run request.

:func:`changed` compares what is wanted with what the forge was last sent (by fingerprint), so
only changes are sent; :func:`plan_round` says when: a new check or a change of status at
once, a change of text only (counters while building) at most once per update interval.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from bigtent.config.forge import MAX_JOB_CHECKS, ForgeKind
from bigtent.runner.forge.model import EvalReport, EvalState, JobReport, JobState

MAX_OUTPUT_CHARS = 65_535
"""GitHub's limit on a check run's ``output.summary`` and ``output.text``."""
MAX_TITLE_CHARS = 255
MAX_DESCRIPTION_CHARS = 140
"""A commit status's description (GitHub's limit; Forgejo shows about as much)."""
MAX_FAILED_LISTED = 100
"""Failed jobs the summary names (the dashboard has the rest)."""
MAX_EXTERNAL_ID_CHARS = 1000

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


class CheckStatus(StrEnum):
    """A GitHub check run's ``status``."""

    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"


class Conclusion(StrEnum):
    """A completed GitHub check run's ``conclusion`` (the ones bigtent uses)."""

    SUCCESS = "success"
    FAILURE = "failure"
    CANCELLED = "cancelled"


class StatusState(StrEnum):
    """A Forgejo/Gitea commit status's ``state``."""

    PENDING = "pending"
    SUCCESS = "success"
    FAILURE = "failure"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class Check:
    """One check as the forge should show it (GitHub's check run fields)."""

    name: str
    external_id: str
    status: CheckStatus
    conclusion: Conclusion | None
    title: str
    summary: str
    text: str = ""
    details_url: str = ""

    @property
    def completed(self) -> bool:
        return self.status is CheckStatus.COMPLETED

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "external_id": self.external_id,
            "status": str(self.status),
            "conclusion": str(self.conclusion) if self.conclusion is not None else None,
            "title": self.title,
            "summary": self.summary,
            "text": self.text,
            "details_url": self.details_url,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Check:
        conclusion = doc.get("conclusion")
        return cls(
            name=str(doc["name"]),
            external_id=str(doc["external_id"]),
            status=CheckStatus(doc["status"]),
            conclusion=Conclusion(conclusion) if conclusion is not None else None,
            title=str(doc["title"]),
            summary=str(doc["summary"]),
            text=str(doc.get("text", "")),
            details_url=str(doc.get("details_url", "")),
        )


@dataclass(frozen=True, slots=True)
class CommitStatus:
    """One Forgejo/Gitea commit status (``POST /repos/{o}/{r}/statuses/{sha}``)."""

    context: str
    state: StatusState
    description: str
    target_url: str

    def to_json(self) -> dict[str, str]:
        body = {"context": self.context, "state": str(self.state)}
        body["description"] = self.description
        if self.target_url:
            body["target_url"] = self.target_url
        return body


# ---- names -------------------------------------------------------------------------------------
def eval_check_name(project: str) -> str:
    return f"bigtent/{project}/eval"


def job_check_name(project: str, attr: str) -> str:
    return f"bigtent/{project}/{attr}"


def eval_external_id(evaluation_id: int) -> str:
    return str(evaluation_id)


def job_external_id(evaluation_id: int, attr: str) -> str:
    return f"{evaluation_id}/{attr}"[:MAX_EXTERNAL_ID_CHARS]


# ---- what the forge should show ----------------------------------------------------------------
_FINAL_EVAL = frozenset(
    {EvalState.SUCCEEDED, EvalState.FAILED, EvalState.EVAL_ERROR, EvalState.CANCELLED}
)


def is_final(state: EvalState) -> bool:
    return state in _FINAL_EVAL


def _eval_status(state: EvalState) -> tuple[CheckStatus, Conclusion | None]:
    match state:
        case EvalState.QUEUED:
            return CheckStatus.QUEUED, None
        case EvalState.EVALUATING | EvalState.BUILDING:
            return CheckStatus.IN_PROGRESS, None
        case EvalState.SUCCEEDED:
            return CheckStatus.COMPLETED, Conclusion.SUCCESS
        case EvalState.FAILED | EvalState.EVAL_ERROR:
            return CheckStatus.COMPLETED, Conclusion.FAILURE
        case EvalState.CANCELLED:
            return CheckStatus.COMPLETED, Conclusion.CANCELLED


def _job_status(state: JobState) -> tuple[CheckStatus, Conclusion | None]:
    match state:
        case JobState.QUEUED:
            return CheckStatus.QUEUED, None
        case JobState.RUNNING:
            return CheckStatus.IN_PROGRESS, None
        case JobState.SUCCEEDED:
            return CheckStatus.COMPLETED, Conclusion.SUCCESS
        case JobState.FAILED:
            return CheckStatus.COMPLETED, Conclusion.FAILURE
        case JobState.CANCELLED:
            return CheckStatus.COMPLETED, Conclusion.CANCELLED


def clean_text(text: str) -> str:
    """Terminal colours and control characters out (newlines and tabs stay)."""
    return _CONTROL.sub("", _ANSI.sub("", text))


def _clip_line(text: str, limit: int) -> str:
    line = " ".join(clean_text(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def fenced(text: str, limit: int) -> str:
    """``text`` in a Markdown code block, at most ``limit`` characters in all: when too long,
    its *end* is kept (the end of a log or of Nix's error is what tells)."""
    body = clean_text(text).rstrip("\n")
    fence = "```"
    while fence in body:
        fence += "`"
    room = limit - 2 * len(fence) - 2
    if len(body) > room:
        # the note's length with the largest number it could say bounds the real one
        keep = room - len(f"[… {len(body)} characters before this]\n")
        if keep <= 0:
            return ""
        body = f"[… {len(body) - keep} characters before this]\n" + body[-keep:]
    return f"{fence}\n{body}\n{fence}"


def _counts(jobs: Sequence[JobReport]) -> dict[JobState, int]:
    counts = dict.fromkeys(JobState, 0)
    for job in jobs:
        counts[job.state] += 1
    return counts


def _eval_title(report: EvalReport, counts: Mapping[JobState, int]) -> str:
    total = len(report.jobs)
    failed = counts[JobState.FAILED]
    done = counts[JobState.SUCCEEDED] + failed + counts[JobState.CANCELLED]
    plural = "job" if total == 1 else "jobs"
    match report.state:
        case EvalState.QUEUED:
            return "queued"
        case EvalState.EVALUATING:
            return "evaluating"
        case EvalState.BUILDING:
            tail = f", {failed} failed" if failed else ""
            return f"building: {done} of {total} {plural} done{tail}"
        case EvalState.SUCCEEDED:
            return f"{total} {plural} succeeded" if total else "no jobs"
        case EvalState.FAILED:
            return f"{failed} of {total} {plural} failed"
        case EvalState.EVAL_ERROR:
            return "evaluation failed"
        case EvalState.CANCELLED:
            return "cancelled"


def _eval_summary(
    report: EvalReport,
    counts: Mapping[JobState, int],
    failed: Sequence[JobReport],
    with_check: Collection[str],
    max_job_checks: int,
) -> str:
    lines: list[str] = []
    if report.state is EvalState.EVAL_ERROR:
        lines.append("Nix could not evaluate this commit; its error is below.")
    elif report.state is EvalState.CANCELLED:
        lines.append("Cancelled (a newer commit superseded this one, or a user cancelled it).")
    if report.jobs:
        parts = [f"{counts[s]} {s}" for s in JobState if counts[s]]
        lines.append(f"{len(report.jobs)} jobs: " + ", ".join(parts) + ".")
    if report.url:
        lines.append(f"Details: {report.url}")
    if failed:
        lines.append("")
        lines.append("Failed jobs:")
        for job in failed[:MAX_FAILED_LISTED]:
            name = _clip_line(job.attr, 300)
            why = f": {_clip_line(job.summary, 200)}" if job.summary else ""
            link = f" ([log]({job.url}))" if job.url else ""
            lines.append(f"- `{name}`{why}{link}")
        if len(failed) > MAX_FAILED_LISTED:
            lines.append(f"- … and {len(failed) - MAX_FAILED_LISTED} more (see the dashboard)")
        without = sum(1 for j in failed if j.attr not in with_check)
        if without:
            lines.append("")
            has = (
                "job has no check run of its own"
                if without == 1
                else "jobs have no check run of their own"
            )
            lines.append(
                f"{without} failed {has} (at most {max_job_checks} jobs get one): see the "
                "dashboard."
            )
    text = "\n".join(lines)
    return text[:MAX_OUTPUT_CHARS]


def _job_check(report: EvalReport, job: JobReport, log_tail_chars: int) -> Check:
    status, conclusion = _job_status(job.state)
    title = str(job.state) if not job.summary else f"{job.state}: {job.summary}"
    summary_lines = [f"Job `{_clip_line(job.attr, 300)}` of evaluation {report.evaluation_id}."]
    if job.drv_path:
        summary_lines.append(f"Derivation: `{_clip_line(job.drv_path, 300)}`")
    if job.url:
        summary_lines.append(f"Log and details: {job.url}")
    text = ""
    if job.state is JobState.FAILED and job.log_tail:
        text = "The end of the log:\n\n" + fenced(job.log_tail, min(log_tail_chars, 60_000))
    return Check(
        name=job_check_name(report.project, job.attr),
        external_id=job_external_id(report.evaluation_id, job.attr),
        status=status,
        conclusion=conclusion,
        title=_clip_line(title, MAX_TITLE_CHARS),
        summary="\n".join(summary_lines)[:MAX_OUTPUT_CHARS],
        text=text,
        details_url=job.url or report.url,
    )


def wanted_checks(
    report: EvalReport,
    existing: Collection[str] = (),
    *,
    max_job_checks: int = MAX_JOB_CHECKS,
    log_tail_chars: int = 16_000,
) -> tuple[Check, ...]:
    """The checks the forge should show for ``report``: the summary first, then the job checks
    in attribute order. ``existing`` names the checks the forge already has for this
    evaluation: their jobs keep a check whatever their state; failed jobs without one get one
    while fewer than ``max_job_checks`` job checks exist."""
    jobs = sorted({j.attr: j for j in report.jobs}.values(), key=lambda j: j.attr)
    counts = _counts(jobs)
    failed = [j for j in jobs if j.state is JobState.FAILED]
    keep = {j.attr for j in jobs if job_check_name(report.project, j.attr) in existing}
    for job in failed:
        if len(keep) >= max_job_checks:
            break
        keep.add(job.attr)
    status, conclusion = _eval_status(report.state)
    text = ""
    if report.state is EvalState.EVAL_ERROR and report.error:
        text = fenced(report.error, MAX_OUTPUT_CHARS)
    summary = Check(
        name=eval_check_name(report.project),
        external_id=eval_external_id(report.evaluation_id),
        status=status,
        conclusion=conclusion,
        title=_clip_line(_eval_title(report, counts), MAX_TITLE_CHARS),
        summary=_eval_summary(report, counts, failed, keep, max_job_checks),
        text=text,
        details_url=report.url,
    )
    return (summary, *(_job_check(report, j, log_tail_chars) for j in jobs if j.attr in keep))


# ---- Forgejo / Gitea ---------------------------------------------------------------------------
def commit_status(check: Check) -> CommitStatus:
    """The commit status showing ``check`` (Forgejo and Gitea have no "cancelled": an
    ``error`` whose description says so)."""
    match check.conclusion:
        case None:
            state = StatusState.PENDING
        case Conclusion.SUCCESS:
            state = StatusState.SUCCESS
        case Conclusion.FAILURE:
            state = StatusState.FAILURE
        case Conclusion.CANCELLED:
            state = StatusState.ERROR
    return CommitStatus(
        context=check.name,
        state=state,
        description=_clip_line(check.title, MAX_DESCRIPTION_CHARS),
        target_url=check.details_url,
    )


# ---- what changed ------------------------------------------------------------------------------
def fingerprint(kind: ForgeKind, check: Check) -> str:
    """What the forge shows of ``check``, hashed: equal fingerprints need no new call."""
    doc: Any = check.to_json() if kind is ForgeKind.GITHUB else commit_status(check).to_json()
    data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(data).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Sent:
    """What the forge was last told of one check: its fingerprint, status and conclusion, and
    on GitHub the check run's id (updates go to it)."""

    fingerprint: str
    status: CheckStatus
    run_id: int | None = None
    conclusion: Conclusion | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "fp": self.fingerprint,
            "status": str(self.status),
            "id": self.run_id,
            "conclusion": str(self.conclusion) if self.conclusion is not None else None,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Sent:
        run_id = doc.get("id")
        conclusion = doc.get("conclusion")
        return cls(
            str(doc["fp"]),
            CheckStatus(doc["status"]),
            int(run_id) if run_id else None,
            Conclusion(conclusion) if conclusion else None,
        )


def sent_as(kind: ForgeKind, check: Check, run_id: int | None = None) -> Sent:
    """The record of ``check`` once the forge shows it."""
    return Sent(fingerprint(kind, check), check.status, run_id, check.conclusion)


def needs_new_run(check: Check, prior: Sent | None) -> bool:
    """Whether ``check`` needs a new GitHub check run rather than an update of ``prior``'s: GitHub
    never lets a completed check run change its status or conclusion again, so a job run
    again (Re-run) gets a new run of the same name, which GitHub then shows in place of the
    old one. A completed run's text may still be updated."""
    if prior is None or prior.run_id is None:
        return True
    return prior.status is CheckStatus.COMPLETED and (
        check.status is not CheckStatus.COMPLETED or check.conclusion != prior.conclusion
    )


def changed(kind: ForgeKind, wanted: Iterable[Check], sent: Mapping[str, Sent]) -> list[Check]:
    """The checks of ``wanted`` the forge does not show yet as wanted, in order."""
    out = []
    for check in wanted:
        prior = sent.get(check.name)
        if prior is None or prior.fingerprint != fingerprint(kind, check):
            out.append(check)
    return out


def urgent(check: Check, sent: Mapping[str, Sent]) -> bool:
    """A new check, or a change of status (queued, in progress, completed): sent at once. A
    change of title or text alone (the counters of a running evaluation) can wait."""
    prior = sent.get(check.name)
    return prior is None or prior.status is not check.status or check.completed


def plan_round(
    changes: Sequence[Check],
    sent: Mapping[str, Sent],
    last_full_at: float | None,
    interval: float,
    now: float,
) -> tuple[list[Check], float | None]:
    """Which of ``changes`` to send now, and when the rest is due (None: nothing is left).

    Urgent changes (``urgent``) go at once. The others (a change of text alone) go with them
    only when the last *full* round (every change sent) is ``interval`` ago; else they wait
    until then. So a stream of new failures creates its job checks at once while the
    summary's counters are updated at most once per interval, and a final status never
    waits."""
    if last_full_at is None or now >= last_full_at + interval:
        return list(changes), None
    now_list = [c for c in changes if urgent(c, sent)]
    if len(now_list) == len(changes):
        return now_list, None
    return now_list, last_full_at + interval
