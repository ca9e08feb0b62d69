"""Trigger decisions (pure): branches, trust of forks, approval, supersede."""

from __future__ import annotations

import pytest

from bigtent.config.ci import ProjectSection
from bigtent.runner.ci.triggers import (
    ActiveEval,
    CiEvalState,
    decide,
    job_state_from_step,
    match_project,
    settle,
    stale_push,
    superseded,
)
from bigtent.runner.ci.webhooks import Trigger, TriggerKind

SHA = "a" * 40


def project(**kw: object) -> ProjectSection:
    return ProjectSection.model_validate(
        {"name": "w", "url": "https://example.test/acme/widgets.git", **kw}
    )


def push(branch: str, default: str = "main") -> Trigger:
    return Trigger(
        kind=TriggerKind.PUSH,
        repository="acme/widgets",
        clone_urls=(),
        ref=f"refs/heads/{branch}",
        fetch_ref=f"refs/heads/{branch}",
        commit_sha=SHA,
        branch=branch,
        default_branch=default,
    )


def pr(fork: bool, outside: bool, base: str = "main") -> Trigger:
    return Trigger(
        kind=TriggerKind.PULL_REQUEST,
        repository="acme/widgets",
        clone_urls=(),
        ref="refs/pull/3/head",
        fetch_ref="refs/pull/3/head",
        commit_sha=SHA,
        branch=base,
        default_branch="main",
        pull_request=3,
        from_fork=fork,
        outside=outside,
    )


def test_default_branch_is_built_when_no_branches_are_listed() -> None:
    assert decide(project(), push("main")).evaluate
    assert not decide(project(), push("feature")).evaluate


def test_listed_branches_only() -> None:
    p = project(branches=["release", "main"])
    assert decide(p, push("release")).evaluate
    assert not decide(p, push("feature")).evaluate


def test_push_is_trusted() -> None:
    assert decide(project(), push("main")).trusted


def test_pull_request_from_a_fork_is_untrusted() -> None:
    d = decide(project(), pr(fork=True, outside=True))
    assert d.evaluate and not d.trusted and not d.needs_approval


def test_pull_request_from_a_branch_of_the_repository_is_untrusted_too() -> None:
    # Its branch is built trusted by its push events; the pull request is not.
    d = decide(project(), pr(fork=False, outside=False))
    assert d.evaluate and not d.trusted and not d.needs_approval


def test_outside_author_needs_approval_when_the_project_says_so() -> None:
    p = project(require_approval_for_outside=True)
    assert decide(p, pr(fork=True, outside=True)).needs_approval
    assert not decide(p, pr(fork=True, outside=False)).needs_approval
    # Not only from forks: an outsider's pull request from a branch (or an AGit one) too.
    assert decide(p, pr(fork=False, outside=True)).needs_approval


def test_pull_request_into_a_branch_not_built_is_not_evaluated() -> None:
    assert not decide(project(), pr(fork=True, outside=False, base="other")).evaluate


def test_new_commit_supersedes_the_active_evaluations_of_its_ref_only() -> None:
    active = [
        ActiveEval(1, "refs/heads/main", "b" * 40, CiEvalState.BUILDING),
        ActiveEval(2, "refs/heads/main", "c" * 40, CiEvalState.EVALUATING),
        ActiveEval(3, "refs/heads/other", "d" * 40, CiEvalState.BUILDING),
        ActiveEval(4, "refs/heads/main", "e" * 40, CiEvalState.SUCCEEDED),
        ActiveEval(5, "refs/heads/main", SHA, CiEvalState.QUEUED),
    ]
    assert superseded(active, "refs/heads/main", SHA) == [1, 2]


def test_project_is_matched_by_repository_then_url() -> None:
    a = project(name="a", url="https://example.test/acme/a.git", repository="acme/a")
    b = project(name="b", url="file:///srv/git/b")
    assert match_project([a, b], "ACME/a", ()) is a
    assert match_project([a, b], "x/b", ("file:///srv/git/b.git",)) is b
    assert match_project([a, b], "x/c", ("file:///srv/git/c",)) is None


def test_job_state_from_its_step() -> None:
    assert job_state_from_step(None, "running") == "succeeded"  # no step needed: cached
    assert job_state_from_step("building", "running") == "running"
    assert job_state_from_step("dependency_failed", "failed") == "failed"
    assert job_state_from_step("runnable", "queued") == "queued"
    assert job_state_from_step(None, "cancelled") == "cancelled"


def test_a_push_is_taken_only_while_its_ref_points_at_its_commit() -> None:
    now = {"refs/heads/main": SHA}
    assert stale_push(push("main"), now) is None
    moved = stale_push(push("main"), {"refs/heads/main": "b" * 40})
    assert moved is not None and moved.startswith("stale") and "bbbbbbbbbbbb" in moved
    gone = stale_push(push("main"), {})
    assert gone is not None and "no longer exists" in gone
    assert stale_push(pr(fork=True, outside=True), {}) is None  # not a push: not checked


# (jobs, root step states, build state) -> (changed jobs, evaluation state)
SETTLE_CASES = [
    # the build runs: a job whose root step builds is running; nothing else moved
    (
        [("a", "/a.drv", "queued"), ("b", "/b.drv", "queued")],
        {"/a.drv": "building", "/b.drv": "runnable"},
        "running",
        ({"a": "running"}, CiEvalState.BUILDING),
    ),
    # no step needed (outputs cached): succeeded once the build is done
    (
        [("a", "/a.drv", "queued")],
        {"/a.drv": None},
        "succeeded",
        ({"a": "succeeded"}, CiEvalState.SUCCEEDED),
    ),
    # a job that did not evaluate fails a succeeded build's evaluation
    (
        [("a", "/a.drv", "succeeded"), ("broken", None, "failed")],
        {"/a.drv": "succeeded"},
        "succeeded",
        ({}, CiEvalState.FAILED),
    ),
    (
        [("a", "/a.drv", "running")],
        {"/a.drv": "dependency_failed"},
        "failed",
        ({"a": "failed"}, CiEvalState.FAILED),
    ),
    ([("a", "/a.drv", "queued")], {}, "cancelled", ({"a": "cancelled"}, CiEvalState.CANCELLED)),
]


@pytest.mark.parametrize(("jobs", "roots", "build_state", "want"), SETTLE_CASES)
def test_settle(
    jobs: list[tuple[str, str | None, str]],
    roots: dict[str, str | None],
    build_state: str,
    want: tuple[dict[str, str], CiEvalState],
) -> None:
    assert settle(jobs, roots, build_state) == want
