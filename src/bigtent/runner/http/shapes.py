"""The JSON shapes of builds, steps, attempts and cached-failure hits (docs/api.md), as the
build and step routes answer them: each is its ``bigtent.apimodels`` model (``Build``,
``Step``, ``StepAttempt``, ``CachedFailure``…), the route's ``response_model``, which the
client parses with."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi.responses import JSONResponse
from sqlalchemy.ext.asyncio import AsyncConnection

from bigtent.apilimits import known_id
from bigtent.errors import NotFound
from bigtent.runner.components import Components
from bigtent.runner.db import queries
from bigtent.runner.http.deps import iso
from bigtent.runner.logs.retention import expired_text, log_expired
from bigtent.runner.scheduler.leases import cached_failure_error
from bigtent.states import StepState

LOG_TAIL_LINES = 40


def answer(shaped: dict[str, Any], status_code: int = 200) -> JSONResponse:
    """``shaped`` (the route's ``response_model`` as JSON) as the answer, as it is. Checking
    it against the model on each answer would cost more than building it (a list of 1,000
    builds: about 17 ms of CPU to validate, 2.5 ms to build); the integration tests hold
    each answer to its model (``test_api_models.py``)."""
    return JSONResponse(shaped, status_code=status_code)


async def cached_hits(conn: Any, build_id: int) -> dict[int, Any]:
    """The build's cached-failure hits by step (``queries.fetch_build_cached_failure_hits``)."""
    return {
        int(h.step_id): h for h in await queries.fetch_build_cached_failure_hits(conn, build_id)
    }


def cached_hit_json(hit: Any) -> dict[str, Any]:
    """A step this build failed from the failure cache: when, the failure it reused (the
    attempt that ran, and the build that queued that run, when known), until when it is
    reused (docs/api.md)."""
    return {
        "hit_at": iso(hit.hit_at),
        "failed_at": iso(hit.failed_at),
        "outcome": hit.failed_outcome,
        "cached_until": iso(hit.cached_until),
        "attempt_id": hit.attempt_id,
        "agent_name": hit.agent_name,
        "ran_in_build": hit.ran_in_build,
    }


def with_cached_hit(step: dict[str, Any], hit: Any | None) -> dict[str, Any]:
    """A step as this build sees it: for a cached-failure hit, the error says so (the step's
    own row keeps the error of the attempt that ran) and ``cached_failure`` says which."""
    if hit is None:
        return step
    return step | {
        "error": cached_failure_error(
            hit.failed_outcome,
            float(hit.failed_at),
            float(hit.cached_until) - float(hit.failed_at),
            step["error"],
        ),
        "cached_failure": cached_hit_json(hit),
    }


def step_log_expired(row: Any, comps: Components) -> bool:
    sched = comps.scheduler
    return log_expired(
        row.id, row.finished_at, comps.logs, sched, comps.config.scheduler, sched.clock()
    )


STEP_COUNTS = ("total", "waiting", "runnable", "running", "succeeded", "failed", "cancelled")
"""The keys of a build's ``counts``: assigned and building steps count as running, failed and
dependency-failed ones as failed."""


def step_counts(states: Mapping[str, int]) -> dict[str, int]:
    """A build's ``counts`` from how many of its steps are in each state (pure)."""
    counts = dict.fromkeys(STEP_COUNTS, 0)
    for name, n in states.items():
        state = StepState(name)
        counts["total"] += n
        if state in (StepState.ASSIGNED, StepState.BUILDING):
            counts["running"] += n
        elif state in (StepState.FAILED, StepState.DEPENDENCY_FAILED):
            counts["failed"] += n
        else:
            counts[state.value] += n
    return counts


def root_json(row: Any, step_state: str | None) -> dict[str, Any]:
    """A build's root: its step's state, or ``cached`` when it needed no step (pure)."""
    return {
        "drv_path": row.drv_path,
        "outputs": json.loads(row.outputs),
        "step_id": row.step_id,
        "state": step_state if step_state is not None else "cached",
    }


def build_summary_json(
    build: Any, roots: list[dict[str, Any]], counts: dict[str, int], waiting_count: int
) -> dict[str, Any]:
    """A build as ``GET /builds`` lists it (``GET /builds/{id}`` adds its details; pure)."""
    return {
        "id": build.id,
        "state": build.state,
        "priority": build.priority,
        "created_at": iso(build.created_at),
        "finished_at": iso(build.finished_at),
        "created_by": build.created_by,
        "repository": build.repository,
        "ref": build.ref,
        "trusted": bool(build.trusted),
        "roots": roots,
        "counts": counts,
        "waiting_for_capacity_count": waiting_count,
    }


async def build_list_json(
    comps: Components, conn: AsyncConnection, builds: Sequence[Any]
) -> list[dict[str, Any]]:
    """``builds`` (rows of ``queries.fetch_builds``) as ``GET /builds`` lists them: a fixed
    number of queries for the whole list, whatever its length (step counts grouped by build
    and state, every root with its step's state, and, while steps wait for capacity, the
    builds' runnable steps)."""
    ids = [int(b.id) for b in builds]
    waiting = comps.scheduler.capacity_waiting()
    states = await queries.fetch_build_state_counts(conn, ids)
    roots: dict[int, list[dict[str, Any]]] = {i: [] for i in ids}
    for r in await queries.fetch_roots_of_builds(conn, ids):
        roots[int(r.build_id)].append(root_json(r, r.step_state))
    waiting_counts = Counter[int]()
    if waiting:
        for build_id, step_id in await queries.fetch_build_steps_in_state(
            conn, ids, StepState.RUNNABLE
        ):
            if step_id in waiting:
                waiting_counts[build_id] += 1
    return [
        build_summary_json(b, roots[i], step_counts(states[i]), waiting_counts[i])
        for i, b in zip(ids, builds, strict=True)
    ]


async def build_json(comps: Components, build_id: int, details: bool = False) -> dict[str, Any]:
    """A build with its counts and roots (``details``: its events, the steps waiting for
    capacity and the failed ones too). Its steps are counted by the database and only those
    listed are read: ``bigtent build`` polls this several times a second, and a build has
    thousands of steps."""
    known_id(build_id, "build")
    capacity_waiting = comps.scheduler.capacity_waiting()
    async with comps.engine.connect() as conn:
        build = await queries.fetch_build(conn, build_id)
        if build is None:
            raise NotFound(f"no build {build_id}")
        roots = await queries.fetch_roots_of_builds(conn, [build_id])
        states = (await queries.fetch_build_state_counts(conn, [build_id]))[build_id]
        listed: list[int] = []
        if capacity_waiting:
            runnable = await queries.fetch_build_steps_in_state(
                conn, [build_id], StepState.RUNNABLE
            )
            listed += [step for _, step in runnable if step in capacity_waiting]
        if details and states.get(StepState.FAILED):
            failed = await queries.fetch_build_steps_in_state(conn, [build_id], StepState.FAILED)
            listed += [step for _, step in failed]
        steps = sorted(
            await queries.fetch_steps_by_ids(conn, sorted(set(listed))) if listed else [],
            key=lambda s: int(s.id),
        )
        events = await queries.fetch_build_events(conn, build_id, EVENTS_SHOWN) if details else []
        hits = await cached_hits(conn, build_id) if details else {}
    waiting = waiting_for_capacity(comps, steps)
    out = build_summary_json(
        build,
        [root_json(r, r.step_state) for r in roots],
        step_counts(states),
        len(waiting),
    )
    if details:
        out["events"] = [build_event_json(e) for e in events]
        out["waiting_for_capacity"] = waiting[:WAITING_LISTED]
        out["failed_steps"] = [
            with_cached_hit(
                {
                    "id": s.id,
                    "drv_path": s.drv_path,
                    "state": s.state,
                    "outcome": s.outcome,
                    "error": s.error,
                    "log_tail": (
                        expired_text(comps.config.scheduler.log_retention_days)
                        if step_log_expired(s, comps)
                        else comps.logs.tail(s.id, LOG_TAIL_LINES)
                    ),
                },
                hits.get(s.id),
            )
            for s in steps
            if s.state == StepState.FAILED
        ]
    return out


EVENTS_SHOWN = 200
"""A build's newest events in ``GET /builds/{id}``."""


def build_event_json(row: Any) -> dict[str, Any]:
    """One entry of a build's history (``build_events``)."""
    return {
        "id": row.id,
        "at": iso(row.at),
        "kind": row.kind,
        "actor": row.actor,
        "detail": row.detail,
    }


WAITING_LISTED = 20
"""Steps waiting for capacity listed in ``GET /builds/{id}`` (the count has them all)."""


def waiting_for_capacity(comps: Components, steps: Sequence[Any]) -> list[dict[str, Any]]:
    """The build's runnable steps that no venue can take (``Scheduler.capacity_waiting``),
    longest waiting first."""
    waiting = comps.scheduler.capacity_waiting()
    if not waiting:
        return []
    found = [s for s in steps if s.id in waiting and s.state == StepState.RUNNABLE]
    found.sort(key=lambda s: (waiting[s.id], s.id))
    return [
        {
            "step_id": s.id,
            "drv_path": s.drv_path,
            "name": s.name,
            "system": s.system,
            "required_features": json.loads(s.required_features),
            "reason": comps.scheduler.waiting_reason(s.id),
            "since": iso(waiting[s.id]),
        }
        for s in found
    ]


def step_json(row: Any, comps: Components) -> dict[str, Any]:
    return {
        "log_expired": step_log_expired(row, comps),
        "id": row.id,
        "drv_path": row.drv_path,
        "name": row.name,
        "system": row.system,
        "required_features": json.loads(row.required_features),
        "state": row.state,
        "outcome": row.outcome,
        "error": row.error,
        "exit_code": row.exit_code,
        "attempts": row.attempts,
        "agent_name": row.agent_name,
        "trusted": bool(row.trusted),
        "created_at": iso(row.created_at),
        "assigned_at": iso(row.assigned_at),
        "started_at": iso(row.started_at),
        "finished_at": iso(row.finished_at),
        "outputs": json.loads(row.outputs),
        "waiting_reason": comps.scheduler.waiting_reason(row.id),
    }


def attempt_json(row: Any) -> dict[str, Any]:
    """One attempt record (a row of ``queries.fetch_build_attempts``/``fetch_step_attempts``)."""
    return {
        "id": row.id,
        "step_id": row.step_id,
        "drv_path": row.drv_path,
        "name": row.name,
        "attempt": row.attempt,
        "max_attempts": row.max_attempts,
        "agent_name": row.agent_name,
        "started_at": iso(row.started_at),
        "finished_at": iso(row.finished_at),
        "outcome": row.outcome,
        "error": row.error,
        "retry_at": iso(row.retry_at),
    }
