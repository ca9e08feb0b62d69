"""The scheduler service against a real database (SQLite, or PostgreSQL in that pass), with
fake venues and a fake clock.

The loop is driven one ``tick(now)`` at a time, so no test waits on real time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncEngine

from bigtent import protocol as p
from bigtent.config import SchedulerSection
from bigtent.errors import NotFound
from bigtent.runner.db import queries
from bigtent.runner.logs.store import LogStore
from bigtent.runner.scheduler import dispatch
from bigtent.runner.scheduler.model import PlannedStep, PlanPart, SessionClosed, Venue
from bigtent.runner.scheduler.service import Scheduler
from bigtent.runner.scheduler.steps import plan_heights
from bigtent.states import StepState
from tests.conftest import eventually

X86 = "x86_64-linux"
T0 = 1_700_000_000.0
CONFIG = SchedulerSection(
    lease_secs=60.0,
    max_infra_attempts=3,
    retry_base_secs=10.0,
    retry_max_secs=100.0,
    agent_backoff_base_secs=1.0,
    agent_backoff_max_secs=8.0,
    refuse_cooldown_secs=2.0,
)


# ---- harness -------------------------------------------------------------------------------
def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def drv(
    name: str, *deps: queries.DrvInfo, features: Sequence[str] = (), system: str = X86
) -> queries.DrvInfo:
    return queries.DrvInfo(
        drv_path=f"/nix/store/{_hash(name + '.drv')}-{name}.drv",
        name=name,
        system=system,
        required_features=frozenset(features),
        outputs={"out": f"/nix/store/{_hash(name)}-{name}"},
        input_drvs={d.drv_path: ("out",) for d in deps},
        input_srcs=(),
    )


@dataclass
class Clock:
    now: float = T0

    def __call__(self) -> float:
        return self.now


@dataclass
class Agent:
    """A fake venue: every message the scheduler sends lands in ``outbox``."""

    venue: Venue
    outbox: list[BaseModel] = field(default_factory=list)
    kept: list[p.StepId] = field(default_factory=list)
    """What ``attach`` returned: the reported running steps whose leases it keeps."""

    def assigns(self) -> list[p.Assign]:
        return [m for m in self.outbox if isinstance(m, p.Assign)]

    def aborts(self) -> list[int]:
        return [m.step_id for m in self.outbox if isinstance(m, p.Abort)]

    def take_assigns(self) -> list[p.Assign]:
        """The assigns sent since the last call."""
        got = self.assigns()
        self.outbox[:] = [m for m in self.outbox if not isinstance(m, p.Assign)]
        return got


class Farm:
    """One database, a scheduler over it, a fake clock, a fake cache and fake agents."""

    def __init__(self, engine: AsyncEngine, tmp_path: Path, config: SchedulerSection) -> None:
        self.engine = engine
        self.tmp_path = tmp_path
        self.config = config
        self.clock = Clock()
        self.uploaded: set[str] = set()
        self.sched = self.new_scheduler()

    def new_scheduler(self) -> Scheduler:
        async def present(paths: Sequence[str]) -> set[str]:
            return set(paths) & self.uploaded

        return Scheduler(
            self.engine,
            self.config,
            LogStore(self.tmp_path / "logs", 1 << 20),
            present,
            clock=self.clock,
            rand=lambda: 0.0,
        )

    async def add(
        self,
        planned: Sequence[queries.DrvInfo],
        roots: Sequence[queries.DrvInfo],
        *,
        priority: int = 0,
        cached_roots: Sequence[queries.DrvInfo] = (),
    ) -> int:
        """Create a build; ``planned`` is dependencies first, each depending on the inputs
        that are planned too."""
        async with self.engine.begin() as conn:
            for d in [*planned, *cached_roots]:
                await queries.insert_derivation(conn, d)
        paths = {d.drv_path for d in planned}
        steps = [PlannedStep(d, tuple(i for i in d.input_drvs if i in paths)) for d in planned]
        root_map: dict[str, str | None] = {d.drv_path: d.drv_path for d in roots}
        root_map.update({d.drv_path: None for d in cached_roots})
        return await self.sched.add_build(
            priority=priority, created_by="test", roots=root_map, planned=steps
        )

    def agent(
        self,
        machine_id: str,
        *,
        supported: Sequence[str] = (),
        mandatory: Sequence[str] = (),
        max_jobs: int = 1,
        speed: float = 1.0,
        running: Sequence[p.RunningStep] = (),
        send: Callable[[BaseModel], None] | None = None,
    ) -> Agent:
        outbox: list[BaseModel] = []
        venue = Venue(
            machine_id=machine_id,
            name=f"agent-{machine_id}",
            systems=frozenset({X86}),
            supported_features=frozenset(supported),
            mandatory_features=frozenset(mandatory),
            max_jobs=max_jobs,
            speed_factor=speed,
            send=send or outbox.append,
        )
        return Agent(venue, outbox, self.sched.attach(venue, running))

    async def tick(self, at: float | None = None) -> float | None:
        if at is not None:
            self.clock.now = at
        return await self.sched.tick(self.clock.now)

    def sid(self, d: queries.DrvInfo) -> int:
        return self.sched.by_drv[d.drv_path]

    async def succeed(self, agent: Agent, a: p.Assign) -> bool:
        await self.sched.accepted(agent.venue, p.Accepted(step_id=a.step_id, lease_id=a.lease_id))
        self.uploaded.update(a.outputs.values())
        return await self.report(agent, a, p.Outcome.SUCCESS)

    async def report(self, agent: Agent, a: p.Assign, outcome: p.Outcome, error: str = "") -> bool:
        msg = p.Result(step_id=a.step_id, lease_id=a.lease_id, outcome=outcome, error=error)
        return await self.sched.result(agent.venue, msg)

    async def step(self, d: queries.DrvInfo | int) -> Any:
        sid = d if isinstance(d, int) else None
        async with self.engine.connect() as conn:
            if sid is None:
                assert isinstance(d, queries.DrvInfo)
                row = (await queries.fetch_steps_by_drv(conn, [d.drv_path]))[d.drv_path]
                sid = int(row.id)
            return await queries.fetch_step(conn, sid)

    async def state(self, d: queries.DrvInfo | int) -> StepState:
        return StepState((await self.step(d)).state)

    async def build_state(self, build_id: int) -> str:
        async with self.engine.connect() as conn:
            row = await queries.fetch_build(conn, build_id)
        assert row is not None
        return str(row.state)

    def runnable(self, sched: Scheduler | None = None) -> set[int]:
        """Steps in the runnable index or waiting out a retry delay."""
        s = sched or self.sched
        return {sid for sid in s.nodes if sid in s.index} | {
            sid for _, sid in s.delayed if s.nodes[sid].state is StepState.RUNNABLE
        }


@pytest.fixture
def make_farm(engine: AsyncEngine, tmp_path: Path) -> Callable[..., Farm]:
    def make(**overrides: Any) -> Farm:
        return Farm(engine, tmp_path, CONFIG.model_copy(update=overrides))

    return make


@pytest.fixture
def farm(make_farm: Callable[..., Farm]) -> Farm:
    return make_farm()


def by_drv(assigns: Sequence[p.Assign]) -> dict[str, p.Assign]:
    return {a.drv_path: a for a in assigns}


# ---- the DAG -------------------------------------------------------------------------------
async def test_dag_dispatches_in_dependency_order_and_build_succeeds(farm: Farm) -> None:
    lib = drv("lib")
    a, b = drv("a", lib), drv("b", lib)
    app = drv("app", a, b)
    build = await farm.add([lib, a, b, app], roots=[app])
    assert [farm.sched.nodes[farm.sid(d)].height for d in (lib, a, b, app)] == [3, 2, 2, 1]
    agent = farm.agent("m1", max_jobs=4)

    levels: list[set[str]] = []
    while assigns := (await farm.tick(), agent.take_assigns())[1]:
        levels.append({x.drv_path for x in assigns})
        for x in assigns:
            assert await farm.succeed(agent, x)

    assert levels == [{lib.drv_path}, {a.drv_path, b.drv_path}, {app.drv_path}]
    assert await farm.build_state(build) == "succeeded"
    assert {await farm.state(d) for d in (lib, a, b, app)} == {StepState.SUCCEEDED}
    # Finished work leaves memory; nothing waits for a deadline.
    assert farm.sched.nodes == {} and farm.sched.builds == {}
    assert await farm.tick() is None


async def test_assign_message_carries_lease_outputs_and_limits(farm: Farm) -> None:
    x = drv("x")
    await farm.add([x], roots=[x])
    agent = farm.agent("m1")
    deadline = await farm.tick()
    [a] = agent.assigns()
    assert a.step_id == farm.sid(x) and a.drv_path == x.drv_path
    assert a.outputs == dict(x.outputs)
    assert a.upload_urls == {"out": f"/api/v1/agent/upload/{a.lease_id}/out"}
    assert (a.timeout_secs, a.max_silent_secs) == (CONFIG.step_timeout_secs, CONFIG.max_silent_secs)
    assert deadline == T0 + CONFIG.lease_secs  # the lease expiry is the next deadline
    row = await farm.step(x)
    assert (row.state, row.lease_id, row.agent_machine_id) == ("assigned", a.lease_id, "m1")
    assert farm.sched.lease_holder(a.lease_id) is farm.sched.nodes[a.step_id]


async def test_assign_carries_the_recorded_text_and_the_resolved_inputs(farm: Farm) -> None:
    """A derivation recorded with its text goes to the agent with it and its input paths (the
    outputs of its input derivations, read from their records, and its sources); one recorded
    without, or whose input is not recorded, goes without either."""
    src = "/nix/store/1b9p07z77phvv2hf6gm9f28syp39f1ag-src"
    lib = replace(drv("lib"), text="Derive(lib)")
    app = replace(drv("app", lib), input_srcs=(src,), text="Derive(app)")
    plain = drv("plain")
    orphan = replace(drv("orphan"), input_drvs={"/nix/store/unknown-x.drv": ("out",)}, text="T")
    await farm.add([lib, app], roots=[app])
    await farm.add([plain, orphan], roots=[plain, orphan])
    agent = farm.agent("m1", max_jobs=4)
    await farm.tick()
    got = by_drv(agent.take_assigns())
    assert set(got) == {lib.drv_path, plain.drv_path, orphan.drv_path}
    assert (got[lib.drv_path].drv_text, got[lib.drv_path].inputs) == ("Derive(lib)", [])
    for d in (plain, orphan):
        assert (got[d.drv_path].drv_text, got[d.drv_path].inputs) == (None, None)
    assert await farm.succeed(agent, got[lib.drv_path])
    await farm.tick()
    [a] = agent.take_assigns()
    assert a.drv_path == app.drv_path and a.drv_text == "Derive(app)"
    assert a.inputs == sorted([src, lib.outputs["out"]])


async def test_build_failure_fails_only_dependents(farm: Farm) -> None:
    lib = drv("lib")
    a = drv("a", lib)
    b = drv("b")
    app = drv("app", a, b)
    toolbase = drv("toolbase")
    tool = drv("tool", toolbase)
    build = await farm.add([lib, a, b, app, toolbase, tool], roots=[app, tool])
    agent = farm.agent("m1", max_jobs=4)

    await farm.tick()
    first = by_drv(agent.take_assigns())
    assert set(first) == {lib.drv_path, b.drv_path, toolbase.drv_path}
    assert await farm.report(agent, first[lib.drv_path], p.Outcome.BUILD_FAILURE, "exit 1")

    assert await farm.state(lib) is StepState.FAILED
    for d in (a, app):
        row = await farm.step(d)
        assert row.state == "dependency_failed"
        assert lib.drv_path in row.error
    # The unrelated branch goes on; the build is not over while it runs.
    assert await farm.build_state(build) == "running"
    assert await farm.succeed(agent, first[b.drv_path])
    assert await farm.succeed(agent, first[toolbase.drv_path])
    await farm.tick()
    [t] = agent.take_assigns()
    assert t.drv_path == tool.drv_path
    assert await farm.build_state(build) == "running"
    assert await farm.succeed(agent, t)

    assert await farm.build_state(build) == "failed"
    assert [await farm.state(d) for d in (b, toolbase, tool)] == [StepState.SUCCEEDED] * 3
    # A build failure is never the agent's fault.
    assert agent.venue.backoff_until == 0.0 and agent.venue.consecutive_failures == 0


EXPECTED_AFTER: dict[p.Outcome, tuple[StepState, str, bool]] = {
    # outcome: (step state, build state, counts against the venue)
    p.Outcome.SUCCESS: (StepState.SUCCEEDED, "succeeded", False),
    p.Outcome.BUILD_FAILURE: (StepState.FAILED, "failed", False),
    p.Outcome.TIMED_OUT: (StepState.FAILED, "failed", False),
    p.Outcome.LOG_LIMIT: (StepState.FAILED, "failed", False),
    p.Outcome.ABORTED: (StepState.RUNNABLE, "running", False),
    p.Outcome.PREPARE_FAILURE: (StepState.RUNNABLE, "running", True),
    p.Outcome.UPLOAD_FAILURE: (StepState.RUNNABLE, "running", True),
    p.Outcome.AGENT_LOST: (StepState.RUNNABLE, "running", True),
}
"""Every outcome an agent may report (``unsupported`` is the runner's: test_capacity.py)."""


@pytest.mark.parametrize("outcome", list(EXPECTED_AFTER))
async def test_result_outcome_policy(farm: Farm, outcome: p.Outcome) -> None:
    x = drv("x")
    build = await farm.add([x], roots=[x])
    agent = farm.agent("m1")
    await farm.tick()
    [a] = agent.take_assigns()
    farm.clock.now += 5
    farm.uploaded.update(a.outputs.values())
    assert await farm.report(agent, a, outcome, "boom")

    state, build_state, counted = EXPECTED_AFTER[outcome]
    row = await farm.step(x)
    assert (StepState(row.state), row.outcome) == (state, outcome)
    assert row.lease_id is None
    assert await farm.build_state(build) == build_state
    assert agent.venue.running == set()
    if counted:
        assert row.attempts == 1
        assert row.not_before == farm.clock.now + CONFIG.retry_base_secs
        assert agent.venue.backoff_until == farm.clock.now + CONFIG.agent_backoff_base_secs
    else:
        assert row.attempts == 0 and row.not_before is None
        assert agent.venue.backoff_until == 0.0
    if outcome is p.Outcome.ABORTED:
        # Requeued at once, but not straight back to the venue that aborted it (an agent
        # aborting everything must not spin): it cools down, another venue may take it.
        await farm.tick()
        assert agent.take_assigns() == []
        other = farm.agent("m2")
        await farm.tick()
        assert len(other.take_assigns()) == 1


async def test_success_without_uploaded_outputs_is_an_upload_failure(farm: Farm) -> None:
    x = drv("x")
    await farm.add([x], roots=[x])
    agent = farm.agent("m1")
    await farm.tick()
    [a] = agent.take_assigns()
    assert await farm.report(agent, a, p.Outcome.SUCCESS)
    row = await farm.step(x)
    assert (row.state, row.outcome, row.attempts) == ("runnable", "upload_failure", 1)
    assert x.outputs["out"] in row.error


# ---- leases --------------------------------------------------------------------------------
async def test_stale_lease_result_is_ignored_and_step_finishes_once(farm: Farm) -> None:
    x = drv("x")
    top = drv("top", x)
    await farm.add([x, top], roots=[top])
    agent = farm.agent("m1")
    await farm.tick()
    [first] = agent.take_assigns()
    bogus = p.Result(step_id=first.step_id, lease_id=p.LeaseId("nope"), outcome=p.Outcome.SUCCESS)
    assert not await farm.sched.result(agent.venue, bogus)
    assert await farm.state(x) is StepState.ASSIGNED

    # The lease runs out; the late result of the first attempt no longer counts.
    await farm.tick(T0 + CONFIG.lease_secs)
    farm.uploaded.update(first.outputs.values())
    assert not await farm.report(agent, first, p.Outcome.SUCCESS)
    assert await farm.state(x) is StepState.RUNNABLE

    await farm.tick(T0 + CONFIG.lease_secs + CONFIG.retry_base_secs)
    [second] = agent.take_assigns()
    assert second.lease_id != first.lease_id
    assert await farm.succeed(agent, second)
    finished_at = (await farm.step(x)).finished_at
    farm.clock.now += 100
    assert not await farm.succeed(agent, second)
    assert not await farm.report(agent, second, p.Outcome.BUILD_FAILURE)
    assert not await farm.report(agent, first, p.Outcome.SUCCESS)
    row = await farm.step(x)
    assert (row.state, row.finished_at) == ("succeeded", finished_at)
    # The dependent was made runnable exactly once.
    await farm.tick()
    assert [a.drv_path for a in agent.take_assigns()] == [top.drv_path]


async def test_lease_expiry_retries_with_backoff_then_fails(farm: Farm) -> None:
    x = drv("x")
    top = drv("top", x)
    build = await farm.add([x, top], roots=[top])
    sx = farm.sid(x)
    agent = farm.agent("m1")
    now = T0
    for attempt in (1, 2, 3):
        await farm.tick(now)
        [a] = agent.take_assigns()
        await farm.sched.accepted(agent.venue, p.Accepted(step_id=a.step_id, lease_id=a.lease_id))
        now += CONFIG.lease_secs
        await farm.tick(now)
        assert agent.aborts()[-1] == sx
        # Counted against the venue, with growing backoff.
        assert agent.venue.consecutive_failures == attempt
        assert agent.venue.backoff_until == now + CONFIG.agent_backoff_base_secs * 2 ** (
            attempt - 1
        )
        row = await farm.step(x)
        assert row.outcome == "agent_lost" and row.attempts == attempt
        if attempt == CONFIG.max_infra_attempts:
            break
        not_before = now + CONFIG.retry_base_secs * 2 ** (attempt - 1)
        assert (row.state, row.not_before) == ("runnable", not_before)
        # Not before not_before, even with a free venue ...
        assert await farm.tick(not_before - 0.5) == not_before
        assert agent.take_assigns() == []
        now = not_before  # ... but then.

    row = await farm.step(x)
    assert row.state == "failed"
    assert "infrastructure failure after 3 attempts" in row.error
    assert await farm.state(top) is StepState.DEPENDENCY_FAILED
    assert await farm.build_state(build) == "failed"
    assert "attempt 3 on agent-m1" in farm.sched.logs.read(sx).decode()


async def test_heartbeat_renews_only_the_holders_leases(farm: Farm) -> None:
    x, y = drv("x"), drv("y")
    await farm.add([x, y], roots=[x, y])
    agent = farm.agent("m1", max_jobs=2)
    other = farm.agent("m2")
    await farm.tick()
    assert len(agent.take_assigns()) == 2
    farm.clock.now = T0 + 50
    farm.sched.heartbeat(agent.venue, [farm.sid(x)])
    farm.sched.heartbeat(other.venue, [farm.sid(y)])  # not its step: no renewal
    deadline = await farm.tick(T0 + CONFIG.lease_secs)
    assert await farm.state(x) is StepState.ASSIGNED
    assert await farm.state(y) is StepState.RUNNABLE
    assert farm.sched.nodes[farm.sid(x)].lease_expires_at == T0 + 50 + CONFIG.lease_secs
    assert deadline == T0 + CONFIG.lease_secs + CONFIG.retry_base_secs  # y's retry comes first


async def test_refused_releases_the_slot_and_cools_the_venue_down(farm: Farm) -> None:
    x = drv("x")
    await farm.add([x], roots=[x])
    agent = farm.agent("m1")
    await farm.tick()
    [a] = agent.take_assigns()
    stale = p.Refused(step_id=a.step_id, lease_id=p.LeaseId("old"), reason="busy")
    await farm.sched.refused(agent.venue, stale)
    assert await farm.state(x) is StepState.ASSIGNED

    await farm.sched.refused(
        agent.venue, p.Refused(step_id=a.step_id, lease_id=a.lease_id, reason="busy")
    )
    row = await farm.step(x)
    assert (row.state, row.lease_id, row.agent_machine_id) == ("runnable", None, None)
    assert agent.venue.running == set()
    assert agent.venue.cooldown_until == T0 + CONFIG.refuse_cooldown_secs
    assert agent.venue.backoff_until == 0.0  # a refusal is no failure

    # During the cooldown nothing goes there; the cooldown's end is the next deadline.
    assert await farm.tick() == T0 + CONFIG.refuse_cooldown_secs
    assert agent.take_assigns() == []
    await farm.tick(T0 + CONFIG.refuse_cooldown_secs)
    [again] = agent.take_assigns()
    assert again.lease_id != a.lease_id


async def test_refusing_venue_cools_down_while_another_takes_the_step(farm: Farm) -> None:
    x = drv("x")
    await farm.add([x], roots=[x])
    first = farm.agent("a")
    await farm.tick()
    [a] = first.take_assigns()
    second = farm.agent("b")
    await farm.sched.refused(first.venue, p.Refused(step_id=a.step_id, lease_id=a.lease_id))
    await farm.tick()
    assert [x.step_id for x in second.take_assigns()] == [a.step_id]
    assert first.take_assigns() == []


async def test_send_failure_releases_the_slot(farm: Farm) -> None:
    def closed(_msg: BaseModel) -> None:
        raise SessionClosed()

    x = drv("x")
    await farm.add([x], roots=[x])
    agent = farm.agent("m1", send=closed)
    await farm.tick()
    row = await farm.step(x)
    assert (row.state, row.lease_id, row.agent_machine_id) == ("runnable", None, None)
    assert agent.venue.running == set() and farm.sched.leases == {}
    assert agent.venue.cooldown_until == T0 + CONFIG.refuse_cooldown_secs
    assert farm.runnable() == {farm.sid(x)}


async def test_reconnect_keeps_current_leases_and_drops_others(farm: Farm) -> None:
    steps = [drv(f"s{i}") for i in range(3)]
    await farm.add(steps, roots=steps)
    agent = farm.agent("m1", max_jobs=3)
    await farm.tick()
    leases = {a.step_id: a for a in agent.take_assigns()}
    s0, s1, s2 = (p.StepId(farm.sid(d)) for d in steps)
    farm.sched.detach(agent.venue)
    assert farm.sched.venues == {}
    # Another machine cannot claim the lease.
    thief = farm.agent("m2", running=[p.RunningStep(step_id=s0, lease_id=leases[s0].lease_id)])
    assert thief.kept == [] and thief.venue.running == set()

    farm.clock.now += 5
    back = farm.agent(
        "m1",
        max_jobs=3,
        running=[
            p.RunningStep(step_id=s0, lease_id=leases[s0].lease_id),
            p.RunningStep(step_id=s1, lease_id=p.LeaseId("bogus")),
        ],
    )
    assert back.kept == [s0]
    assert back.venue.running == {s0}
    await farm.tick()
    assert await farm.state(s0) is StepState.ASSIGNED
    for sid in (s1, s2):
        row = await farm.step(sid)
        assert (row.state, row.outcome, row.attempts) == ("runnable", "agent_lost", 1)
    assert sorted(back.aborts()) == [s1, s2]
    assert await farm.succeed(back, leases[s0])
    assert await farm.state(s0) is StepState.SUCCEEDED


async def test_kvm_step_only_on_the_kvm_venue(farm: Farm) -> None:
    k, plain = drv("k", features=["kvm"]), drv("plain")
    await farm.add([k, plain], roots=[k, plain])
    small = farm.agent("plain", max_jobs=4)
    await farm.tick()
    assert [a.drv_path for a in small.take_assigns()] == [plain.drv_path]
    assert farm.runnable() == {farm.sid(k)}
    big = farm.agent("kvm", supported=["kvm"], max_jobs=1)
    await farm.tick()
    assert [a.drv_path for a in big.take_assigns()] == [k.drv_path]


async def test_plain_step_prefers_the_non_kvm_venue(farm: Farm) -> None:
    plain, k = drv("plain"), drv("k", features=["kvm"])
    await farm.add([plain], roots=[plain], priority=5)
    await farm.add([k], roots=[k])
    # The kvm venue is bigger, faster and sorts first, yet kvm work waits for it.
    kvm = farm.agent("a-kvm", supported=["kvm"], max_jobs=8, speed=4.0)
    other = farm.agent("z-plain", max_jobs=1)
    await farm.tick()
    assert [a.drv_path for a in other.take_assigns()] == [plain.drv_path]
    assert [a.drv_path for a in kvm.take_assigns()] == [k.drv_path]


async def test_a_step_goes_where_its_input_was_built(farm: Farm) -> None:
    x, y = drv("x"), drv("y")
    z = drv("z", y)
    await farm.add([x, y, z], roots=[x, z])
    b = farm.agent("b")
    await farm.tick()
    (got_y,) = b.take_assigns()
    assert got_y.drv_path == y.drv_path  # the taller step first
    a = farm.agent("a")
    await farm.tick()
    (got_x,) = a.take_assigns()
    assert await farm.succeed(a, got_x)
    assert await farm.succeed(b, got_y)
    assert farm.sched.nodes[farm.sid(z)].inputs_on == {"b": 1}
    # Both agents are free and alike: "a" sorts first, but "b" holds z's input.
    await farm.tick()
    assert a.take_assigns() == []
    assert [x_.drv_path for x_ in b.take_assigns()] == [z.drv_path]


async def test_mandatory_feature_venue_only_takes_steps_requiring_it(farm: Farm) -> None:
    plain, bench = drv("plain"), drv("bench", features=["benchmark"])
    await farm.add([plain, bench], roots=[plain, bench])
    special = farm.agent("bench-box", mandatory=["benchmark"], max_jobs=4)
    await farm.tick()
    assert [a.drv_path for a in special.take_assigns()] == [bench.drv_path]
    assert farm.runnable() == {farm.sid(plain)}


async def test_draining_venue_gets_no_new_work(farm: Farm) -> None:
    x = drv("x")
    await farm.add([x], roots=[x])
    agent = farm.agent("m1")
    assert farm.sched.drain("m1") and not farm.sched.drain("unknown")
    await farm.tick()
    assert agent.assigns() == [] and isinstance(agent.outbox[-1], p.Drain)


async def test_agent_without_room_in_its_store_gets_no_work_until_it_reports_room(
    make_farm: Callable[..., Farm],
) -> None:
    farm = make_farm(min_free_store_bytes=1000)
    x, y = drv("x"), drv("y")
    await farm.add([x, y], roots=[x, y])
    full = farm.agent("full", max_jobs=2)
    farm.sched.disk_report(full.venue, 999)
    roomy = farm.agent("roomy", max_jobs=1)
    await farm.tick()
    # Only the agent with room takes a step; the other waits.
    assert len(roomy.take_assigns()) == 1 and full.assigns() == []
    farm.sched.disk_report(full.venue, 1000)  # its collection freed enough
    await farm.tick()
    assert len(full.assigns()) == 1
    # An agent that reports nothing (an older agent) is never held back.
    farm.sched.disk_report(full.venue, None)
    assert full.venue.free_store_bytes is None


# ---- builds --------------------------------------------------------------------------------
async def test_cancel_build_aborts_leased_steps_and_spares_shared_ones(farm: Farm) -> None:
    shared, own = drv("shared"), drv("own")
    top = drv("top", shared, own)
    cancelled = await farm.add([shared, own, top], roots=[top])
    other = await farm.add([shared], roots=[shared])
    agent = farm.agent("m1", max_jobs=4)
    await farm.tick()
    assigned = by_drv(agent.take_assigns())
    assert set(assigned) == {shared.drv_path, own.drv_path}

    farm.clock.now += 1
    assert await farm.sched.cancel_build(cancelled)
    assert not await farm.sched.cancel_build(cancelled)
    assert agent.aborts() == [assigned[own.drv_path].step_id]
    assert farm.sched.by_drv.keys() == {shared.drv_path}  # cancelled steps are forgotten
    assert await farm.state(own) is StepState.CANCELLED
    assert await farm.state(top) is StepState.CANCELLED
    assert await farm.build_state(cancelled) == "cancelled"
    assert agent.venue.running == {farm.sid(shared)}
    # The aborted attempt's late result is ignored; the shared step goes on.
    assert not await farm.report(agent, assigned[own.drv_path], p.Outcome.ABORTED)
    assert await farm.state(own) is StepState.CANCELLED
    assert await farm.succeed(agent, assigned[shared.drv_path])
    assert await farm.build_state(other) == "succeeded"
    assert await farm.build_state(cancelled) == "cancelled"


async def test_two_builds_share_one_step(farm: Farm) -> None:
    x = drv("x")
    y = drv("y", x)
    first = await farm.add([x], roots=[x])
    second = await farm.add([x, y], roots=[y])
    assert len(farm.sched.by_drv) == 2
    assert farm.sched.nodes[farm.sid(x)].builds == {first, second}
    agent = farm.agent("m1", max_jobs=4)
    await farm.tick()
    [a] = agent.take_assigns()
    assert a.drv_path == x.drv_path
    assert await farm.succeed(agent, a)
    assert await farm.build_state(first) == "succeeded"
    assert await farm.build_state(second) == "running"
    await farm.tick()
    [b] = agent.take_assigns()
    assert b.drv_path == y.drv_path
    assert await farm.succeed(agent, b)
    assert await farm.build_state(second) == "succeeded"


async def test_cached_roots_finish_a_build_at_once(farm: Farm) -> None:
    x = drv("x")
    build = await farm.add([], roots=[], cached_roots=[x])
    assert await farm.build_state(build) == "succeeded"
    assert farm.sched.builds == {}


async def test_new_build_on_a_cached_failure_fails_at_once(farm: Farm) -> None:
    x = drv("x")
    first = await farm.add([x], roots=[x])
    holder = await farm.add([x, drv("z", x)], roots=[drv("z", x)])
    agent = farm.agent("m1")
    await farm.tick()
    [a] = agent.take_assigns()
    farm.sched.log_lines(
        farm.sched.venues["m1"],
        p.Log(step_id=a.step_id, lease_id=a.lease_id, lines=["first run"]),
    )
    assert await farm.report(agent, a, p.Outcome.BUILD_FAILURE, "builder exited 1")
    assert await farm.build_state(first) == "failed"
    assert await farm.build_state(holder) == "failed"
    assert farm.sched.nodes == {}
    # Within the TTL a new build does not rebuild x: x fails at once, y with it.
    farm.clock.now += CONFIG.failure_cache_ttl_secs - 1
    y = drv("y", x)
    third = await farm.add([x, y], roots=[y])
    row = await farm.step(x)
    assert (row.state, row.outcome, row.failed_at) == ("failed", "build_failure", T0)
    # The step keeps the record of the attempt that ran (issue: a hit wrote over it)...
    assert (row.error, row.agent_name, row.finished_at) == ("builder exited 1", "agent-m1", T0)
    # ...and the hit is recorded for the build that hit it, pointing at that attempt.
    async with farm.engine.connect() as conn:
        [ran] = await queries.fetch_step_attempts(conn, a.step_id, 10)
        [hit] = await queries.fetch_build_cached_failure_hits(conn, third)
        assert await queries.fetch_build_cached_failure_hits(conn, first) == []
    assert (hit.step_id, hit.attempt_id, hit.agent_name) == (a.step_id, ran.id, "agent-m1")
    assert (hit.failed_at, hit.failed_outcome, hit.error) == (T0, "build_failure", ran.error)
    assert hit.hit_at == farm.clock.now
    assert hit.cached_until == T0 + CONFIG.failure_cache_ttl_secs
    assert hit.ran_in_build == first  # the build that queued the run
    assert (await farm.step(y)).state == "dependency_failed"
    assert x.drv_path in (await farm.step(y)).error
    assert await farm.build_state(third) == "failed"
    await farm.tick()
    assert agent.take_assigns() == []
    assert farm.sched.logs.read(a.step_id) == b"first run\n"  # the failure's log stays
    assert farm.sched.nodes == {} and farm.sched.builds == {}
    # A second hit is its build's own record; the step's error is still the attempt's.
    fourth = await farm.add([x], roots=[x])
    assert (await farm.step(x)).error == "builder exited 1"
    async with farm.engine.connect() as conn:
        [again] = await queries.fetch_build_cached_failure_hits(conn, fourth)
        assert len(await queries.fetch_build_cached_failure_hits(conn, third)) == 1
    assert again.attempt_id == ran.id and again.ran_in_build == first


async def test_cached_failure_expires_after_the_ttl(farm: Farm) -> None:
    x = drv("x")
    await farm.add([x], roots=[x])
    agent = farm.agent("m1")
    await farm.tick()
    [a] = agent.take_assigns()
    farm.sched.log_lines(
        agent.venue, p.Log(step_id=a.step_id, lease_id=a.lease_id, lines=["first run"])
    )
    assert await farm.report(agent, a, p.Outcome.TIMED_OUT)
    farm.clock.now = T0 + CONFIG.failure_cache_ttl_secs
    y = drv("y", x)
    build = await farm.add([x, y], roots=[y])
    row = await farm.step(x)
    assert (row.state, row.outcome, row.failed_at, row.error) == ("runnable", None, None, None)
    assert farm.sched.logs.read(a.step_id) == b""  # a new run, a fresh log
    await farm.tick()
    [again] = agent.take_assigns()
    assert again.drv_path == x.drv_path and again.lease_id != a.lease_id
    assert await farm.succeed(agent, again)
    await farm.tick()
    [top] = agent.take_assigns()
    assert await farm.succeed(agent, top)
    assert await farm.build_state(build) == "succeeded"


@pytest.mark.parametrize("outcome", [p.Outcome.PREPARE_FAILURE, p.Outcome.AGENT_LOST])
async def test_infrastructure_failures_are_never_cached(
    make_farm: Callable[..., Farm], outcome: p.Outcome
) -> None:
    farm = make_farm(max_infra_attempts=1)
    x = drv("x")
    first = await farm.add([x], roots=[x])
    agent = farm.agent("m1")
    await farm.tick()
    [a] = agent.take_assigns()
    assert await farm.report(agent, a, outcome)
    row = await farm.step(x)
    assert (row.state, row.outcome, row.failed_at) == ("failed", outcome, None)
    assert await farm.build_state(first) == "failed"
    second = await farm.add([x], roots=[x])
    assert await farm.state(x) is StepState.RUNNABLE
    assert await farm.build_state(second) == "queued"


async def test_zero_ttl_caches_nothing(make_farm: Callable[..., Farm]) -> None:
    farm = make_farm(failure_cache_ttl_secs=0)
    x = drv("x")
    await farm.add([x], roots=[x])
    agent = farm.agent("m1")
    await farm.tick()
    [a] = agent.take_assigns()
    assert await farm.report(agent, a, p.Outcome.BUILD_FAILURE)
    await farm.add([x], roots=[x])
    assert await farm.state(x) is StepState.RUNNABLE


async def test_restart_clears_the_cached_failure_and_rebuilds(farm: Farm) -> None:
    lib = drv("lib")
    a = drv("a", lib)
    b = drv("b")
    app = drv("app", a, b)
    build = await farm.add([lib, a, b, app], roots=[app])
    agent = farm.agent("m1", max_jobs=2)
    await farm.tick()
    first = by_drv(agent.take_assigns())
    assert await farm.report(agent, first[lib.drv_path], p.Outcome.BUILD_FAILURE)
    assert await farm.succeed(agent, first[b.drv_path])
    assert await farm.build_state(build) == "failed"
    # Another build on lib is a cached failure...
    other = await farm.add([lib], roots=[lib])
    assert await farm.build_state(other) == "failed"

    farm.clock.now += 60
    assert await farm.sched.restart_build(build)
    assert not await farm.sched.restart_build(999)
    assert await farm.build_state(build) == "queued"
    row = await farm.step(lib)
    assert (row.state, row.failed_at, row.outcome) == ("runnable", None, None)
    assert [await farm.state(d) for d in (a, b, app)] == [
        StepState.WAITING,
        StepState.SUCCEEDED,
        StepState.WAITING,
    ]
    built: list[str] = []
    while assigns := (await farm.tick(), agent.take_assigns())[1]:
        for x in assigns:
            built.append(x.drv_path)
            assert await farm.succeed(agent, x)
    assert built == [lib.drv_path, a.drv_path, app.drv_path]  # b is not rebuilt
    assert await farm.build_state(build) == "succeeded"
    async with farm.engine.connect() as conn:
        row = await queries.fetch_build(conn, build)
    assert row is not None and row.finished_at == farm.clock.now
    assert await farm.build_state(other) == "failed"  # only the restarted build changes
    assert farm.sched.nodes == {} and farm.sched.builds == {}


async def test_restart_of_a_cancelled_build_and_of_a_build_with_nothing_to_redo(
    farm: Farm,
) -> None:
    x = drv("x")
    build = await farm.add([x], roots=[x])
    assert await farm.sched.cancel_build(build)
    assert await farm.sched.restart_build(build)
    assert await farm.state(x) is StepState.RUNNABLE
    agent = farm.agent("m1")
    await farm.tick()
    [a] = agent.take_assigns()
    assert await farm.build_state(build) == "running"
    assert await farm.succeed(agent, a)
    assert await farm.build_state(build) == "succeeded"
    assert await farm.sched.restart_build(build)  # nothing failed: nothing happens
    assert await farm.build_state(build) == "succeeded"
    assert farm.sched.builds == {}


async def test_restart_requeues_a_failed_step_another_active_build_holds(farm: Farm) -> None:
    x, w = drv("x"), drv("w")
    first = await farm.add([x], roots=[x])
    second = await farm.add([x, w], roots=[x, w])
    agent = farm.agent("m1", max_jobs=2)
    await farm.tick()
    assigned = by_drv(agent.take_assigns())
    assert await farm.report(agent, assigned[x.drv_path], p.Outcome.BUILD_FAILURE)
    assert await farm.build_state(first) == "failed"
    assert await farm.build_state(second) == "running"  # w still runs
    assert await farm.sched.restart_build(first)
    assert farm.sched.builds[second].unfinished == 2  # x runs again for both builds
    await farm.tick()
    [again] = agent.take_assigns()
    assert again.drv_path == x.drv_path
    assert await farm.succeed(agent, again)
    assert await farm.build_state(first) == "succeeded"
    assert await farm.succeed(agent, assigned[w.drv_path])
    assert await farm.build_state(second) == "succeeded"


async def test_restart_of_one_root_leaves_the_other_failed_roots_failed(farm: Farm) -> None:
    # A CI re-run of one job: root one (needing lib) and root two failed; only one and lib
    # run again, and the build fails again although the restarted root succeeds.
    lib = drv("lib")
    one = drv("one", lib)
    two = drv("two")
    ok = drv("ok")
    build = await farm.add([lib, one, two, ok], roots=[one, two, ok])
    agent = farm.agent("m1", max_jobs=3)
    await farm.tick()
    first = by_drv(agent.take_assigns())
    assert await farm.report(agent, first[lib.drv_path], p.Outcome.BUILD_FAILURE)
    assert await farm.report(agent, first[two.drv_path], p.Outcome.BUILD_FAILURE)
    assert await farm.succeed(agent, first[ok.drv_path])
    assert await farm.build_state(build) == "failed"
    assert await farm.state(one) is StepState.DEPENDENCY_FAILED

    farm.clock.now += 60
    assert await farm.sched.restart_build(build, roots=[one.drv_path])
    assert await farm.build_state(build) == "queued"
    assert [await farm.state(d) for d in (lib, one, two, ok)] == [
        StepState.RUNNABLE,
        StepState.WAITING,
        StepState.FAILED,
        StepState.SUCCEEDED,
    ]
    built: list[str] = []
    while assigns := (await farm.tick(), agent.take_assigns())[1]:
        for x in assigns:
            built.append(x.drv_path)
            assert await farm.succeed(agent, x)
    assert built == [lib.drv_path, one.drv_path]  # two is not built again
    assert await farm.state(two) is StepState.FAILED
    assert await farm.build_state(build) == "failed"  # two still fails it
    assert farm.sched.nodes == {} and farm.sched.builds == {}
    # A root that is not the build's restarts nothing.
    assert await farm.sched.restart_build(build, roots=[drv("stranger").drv_path])
    assert await farm.build_state(build) == "failed"


# ---- agent records -----------------------------------------------------------------------------
async def record_agent(farm: Farm, machine_id: str, *, ephemeral: bool = False) -> None:
    """The row a session's registration writes (sessions.py)."""
    async with farm.engine.begin() as conn:
        await queries.upsert_agent(
            conn,
            machine_id,
            name=f"agent-{machine_id}",
            hostname="h",
            systems='["x86_64-linux"]',
            supported_features="[]",
            mandatory_features="[]",
            max_jobs=1,
            speed_factor=1.0,
            ephemeral=ephemeral,
            auth_kind="token",
            launch_id=None,
            version="",
            connected=True,
            last_seen=farm.clock.now,
        )


async def agent_row(farm: Farm, machine_id: str) -> Any:
    async with farm.engine.connect() as conn:
        rows = {r.machine_id: r for r in await queries.fetch_agents(conn)}
    return rows.get(machine_id)


async def test_agent_counters_and_backoff_are_recorded(farm: Farm) -> None:
    await record_agent(farm, "m1")
    steps = [drv("s1"), drv("s2"), drv("s3")]
    await farm.add(steps, roots=steps)
    agent = farm.agent("m1")
    outcomes = [p.Outcome.SUCCESS, p.Outcome.BUILD_FAILURE, p.Outcome.PREPARE_FAILURE]
    for outcome in outcomes:
        farm.clock.now += 100
        await farm.tick()
        [a] = agent.take_assigns()
        farm.uploaded.update(a.outputs.values())
        assert await farm.report(agent, a, outcome)
    row = await agent_row(farm, "m1")
    assert (row.steps_succeeded, row.steps_failed, row.infra_failures) == (1, 1, 1)
    assert (row.consecutive_failures, row.backoff_until) == (1, agent.venue.backoff_until)
    assert row.backoff_until == farm.clock.now + CONFIG.agent_backoff_base_secs


async def test_backoff_survives_a_reconnect(farm: Farm) -> None:
    """A flapping agent used to shed its backoff by reconnecting with a fresh session."""
    from bigtent.runner.venues.sessions import restore_backoff

    await record_agent(farm, "m1")
    xs = [drv("x1"), drv("x2")]
    await farm.add(xs, roots=xs)
    agent = farm.agent("m1")
    for _ in range(2):
        await farm.tick(farm.clock.now + 100)
        [a] = agent.take_assigns()
        assert await farm.report(agent, a, p.Outcome.UPLOAD_FAILURE)
    until = farm.clock.now + 2 * CONFIG.agent_backoff_base_secs
    assert (agent.venue.consecutive_failures, agent.venue.backoff_until) == (2, until)
    farm.sched.detach(agent.venue)

    # The same machine registers again: a new Venue, its backoff restored from its row.
    await record_agent(farm, "m1")
    back = farm.agent("m1")
    restore_backoff(back.venue, await agent_row(farm, "m1"))
    assert (back.venue.consecutive_failures, back.venue.backoff_until) == (2, until)
    assert await farm.tick() == until
    assert back.take_assigns() == []
    await farm.tick(until)
    [a] = back.take_assigns()
    assert await farm.succeed(back, a)
    row = await agent_row(farm, "m1")
    assert (row.consecutive_failures, row.backoff_until) == (0, None)


async def test_pruning_deletes_stale_ephemeral_rows_and_keeps_history(farm: Farm) -> None:
    from bigtent.runner.venues.agents import prune_agents

    ttl = 3600.0
    await record_agent(farm, "eph-connected", ephemeral=True)
    await record_agent(farm, "eph-gone", ephemeral=True)
    await record_agent(farm, "persistent")
    async with farm.engine.begin() as conn:
        await queries.update_agent(conn, "eph-gone", connected=False)
    x = drv("x")
    await farm.add([x], roots=[x])
    agent = farm.agent("eph-gone")
    await farm.tick()
    [a] = agent.take_assigns()
    assert await farm.succeed(agent, a)
    farm.clock.now += ttl / 2
    await record_agent(farm, "eph-fresh", ephemeral=True)

    assert await prune_agents(farm.engine, farm.clock.now, ttl) == []
    farm.clock.now = T0 + ttl + 1
    assert await prune_agents(farm.engine, farm.clock.now, ttl) == [
        "eph-connected",
        "eph-gone",
    ]
    async with farm.engine.connect() as conn:
        left = sorted(r.machine_id for r in await queries.fetch_agents(conn))
    assert left == ["eph-fresh", "persistent"]
    row = await farm.step(x)
    assert (row.agent_name, row.agent_machine_id) == ("agent-eph-gone", "eph-gone")
    # A finished attempt of a pruned agent's venue does not bring the row back or fail.
    assert await agent_row(farm, "eph-gone") is None


async def test_bump_build_reorders_runnable_work(farm: Farm) -> None:
    early, late = drv("early"), drv("late")
    first = await farm.add([early], roots=[early])
    second = await farm.add([late], roots=[late])
    assert await farm.sched.bump_build(second, 10)
    assert not await farm.sched.bump_build(999, 10)
    agent = farm.agent("m1")
    await farm.tick()
    assert [a.drv_path for a in agent.take_assigns()] == [late.drv_path]
    async with farm.engine.connect() as conn:
        row = await queries.fetch_build(conn, second)
    assert row is not None and row.priority == 10
    assert await farm.build_state(first) == "queued"


async def test_new_dependents_raise_the_height_of_runnable_work(farm: Farm) -> None:
    a, b = drv("a"), drv("b")
    await farm.add([a], roots=[a])
    await farm.add([b], roots=[b])
    # A second build stacks two steps on b: b now has more work behind it than a.
    mid = drv("mid", b)
    top = drv("top", mid)
    await farm.add([b, mid, top], roots=[top])
    assert farm.sched.nodes[farm.sid(b)].height == 3
    agent = farm.agent("m1")
    await farm.tick()
    assert [x.drv_path for x in agent.take_assigns()] == [b.drv_path]


# ---- restart -------------------------------------------------------------------------------
async def test_load_after_crash_rebuilds_the_queue_and_completes(farm: Farm) -> None:
    lib = drv("lib")
    a = drv("a", lib)
    b, c = drv("b"), drv("c")
    app = drv("app", a, b, c)
    build = await farm.add([lib, a, b, c, app], roots=[app])
    agent = farm.agent("m1", max_jobs=2)
    await farm.tick()
    first = by_drv(agent.take_assigns())
    assert set(first) == {lib.drv_path, b.drv_path}  # the critical path first
    assert await farm.succeed(agent, first[lib.drv_path])
    await farm.tick()
    [run_a] = agent.take_assigns()
    assert run_a.drv_path == a.drv_path
    await farm.sched.accepted(
        agent.venue, p.Accepted(step_id=run_a.step_id, lease_id=run_a.lease_id)
    )
    # b hits an infrastructure failure: it waits out a retry delay when the runner dies.
    assert await farm.report(agent, first[b.drv_path], p.Outcome.PREPARE_FAILURE)

    old = farm.sched
    runnable = farm.runnable(old)
    leased = {n.id: n.lease_id for n in old.nodes.values() if n.state.is_leased}
    assert runnable == {farm.sid(b), farm.sid(c)}
    assert leased == {farm.sid(a): run_a.lease_id}

    # Crash: a fresh scheduler over the same database, a little later.
    farm.clock.now += 3
    farm.sched = farm.new_scheduler()
    await farm.sched.load()
    new = farm.sched
    assert farm.runnable(new) == runnable
    assert {n.id: n.lease_id for n in new.nodes.values() if n.state.is_leased} == leased
    assert {sid for sid, n in new.nodes.items() if n.state is StepState.WAITING} == {farm.sid(app)}
    assert lib.drv_path not in new.by_drv
    assert [new.nodes[farm.sid(d)].height for d in (a, b, c, app)] == [2, 2, 2, 1]
    assert await farm.build_state(build) == "running"

    # The agent comes back still building a; the queue drains without rebuilding lib.
    back = farm.agent(
        "m1", max_jobs=2, running=[p.RunningStep(step_id=run_a.step_id, lease_id=run_a.lease_id)]
    )
    assert back.kept == [run_a.step_id]
    built: list[str] = []
    now = farm.clock.now
    assert await farm.succeed(back, run_a)
    while True:
        deadline = await farm.tick(now)
        assigns = back.take_assigns()
        if not assigns and deadline is None:
            break
        for x in assigns:
            built.append(x.drv_path)
            assert await farm.succeed(back, x)
        if not assigns:
            assert deadline is not None
            now = deadline
    assert sorted(built) == sorted([b.drv_path, c.drv_path, app.drv_path])
    assert built[-1] == app.drv_path
    assert await farm.build_state(build) == "succeeded"
    assert (await farm.step(b)).attempts == 1


async def test_a_restarted_runner_sends_a_waiting_step_where_its_inputs_were_built(
    farm: Farm,
) -> None:
    x, y, other = drv("x"), drv("y"), drv("other")
    z = drv("z", x, y)
    await farm.add([x, y, other, z], roots=[z, other])
    b = farm.agent("b", max_jobs=2)
    await farm.tick()
    got = by_drv(b.take_assigns())
    assert set(got) == {x.drv_path, y.drv_path}  # the taller steps first
    assert await farm.succeed(b, got[x.drv_path])
    a = farm.agent("a")
    await farm.tick()
    (got_other,) = a.take_assigns()
    assert got_other.drv_path == other.drv_path
    assert await farm.succeed(a, got_other)
    # Crash while y builds on "b": z waits, one of its inputs built there.
    farm.sched = farm.new_scheduler()
    await farm.sched.load()
    assert farm.sched.nodes[farm.sid(z)].state is StepState.WAITING
    assert farm.sched.nodes[farm.sid(z)].inputs_on == {"b": 1}
    a = farm.agent("a")
    b = farm.agent(
        "b",
        max_jobs=2,
        running=[p.RunningStep(step_id=got[y.drv_path].step_id, lease_id=got[y.drv_path].lease_id)],
    )
    assert await farm.succeed(b, got[y.drv_path])
    assert farm.sched.nodes[farm.sid(z)].inputs_on == {"b": 2}
    # Both agents are free and alike: "a" sorts first, but "b" holds z's inputs.
    await farm.tick()
    assert a.take_assigns() == []
    assert [d.drv_path for d in b.take_assigns()] == [z.drv_path]


async def test_a_start_reads_where_a_waiting_steps_inputs_were_built(farm: Farm) -> None:
    # Inputs built on different venues, before the restart, in the order they finished.
    x, y, w = drv("x"), drv("y"), drv("w")
    z = drv("z", x, y, w)
    await farm.add([x, y, w, z], roots=[z])
    agents = {m: farm.agent(m) for m in ("a", "b")}
    for machine, at in (("b", 1.0), ("a", 2.0), ("b", 3.0)):
        await farm.tick(T0 + at)
        (assign,) = agents[machine].take_assigns()
        assert await farm.succeed(agents[machine], assign)
    assert farm.sched.nodes[farm.sid(z)].inputs_on == {"b": 2, "a": 1}
    assert farm.runnable() == {farm.sid(z)}
    farm.sched = farm.new_scheduler()
    await farm.sched.load()
    assert farm.runnable() == {farm.sid(z)}
    assert farm.sched.nodes[farm.sid(z)].inputs_on == {"b": 2, "a": 1}
    a, b = farm.agent("a"), farm.agent("b")
    await farm.tick()
    assert a.take_assigns() == []
    assert [d.drv_path for d in b.take_assigns()] == [z.drv_path]


async def test_leases_of_agents_that_never_return_expire_after_restart(farm: Farm) -> None:
    x = drv("x")
    await farm.add([x], roots=[x])
    farm.agent("m1")
    await farm.tick()
    farm.sched = farm.new_scheduler()
    farm.clock.now = T0 + 30
    await farm.sched.load()
    # One more lease period from the restart, then an infrastructure retry.
    assert await farm.tick() == T0 + 30 + CONFIG.lease_secs
    assert await farm.state(x) is StepState.ASSIGNED
    await farm.tick(T0 + 30 + CONFIG.lease_secs)
    row = await farm.step(x)
    assert (row.state, row.outcome, row.attempts) == ("runnable", "agent_lost", 1)


# ---- the loop ------------------------------------------------------------------------------
async def test_run_loop_dispatches_when_woken(farm: Farm) -> None:
    sent = asyncio.Event()
    outbox: list[BaseModel] = []

    def send(msg: BaseModel) -> None:
        outbox.append(msg)
        sent.set()

    farm.agent("m1", send=send)
    task = asyncio.create_task(farm.sched.run())
    try:
        x = drv("x")
        await farm.add([x], roots=[x])
        await asyncio.wait_for(sent.wait(), timeout=5)
        assert [m.drv_path for m in outbox if isinstance(m, p.Assign)] == [x.drv_path]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_run_loop_survives_a_failing_pass(
    farm: Farm, monkeypatch: pytest.MonkeyPatch
) -> None:
    failed, sent = asyncio.Event(), asyncio.Event()
    real_dispatch = farm.sched._dispatch

    async def flaky(now: float) -> None:
        if not failed.is_set():
            failed.set()
            raise RuntimeError("database is locked")
        await real_dispatch(now)

    monkeypatch.setattr(farm.sched, "_dispatch", flaky)
    farm.agent("m1", send=lambda _msg: sent.set())
    x = drv("x")
    await farm.add([x], roots=[x])
    task = asyncio.create_task(farm.sched.run())
    try:
        await asyncio.wait_for(failed.wait(), timeout=5)
        farm.sched.wake()
        await asyncio.wait_for(sent.wait(), timeout=5)
        assert not task.done()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# ---- regressions -----------------------------------------------------------------------------
async def test_stale_delay_entry_does_not_release_a_retry_early(farm: Farm) -> None:
    """A step cancelled during its retry delay and queued again by a new build left its old
    delay entry behind, which released the step's *next* retry before its not_before."""
    x = drv("x")
    first = await farm.add([x], roots=[x])
    agent = farm.agent("m1")
    await farm.tick()
    [a] = agent.take_assigns()
    assert await farm.report(agent, a, p.Outcome.PREPARE_FAILURE)  # retry at T0 + 10
    assert await farm.sched.cancel_build(first)

    farm.clock.now = T0 + 2
    await farm.add([x], roots=[x])  # the same step row, queued afresh
    await farm.tick()
    [b] = agent.take_assigns()
    assert await farm.report(agent, b, p.Outcome.PREPARE_FAILURE)  # retry at T0 + 12
    assert (await farm.step(x)).not_before == T0 + 12

    await farm.tick(T0 + 10)
    assert agent.take_assigns() == []
    await farm.tick(T0 + 12)
    assert len(agent.take_assigns()) == 1


async def test_venue_detached_during_dispatch_transaction(
    farm: Farm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A venue that detached while the dispatch transaction awaited the database crashed the
    loop with a KeyError; now the send to its closed session fails and the slot is freed."""
    steps = [drv("s0"), drv("s1")]
    await farm.add(steps, roots=steps)
    first = farm.agent("a")
    closed = False

    def send_b(_msg: BaseModel) -> None:
        if closed:
            raise SessionClosed()

    second = farm.agent("b", send=send_b)
    real_update = queries.update_steps_each

    async def update_then_detach(conn: Any, rows: Sequence[dict[str, Any]]) -> None:
        nonlocal closed
        await real_update(conn, rows)
        if not closed:
            closed = True
            farm.sched.detach(second.venue)

    monkeypatch.setattr(queries, "update_steps_each", update_then_detach)
    await farm.tick()
    assert len(first.take_assigns()) == 1
    assert len(farm.runnable()) == 1
    assert farm.sched.venues.keys() == {"a"}


async def test_venue_backoff_after_many_failures_stays_capped(farm: Farm) -> None:
    """``base * 2 ** (failures - 1)`` overflowed a float after ~1000 consecutive failures."""
    x = drv("x")
    await farm.add([x], roots=[x])
    agent = farm.agent("m1")
    await farm.tick()
    [a] = agent.take_assigns()
    agent.venue.consecutive_failures = 5000
    assert await farm.report(agent, a, p.Outcome.UPLOAD_FAILURE)
    assert agent.venue.backoff_until == T0 + CONFIG.agent_backoff_max_secs


# ---- faults found in review ----------------------------------------------------------------
@pytest.fixture
def no_reload(farm: Farm, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the scheduler reloads its working copy from the database."""

    async def load(*, fresh_start: bool = True) -> None:
        raise AssertionError("a transition that applies after its commit needs no reload")

    monkeypatch.setattr(farm.sched, "load", load)


async def _x_leased_y_waiting(farm: Farm) -> tuple[int, int, int, Agent, p.Assign]:
    """A build of y on x, x assigned to agent m1: (build, x's step, y's step, m1, x's assign)."""
    x = drv("x")
    y = drv("y", x)
    build = await farm.add([x, y], roots=[y])
    agent = farm.agent("m1")
    await farm.tick()
    [a] = agent.take_assigns()
    return build, farm.sid(x), farm.sid(y), agent, a


async def _broken(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("database is locked")


async def test_a_failed_result_transaction_leaves_memory_as_it_was(
    farm: Farm, monkeypatch: pytest.MonkeyPatch, no_reload: None
) -> None:
    build, x, y, agent, a = await _x_leased_y_waiting(farm)
    farm.uploaded.update(a.outputs.values())
    # The success's transaction fails part way (y's promotion): nothing of it is applied.
    with monkeypatch.context() as patch:
        patch.setattr(queries, "update_steps_in_state", _broken)
        with pytest.raises(RuntimeError):
            await farm.report(agent, a, p.Outcome.SUCCESS)
    # Memory is as it was: x is still leased to m1, y still waits for it, and a re-sent
    # result (the agent re-sends unacknowledged ones) is recorded.
    assert farm.sched.nodes[x].state is StepState.ASSIGNED
    assert farm.sched.nodes[x].lease_id == a.lease_id
    assert farm.sched.nodes[y].state is StepState.WAITING
    assert farm.sched.nodes[y].deps == {x}
    assert x in agent.venue.running
    assert agent.venue.consecutive_failures == 0
    assert await farm.report(agent, a, p.Outcome.SUCCESS)
    await farm.tick()
    [b] = agent.take_assigns()
    assert await farm.succeed(agent, b)
    assert await farm.build_state(build) == "succeeded"


async def test_a_failed_cancel_leaves_memory_as_it_was(
    farm: Farm, monkeypatch: pytest.MonkeyPatch, no_reload: None
) -> None:
    build, x, y, agent, a = await _x_leased_y_waiting(farm)
    # The cancellation's last write fails: its steps' writes roll back with it, and memory
    # was never changed.
    with monkeypatch.context() as patch:
        patch.setattr(queries, "finish_build", _broken)
        with pytest.raises(RuntimeError):
            await farm.sched.cancel_build(build)
    assert farm.sched.nodes[x].state is StepState.ASSIGNED
    assert farm.sched.nodes[y].state is StepState.WAITING
    assert build in farm.sched.builds
    assert agent.outbox == []  # nothing aborted
    assert await farm.sched.cancel_build(build)
    assert await farm.build_state(build) == "cancelled"
    assert agent.aborts() == [a.step_id]


def _memory(farm: Farm) -> dict[str, Any]:
    """What the working copy holds, as plain values to compare."""
    s = farm.sched
    return {
        "nodes": {
            i: (n.state, sorted(n.deps), sorted(n.dependents), sorted(n.builds), n.priority)
            for i, n in s.nodes.items()
        },
        "builds": {
            b.id: (b.state, sorted(b.steps), b.unfinished, b.roots) for b in s.builds.values()
        },
        "by_drv": dict(s.by_drv),
        "runnable": farm.runnable(),
    }


async def test_a_failed_admission_leaves_memory_as_it_was(
    farm: Farm, monkeypatch: pytest.MonkeyPatch, no_reload: None
) -> None:
    build, x, _y, agent, a = await _x_leased_y_waiting(farm)
    z = drv("z", drv("x"))
    w = drv("w")
    before = _memory(farm)
    # The new build joins x and queues z and w; its roots' write fails last: nothing of it
    # is applied (no new steps, x not shared, no build).
    with monkeypatch.context() as patch:
        patch.setattr(queries, "insert_build_roots", _broken)
        with pytest.raises(RuntimeError):
            await farm.add([drv("x"), z, w], roots=[z, w])
    assert _memory(farm) == before
    second = await farm.add([drv("x"), z, w], roots=[z, w])
    assert farm.sched.nodes[x].builds == {build, second}
    assert await farm.succeed(agent, a)
    built = []
    while assigns := (await farm.tick(), agent.take_assigns())[1]:
        for b in assigns:
            built.append(b.drv_path)
            assert await farm.succeed(agent, b)
    assert sorted(built) == sorted([drv("y", drv("x")).drv_path, z.drv_path, w.drv_path])
    assert await farm.build_state(second) == "succeeded"


async def test_a_failed_restart_leaves_memory_as_it_was(
    farm: Farm, monkeypatch: pytest.MonkeyPatch, no_reload: None
) -> None:
    a, b = drv("a"), drv("b")
    build = await farm.add([a, b], roots=[a, b])
    agent = farm.agent("m1", max_jobs=2)
    await farm.tick()
    assigned = by_drv(agent.take_assigns())
    assert await farm.report(agent, assigned[a.drv_path], p.Outcome.BUILD_FAILURE)
    assert await farm.build_state(build) == "running"  # b still runs
    before = _memory(farm)
    # The restart queues a again; its edges' write fails: a stays failed in memory, the
    # build keeps its count.
    with monkeypatch.context() as patch:
        patch.setattr(queries, "insert_step_deps", _broken)
        with pytest.raises(RuntimeError):
            await farm.sched.restart_build(build)
    assert _memory(farm) == before
    assert await farm.state(a) is StepState.FAILED
    assert await farm.sched.restart_build(build)
    assert farm.sched.nodes[farm.sid(a)].state is StepState.RUNNABLE
    assert farm.sched.builds[build].unfinished == 2
    await farm.tick()
    [again] = agent.take_assigns()
    assert await farm.succeed(agent, again)
    assert await farm.succeed(agent, assigned[b.drv_path])
    assert await farm.build_state(build) == "succeeded"


async def test_a_failed_restart_of_an_ended_build_leaves_memory_as_it_was(
    farm: Farm, monkeypatch: pytest.MonkeyPatch, no_reload: None
) -> None:
    x = drv("x")
    build = await farm.add([x], roots=[x])
    assert await farm.sched.cancel_build(build)
    before = _memory(farm)
    with monkeypatch.context() as patch:
        patch.setattr(queries, "finish_build", _broken)
        patch.setattr(queries, "update_steps", _broken)
        with pytest.raises(RuntimeError):
            await farm.sched.restart_build(build)
    assert _memory(farm) == before
    assert build not in farm.sched.builds
    assert await farm.build_state(build) == "cancelled"
    assert await farm.sched.restart_build(build)
    assert await farm.state(x) is StepState.RUNNABLE


async def test_a_failed_pass_reloads_memory_from_the_database(
    farm: Farm, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = drv("x")
    build = await farm.add([x], roots=[x])
    agent = farm.agent("m1")
    # A pass changes memory as it assigns (x leased to m1), then its write fails: the
    # working copy is thrown away and reloaded, where x is still runnable.
    with monkeypatch.context() as patch:
        patch.setattr(queries, "update_steps_each", _broken)
        with pytest.raises(RuntimeError):
            await farm.tick()
        async with farm.sched._lock:
            await farm.sched.recover()
    assert farm.sched.nodes[farm.sid(x)].state is StepState.RUNNABLE
    assert farm.sid(x) not in agent.venue.running
    agent.take_assigns()
    await farm.tick()
    [a] = agent.take_assigns()
    assert await farm.succeed(agent, a)
    assert await farm.build_state(build) == "succeeded"


async def test_a_step_whose_assign_cannot_be_built_fails_alone(farm: Farm) -> None:
    huge = drv("huge")
    huge = dataclasses.replace(
        huge, outputs={f"o{i}": f"/nix/store/{'a' * 32}-huge-o{i}" for i in range(300)}
    )
    fine = drv("fine")
    bad_build = await farm.add([huge], roots=[huge])
    good_build = await farm.add([fine], roots=[fine])
    agent = farm.agent("m1", max_jobs=2)
    await farm.tick()
    [a] = agent.take_assigns()
    assert a.drv_path == fine.drv_path
    assert await farm.state(huge) is StepState.FAILED
    assert await farm.build_state(bad_build) == "failed"
    assert await farm.succeed(agent, a)
    assert await farm.build_state(good_build) == "succeeded"


async def test_new_dependency_of_a_runnable_step_cannot_fail_it(farm: Farm) -> None:
    # y is runnable; a second build plans y again on top of a new dependency z that then
    # fails: y keeps the dependencies it had and is not marked dependency_failed.
    x = drv("x")
    y = drv("y", x)
    await farm.add([x, y], roots=[y])
    first = farm.agent("m1")
    await farm.tick()
    [ax] = first.take_assigns()
    assert await farm.succeed(first, ax)
    farm.sched.detach(first.venue)
    assert farm.sched.nodes[farm.sid(y)].state is StepState.RUNNABLE
    z = drv("z", features=["kvm"])
    async with farm.engine.begin() as conn:
        await queries.insert_derivation(conn, z)
    await farm.sched.add_build(
        priority=0,
        created_by="t",
        roots={y.drv_path: y.drv_path},
        planned=[PlannedStep(z, ()), PlannedStep(y, (z.drv_path,))],
    )
    kvm_only = farm.agent("m2", supported=["kvm"], mandatory=["kvm"])
    await farm.tick()
    [az] = kvm_only.take_assigns()
    assert az.drv_path == z.drv_path
    assert await farm.report(kvm_only, az, p.Outcome.BUILD_FAILURE)
    assert farm.sched.nodes[farm.sid(y)].state is StepState.RUNNABLE


async def test_a_departed_venue_gives_back_what_it_never_accepted(farm: Farm) -> None:
    x, y = drv("x"), drv("y")
    await farm.add([x, y], roots=[x, y])
    agent = farm.agent("m1", max_jobs=2)
    await farm.tick()
    a, b = agent.take_assigns()
    await farm.sched.accepted(agent.venue, p.Accepted(step_id=a.step_id, lease_id=a.lease_id))
    farm.sched.detach(agent.venue)
    await farm.sched.release_unaccepted(agent.venue)
    # The accepted step keeps its lease (the agent may come back running it); the other one,
    # never accepted, is runnable again at once.
    assert farm.sched.nodes[a.step_id].state is StepState.BUILDING
    assert farm.sched.nodes[b.step_id].state is StepState.RUNNABLE
    assert await farm.state(b.step_id) is StepState.RUNNABLE
    other = farm.agent("m2")
    await farm.tick()
    assert [m.step_id for m in other.take_assigns()] == [b.step_id]


async def test_a_replaced_venue_leaves_the_newer_session_alone(farm: Farm) -> None:
    x = drv("x")
    await farm.add([x], roots=[x])
    old = farm.agent("m1")
    await farm.tick()
    [a] = old.take_assigns()
    farm.sched.detach(old.venue)
    farm.agent("m1")  # the same machine, a newer session, already attached
    await farm.sched.release_unaccepted(old.venue)
    assert farm.sched.nodes[a.step_id].state is StepState.ASSIGNED


# ---- admission in parts, chunked dispatch --------------------------------------------------
def _part(
    steps: Sequence[queries.DrvInfo],
    planned: Sequence[queries.DrvInfo],
    roots: Sequence[queries.DrvInfo] | None = None,
) -> PlanPart:
    """A plan part of ``steps``, each depending on its inputs among ``planned``."""
    paths = {d.drv_path for d in planned}
    items = [PlannedStep(d, tuple(i for i in d.input_drvs if i in paths)) for d in steps]
    root_map: dict[str, str | None] | None = None
    if roots is not None:
        root_map = {d.drv_path: d.drv_path for d in roots}
    return PlanPart(items, plan_heights([(s.drv.drv_path, s.deps) for s in items]), root_map)


async def _record(farm: Farm, *drvs: queries.DrvInfo) -> None:
    async with farm.engine.begin() as conn:
        for d in drvs:
            await queries.insert_derivation(conn, d)


async def test_steps_of_an_early_part_run_before_the_plan_is_complete(farm: Farm) -> None:
    leaf_a, leaf_b = drv("leaf-a"), drv("leaf-b")
    top = drv("top", leaf_a, leaf_b)
    await _record(farm, leaf_a, leaf_b, top)
    planned = [leaf_a, leaf_b, top]
    rest_of_plan = asyncio.Event()

    async def parts() -> AsyncIterator[PlanPart]:
        yield _part([leaf_a, leaf_b], planned)
        await rest_of_plan.wait()  # the planner still walks the graph
        yield _part([top], planned, roots=[top])

    agent = farm.agent("m1", max_jobs=4)
    admitting = asyncio.create_task(
        farm.sched.admit_build(priority=0, created_by="t", parts=parts())
    )
    await eventually(lambda: len(farm.sched.index) == 2)
    await farm.tick()
    early = by_drv(agent.take_assigns())
    assert set(early) == {leaf_a.drv_path, leaf_b.drv_path}
    # The build cannot end before its plan is complete, even when all its steps so far did.
    for a in early.values():
        assert await farm.succeed(agent, a)
    assert not admitting.done()
    [build_id] = farm.sched.builds
    assert await farm.build_state(build_id) == "running"
    rest_of_plan.set()
    assert await admitting == build_id
    await farm.tick()
    [last] = agent.take_assigns()
    assert last.drv_path == top.drv_path
    assert await farm.succeed(agent, last)
    assert await farm.build_state(build_id) == "succeeded"


async def test_a_plan_failing_part_way_cancels_its_steps_and_leaves_no_build(farm: Farm) -> None:
    shared, own = drv("shared"), drv("own")
    await _record(farm, shared, own)
    other = await farm.add([shared], roots=[shared])

    async def parts() -> AsyncIterator[PlanPart]:
        yield _part([shared, own], [shared, own])
        raise NotFound("unknown derivation /nix/store/...-deep.drv")

    agent = farm.agent("m1", max_jobs=4)
    with pytest.raises(NotFound):
        await farm.sched.admit_build(priority=0, created_by="t", parts=parts())
    # The build is gone; its own step is cancelled, the shared one still runs for the other.
    async with farm.engine.connect() as conn:
        assert [int(b.id) for b in await queries.fetch_builds(conn, 10)] == [other]
    assert await farm.state(own) is StepState.CANCELLED
    assert farm.sched.builds.keys() == {other}
    await farm.tick()
    [a] = agent.take_assigns()
    assert a.drv_path == shared.drv_path
    assert await farm.succeed(agent, a)
    assert await farm.build_state(other) == "succeeded"


async def test_an_admission_stopped_part_way_undoes_itself(farm: Farm) -> None:
    x, y = drv("x"), drv("y")
    await _record(farm, x, y)
    never = asyncio.Event()

    async def parts() -> AsyncIterator[PlanPart]:
        yield _part([x, y], [x, y])
        await never.wait()
        yield _part([], [], roots=[x, y])  # pragma: no cover

    admitting = asyncio.create_task(
        farm.sched.admit_build(priority=0, created_by="t", parts=parts())
    )
    await eventually(lambda: len(farm.sched.index) == 2)
    admitting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await admitting
    assert farm.sched.builds == {} and len(farm.sched.index) == 0
    async with farm.engine.connect() as conn:
        assert await queries.fetch_builds(conn, 10) == []
    assert await farm.state(x) is StepState.CANCELLED
    assert await farm.state(y) is StepState.CANCELLED


async def test_a_build_left_without_roots_is_cancelled_at_start(farm: Farm) -> None:
    """A runner that stopped while admitting a build left it without roots: the next start
    cancels it and the steps only it needed."""
    z = drv("z")
    async with farm.engine.begin() as conn:
        build_id = await queries.insert_build(
            conn, state="queued", priority=0, created_at=T0, created_by="t", trusted=True
        )
        await queries.insert_derivation(conn, z)
        sid = await queries.insert_step(
            conn, drv_path=z.drv_path, state=StepState.RUNNABLE, created_at=T0, attempts=0
        )
        assert sid is not None
        await queries.insert_build_steps(conn, build_id, [sid])
    restarted = farm.new_scheduler()
    await restarted.load()
    assert restarted.builds == {} and len(restarted.index) == 0
    assert await farm.build_state(build_id) == "cancelled"
    assert await farm.state(z) is StepState.CANCELLED
    # Nobody cancelled it: the history says what happened, once (a second start adds nothing).
    again = farm.new_scheduler()
    await again.load()
    async with farm.engine.connect() as conn:
        events = await queries.fetch_build_events(conn, build_id, 10)
        found = await queries.fetch_submitted_build(conn, "t", "no-such-key")
    assert [(e.kind, e.actor) for e in events] == [("admission_interrupted", "runner")]
    assert "nobody cancelled it" in events[0].detail
    assert found is None


async def test_one_pass_fills_more_slots_than_a_dispatch_chunk(
    farm: Farm, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dispatch, "DISPATCH_CHUNK", 2)
    steps = [drv(f"s{i}") for i in range(5)]
    await farm.add(steps, roots=steps)
    sent_before_commit: list[int] = []
    agent = farm.agent("m1", max_jobs=5)
    real = queries.update_steps_each

    async def counting(conn: Any, rows: Sequence[dict[str, Any]]) -> None:
        sent_before_commit.append(len(agent.assigns()))
        await real(conn, rows)

    monkeypatch.setattr(queries, "update_steps_each", counting)
    await farm.tick()
    assert len(agent.take_assigns()) == 5
    # Three chunks (2 + 2 + 1), each written, then sent before the next is planned.
    assert sent_before_commit == [0, 2, 4]
    assert all(farm.sched.nodes[farm.sid(s)].state is StepState.ASSIGNED for s in steps)


async def test_a_builds_took_leaves_out_the_time_it_only_waited(farm: Farm) -> None:
    """The dashboard's "took" (docs/dashboard.md): the time its steps ran, from the attempt
    records and the steps running now; not the time it waited for a slot."""
    from bigtent.runner.dashboard.present import busy_secs

    x = drv("x")
    y = drv("y", x)
    build = await farm.add([x, y], roots=[y])
    agent = farm.agent("m1")

    async def took() -> float:
        async with farm.engine.connect() as conn:
            spans = await queries.fetch_build_run_intervals(conn, [build])
            row = await queries.fetch_build(conn, build)
        assert row is not None
        end = row.finished_at if row.finished_at is not None else farm.clock.now
        return busy_secs(spans[build], float(row.created_at), end)

    await farm.tick(T0 + 30)  # waited 30 s for an agent: not counted
    [a] = agent.take_assigns()
    farm.clock.now = T0 + 40
    assert await took() == 10.0  # x runs: counted so far
    assert await farm.succeed(agent, a)
    farm.clock.now = T0 + 100  # y waits 60 s for a slot: not counted
    assert await took() == 10.0
    await farm.tick()
    [b] = agent.take_assigns()
    farm.clock.now = T0 + 105
    assert await farm.succeed(agent, b)
    assert await farm.build_state(build) == "succeeded"
    farm.clock.now = T0 + 500
    assert await took() == 15.0


async def test_a_failed_chunk_of_a_staged_admission_is_undone_without_a_reload(
    farm: Farm, monkeypatch: pytest.MonkeyPatch, no_reload: None
) -> None:
    shared, own, late = drv("shared"), drv("own"), drv("late", drv("own"))
    await _record(farm, shared, own, late)
    other = await farm.add([shared], roots=[shared])
    before = _memory(farm)
    broken = False

    async def parts() -> AsyncIterator[PlanPart]:
        nonlocal broken
        yield _part([shared, own], [shared, own, late])
        broken = True  # the second chunk's transaction fails as it writes its edges
        yield _part([late], [shared, own, late], roots=[shared, late])

    real = queries.insert_step_deps

    async def insert_step_deps(conn: Any, pairs: Any) -> None:
        if broken:
            raise RuntimeError("database is locked")
        await real(conn, pairs)

    monkeypatch.setattr(queries, "insert_step_deps", insert_step_deps)
    with pytest.raises(RuntimeError):
        await farm.sched.admit_build(priority=0, created_by="t", parts=parts())
    # The first chunk was applied, then undone with the build; the second never was.
    assert _memory(farm) == before
    assert late.drv_path not in farm.sched.by_drv
    assert await farm.state(own) is StepState.CANCELLED
    assert farm.sched.builds.keys() == {other}
