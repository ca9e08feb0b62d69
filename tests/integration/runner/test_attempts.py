"""Attempt records (docs/api.md "Attempts") written by the scheduler service against a real
database (SQLite, or PostgreSQL in that pass), with fake venues and a fake clock: every ended
attempt has a row, written with the step's new state, naming its venue, times, outcome,
reason and next try."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from bigtent import protocol as p
from bigtent.runner.db import queries
from bigtent.states import StepState
from tests.integration.runner.test_dispatcher import CONFIG, T0, Farm, drv


@pytest.fixture
def farm(engine: AsyncEngine, tmp_path: Path) -> Farm:
    return Farm(engine, tmp_path, CONFIG)


async def step_attempts(farm: Farm, step_id: int) -> list[Any]:
    async with farm.engine.connect() as conn:
        return await queries.fetch_step_attempts(conn, step_id, 100)


async def build_attempts(
    farm: Farm, build_id: int, *, after: int = 0, limit: int = 100
) -> list[Any]:
    async with farm.engine.connect() as conn:
        return await queries.fetch_build_attempts(
            conn, build_id, after=after, since=T0, limit=limit
        )


def summary(row: Any) -> tuple[Any, ...]:
    return (
        row.attempt,
        row.max_attempts,
        row.agent_name,
        row.started_at,
        row.finished_at,
        row.outcome,
        row.error,
        row.retry_at,
    )


async def test_each_infrastructure_failure_is_recorded_up_to_the_last(farm: Farm) -> None:
    """A prepare failure, an expired lease, then a prepare failure again on the last allowed
    attempt: three rows with their venue, times, reason and next try; the last is final."""
    x = drv("x")
    build = await farm.add([x], roots=[x])
    sx = farm.sid(x)
    agent = farm.agent("m1")

    await farm.tick(T0)
    [a] = agent.take_assigns()
    farm.clock.now = T0 + 3
    assert await farm.report(agent, a, p.Outcome.PREPARE_FAILURE, "error: no nixbld\nmore")
    retry1 = T0 + 3 + CONFIG.retry_base_secs

    await farm.tick(retry1)
    [b] = agent.take_assigns()
    await farm.sched.accepted(agent.venue, p.Accepted(step_id=b.step_id, lease_id=b.lease_id))
    expired_at = retry1 + CONFIG.lease_secs
    await farm.tick(expired_at)
    retry2 = expired_at + CONFIG.retry_base_secs * 2

    await farm.tick(retry2)
    [c] = agent.take_assigns()
    farm.clock.now = retry2 + 1
    assert await farm.report(agent, c, p.Outcome.PREPARE_FAILURE, "error: still no nixbld")

    rows = await step_attempts(farm, sx)
    lost = "lease expired: the agent stopped reporting it"
    assert [summary(r) for r in rows] == [
        (1, 3, "agent-m1", T0, T0 + 3, "prepare_failure", "error: no nixbld\nmore", retry1),
        (2, 3, "agent-m1", retry1, expired_at, "agent_lost", lost, retry2),
        (3, 3, "agent-m1", retry2, retry2 + 1, "prepare_failure", "error: still no nixbld", None),
    ]
    assert all(r.step_id == sx and r.drv_path == x.drv_path and r.name == "x" for r in rows)
    # The step's log tells each failed attempt's end, with the first line of its reason.
    log = farm.sched.logs.read(sx).decode()
    assert "[bigtent: attempt 1 on agent-m1: prepare_failure: error: no nixbld]\n" in log
    assert f"[bigtent: attempt 2 on agent-m1: agent_lost: {lost}]\n" in log
    assert log.endswith(
        "[bigtent: attempt 3 on agent-m1: prepare_failure: error: still no nixbld]\n"
    )
    # The step failed with the last reason; the build's attempts are the same rows, by id,
    # paged with ``after``.
    assert await farm.state(x) is StepState.FAILED
    assert [r.id for r in await build_attempts(farm, build)] == [r.id for r in rows]
    page = await build_attempts(farm, build, after=rows[0].id, limit=1)
    assert [r.id for r in page] == [rows[1].id]


@pytest.mark.parametrize(
    ("outcome", "retry_after"),
    [
        (p.Outcome.SUCCESS, None),
        (p.Outcome.BUILD_FAILURE, None),
        (p.Outcome.ABORTED, 0.0),
        (p.Outcome.UPLOAD_FAILURE, CONFIG.retry_base_secs),
    ],
)
async def test_every_outcome_leaves_one_record(
    farm: Farm, outcome: p.Outcome, retry_after: float | None
) -> None:
    x = drv("x")
    await farm.add([x], roots=[x])
    sx = farm.sid(x)
    agent = farm.agent("m1")
    await farm.tick()
    [a] = agent.take_assigns()
    farm.clock.now += 5
    farm.uploaded.update(a.outputs.values())
    assert await farm.report(agent, a, outcome, "why")
    [row] = await step_attempts(farm, sx)
    assert (row.attempt, row.outcome, row.agent_name) == (1, outcome, "agent-m1")
    assert row.error == "why"
    expected = None if retry_after is None else farm.clock.now + retry_after
    assert row.retry_at == expected
    # A late duplicate of the result records nothing more.
    assert not await farm.report(agent, a, outcome, "again")
    assert len(await step_attempts(farm, sx)) == 1


async def test_cancelling_a_running_step_records_its_attempt(farm: Farm) -> None:
    x = drv("x")
    build = await farm.add([x], roots=[x])
    sx = farm.sid(x)
    agent = farm.agent("m1")
    await farm.tick()
    [_] = agent.take_assigns()
    farm.clock.now += 7
    assert await farm.sched.cancel_build(build)
    [row] = await step_attempts(farm, sx)
    assert (row.outcome, row.error, row.retry_at, row.agent_name) == (
        "aborted",
        "cancelled",
        None,
        "agent-m1",
    )
    assert (row.started_at, row.finished_at) == (T0, T0 + 7)


async def test_attempts_before_a_build_was_created_are_not_its_own(farm: Farm) -> None:
    """A build that joins a step retrying for an older build sees only the attempts made
    since it was created."""
    x = drv("x")
    older = await farm.add([x], roots=[x])
    agent = farm.agent("m1")
    await farm.tick()
    [a] = agent.take_assigns()
    farm.clock.now = T0 + 1
    assert await farm.report(agent, a, p.Outcome.PREPARE_FAILURE, "first")
    farm.clock.now = T0 + 2
    newer = await farm.add([x], roots=[x])
    async with farm.engine.connect() as conn:
        mine = await queries.fetch_build_attempts(conn, newer, after=0, since=T0 + 2, limit=10)
        theirs = await queries.fetch_build_attempts(conn, older, after=0, since=T0, limit=10)
    assert mine == [] and [r.error for r in theirs] == ["first"]
