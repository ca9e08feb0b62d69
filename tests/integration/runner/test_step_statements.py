"""The statement census of one step against the real database (SQLite, or PostgreSQL in that
pass): what the runner writes when a step is accepted and when it succeeds, one statement a
fact, and nothing it reads back that memory knows (``bench/dag.py`` with
``BENCH_SQL_CENSUS`` counts the same over a whole DAG)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from bigtent import protocol as p
from bigtent.errors import Unavailable
from bigtent.runner.scheduler.recovery import RecoveryFailure
from bigtent.states import StepState
from tests.integration.runner.conftest import statements
from tests.integration.runner.test_dispatcher import CONFIG, Farm, drv


@pytest.fixture
def farm(engine: AsyncEngine, tmp_path: Path) -> Farm:
    return Farm(engine, tmp_path, CONFIG)


def _writes(seen: list[str]) -> list[str]:
    """The statements that write, by verb and table (reads are counted apart: a
    several-runner database locks the rows it checks with one)."""
    return [" ".join(s.split()[:3]) for s in seen if not s.lstrip().upper().startswith("SELECT")]


def _reads(seen: list[str]) -> int:
    return sum(1 for s in seen if s.lstrip().upper().startswith("SELECT"))


async def test_a_step_is_accepted_and_ended_in_a_handful_of_statements(farm: Farm) -> None:
    x = drv("x")
    y = drv("y", x)
    await farm.add([x, y], roots=[y])
    agent = farm.agent("m1")
    await farm.tick()
    [a] = agent.take_assigns()

    with statements(farm.engine) as accepting:
        await farm.sched.accepted(agent.venue, p.Accepted(step_id=a.step_id, lease_id=a.lease_id))
    with statements(farm.engine) as ending:
        assert await farm.succeed(agent, a)

    assert _writes(accepting) == ["UPDATE steps SET"]
    assert _writes(ending) == [
        "UPDATE agents SET",  # the venue's counters and backoff
        "UPDATE steps SET",  # the step's end
        "UPDATE steps SET",  # its dependent made runnable
        "INSERT INTO step_attempts",  # the attempt's record
    ]
    assert _reads(accepting) <= 1 and _reads(ending) <= 1


async def test_accepts_waiting_for_the_lock_are_written_in_one_statement(farm: Farm) -> None:
    x, y, z = drv("x"), drv("y"), drv("z")
    await farm.add([x, y, z], roots=[x, y, z])
    agent = farm.agent("m1", max_jobs=3)
    await farm.tick()
    assigns = agent.take_assigns()
    assert len(assigns) == 3
    stale = p.Accepted(step_id=assigns[2].step_id, lease_id=p.LeaseId("not-its-lease"))

    sched = farm.sched
    with statements(farm.engine) as accepting:
        async with sched._lock:  # another transition holds it while the messages arrive
            pending = [
                asyncio.create_task(
                    sched.accepted(agent.venue, p.Accepted(step_id=a.step_id, lease_id=a.lease_id))
                )
                for a in assigns[:2]
            ]
            pending.append(asyncio.create_task(sched.accepted(agent.venue, stale)))
            await asyncio.sleep(0)  # one yield: each task queues its message, then waits
            assert len(sched._accepts) == 3
        await asyncio.gather(*pending)

    assert _writes(accepting) == ["UPDATE steps SET"]  # both steps, one executemany
    assert _reads(accepting) <= 1
    for a in assigns[:2]:
        assert sched.nodes[a.step_id].state is StepState.BUILDING
        assert await farm.state(a.step_id) is StepState.BUILDING
        assert (await farm.step(a.step_id)).started_at == farm.clock.now
    assert sched.nodes[assigns[2].step_id].state is StepState.ASSIGNED
    assert await farm.state(assigns[2].step_id) is StepState.ASSIGNED


async def test_a_group_that_cannot_be_written_leaves_each_message_to_its_own_handler(
    farm: Farm,
) -> None:
    x, y = drv("x"), drv("y")
    await farm.add([x, y], roots=[x, y])
    agent = farm.agent("m1", max_jobs=2)
    await farm.tick()
    assigns = agent.take_assigns()
    sched = farm.sched
    async with sched._lock:
        pending = [
            asyncio.create_task(
                sched.accepted(agent.venue, p.Accepted(step_id=a.step_id, lease_id=a.lease_id))
            )
            for a in assigns
        ]
        await asyncio.sleep(0)  # one yield: each task queues its message, then waits
        assert len(sched._accepts) == 2
        # The scheduler is reloading its state: no transition runs.
        sched.recovery = RecoveryFailure(since=0.0, failures=1, error="down", retry_at=1.0)
    results = await asyncio.gather(*pending, return_exceptions=True)
    assert [type(r) for r in results] == [Unavailable, Unavailable]  # each told, as before
    assert sched._accepts == []
    assert [await farm.state(a.step_id) for a in assigns] == [StepState.ASSIGNED] * 2
