"""Where a project's branches are: ``git ls-remote`` of its repository, its default branch
(read once), which projects are due a poll, and the triggers a poll or a manual evaluation
makes."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable

from bigtent.config.ci import ProjectSection
from bigtent.errors import BadRequest, NotFound
from bigtent.runner.ci import triggers
from bigtent.runner.ci.evaluator import EvalFailure, default_branch, ls_remote
from bigtent.runner.ci.webhooks import Trigger, TriggerKind

log = logging.getLogger(__name__)

LsRemote = Callable[[str, list[str]], Awaitable[dict[str, str]]]
"""``git ls-remote URL REFS``: ref -> commit."""


class Refs:
    def __init__(self, lister: LsRemote = ls_remote) -> None:
        self.ls_remote = lister
        self._polled: dict[str, float] = {}
        self._default_branches: dict[str, str] = {}

    async def stale(self, project: ProjectSection, trigger: Trigger) -> str | None:
        """Why a webhook's push is not taken (``triggers.stale_push``: its ref has moved on,
        or cannot be read now); None when it is current or not a push."""
        if trigger.kind is not TriggerKind.PUSH:
            return None
        try:
            found = await self.ls_remote(project.url, [trigger.ref])
        except EvalFailure as exc:
            log.warning("project %s: cannot check %s: %s", project.name, trigger.ref, exc)
            return f"cannot check that {trigger.ref} is at {trigger.commit_sha[:12]}"
        reason = triggers.stale_push(trigger, found)
        if reason is not None:
            log.warning(
                "project %s: push of %s to %s ignored (%s)",
                project.name,
                trigger.commit_sha[:12],
                trigger.ref,
                reason,
            )
        return reason

    async def default_branch(self, project: ProjectSection) -> str:
        """The repository's default branch when the project names no branches ("" when it
        names some, or when the default cannot be read now)."""
        if project.branches:
            return ""
        if project.name not in self._default_branches:
            try:
                self._default_branches[project.name] = await default_branch(project.url)
            except EvalFailure as exc:
                log.warning("project %s: cannot find its default branch: %s", project.name, exc)
                return ""
        return self._default_branches[project.name]

    async def manual(self, project: ProjectSection, branch: str | None) -> Trigger:
        """A manual trigger of ``branch`` (default: the first built branch, else the
        default branch) at its current commit."""
        name = project.name
        target = branch or (project.branches[0] if project.branches else "")
        if not target:
            target = await self.default_branch(project)
        if not target:
            raise BadRequest(f"project {name}: name a branch (the default branch is not known)")
        ref = f"refs/heads/{target}"
        try:
            found = await self.ls_remote(project.url, [ref])
        except EvalFailure as exc:
            raise BadRequest(f"project {name}: {exc.message}") from exc
        if ref not in found:
            raise NotFound(f"project {name} has no branch {target}")
        return Trigger(
            kind=TriggerKind.MANUAL,
            repository=project.repository,
            clone_urls=(),
            ref=ref,
            fetch_ref=ref,
            commit_sha=found[ref],
            branch=target,
            default_branch=target,
        )

    def due(self, projects: Iterable[ProjectSection], now: float) -> list[ProjectSection]:
        """The projects whose ``poll_interval_secs`` has passed since their last poll (they
        count as polled at ``now`` from here on)."""
        due = []
        for project in projects:
            interval = project.poll_interval_secs
            if interval is None or now - self._polled.get(project.name, -1e18) < interval:
                continue
            self._polled[project.name] = now
            due.append(project)
        return due

    async def polled(self, project: ProjectSection) -> list[Trigger]:
        """A poll: a trigger for each built branch at its current commit (none when the
        repository cannot be read now)."""
        branches = project.branches or [await self.default_branch(project)]
        refs = [f"refs/heads/{b}" for b in branches if b]
        try:
            found = await self.ls_remote(project.url, refs)
        except EvalFailure as exc:
            log.warning("project %s: polling failed: %s", project.name, exc)
            return []
        return [
            Trigger(
                kind=TriggerKind.POLL,
                repository=project.repository,
                clone_urls=(),
                ref=ref,
                fetch_ref=ref,
                commit_sha=sha,
                branch=ref.removeprefix("refs/heads/"),
            )
            for ref, sha in sorted(found.items())
            if ref in refs
        ]
