"""The CI service: projects, triggers, evaluations and their builds (docs/ci.md).

A trigger (webhook, poll, ``POST /projects/{name}/evaluate``) inserts an evaluation row for
(project, ref, commit) once: the unique key makes a second trigger of the same commit, from
any runner on the database, a no-op. A new commit on a ref supersedes the ref's evaluations
that are not final: each becomes ``cancelled`` (a conditional update), its Nix process is
killed if it runs here, and its build is cancelled (steps no other build needs stop).

The loop (``run``) claims queued evaluations (``queued -> evaluating``, a conditional update:
one runner wins), evaluates each off the event loop (``evaluator.py``), puts the ``.drv``
closure into the cache with the checks a client's upload gets, in batches
(``ingest_client_closure``), admits one build with every job through the admission path
``POST /api/v1/builds`` uses (``plan_parts`` + ``Scheduler.admit_build``), and watches the
builds of its evaluations, reporting every evaluation and job state change to the ``Reporter``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from bigtent.client.build import nar_hash_to_nix32, upload_order
from bigtent.config import RunnerConfig
from bigtent.errors import BadRequest, ConfigError, Conflict, NotFound
from bigtent.nix import base32
from bigtent.nix.nar import dump_path
from bigtent.runner.builds import plan_parts
from bigtent.runner.cache import Cache, Upstreams
from bigtent.runner.ci import triggers
from bigtent.runner.ci.disclosure import shown_eval_error, shown_job_error
from bigtent.runner.ci.evaluator import EvalFailure, Evaluator, default_branch, ls_remote
from bigtent.runner.ci.settings import ProjectSection, api_project_problem
from bigtent.runner.ci.triggers import ActiveEval, CiEvalState, job_state_from_step
from bigtent.runner.ci.webhooks import Rerun, Trigger, TriggerKind
from bigtent.runner.db import ci_queries as q
from bigtent.runner.forge.model import EvalReport, EvalState, JobReport, JobState, Reporter
from bigtent.runner.ingest import ClientPath, ingest_client_closure
from bigtent.runner.logs import LogStore
from bigtent.runner.scheduler.service import Scheduler

log = logging.getLogger(__name__)

ACTOR = "ci"
LOG_TAIL_LINES = 40
FAILED_TAILS = 50
"""Failed jobs whose log tail a report carries (the forge side caps what it posts)."""
PRUNE_SECS = 3600.0
"""How often webhook delivery ids older than ``evaluation.replay_window_secs`` are deleted."""
PROJECT_RELOAD_SECS = 10.0
"""How often the loop reads the projects again (another runner may have changed them)."""


@dataclass(slots=True)
class _Watched:
    """What was last reported of an evaluation (to report changes only)."""

    state: str
    jobs: dict[str, str] = field(default_factory=dict)


def default_runner_id(config: RunnerConfig) -> str:
    return f"{socket.gethostname()}:{config.runner.port}"


class CiService:
    def __init__(
        self,
        config: RunnerConfig,
        engine: AsyncEngine,
        cache: Cache,
        untrusted_cache: Cache | None,
        upstreams: Upstreams,
        scheduler: Scheduler,
        logs: LogStore,
        reporter: Reporter,
        *,
        clock: Callable[[], float] = time.time,
        runner_id: str | None = None,
    ) -> None:
        self.config = config
        self.engine = engine
        self.cache = cache
        self.untrusted_cache = untrusted_cache
        self.upstreams = upstreams
        self.scheduler = scheduler
        self.logs = logs
        self.reporter = reporter
        self.clock = clock
        self.runner_id = runner_id or default_runner_id(config)
        self.limits = config.evaluation
        self.evaluator = Evaluator(
            config.runner.state_dir, config.evaluation, {"allow-import-from-derivation": "false"}
        )
        self.projects: dict[str, ProjectSection] = {}
        self.sources: dict[str, str] = {}
        self._wake = asyncio.Event()
        self._aborts: dict[int, asyncio.Event] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._watched: dict[int, _Watched] = {}
        self._polled: dict[str, float] = {}
        self._default_branches: dict[str, str] = {}
        self._reloaded = time.monotonic()
        self._pruned = -PRUNE_SECS
        self.ls_remote: Callable[[str, list[str]], Awaitable[dict[str, str]]] = ls_remote
        """``git ls-remote`` (replaced in tests)."""

    # ---- projects ---------------------------------------------------------------------------
    async def load(self) -> None:
        """Write the configured projects to the database (they win over stored ones of the
        same name), then load every project; requeue evaluations this runner was running
        when it stopped."""
        names = [p.name for p in self.config.projects]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ConfigError(f"[[projects]] names repeat: {', '.join(sorted(dup))}")
        now = self.clock()
        async with self.engine.begin() as conn:
            for p in self.config.projects:
                await q.upsert_project(conn, p.name, "config", p.model_dump(mode="json"), now)
            rows = await q.fetch_projects(conn)
            for row in await q.fetch_evaluations_in(
                conn, [CiEvalState.EVALUATING.value], claimed_by=self.runner_id
            ):
                await q.transition(
                    conn, row.id, [CiEvalState.EVALUATING.value], state=CiEvalState.QUEUED.value
                )
        self._set_projects(rows)
        problem = await self.evaluator.probe()
        if problem is not None and self.evaluator.refuses_untrusted:
            log.error(
                "CI evaluation sandbox unavailable: %s. Trusted evaluations (pushes) run "
                "unsandboxed; untrusted ones (pull requests) are refused. Install bubblewrap, "
                'or set [evaluation] sandbox = "none" to evaluate untrusted code unsandboxed '
                "(unsafe: it can read the runner's files, its signing key included)",
                problem,
            )
        elif problem is not None:
            log.warning(
                'CI evaluation runs without a sandbox ([evaluation] sandbox = "none"): '
                "evaluated code can read the runner's files, its signing key included"
            )

    def _set_projects(self, rows: list[Any]) -> None:
        self.projects = {}
        self.sources = {}
        for row in rows:
            try:
                project = ProjectSection.model_validate_json(row.settings)
            except ValueError as exc:
                log.error("project %s in the database is invalid, skipped: %s", row.name, exc)
                continue
            problem = (
                api_project_problem(project, self.limits.api_secrets_dir)
                if row.source != "config"
                else None
            )
            if problem is not None:
                log.error("project %s (added through the API) skipped: %s", row.name, problem)
                continue
            self.projects[row.name] = project
            self.sources[row.name] = row.source

    async def reload_projects(self) -> None:
        async with self.engine.connect() as conn:
            self._set_projects(await q.fetch_projects(conn))
        self._reloaded = time.monotonic()

    async def add_project(self, project: ProjectSection) -> None:
        problem = api_project_problem(project, self.limits.api_secrets_dir)
        if problem is not None:
            raise BadRequest(f"invalid project: {problem}")
        async with self.engine.begin() as conn:
            added = await q.insert_project(
                conn, project.name, "api", project.model_dump(mode="json"), self.clock()
            )
        if not added:
            raise Conflict(f"project {project.name} exists already")
        await self.reload_projects()
        self._wake.set()

    async def remove_project(self, name: str) -> None:
        await self.reload_projects()
        if name not in self.projects:
            raise NotFound(f"no project {name}")
        if self.sources.get(name) == "config":
            raise Conflict(
                f"project {name} is defined in the runner's config: remove it from [[projects]]"
            )
        async with self.engine.begin() as conn:
            await q.delete_project(conn, name)
        await self.reload_projects()

    def project(self, name: str) -> ProjectSection:
        p = self.projects.get(name)
        if p is None:
            raise NotFound(f"no project {name}")
        return p

    # ---- triggers ---------------------------------------------------------------------------
    async def trigger(self, project: ProjectSection, trigger: Trigger) -> int | None:
        """Queue an evaluation of the trigger's commit; supersede older commits of its ref.
        The evaluation's id (an existing one for a commit already triggered); None when the
        project does not build it."""
        if project.name not in self.projects:
            await self.reload_projects()
        default = trigger.default_branch or await self._default_branch(project)
        decision = triggers.decide(project, dataclasses.replace(trigger, default_branch=default))
        if not decision.evaluate:
            log.info("project %s: %s: not evaluated", project.name, decision.reason)
            return None
        state = CiEvalState.AWAITING_APPROVAL if decision.needs_approval else CiEvalState.QUEUED
        now = self.clock()
        async with self.engine.begin() as conn:
            eval_id = await q.insert_evaluation(
                conn,
                project=project.name,
                ref=trigger.ref,
                commit_sha=trigger.commit_sha,
                fetch_ref=trigger.fetch_ref,
                trigger=trigger.kind.value,
                pull_request=trigger.pull_request,
                trusted=decision.trusted,
                state=state.value,
                created_at=now,
            )
            if eval_id is None:
                row = await q.find_evaluation(conn, project.name, trigger.ref, trigger.commit_sha)
                assert row is not None
                if row.superseded_by is None or row.state != CiEvalState.CANCELLED:
                    return int(row.id)
                # The ref is back at a commit whose evaluation a newer one superseded (a
                # force-push back): evaluate it again, as new.
                eval_id = int(row.id)
                revived = await q.transition(
                    conn,
                    eval_id,
                    [CiEvalState.CANCELLED.value],
                    state=state.value,
                    superseded_by=None,
                    build_id=None,
                    error=None,
                    claimed_by=None,
                    started_at=None,
                    finished_at=None,
                    created_at=now,
                    trigger=trigger.kind.value,
                )
                if not revived:
                    return eval_id
                await q.delete_jobs(conn, eval_id)
                self._watched.pop(eval_id, None)
            active = await q.fetch_active_evaluations(conn, project.name)
        log.info(
            "project %s: evaluation %d of %s at %s (%s, %s)",
            project.name,
            eval_id,
            trigger.commit_sha[:12],
            trigger.ref,
            trigger.kind.value,
            "trusted" if decision.trusted else "untrusted",
        )
        old = triggers.superseded(
            [ActiveEval(r.id, r.ref, r.commit_sha, CiEvalState(r.state)) for r in active],
            trigger.ref,
            trigger.commit_sha,
        )
        for other in old:
            await self.cancel(other, superseded_by=eval_id)
        await self._report(eval_id)
        self._wake.set()
        return eval_id

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

    async def _default_branch(self, project: ProjectSection) -> str:
        if project.branches:
            return ""
        if project.name not in self._default_branches:
            try:
                self._default_branches[project.name] = await default_branch(project.url)
            except EvalFailure as exc:
                log.warning("project %s: cannot find its default branch: %s", project.name, exc)
                return ""
        return self._default_branches[project.name]

    async def evaluate_now(self, name: str, branch: str | None) -> int | None:
        """A manual trigger: the branch's current commit (default: the first built branch)."""
        project = self.project(name)
        target = branch or (project.branches[0] if project.branches else "")
        if not target:
            target = await self._default_branch(project)
        if not target:
            raise BadRequest(f"project {name}: name a branch (the default branch is not known)")
        ref = f"refs/heads/{target}"
        try:
            found = await self.ls_remote(project.url, [ref])
        except EvalFailure as exc:
            raise BadRequest(f"project {name}: {exc.message}") from exc
        if ref not in found:
            raise NotFound(f"project {name} has no branch {target}")
        return await self.trigger(
            project,
            Trigger(
                kind=TriggerKind.MANUAL,
                repository=project.repository,
                clone_urls=(),
                ref=ref,
                fetch_ref=ref,
                commit_sha=found[ref],
                branch=target,
                default_branch=target,
            ),
        )

    async def cancel(self, eval_id: int, *, superseded_by: int | None = None) -> bool:
        """Cancel an evaluation that is not final: its Nix process stops, its build is
        cancelled. False when it was final already."""
        active = [s.value for s in CiEvalState if not s.is_final]
        async with self.engine.begin() as conn:
            moved = await q.transition(
                conn,
                eval_id,
                active,
                state=CiEvalState.CANCELLED.value,
                finished_at=self.clock(),
                superseded_by=superseded_by,
            )
            row = await q.fetch_evaluation(conn, eval_id)
        if not moved or row is None:
            return False
        if superseded_by is not None:
            log.info("evaluation %d superseded by %d", eval_id, superseded_by)
        abort = self._aborts.get(eval_id)
        if abort is not None:
            abort.set()
        if row.build_id is not None:
            await self.scheduler.cancel_build(int(row.build_id), actor=ACTOR)
        await self._settle_jobs(eval_id)
        await self._report(eval_id)
        return True

    async def approve(self, eval_id: int) -> None:
        async with self.engine.begin() as conn:
            moved = await q.transition(
                conn,
                eval_id,
                [CiEvalState.AWAITING_APPROVAL.value],
                state=CiEvalState.QUEUED.value,
            )
        if not moved:
            raise Conflict(f"evaluation {eval_id} is not waiting for approval")
        await self._report(eval_id)
        self._wake.set()

    async def rerun(self, rerun: Rerun) -> bool:
        """Restart the failed jobs of an evaluation (``attr``: only that job, when it failed).
        Restarting goes through ``Scheduler.restart_build``: the failed steps of the build
        (with ``attr``, only those that job's derivation needs) are queued again, their cached
        failures cleared."""
        async with self.engine.connect() as conn:
            row = await q.fetch_evaluation(conn, rerun.evaluation_id)
            jobs = await q.fetch_jobs(conn, rerun.evaluation_id) if row is not None else []
        if row is None or row.build_id is None:
            return False
        failed = {
            j.attr: str(j.drv_path) for j in jobs if j.state == JobState.FAILED and j.drv_path
        }
        if rerun.attr is not None:
            failed = {a: d for a, d in failed.items() if a == rerun.attr}
        if not failed:
            return False
        restarted = await self.scheduler.restart_build(
            int(row.build_id),
            actor=ACTOR,
            roots=None if rerun.attr is None else list(failed.values()),
        )
        if not restarted:
            return False
        async with self.engine.begin() as conn:
            await q.transition(
                conn,
                row.id,
                [CiEvalState.FAILED.value, CiEvalState.BUILDING.value],
                state=CiEvalState.BUILDING.value,
                finished_at=None,
                claimed_by=self.runner_id,
            )
            await q.set_job_states(conn, row.id, dict.fromkeys(failed, JobState.QUEUED.value))
        self._watched.pop(row.id, None)
        log.info("evaluation %d: failed jobs restarted (%d)", row.id, len(failed))
        self._wake.set()
        return True

    # ---- the loop ---------------------------------------------------------------------------
    async def run(self) -> None:
        """Claim and evaluate queued evaluations, watch builds, poll projects; until
        cancelled."""
        try:
            while True:
                try:
                    await self._tick()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("CI loop pass failed; trying again")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.limits.watch_interval_secs):
                        await self._wake.wait()
                self._wake.clear()
        finally:
            for task in list(self._tasks):
                task.cancel()
            for task in list(self._tasks):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    def wake(self) -> None:
        self._wake.set()

    async def _tick(self) -> None:
        if time.monotonic() - self._reloaded > PROJECT_RELOAD_SECS:
            # Projects another runner on the database added or removed.
            await self.reload_projects()
        async with self.engine.connect() as conn:
            queued = await q.fetch_evaluations_in(conn, [CiEvalState.QUEUED.value])
            building = await q.fetch_evaluations_in(
                conn, [CiEvalState.BUILDING.value], claimed_by=self.runner_id
            )
        running = len(self._aborts)
        for row in queued:
            if running >= self.limits.max_concurrent:
                break
            if row.id in self._aborts:
                continue
            if await self._claim(int(row.id)):
                running += 1
                abort = self._aborts[int(row.id)] = asyncio.Event()
                self._spawn(self._evaluate(int(row.id), abort), f"evaluation-{row.id}")
        for row in building:
            await self._watch(int(row.id))
        await self._poll()
        if time.monotonic() - self._pruned > PRUNE_SECS:
            self._pruned = time.monotonic()
            async with self.engine.begin() as conn:
                await q.prune_deliveries(conn, self.clock() - self.limits.replay_window_secs)

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _claim(self, eval_id: int) -> bool:
        async with self.engine.begin() as conn:
            return await q.transition(
                conn,
                eval_id,
                [CiEvalState.QUEUED.value],
                state=CiEvalState.EVALUATING.value,
                claimed_by=self.runner_id,
                started_at=self.clock(),
            )

    async def _evaluate(self, eval_id: int, abort: asyncio.Event) -> None:
        """Evaluate a claimed evaluation (``abort``, in ``_aborts`` from its claim on, stops
        it when it is superseded or cancelled)."""
        try:
            await self._report(eval_id)
            await self._evaluate_claimed(eval_id, abort)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("evaluation %d failed", eval_id)
            await self._end(eval_id, CiEvalState.EVAL_ERROR, f"internal error: {exc}")
        finally:
            self._aborts.pop(eval_id, None)
            self._wake.set()

    async def _evaluate_claimed(self, eval_id: int, abort: asyncio.Event) -> None:
        async with self.engine.connect() as conn:
            row = await q.fetch_evaluation(conn, eval_id)
        assert row is not None
        if row.project not in self.projects:
            await self.reload_projects()
        project = self.projects.get(row.project)
        if project is None:
            await self._end(eval_id, CiEvalState.EVAL_ERROR, f"no project {row.project}")
            return
        if not row.trusted and self.evaluator.refuses_untrusted:
            await self._end(
                eval_id,
                CiEvalState.EVAL_ERROR,
                "untrusted evaluation refused: the evaluation sandbox is unavailable on this "
                f"runner ({self.evaluator.sandbox_problem})",
            )
            return
        started = time.monotonic()
        try:
            jobs, peak = await self.evaluator.evaluate(
                project, row.fetch_ref, row.commit_sha, abort
            )
        except EvalFailure as exc:
            if exc.kind == "aborted":
                return  # cancelled: already recorded and reported
            log.info("evaluation %d: %s", eval_id, exc.message.splitlines()[0])
            await self._end(eval_id, CiEvalState.EVAL_ERROR, exc.message)
            return
        log.info(
            "evaluation %d: %d jobs in %.2f s, Nix's peak memory %.1f MiB",
            eval_id,
            len(jobs),
            time.monotonic() - started,
            peak / 2**20,
        )
        async with self.engine.begin() as conn:
            await q.insert_jobs(
                conn,
                eval_id,
                [
                    {
                        "attr": j.attr,
                        "drv_path": j.drv_path,
                        "error": j.error,
                        "state": JobState.QUEUED.value if j.drv_path else JobState.FAILED.value,
                    }
                    for j in jobs
                ],
            )
        drvs = list(dict.fromkeys(j.drv_path for j in jobs if j.drv_path))
        if not drvs:
            has_errors = any(j.error for j in jobs)
            await self._end(
                eval_id,
                CiEvalState.FAILED if has_errors else CiEvalState.SUCCEEDED,
                None if jobs else "no jobs: nothing to build",
            )
            return
        t_upload = time.monotonic()
        uploaded = await self._upload(drvs)
        log.info(
            "evaluation %d: %d paths of the .drv closure uploaded in %.2f s",
            eval_id,
            uploaded,
            time.monotonic() - t_upload,
        )
        if abort.is_set():
            return
        build_id = await self.scheduler.admit_build(
            priority=project.priority,
            created_by=f"{ACTOR}/{project.name}",
            parts=plan_parts(
                self.cache,
                self.upstreams,
                drvs,
                also=None if row.trusted else self.untrusted_cache,
            ),
            repository=project.repository or project.name,
            ref=row.ref,
            trusted=bool(row.trusted),
        )
        async with self.engine.begin() as conn:
            moved = await q.transition(
                conn,
                eval_id,
                [CiEvalState.EVALUATING.value],
                state=CiEvalState.BUILDING.value,
                build_id=build_id,
            )
        if not moved:  # superseded while its closure was uploaded or its build admitted
            await self.scheduler.cancel_build(build_id, actor=ACTOR)
            return
        log.info("evaluation %d: build %d with %d jobs", eval_id, build_id, len(drvs))
        await self._watch(eval_id)

    async def _upload(self, drvs: list[str]) -> int:
        """The ``.drv`` closure, from the evaluation store into the cache (every path
        content-addressed and checked as a client's upload is, published in batches:
        ``ingest_client_closure``)."""
        store = self.evaluator.store
        infos = await store.path_info(drvs, recursive=True, derivation=True)
        order = upload_order(infos, [i.path for i in infos])
        paths = [
            ClientPath(
                path=info.path,
                nar_hash=base32.parse_hash(nar_hash_to_nix32(info.nar_hash), "sha256"),
                nar_size=info.nar_size,
                references=frozenset(r for r in info.references if r != info.path),
                nar=functools.partial(dump_path, store.real_path(info.path)),
            )
            for info in order
        ]
        return await ingest_client_closure(self.cache, self.engine, paths)

    async def _end(self, eval_id: int, state: CiEvalState, error: str | None) -> None:
        async with self.engine.begin() as conn:
            moved = await q.transition(
                conn,
                eval_id,
                [CiEvalState.EVALUATING.value, CiEvalState.BUILDING.value],
                state=state.value,
                error=error,
                finished_at=self.clock(),
            )
        if moved:
            await self._report(eval_id)

    async def _settle_jobs(self, eval_id: int) -> None:
        """Jobs of a cancelled evaluation that had not ended are cancelled."""
        async with self.engine.begin() as conn:
            jobs = await q.fetch_jobs(conn, eval_id)
            await q.set_job_states(
                conn,
                eval_id,
                {
                    j.attr: JobState.CANCELLED.value
                    for j in jobs
                    if j.state in (JobState.QUEUED, JobState.RUNNING)
                },
            )

    async def _watch(self, eval_id: int) -> None:
        """Read the evaluation's build; store and report what changed."""
        async with self.engine.connect() as conn:
            row = await q.fetch_evaluation(conn, eval_id)
            if row is None or row.build_id is None:
                return
            build_state, roots = await q.build_progress(conn, int(row.build_id))
            jobs = await q.fetch_jobs(conn, eval_id)
        if build_state is None:
            await self._end(eval_id, CiEvalState.CANCELLED, "its build was deleted")
            return
        by_drv = {r.drv_path: r for r in roots}
        new_states: dict[str, str] = {}
        for j in jobs:
            if not j.drv_path:
                continue
            root = by_drv.get(j.drv_path)
            state = job_state_from_step(root.state if root else None, build_state)
            if state != j.state:
                new_states[j.attr] = state
        final = triggers.eval_state_of_build(build_state)
        if final is CiEvalState.SUCCEEDED and any(not j.drv_path for j in jobs):
            final = CiEvalState.FAILED  # a job did not even evaluate
        if new_states:
            async with self.engine.begin() as conn:
                await q.set_job_states(conn, eval_id, new_states)
        if final is not CiEvalState.BUILDING:
            await self._end(eval_id, final, None)
            self._watched.pop(eval_id, None)
        elif new_states or eval_id not in self._watched:
            self._watched[eval_id] = _Watched(CiEvalState.BUILDING.value)
            await self._report(eval_id)

    # ---- polling ----------------------------------------------------------------------------
    async def _poll(self) -> None:
        now = time.monotonic()
        for project in list(self.projects.values()):
            interval = project.poll_interval_secs
            if interval is None or now - self._polled.get(project.name, -1e18) < interval:
                continue
            self._polled[project.name] = now
            self._spawn(self._poll_project(project), f"poll-{project.name}")

    async def _poll_project(self, project: ProjectSection) -> None:
        branches = project.branches or [await self._default_branch(project)]
        refs = [f"refs/heads/{b}" for b in branches if b]
        try:
            found = await self.ls_remote(project.url, refs)
        except EvalFailure as exc:
            log.warning("project %s: polling failed: %s", project.name, exc)
            return
        for ref, sha in sorted(found.items()):
            if ref not in refs:
                continue
            await self.trigger(
                project,
                Trigger(
                    kind=TriggerKind.POLL,
                    repository=project.repository,
                    clone_urls=(),
                    ref=ref,
                    fetch_ref=ref,
                    commit_sha=sha,
                    branch=ref.removeprefix("refs/heads/"),
                ),
            )

    # ---- reports ----------------------------------------------------------------------------
    def eval_url(self, eval_id: int) -> str:
        return f"{self.config.runner.base_url()}/ci/evaluations/{eval_id}"

    async def build_report(self, eval_id: int) -> EvalReport | None:
        """What the forge is told about an evaluation now (None: no such evaluation, or its
        project reports to no forge)."""
        async with self.engine.connect() as conn:
            row = await q.fetch_evaluation(conn, eval_id)
            if row is None:
                return None
            jobs = await q.fetch_jobs(conn, eval_id)
            roots: dict[str, Any] = {}
            if row.build_id is not None:
                _, found = await q.build_progress(conn, int(row.build_id))
                roots = {r.drv_path: r for r in found}
        project = self.projects.get(row.project)
        target = project.target() if project is not None else None
        if target is None:
            return None
        reports = []
        tails = 0
        for j in jobs:
            state = JobState(j.state)
            tail = ""
            summary = ""
            root = roots.get(j.drv_path) if j.drv_path else None
            if state is JobState.FAILED:
                if j.error:
                    summary = (
                        shown_job_error(
                            j.error,
                            trusted=bool(row.trusted),
                            admin=False,
                            url=self.eval_url(eval_id),
                        )
                        or ""
                    )
                elif root is not None and root.id is not None:
                    if root.state == "dependency_failed":
                        summary = "a dependency failed"
                    elif tails < FAILED_TAILS:
                        tails += 1
                        tail = await asyncio.to_thread(self.logs.tail, int(root.id), LOG_TAIL_LINES)
                        summary = "build failed"
            url = (
                f"{self.config.runner.base_url()}/steps/{root.id}"
                if root is not None and root.id is not None
                else self.eval_url(eval_id)
            )
            reports.append(
                JobReport(
                    attr=j.attr,
                    state=state,
                    drv_path=j.drv_path or "",
                    url=url,
                    log_tail=tail,
                    summary=summary,
                )
            )
        return EvalReport(
            project=row.project,
            target=target,
            commit_sha=row.commit_sha,
            evaluation_id=int(row.id),
            state=_forge_state(CiEvalState(row.state)),
            url=self.eval_url(eval_id),
            error=shown_eval_error(
                row.error or "", trusted=bool(row.trusted), admin=False, url=self.eval_url(eval_id)
            )
            or ""
            if row.state == CiEvalState.EVAL_ERROR
            else "",
            jobs=tuple(reports),
        )

    async def _report(self, eval_id: int) -> None:
        report = await self.build_report(eval_id)
        if report is None:
            return
        try:
            await self.reporter.report(report)
        except Exception:  # a Reporter never raises for forge trouble: a bug if it does
            log.exception("reporting evaluation %d failed", eval_id)


def _forge_state(state: CiEvalState) -> EvalState:
    if state is CiEvalState.AWAITING_APPROVAL:
        return EvalState.QUEUED
    return EvalState(state.value)
