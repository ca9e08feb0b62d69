"""What a trigger means for a project (pure): which project, whether to evaluate, with what
trust, and which earlier evaluations the new commit supersedes."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from bigtent.config.ci import ProjectSection
from bigtent.runner.ci.webhooks import Trigger, TriggerKind
from bigtent.runner.trust import is_pull_request_ref


class CiEvalState(StrEnum):
    """An evaluation's state in the database (``ci_evaluations.state``). Values are the
    database and API strings."""

    AWAITING_APPROVAL = "awaiting_approval"
    QUEUED = "queued"
    EVALUATING = "evaluating"
    BUILDING = "building"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    EVAL_ERROR = "eval_error"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in _FINAL


_FINAL = frozenset(
    {CiEvalState.SUCCEEDED, CiEvalState.FAILED, CiEvalState.EVAL_ERROR, CiEvalState.CANCELLED}
)


def _norm_url(url: str) -> str:
    u = url.strip().rstrip("/").lower()
    return u.removesuffix(".git")


def match_project(
    projects: Iterable[ProjectSection], repository: str, clone_urls: Sequence[str]
) -> ProjectSection | None:
    """The project a hook's repository is: by ``repository`` (owner/name, case-insensitive),
    else by its git URL."""
    urls = {_norm_url(u) for u in clone_urls}
    for p in projects:
        if p.repository and p.repository.lower() == repository.lower():
            return p
    for p in projects:
        if _norm_url(p.url) in urls:
            return p
    return None


@dataclass(frozen=True, slots=True)
class Decision:
    evaluate: bool
    reason: str = ""
    trusted: bool = True
    needs_approval: bool = False


def builds_branch(project: ProjectSection, branch: str, default_branch: str) -> bool:
    """Whether pushes to ``branch`` are built: one of ``branches``, or the default branch
    when none are listed."""
    if project.branches:
        return branch in project.branches
    return bool(default_branch) and branch == default_branch


def decide(project: ProjectSection, trigger: Trigger) -> Decision:
    """Whether a trigger is evaluated, and how (pure).

    A push is evaluated for a built branch. A pull request is evaluated when it targets a
    built branch, always untrusted (untrusted agents, the untrusted cache): whoever can open
    one writes its head, and a branch of the repository itself is built trusted by its own
    push events. With ``require_approval_for_outside`` a pull request by an outside author
    (fork, AGit or a branch) waits for approval.
    """
    if trigger.kind is TriggerKind.PULL_REQUEST:
        if not builds_branch(project, trigger.branch, trigger.default_branch):
            return Decision(False, f"pull request into {trigger.branch}, a branch not built")
        approval = trigger.outside and project.require_approval_for_outside
        return Decision(True, trusted=False, needs_approval=approval)
    if not builds_branch(project, trigger.branch, trigger.default_branch):
        return Decision(False, f"branch {trigger.branch} is not built")
    return Decision(True, trusted=not is_pull_request_ref(trigger.ref))


def stale_push(trigger: Trigger, found: Mapping[str, str]) -> str | None:
    """Why a push is not evaluated although its signature is good (None: it is current).

    A webhook's signature covers its body, not its delivery id: a captured push of commit A
    resent under a new id would evaluate A again and supersede the newer B. So a push is
    taken only while its ref still points at its commit (``found``: ``git ls-remote`` of the
    ref, ref -> commit); otherwise a newer push (evaluated by its own hook) or a deletion
    followed."""
    if trigger.kind is not TriggerKind.PUSH:
        return None
    now = found.get(trigger.ref)
    if now is None:
        return f"stale: {trigger.ref} no longer exists"
    if now != trigger.commit_sha:
        return f"stale: {trigger.ref} is at {now[:12]} now, not at {trigger.commit_sha[:12]}"
    return None


@dataclass(frozen=True, slots=True)
class ActiveEval:
    id: int
    ref: str
    commit_sha: str
    state: CiEvalState


def superseded(active: Iterable[ActiveEval], ref: str, commit_sha: str) -> list[int]:
    """The evaluations a new commit on ``ref`` supersedes: those of the same ref for another
    commit that are not final (their evaluation stops, their build is cancelled)."""
    return [
        a.id for a in active if a.ref == ref and a.commit_sha != commit_sha and not a.state.is_final
    ]


def job_state_from_step(step_state: str | None, build_state: str) -> str:
    """A job's state from its root step (None: no step was needed, the outputs exist) and its
    build's state. Values are ``forge.model.JobState`` strings."""
    if step_state is None:
        if build_state == "cancelled":
            return "cancelled"
        return "succeeded" if build_state in ("succeeded", "failed", "running") else "queued"
    return {
        "waiting": "queued",
        "runnable": "queued",
        "assigned": "running",
        "building": "running",
        "succeeded": "succeeded",
        "failed": "failed",
        "dependency_failed": "failed",
        "cancelled": "cancelled",
    }.get(step_state, "queued")


def eval_state_of_build(build_state: str) -> CiEvalState:
    """An evaluation's state while and after its build runs."""
    return {
        "succeeded": CiEvalState.SUCCEEDED,
        "failed": CiEvalState.FAILED,
        "cancelled": CiEvalState.CANCELLED,
    }.get(build_state, CiEvalState.BUILDING)


def settle(
    jobs: Iterable[tuple[str, str | None, str]],
    root_states: Mapping[str, str | None],
    build_state: str,
) -> tuple[dict[str, str], CiEvalState]:
    """What a look at an evaluation's build changes: the jobs whose state moved (attr -> new
    state) and the evaluation's state. ``jobs`` are (attr, .drv path or None when it did not
    evaluate, stored state); ``root_states`` the build's root steps' states by .drv path."""
    changed: dict[str, str] = {}
    unevaluated = False
    for attr, drv_path, stored in jobs:
        if not drv_path:
            unevaluated = True
            continue
        state = job_state_from_step(root_states.get(drv_path), build_state)
        if state != stored:
            changed[attr] = state
    final = eval_state_of_build(build_state)
    if final is CiEvalState.SUCCEEDED and unevaluated:
        final = CiEvalState.FAILED  # a job did not even evaluate
    return changed, final
