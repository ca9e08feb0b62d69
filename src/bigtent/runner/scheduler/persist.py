"""Writes decided transitions (``transitions``) in the caller's transaction: the rows of a
step whose attempt ended, its venue, its dependents, its attempt record and the builds that
end with it. Memory is changed by the caller only after the transaction commits."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sqlalchemy.ext.asyncio import AsyncConnection

from bigtent import protocol as p
from bigtent.runner.db import queries
from bigtent.runner.scheduler.transitions import MAX_ERROR_CHARS, AttemptEnd, Cancellation
from bigtent.states import BuildState, StepState


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


async def accepted(conn: AsyncConnection, step_id: int, now: float) -> None:
    """The venue started the step it was assigned."""
    await queries.update_step(conn, step_id, state=StepState.BUILDING, started_at=now)


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
