"""One claimed evaluation, from its commit to its build: evaluate the jobs (``evaluator``),
record them, put the ``.drv`` closure into the cache with the checks a client's upload gets,
in batches (``ingest_client_closure``), and admit one build with every job through the
admission path ``POST /api/v1/builds`` uses (``plan_parts`` + ``Scheduler.admit_build``)."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from bigtent.client.upload import nar_hash_to_nix32, upload_order
from bigtent.config.ci import ProjectSection
from bigtent.nix import base32
from bigtent.nix.nar import dump_path
from bigtent.runner.builds import plan_parts
from bigtent.runner.cache.closureingest import ClientPath, ingest_client_closure
from bigtent.runner.cache.service import Cache
from bigtent.runner.cache.upstreams import Upstreams
from bigtent.runner.ci.evaluator import EvalFailure, Evaluator
from bigtent.runner.ci.triggers import CiEvalState
from bigtent.runner.db import ci_queries as q
from bigtent.runner.forge.model import JobState
from bigtent.runner.scheduler.service import Scheduler

log = logging.getLogger(__name__)

ACTOR = "ci"


@dataclass(frozen=True, slots=True)
class Ended:
    """The evaluation ends here, in ``state`` (no build, or nothing to build)."""

    state: CiEvalState
    error: str | None


@dataclass(eq=False)
class Admission:
    """What an evaluation needs to reach its build: the evaluator, the caches, the
    scheduler."""

    engine: AsyncEngine
    evaluator: Evaluator
    cache: Cache
    untrusted_cache: Cache | None
    upstreams: Upstreams
    scheduler: Scheduler

    async def run(
        self, eval_id: int, row: Any, project: ProjectSection, abort: asyncio.Event
    ) -> Ended | int | None:
        """Evaluate ``row`` (a claimed evaluation of ``project``) and admit its build: the
        build's id, ``Ended`` when the evaluation ends without one, None when it was
        cancelled or superseded meanwhile (already recorded and reported)."""
        started = time.monotonic()
        try:
            jobs, peak = await self.evaluator.evaluate(
                project, row.fetch_ref, row.commit_sha, abort
            )
        except EvalFailure as exc:
            if exc.kind == "aborted":
                return None  # cancelled: already recorded and reported
            log.info("evaluation %d: %s", eval_id, exc.message.splitlines()[0])
            return Ended(CiEvalState.EVAL_ERROR, exc.message)
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
            return Ended(
                CiEvalState.FAILED if has_errors else CiEvalState.SUCCEEDED,
                None if jobs else "no jobs: nothing to build",
            )
        t_upload = time.monotonic()
        uploaded = await self._upload(drvs)
        log.info(
            "evaluation %d: %d paths of the .drv closure uploaded in %.2f s",
            eval_id,
            uploaded,
            time.monotonic() - t_upload,
        )
        if abort.is_set():
            return None
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
            return None
        log.info("evaluation %d: build %d with %d jobs", eval_id, build_id, len(drvs))
        return build_id

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
