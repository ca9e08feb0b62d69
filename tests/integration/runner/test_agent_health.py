"""Unhealthy venues in the scheduler (fake clock, real database): after
``unhealthy_after_failures`` consecutive infrastructure failures a venue gets nothing during
its backoff, then one step at a time; a success makes it healthy again with all its slots. The
last error is stored with the agent's row and restored when it registers again."""

from __future__ import annotations

from collections.abc import Callable

from bigtent import protocol as p
from bigtent.runner.venues.sessions import restore_backoff
from tests.integration.runner.test_dispatcher import (
    Farm,
    agent_row,
    drv,
    make_farm,
    record_agent,
)

__all__ = ["make_farm"]  # the fixture


async def test_unhealthy_agent_is_half_open_until_a_success(make_farm: Callable[..., Farm]) -> None:
    farm = make_farm(unhealthy_after_failures=2, max_infra_attempts=100, retry_base_secs=0.0)
    await record_agent(farm, "m1")
    steps = [drv(f"h{i}") for i in range(6)]
    await farm.add(steps, roots=steps)
    agent = farm.agent("m1", max_jobs=3)

    await farm.tick()
    first = agent.take_assigns()
    assert len(first) == 3  # healthy: every slot
    for i, a in enumerate(first[:2]):
        assert await farm.report(agent, a, p.Outcome.PREPARE_FAILURE, error=f"error: broken {i}")
    assert agent.venue.consecutive_failures == 2
    row = await agent_row(farm, "m1")
    assert (row.consecutive_failures, row.health_last_error) == (2, "error: broken 1")

    # Unhealthy: nothing during the backoff, even with a free slot...
    until = agent.venue.backoff_until
    await farm.tick(until - 0.01)
    assert agent.take_assigns() == []
    # ...then one step at a time (one is still running from before: nothing more yet).
    await farm.tick(until)
    assert agent.take_assigns() == []
    assert await farm.succeed(agent, first[2])  # a success makes it healthy again
    assert agent.venue.consecutive_failures == 0
    await farm.tick(until)
    assert len(agent.take_assigns()) == 3


async def test_unhealthy_agent_gets_one_step_after_its_backoff(
    make_farm: Callable[..., Farm],
) -> None:
    farm = make_farm(unhealthy_after_failures=1, max_infra_attempts=100, retry_base_secs=0.0)
    await record_agent(farm, "m1")
    steps = [drv(f"o{i}") for i in range(4)]
    await farm.add(steps, roots=steps)
    agent = farm.agent("m1", max_jobs=2)
    await farm.tick()
    a, b = agent.take_assigns()
    assert await farm.report(agent, a, p.Outcome.UPLOAD_FAILURE, error="error: upload refused")
    assert await farm.report(agent, b, p.Outcome.UPLOAD_FAILURE, error="error: upload refused")
    await farm.tick(agent.venue.backoff_until)
    [probe] = agent.take_assigns()  # half-open: one step though two slots are free
    assert await farm.report(agent, probe, p.Outcome.PREPARE_FAILURE, error="error: again")
    assert agent.venue.consecutive_failures == 3

    # Registering again keeps the count and the last error (from the agent's row).
    farm.sched.detach(agent.venue)
    await record_agent(farm, "m1")
    back = farm.agent("m1", max_jobs=2)
    restore_backoff(back.venue, await agent_row(farm, "m1"))
    assert (back.venue.consecutive_failures, back.venue.last_error) == (3, "error: again")
    await farm.tick(back.venue.backoff_until)
    [again] = back.take_assigns()
    assert await farm.succeed(back, again)
    await farm.tick(back.venue.backoff_until)
    assert len(back.take_assigns()) == 2
