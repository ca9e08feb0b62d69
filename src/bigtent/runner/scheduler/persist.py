"""Writes decided transitions (``transitions``) in the caller's transaction: the rows of a
step whose attempt ended, its venue, its dependents, its attempt record and the builds that
end with it. Memory is changed by the caller only after the transaction commits."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from bigtent import protocol as p
from bigtent.runner.db import queries
from bigtent.runner.db.queries import DrvInfo
from bigtent.runner.scheduler.transitions import MAX_ERROR_CHARS, AttemptEnd, Cancellation
from bigtent.states import BuildEventKind, BuildState, StepState


async def attempt_end(
    conn: AsyncConnection, end: AttemptEnd, machine_id: str | None, max_attempts: int, now: float
) -> tuple[set[int], set[int]]:
    """Write an attempt's end: the venue's counters (the agent's row keeps its backoff in
    step with memory, so a reconnect cannot shed it: architecture §4), the step's row, its
    dependents, and the attempt's record. Returns the dependents made runnable and those
    failed: each only if still in the state memory has (another runner may be first)."""
    if end.venue is not None and machine_id is not None:
        await queries.record_agent_attempt(
            conn,
            machine_id,
            succeeded=end.venue.succeeded,
            failed=end.venue.failed,
            infra=end.venue.infra,
            consecutive_failures=end.venue.consecutive_failures,
            backoff_until=end.venue.backoff_until or None,
            last_error=end.venue.last_error or None,
        )
    await queries.update_step(conn, end.step_id, **end.row)
    promoted: set[int] = set()
    failed: set[int] = set()
    if end.state is StepState.SUCCEEDED:
        promoted = await queries.update_steps_in_state(
            conn, list(end.promote), [StepState.WAITING], state=StepState.RUNNABLE
        )
    elif end.state is StepState.FAILED:
        failed = await queries.update_steps_in_state(
            conn,
            list(end.fail),
            [StepState.WAITING, StepState.RUNNABLE],
            state=StepState.DEPENDENCY_FAILED,
            finished_at=now,
            error=end.dependency_error,
        )
    await attempt_record(
        conn,
        end.step_id,
        attempt=end.attempt,
        max_attempts=max_attempts,
        outcome=end.outcome,
        error=end.error,
        now=now,
        retry_at=end.retry_at,
        leased=end.leased,
    )
    return promoted, failed


async def attempt_record(
    conn: AsyncConnection,
    step_id: int,
    *,
    attempt: int,
    max_attempts: int,
    outcome: p.Outcome,
    error: str,
    now: float,
    retry_at: float | None,
    leased: bool,
) -> None:
    """Record an attempt that just ended, in the transaction of the step's new state: every
    attempt is visible (docs/api.md "Attempts")."""
    await queries.insert_step_attempt(
        conn,
        step_id,
        attempt=attempt,
        max_attempts=max_attempts,
        finished_at=now,
        outcome=outcome,
        error=error[:MAX_ERROR_CHARS] or None,
        retry_at=retry_at,
        leased=leased,
    )


async def build_endings(
    conn: AsyncConnection, endings: Mapping[int, BuildState], now: float
) -> set[int]:
    """Record the builds' ends; returns those that had not ended yet (another runner may
    have recorded one first)."""
    return {
        bid
        for bid, outcome in sorted(endings.items())
        if await queries.finish_build(conn, bid, outcome, finished_at=now)
    }


async def accepted(conn: AsyncConnection, step_ids: Sequence[int], now: float) -> None:
    """The venues started the steps they were assigned: one statement (an executemany for
    several; ``update_steps_each`` runs the same ``UPDATE`` by id as ``update_step``)."""
    await queries.update_steps_each(
        conn, [{"id": sid, "state": StepState.BUILDING, "started_at": now} for sid in step_ids]
    )


async def given_back(conn: AsyncConnection, step_id: int) -> None:
    """A refused step, or one whose ``assign`` could not be sent, is runnable again as if it
    had never been assigned (architecture §5)."""
    await queries.update_step(
        conn,
        step_id,
        state=StepState.RUNNABLE,
        lease_id=None,
        lease_expires_at=None,
        agent_machine_id=None,
    )


async def cancellation(
    conn: AsyncConnection, cancelled: Cancellation, max_attempts: int, now: float
) -> None:
    """Write a build's cancellation: the aborted attempts, the cancelled steps, the build."""
    for sid in cancelled.victims:
        attempt = cancelled.aborted.get(sid)
        if attempt is not None:
            await attempt_record(
                conn,
                sid,
                attempt=attempt,
                max_attempts=max_attempts,
                outcome=p.Outcome.ABORTED,
                error="cancelled",
                now=now,
                retry_at=None,
                leased=True,
            )
        await queries.update_step(
            conn,
            sid,
            state=StepState.CANCELLED,
            finished_at=now,
            lease_id=None,
            lease_expires_at=None,
        )
    await queries.finish_build(conn, cancelled.build_id, BuildState.CANCELLED, finished_at=now)


async def new_build(
    conn: AsyncConnection,
    priority: int,
    created_by: str,
    now: float,
    repository: str | None,
    ref: str | None,
    submission_key: str | None,
    trusted: bool,
) -> int:
    """A new build's row, queued; returns its id."""
    return await queries.insert_build(
        conn,
        state=BuildState.QUEUED,
        priority=priority,
        created_at=now,
        created_by=created_by,
        submission_key=submission_key,
        repository=repository,
        ref=ref,
        trusted=trusted,
    )


async def assignments(
    conn: AsyncConnection,
    leases: Sequence[tuple[int, str, str, str]],
    started: Sequence[int],
    expires: float,
    now: float,
) -> None:
    """Write a dispatch chunk's leases, each (step id, lease id, machine id, venue name),
    before their ``assign`` messages are sent; the builds in ``started`` run from now."""
    await queries.update_steps_each(
        conn,
        [
            {
                "id": sid,
                "state": StepState.ASSIGNED,
                "lease_id": lease,
                "lease_expires_at": expires,
                "agent_machine_id": machine_id,
                "agent_name": name,
                "assigned_at": now,
            }
            for sid, lease, machine_id, name in leases
        ],
    )
    await queries.start_builds(conn, list(started))


async def agents_disconnected(conn: AsyncConnection) -> None:
    """At a fresh start no agent is connected yet."""
    await queries.mark_all_agents_disconnected(conn)


async def build_event(
    conn: AsyncConnection,
    build_id: int,
    *,
    at: float,
    kind: BuildEventKind,
    actor: str,
    detail: str | None = None,
) -> None:
    """Record an event of a build (who cancelled, bumped or restarted it, and when)."""
    await queries.insert_build_event(conn, build_id, at=at, kind=kind, actor=actor, detail=detail)


async def build_roots(
    conn: AsyncConnection, build_id: int, roots: Mapping[str, int | None]
) -> None:
    """A build's roots (.drv path -> step id, None: cached): from now on it ends when they do."""
    await queries.insert_build_roots(conn, build_id, roots)


async def build_deleted(conn: AsyncConnection, build_id: int) -> None:
    """A build whose plan failed part way is deleted (its steps stay)."""
    await queries.delete_build(conn, build_id)


async def bumped(conn: AsyncConnection, build_id: int, priority: int) -> None:
    """A build's new priority."""
    await queries.update_build(conn, build_id, priority=priority)


async def claim(conn: AsyncConnection, step_ids: Sequence[int]) -> set[int]:
    """Of these runnable steps, those no other runner holds, locked for this transaction."""
    return await queries.claim_runnable_steps(conn, step_ids)


async def renewals(conn: AsyncConnection, leases: Sequence[tuple[int, str, float]]) -> None:
    """Lease renewals (step id, lease id, expires at) stored for the other runners."""
    await queries.renew_leases(conn, leases)


async def settled(conn: AsyncConnection, step_id: int, state: StepState, **values: Any) -> bool:
    """A waiting step whose dependencies are done: runnable or dependency-failed, only if
    still waiting (another runner may be first)."""
    return bool(
        await queries.update_steps_in_state(
            conn, [step_id], [StepState.WAITING], state=state, **values
        )
    )


async def cached_failure_hit(
    conn: AsyncConnection, build_id: int, row: Any, ttl: float, now: float
) -> None:
    """A build met the cached failure of the step ``row``: recorded for the build, while
    the step's row stays the attempt that ran."""
    await queries.insert_cached_failure_hit(
        conn,
        build_id,
        int(row.id),
        hit_at=now,
        failed_at=float(row.failed_at),
        failed_outcome=str(row.outcome),
        cached_until=float(row.failed_at) + ttl,
    )


async def steps_queued_again(conn: AsyncConnection, rows: Sequence[Mapping[str, Any]]) -> None:
    """Finished steps queued again in place (each row: the step's ``id`` and its values)."""
    await queries.update_steps_each(conn, rows)


async def new_steps(
    conn: AsyncConnection, drvs: Sequence[DrvInfo], trusted: bool, values: Mapping[str, Any]
) -> dict[str, int]:
    """New steps of one trust for these derivations; returns each one's id by .drv path (a
    derivation missing from it got its step from another runner first)."""
    return await queries.insert_steps(
        conn, [{"drv_path": d.drv_path, "trusted": trusted, **values} for d in drvs]
    )


async def admitted(
    conn: AsyncConnection,
    build_id: int | None,
    members: Sequence[int],
    pairs: Sequence[tuple[int, int]],
    failed: Sequence[Mapping[str, Any]],
    runnable: Sequence[int],
) -> None:
    """The rest of an admission: the edges (step, dependency), the build's membership rows
    (``build_id`` None: they exist), the steps failed at once for a failed dependency and
    those runnable at once."""
    await queries.insert_step_deps(conn, pairs)
    if build_id is not None:
        await queries.insert_build_steps(conn, build_id, members)
    await queries.update_steps_each(conn, failed)
    await queries.update_steps(conn, list(runnable), state=StepState.RUNNABLE)


async def restarted(
    conn: AsyncConnection, build_id: int, failed: Sequence[int], *, reopen: bool
) -> None:
    """A restart clears its failed steps' cached failures; ``reopen``: the build had ended
    and is queued again."""
    await queries.update_steps(conn, list(failed), failed_at=None)
    if reopen:
        await queries.update_build(conn, build_id, state=BuildState.QUEUED, finished_at=None)
