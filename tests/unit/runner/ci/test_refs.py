"""Which projects a poll is due for, and the triggers a poll or a manual evaluation makes
(``Refs`` with a fake ``git ls-remote``)."""

from __future__ import annotations

import pytest

from bigtent.config.ci import ProjectSection
from bigtent.errors import BadRequest, NotFound
from bigtent.runner.ci.evaluator import EvalFailure
from bigtent.runner.ci.refs import Refs
from bigtent.runner.ci.webhooks import TriggerKind

SHA = "b" * 40


def project(name: str = "w", **kw: object) -> ProjectSection:
    return ProjectSection.model_validate(
        {"name": name, "url": f"https://example.test/acme/{name}.git", **kw}
    )


def remote(heads: dict[str, str]) -> Refs:
    async def ls_remote(url: str, refs: list[str]) -> dict[str, str]:
        return {r: heads[r] for r in refs if r in heads}

    return Refs(ls_remote)


def test_due_polls_each_project_once_per_interval() -> None:
    refs = Refs()
    polled = project("p", poll_interval_secs=60)
    never = project("n")
    assert refs.due([polled, never], 1000.0) == [polled]
    assert refs.due([polled, never], 1059.0) == []
    assert refs.due([polled, never], 1060.0) == [polled]


async def test_polled_makes_a_trigger_per_built_branch_at_its_commit() -> None:
    refs = remote({"refs/heads/main": SHA, "refs/heads/other": "c" * 40})
    got = await refs.polled(project(branches=["main", "gone"]))
    assert [(t.kind, t.ref, t.commit_sha, t.branch) for t in got] == [
        (TriggerKind.POLL, "refs/heads/main", SHA, "main")
    ]


async def test_polled_is_empty_when_the_repository_cannot_be_read() -> None:
    async def failing(url: str, refs: list[str]) -> dict[str, str]:
        raise EvalFailure("unreachable", kind="fetch")

    assert await Refs(failing).polled(project(branches=["main"])) == []


async def test_manual_takes_the_first_built_branch() -> None:
    trigger = await remote({"refs/heads/main": SHA}).manual(project(branches=["main"]), None)
    assert (trigger.kind, trigger.ref, trigger.commit_sha, trigger.default_branch) == (
        TriggerKind.MANUAL,
        "refs/heads/main",
        SHA,
        "main",
    )


async def test_manual_of_a_missing_branch_is_not_found() -> None:
    with pytest.raises(NotFound, match="has no branch nope"):
        await remote({}).manual(project(branches=["main"]), "nope")


async def test_manual_without_a_known_branch_asks_for_one(monkeypatch: pytest.MonkeyPatch) -> None:
    refs = remote({})

    async def unknown(p: ProjectSection) -> str:
        return ""

    monkeypatch.setattr(refs, "default_branch", unknown)
    with pytest.raises(BadRequest, match="name a branch"):
        await refs.manual(project(), None)
