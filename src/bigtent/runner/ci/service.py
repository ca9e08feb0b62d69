"""The CI service: projects, triggers, evaluations and their builds (docs/ci.md).

A trigger (webhook, poll, ``POST /projects/{name}/evaluate``) inserts an evaluation row for
(project, ref, commit) once: the unique key makes a second trigger of the same commit, from
any runner on the database, a no-op. A new commit on a ref supersedes the ref's evaluations
that are not final: each becomes ``cancelled`` (a conditional update), its Nix process is
killed if it runs here, and its build is cancelled (steps no other build needs stop).

The loop (``run``) claims queued evaluations (``queued -> evaluating``, a conditional update:
one runner wins), and for each (``evaluation.Admission``) evaluates off the event loop
(``evaluator.py``), puts the ``.drv``
closure into the cache with the checks a client's upload gets, in batches
(``ingest_client_closure``), admits one build with every job through the admission path
``POST /api/v1/builds`` uses (``plan_parts`` + ``Scheduler.admit_build``), and watches the
builds of its evaluations, reporting every evaluation and job state change to the ``Reporter``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from bigtent.config import RunnerConfig
from bigtent.config.ci import ProjectSection
from bigtent.errors import Conflict
from bigtent.runner.cache.service import Cache
from bigtent.runner.cache.upstreams import Upstreams
from bigtent.runner.ci import queue, triggers
from bigtent.runner.ci.evaluation import ACTOR, Admission, Ended
from bigtent.runner.ci.evaluator import Evaluator
from bigtent.runner.ci.projects import Projects
from bigtent.runner.ci.refs import LsRemote, Refs
from bigtent.runner.ci.reports import build_report, eval_url
from bigtent.runner.ci.triggers import CiEvalState
from bigtent.runner.ci.webhooks import Rerun, Trigger
from bigtent.runner.db import ci_queries as q
from bigtent.runner.forge.model import EvalReport, JobState, Reporter
from bigtent.runner.logs.store import LogStore
from bigtent.runner.scheduler.service import Scheduler

log = logging.getLogger(__name__)

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
        self.admission = Admission(
            engine, self.evaluator, cache, untrusted_cache, upstreams, scheduler
        )
        self.registry = Projects(engine, self.limits.api_secrets_dir, clock)
        self._wake = asyncio.Event()
        self._aborts: dict[int, asyncio.Event] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._watched: dict[int, _Watched] = {}
        self._pruned = -PRUNE_SECS
        self.refs = Refs()

    @property
    def ls_remote(self) -> LsRemote:
        """``git ls-remote`` (replaced in tests)."""
        return self.refs.ls_remote

    @ls_remote.setter
    def ls_remote(self, fn: LsRemote) -> None:
        self.refs.ls_remote = fn

    # ---- projects ---------------------------------------------------------------------------
    @property
    def projects(self) -> dict[str, ProjectSection]:
        return self.registry.by_name

    @property
    def sources(self) -> dict[str, str]:
        return self.registry.sources

    async def load(self) -> None:
        """Write the configured projects to the database (they win over stored ones of the
        same name), then load every project; requeue evaluations this runner was running
        when it stopped."""
        Projects.check_names(self.config.projects)
        async with self.engine.begin() as conn:
            await self.registry.write_configured(conn, self.config.projects)
            rows = await q.fetch_projects(conn)
            await queue.requeue_claimed(conn, self.runner_id)
        self.registry.set_rows(rows)
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

    async def reload_projects(self) -> None:
        await self.registry.reload()

    async def add_project(self, project: ProjectSection) -> None:
        await self.registry.add(project)
        self._wake.set()

    async def remove_project(self, name: str) -> None:
        await self.registry.remove(name)

    def project(self, name: str) -> ProjectSection:
        return self.registry.get(name)

    # ---- triggers ---------------------------------------------------------------------------
    async def trigger(self, project: ProjectSection, trigger: Trigger) -> int | None:
        """Queue an evaluation of the trigger's commit; supersede older commits of its ref.
        The evaluation's id (an existing one for a commit already triggered); None when the
        project does not build it."""
        if project.name not in self.projects:
            await self.reload_projects()
        default = trigger.default_branch or await self.refs.default_branch(project)
        decision = triggers.decide(project, dataclasses.replace(trigger, default_branch=default))
        if not decision.evaluate:
            log.info("project %s: %s: not evaluated", project.name, decision.reason)
            return None
        state = CiEvalState.AWAITING_APPROVAL if decision.needs_approval else CiEvalState.QUEUED
        queued = await queue.enqueue(
            self.engine,
            project.name,
            trigger,
            trusted=decision.trusted,
            state=state,
            now=self.clock(),
        )
        eval_id = queued.eval_id
        if not queued.new:
            return eval_id
        if queued.revived:
            self._watched.pop(eval_id, None)
        log.info(
            "project %s: evaluation %d of %s at %s (%s, %s)",
            project.name,
            eval_id,
            trigger.commit_sha[:12],
            trigger.ref,
            trigger.kind.value,
            "trusted" if decision.trusted else "untrusted",
        )
        old = triggers.superseded(queued.active, trigger.ref, trigger.commit_sha)
        for other in old:
            await self.cancel(other, superseded_by=eval_id)
        await self._report(eval_id)
        self._wake.set()
        return eval_id

    async def stale(self, project: ProjectSection, trigger: Trigger) -> str | None:
        """Why a webhook's push is not taken (``Refs.stale``); None when it is current or not
        a push."""
        return await self.refs.stale(project, trigger)

    async def evaluate_now(self, name: str, branch: str | None) -> int | None:
        """A manual trigger: the branch's current commit (default: the first built branch)."""
        project = self.project(name)
        return await self.trigger(project, await self.refs.manual(project, branch))

    async def cancel(self, eval_id: int, *, superseded_by: int | None = None) -> bool:
        """Cancel an evaluation that is not final: its Nix process stops, its build is
        cancelled. False when it was final already."""
        row = await queue.cancel(self.engine, eval_id, superseded_by, self.clock())
        if row is None:
            return False
        if superseded_by is not None:
            log.info("evaluation %d superseded by %d", eval_id, superseded_by)
        abort = self._aborts.get(eval_id)
        if abort is not None:
            abort.set()
        if row.build_id is not None:
            await self.scheduler.cancel_build(int(row.build_id), actor=ACTOR)
        await queue.settle_jobs(self.engine, eval_id)
        await self._report(eval_id)
        return True

    async def approve(self, eval_id: int) -> None:
        moved = await queue.approve(self.engine, eval_id)
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
        await queue.rebuild(self.engine, row.id, failed, self.runner_id)
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
        if time.monotonic() - self.registry.reloaded > PROJECT_RELOAD_SECS:
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
            if await queue.claim(self.engine, int(row.id), self.runner_id, self.clock()):
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
        outcome = await self.admission.run(eval_id, row, project, abort)
        if isinstance(outcome, Ended):
            await self._end(eval_id, outcome.state, outcome.error)
        elif outcome is not None:
            await self._watch(eval_id)

    async def _end(self, eval_id: int, state: CiEvalState, error: str | None) -> None:
        if await queue.end(self.engine, eval_id, state, error, self.clock()):
            await self._report(eval_id)

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
        new_states, final = triggers.settle(
            [(str(j.attr), j.drv_path, str(j.state)) for j in jobs],
            {r.drv_path: r.state for r in roots},
            build_state,
        )
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
        for project in self.refs.due(list(self.projects.values()), time.monotonic()):
            self._spawn(self._poll_project(project), f"poll-{project.name}")

    async def _poll_project(self, project: ProjectSection) -> None:
        for trigger in await self.refs.polled(project):
            await self.trigger(project, trigger)

    # ---- reports ----------------------------------------------------------------------------
    def eval_url(self, eval_id: int) -> str:
        return eval_url(self.config.runner.base_url(), eval_id)

    async def build_report(self, eval_id: int) -> EvalReport | None:
        """What the forge is told about an evaluation now (None: no such evaluation, or its
        project reports to no forge)."""
        return await build_report(
            self.engine, self.projects, self.logs, self.config.runner.base_url(), eval_id
        )

    async def _report(self, eval_id: int) -> None:
        report = await self.build_report(eval_id)
        if report is None:
            return
        try:
            await self.reporter.report(report)
        except Exception:  # a Reporter never raises for forge trouble: a bug if it does
            log.exception("reporting evaluation %d failed", eval_id)
