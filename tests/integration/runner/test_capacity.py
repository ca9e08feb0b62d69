"""Waiting for capacity in the scheduler, against a real database, with fake venues and a
fake clock: the state appears, clears when a venue that can take the step connects, and after
``scheduler.capacity_grace_secs`` the step fails as ``unsupported`` (its dependents with it)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from bigtent import protocol as p
from bigtent.runner.scheduler.matching import VenueView
from bigtent.runner.scheduler.model import Venue
from bigtent.states import StepState
from tests.integration.runner.test_dispatcher import CONFIG, T0, Farm, drv

ARM = "aarch64-linux"
GRACE = 100.0


@pytest.fixture
def make_farm(engine: AsyncEngine, tmp_path: Path) -> Callable[..., Farm]:
    def make(**overrides: Any) -> Farm:
        return Farm(engine, tmp_path, CONFIG.model_copy(update=overrides))

    return make


def arm_venue(machine_id: str) -> Venue:
    return Venue(
        machine_id=machine_id,
        name=f"agent-{machine_id}",
        systems=frozenset({ARM}),
        supported_features=frozenset(),
        mandatory_features=frozenset(),
        max_jobs=1,
        speed_factor=1.0,
        send=lambda _msg: None,
    )


async def test_a_step_no_venue_offers_waits_then_fails_unsupported(
    make_farm: Callable[..., Farm],
) -> None:
    farm = make_farm(capacity_grace_secs=GRACE)
    arm = drv("arm", system=ARM)
    top = drv("top", arm)
    other = drv("other")
    build = await farm.add([arm, top, other], roots=[top, other])
    agent = farm.agent("x1")  # x86_64 only

    await farm.tick()
    sched = farm.sched
    assert sched.capacity_waiting() == {farm.sid(arm): T0}
    assert sched.waiting_reason(farm.sid(arm)) == (
        "waiting for capacity: no agent offers aarch64-linux"
    )
    assert sched.waiting_reason(farm.sid(other)) is None  # an x86_64 agent takes it
    [a] = agent.take_assigns()
    assert await farm.succeed(agent, a)
    # With nothing else to wait for, the loop wakes when the grace ends.
    assert await farm.tick() == T0 + GRACE

    # Before the grace ends nothing fails; at the grace the step fails as unsupported.
    await farm.tick(T0 + GRACE - 1)
    assert await farm.state(arm) is StepState.RUNNABLE
    assert await farm.tick(T0 + GRACE) is None
    row = await farm.step(arm)
    assert (row.state, row.outcome) == (StepState.FAILED, p.Outcome.UNSUPPORTED)
    assert row.error == (
        "waiting for capacity: no agent offers aarch64-linux; gave up after 1 min 40 s"
    )
    assert row.failed_at is not None
    assert await farm.state(top) is StepState.DEPENDENCY_FAILED
    assert await farm.build_state(build) == "failed"
    assert sched.capacity_waiting() == {}


async def test_a_venue_that_can_take_it_clears_the_wait(make_farm: Callable[..., Farm]) -> None:
    farm = make_farm(capacity_grace_secs=GRACE)
    arm = drv("arm", system=ARM)
    await farm.add([arm], roots=[arm])
    await farm.tick()
    assert farm.sid(arm) in farm.sched.capacity_waiting()

    sent: list[object] = []
    venue = arm_venue("a1")
    venue.send = sent.append
    farm.sched.attach(venue, [])
    await farm.tick(T0 + 10)
    assert farm.sched.capacity_waiting() == {}
    assert [type(m) for m in sent] == [p.Assign]

    # It leaves again before the step is done: the step is given back and waits anew, from
    # then on, and the grace counts from then.
    farm.sched.detach(venue)
    await farm.sched.release_unaccepted(venue)
    await farm.tick(T0 + 20)
    assert farm.sched.capacity_waiting() == {farm.sid(arm): T0 + 20}
    await farm.tick(T0 + GRACE + 10)
    assert await farm.state(arm) is StepState.RUNNABLE


async def test_a_draining_venue_is_no_capacity(make_farm: Callable[..., Farm]) -> None:
    farm = make_farm(capacity_grace_secs=GRACE)
    x = drv("x")
    await farm.add([x], roots=[x])
    busy = farm.agent("x1")
    await farm.tick()
    assert farm.sched.capacity_waiting() == {}
    # x runs; a second step for x86_64 waits for a slot, not for capacity.
    y = drv("y")
    await farm.add([y], roots=[y])
    await farm.tick(T0 + 1)
    assert farm.sched.capacity_waiting() == {}
    assert farm.sched.drain(busy.venue.machine_id)
    await farm.tick(T0 + 2)
    assert farm.sched.capacity_waiting() == {farm.sid(y): T0 + 2}


async def test_a_pool_that_could_launch_one_is_capacity(make_farm: Callable[..., Farm]) -> None:
    farm = make_farm(capacity_grace_secs=GRACE)
    arm = drv("arm", system=ARM)
    await farm.add([arm], roots=[arm])
    pool = VenueView("pool", frozenset({ARM}), frozenset(), frozenset(), 1, 0)
    farm.sched.add_launchable(lambda: [pool])
    await farm.tick()
    assert farm.sched.capacity_waiting() == {}
    assert await farm.tick(T0 + 2 * GRACE) is None
    assert await farm.state(arm) is StepState.RUNNABLE


async def test_an_unsupported_failure_is_not_cached(make_farm: Callable[..., Farm]) -> None:
    farm = make_farm(capacity_grace_secs=0.0)
    arm = drv("arm", system=ARM)
    first = await farm.add([arm], roots=[arm])
    await farm.tick()
    assert await farm.build_state(first) == "failed"
    # Capacity arrived: a new build of the same derivation builds it.
    sent: list[object] = []
    venue = arm_venue("a1")
    venue.send = sent.append
    farm.sched.attach(venue, [])
    second = await farm.add([arm], roots=[arm])
    await farm.tick(T0 + 1)
    assert await farm.state(farm.sid(arm)) is StepState.ASSIGNED
    assert [type(m) for m in sent] == [p.Assign]
    assert await farm.build_state(second) == "running"


async def test_an_agent_cannot_report_unsupported(make_farm: Callable[..., Farm]) -> None:
    """Only the runner decides that no venue can take a step: an agent's ``unsupported`` is
    an infrastructure failure like any other it cannot explain."""
    farm = make_farm()
    x = drv("x")
    await farm.add([x], roots=[x])
    agent = farm.agent("m1")
    await farm.tick()
    [a] = agent.take_assigns()
    assert await farm.report(agent, a, p.Outcome.UNSUPPORTED, "no")
    row = await farm.step(x)
    assert (row.state, row.outcome, row.attempts) == (
        StepState.RUNNABLE,
        p.Outcome.PREPARE_FAILURE,
        1,
    )
    assert row.error == "agent said unsupported: no"


async def test_new_runnable_steps_are_looked_at_at_most_once_a_second(
    make_farm: Callable[..., Farm],
) -> None:
    farm = make_farm(capacity_grace_secs=GRACE)
    x = drv("x")
    await farm.add([x], roots=[x])
    await farm.tick()  # looked: x waits (no agent at all)
    assert farm.sched.capacity_waiting() == {farm.sid(x): T0}
    arm = drv("arm", system=ARM)
    await farm.add([arm], roots=[arm])
    # Only the queue changed, within a second of the last look: the next look is due then.
    assert await farm.tick(T0 + 0.5) == T0 + 1.0
    assert farm.sid(arm) not in farm.sched.capacity_waiting()
    assert await farm.tick(T0 + 1.0) == T0 + GRACE
    assert farm.sched.capacity_waiting() == {farm.sid(x): T0, farm.sid(arm): T0 + 1.0}
    # A venue change is looked at at once.
    farm.agent("x1")
    await farm.tick(T0 + 1.2)
    assert farm.sched.capacity_waiting() == {farm.sid(arm): T0 + 1.0}
