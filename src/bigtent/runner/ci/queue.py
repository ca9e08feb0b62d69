"""The evaluation queue as rows: every change of an evaluation's state is one conditional
update (from the states it may leave), so runners sharing a database agree on who does what;
each function here is one transaction. ``CiService`` decides when to call them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from bigtent.runner.ci.triggers import ActiveEval, CiEvalState
from bigtent.runner.ci.webhooks import Trigger
from bigtent.runner.db import ci_queries as q
from bigtent.runner.forge.model import JobState


@dataclass(frozen=True, slots=True)
class Enqueued:
    """What queueing a trigger's commit did: a new (or ``revived``) evaluation, with the
    project's evaluations that are not final (``active``); or (``new`` False) the commit's
    existing evaluation, untouched."""

    eval_id: int
    new: bool
    revived: bool = False
    active: list[ActiveEval] = field(default_factory=list)


async def enqueue(
    engine: AsyncEngine,
    project: str,
    trigger: Trigger,
    *,
    trusted: bool,
    state: CiEvalState,
    now: float,
) -> Enqueued:
    """An evaluation of (project, ref, commit) in ``state``, inserted once: a second trigger
    of the same commit finds the first. A commit whose evaluation a newer one superseded (the
    ref is back at it: a force-push back) is evaluated again, as new."""
    async with engine.begin() as conn:
        eval_id = await q.insert_evaluation(
            conn,
            project=project,
            ref=trigger.ref,
            commit_sha=trigger.commit_sha,
            fetch_ref=trigger.fetch_ref,
            trigger=trigger.kind.value,
            pull_request=trigger.pull_request,
            trusted=trusted,
            state=state.value,
            created_at=now,
        )
        revived = False
        if eval_id is None:
            row = await q.find_evaluation(conn, project, trigger.ref, trigger.commit_sha)
            assert row is not None
            if row.superseded_by is None or row.state != CiEvalState.CANCELLED:
                return Enqueued(int(row.id), new=False)
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
                return Enqueued(eval_id, new=False)
            await q.delete_jobs(conn, eval_id)
        active = await q.fetch_active_evaluations(conn, project)
    return Enqueued(
        eval_id,
        new=True,
        revived=revived,
        active=[ActiveEval(r.id, r.ref, r.commit_sha, CiEvalState(r.state)) for r in active],
    )


async def requeue_claimed(conn: AsyncConnection, runner_id: str) -> None:
    """Evaluations this runner was evaluating when it stopped go back to the queue."""
    for row in await q.fetch_evaluations_in(
        conn, [CiEvalState.EVALUATING.value], claimed_by=runner_id
    ):
        await q.transition(
            conn, row.id, [CiEvalState.EVALUATING.value], state=CiEvalState.QUEUED.value
        )


async def claim(engine: AsyncEngine, eval_id: int, runner_id: str, now: float) -> bool:
    """``queued -> evaluating`` for this runner: False when another runner won."""
    async with engine.begin() as conn:
        return await q.transition(
            conn,
            eval_id,
            [CiEvalState.QUEUED.value],
            state=CiEvalState.EVALUATING.value,
            claimed_by=runner_id,
            started_at=now,
        )


async def cancel(
    engine: AsyncEngine, eval_id: int, superseded_by: int | None, now: float
) -> Any | None:
    """Cancel an evaluation that is not final: its row after, None when it was final."""
    active = [s.value for s in CiEvalState if not s.is_final]
    async with engine.begin() as conn:
        moved = await q.transition(
            conn,
            eval_id,
            active,
            state=CiEvalState.CANCELLED.value,
            finished_at=now,
            superseded_by=superseded_by,
        )
        row = await q.fetch_evaluation(conn, eval_id)
    return row if moved else None


async def approve(engine: AsyncEngine, eval_id: int) -> bool:
    """``awaiting_approval -> queued``: False when it was not waiting."""
    async with engine.begin() as conn:
        return await q.transition(
            conn, eval_id, [CiEvalState.AWAITING_APPROVAL.value], state=CiEvalState.QUEUED.value
        )


async def end(
    engine: AsyncEngine, eval_id: int, state: CiEvalState, error: str | None, now: float
) -> bool:
    """An evaluating or building evaluation ends in ``state``: False when it was not
    (cancelled meanwhile)."""
    async with engine.begin() as conn:
        return await q.transition(
            conn,
            eval_id,
            [CiEvalState.EVALUATING.value, CiEvalState.BUILDING.value],
            state=state.value,
            error=error,
            finished_at=now,
        )


async def settle_jobs(engine: AsyncEngine, eval_id: int) -> None:
    """Jobs of a cancelled evaluation that had not ended are cancelled."""
    async with engine.begin() as conn:
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


async def rebuild(
    engine: AsyncEngine, eval_id: int, failed: Mapping[str, str], runner_id: str
) -> None:
    """A failed (or building) evaluation builds again, watched by this runner: the ``failed``
    jobs (attr -> .drv) are queued again."""
    async with engine.begin() as conn:
        await q.transition(
            conn,
            eval_id,
            [CiEvalState.FAILED.value, CiEvalState.BUILDING.value],
            state=CiEvalState.BUILDING.value,
            finished_at=None,
            claimed_by=runner_id,
        )
        await q.set_job_states(conn, eval_id, dict.fromkeys(failed, JobState.QUEUED.value))
