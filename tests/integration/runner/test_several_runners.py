"""Two schedulers on one PostgreSQL database, each with its own engine, change feed (real
LISTEN/NOTIFY) and fake agents, under one fake clock: what one runner does, the other learns;
no step is ever assigned twice, whoever races whom.

The loops are driven one ``tick`` at a time. ``barrier(runner)`` sends a marker notification
after everything committed so far and waits until the runner heard it: PostgreSQL delivers
notifications in commit order, so by then it has heard every change before it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from bigtent import protocol as p
from bigtent.config import Role
from bigtent.runner.db import queries
from bigtent.runner.db.migrate import create_engine
from bigtent.runner.db.notify import CHANNEL, Change, PgChangeFeed, encode, note_builds, note_steps
from bigtent.runner.logs.store import LogStore
from bigtent.runner.scheduler import persist, reads
from bigtent.runner.scheduler.model import PlannedStep, Venue
from bigtent.runner.scheduler.service import Scheduler
from bigtent.states import StepState
from tests.databases import needs_postgresql
from tests.integration.runner.conftest import MakeRunner, eventually
from tests.integration.runner.test_dispatcher import CONFIG, X86, Agent, Clock, _broken, drv

pytestmark = [pytest.mark.postgres, needs_postgresql]
WAIT_SECS = 15.0


@dataclass(eq=False)
class Runner:
    """One runner's scheduler, its engine and feed, and what the feed told it."""

    name: str
    engine: AsyncEngine
    sched: Scheduler
    feed: PgChangeFeed
    heard: list[Change | None] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    agents: list[Agent] = field(default_factory=list)

    async def on_change(self, change: Change | None) -> None:
        self.heard.append(change)
        self.sched.notice(change)

    def agent(self, machine_id: str, *, max_jobs: int = 1) -> Agent:
        outbox: list[BaseModel] = []
        venue = Venue(
            machine_id=machine_id,
            name=f"agent-{machine_id}",
            systems=frozenset({X86}),
            supported_features=frozenset(),
            mandatory_features=frozenset(),
            max_jobs=max_jobs,
            speed_factor=1.0,
            send=outbox.append,
        )
        agent = Agent(venue, outbox, self.sched.attach(venue, []))
        self.agents.append(agent)
        return agent

    async def succeed(self, agent: Agent, a: p.Assign, uploaded: set[str]) -> bool:
        await self.sched.accepted(agent.venue, p.Accepted(step_id=a.step_id, lease_id=a.lease_id))
        uploaded.update(a.outputs.values())
        return await self.sched.result(
            agent.venue,
            p.Result(step_id=a.step_id, lease_id=a.lease_id, outcome=p.Outcome.SUCCESS),
        )


class Pair:
    """Runners A and B on one database."""

    def __init__(self, url: str, tmp_path: Path) -> None:
        self.url = url
        self.tmp_path = tmp_path
        self.clock = Clock()
        self.uploaded: set[str] = set()
        self.runners: list[Runner] = []

    async def start(self, name: str, *, listen: bool = True) -> Runner:
        engine = create_engine(self.url)
        feed = PgChangeFeed(engine)

        async def present(paths: Sequence[str]) -> set[str]:
            return set(paths) & self.uploaded

        sched = Scheduler(
            engine,
            CONFIG,
            LogStore(self.tmp_path / name / "logs", 1 << 20),
            present,
            clock=self.clock,
            rand=lambda: 0.0,
            feed=feed,
        )
        await sched.load()
        runner = Runner(name, engine, sched, feed)
        self.runners.append(runner)
        if listen:
            await self.listen(runner)
        return runner

    async def listen(self, runner: Runner) -> None:
        runner.task = asyncio.create_task(runner.feed.follow(runner.on_change))
        await asyncio.wait_for(runner.feed.connected.wait(), WAIT_SECS)

    async def barrier(self, *runners: Runner) -> None:
        """Until each runner heard every change committed before this call."""
        marker = f"barrier-{uuid.uuid4().hex}"
        async with self.runners[0].engine.begin() as conn:
            [payload] = encode(Change(marker))
            await conn.execute(text("SELECT pg_notify(:c, :p)"), {"c": CHANNEL, "p": payload})
        for runner in runners or self.runners:
            deadline = asyncio.get_running_loop().time() + WAIT_SECS
            while not any(c is not None and c.origin == marker for c in runner.heard):
                assert asyncio.get_running_loop().time() < deadline, f"{runner.name} deaf"
                await asyncio.sleep(0.01)

    async def add(
        self, runner: Runner, planned: Sequence[queries.DrvInfo], roots: Sequence[queries.DrvInfo]
    ) -> int:
        async with runner.engine.begin() as conn:
            for d in planned:
                await queries.insert_derivation(conn, d)
        paths = {d.drv_path for d in planned}
        steps = [PlannedStep(d, tuple(i for i in d.input_drvs if i in paths)) for d in planned]
        return await runner.sched.add_build(
            priority=0,
            created_by="test",
            roots={d.drv_path: d.drv_path for d in roots},
            planned=steps,
        )

    async def step(self, d: queries.DrvInfo) -> queries.LeaseRow:
        async with self.runners[0].engine.connect() as conn:
            row = (await queries.fetch_steps_by_drv(conn, [d.drv_path]))[d.drv_path]
            return (await queries.lock_steps(conn, [int(row.id)], lock=False))[int(row.id)]

    async def step_by_id(self, step_id: int) -> queries.LeaseRow:
        async with self.runners[0].engine.connect() as conn:
            return (await queries.lock_steps(conn, [step_id], lock=False))[step_id]

    async def build_state(self, build_id: int) -> str:
        async with self.runners[0].engine.connect() as conn:
            row = await queries.fetch_build(conn, build_id)
        assert row is not None
        return str(row.state)

    async def close(self) -> None:
        for runner in self.runners:
            if runner.task is not None:
                runner.task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await runner.task
            await runner.engine.dispose()


@pytest.fixture
async def pair(database_url: str, tmp_path: Path) -> AsyncIterator[Pair]:
    made = Pair(database_url, tmp_path)
    yield made
    await made.close()


async def _tick_all(pair: Pair) -> None:
    """Both loops at once (their claims race), then until each heard the other."""
    await asyncio.gather(*(r.sched.tick(pair.clock.now) for r in pair.runners))
    await pair.barrier()


# ---- the feed --------------------------------------------------------------------------------
async def test_only_committed_changes_of_other_runners_are_heard(pair: Pair) -> None:
    a, b = await pair.start("a"), await pair.start("b")
    await pair.barrier()
    assert a.heard[0] is None and b.heard[0] is None  # listening began: read everything
    async with a.engine.begin() as conn:
        note_steps(conn, [11, 12])  # as the queries do
        note_builds(conn, [5])
        await a.feed.publish(conn)
    with pytest.raises(RuntimeError):
        async with a.engine.begin() as conn:
            note_steps(conn, [99])
            await a.feed.publish(conn)
            raise RuntimeError("rolled back")
    await pair.barrier()
    heard_b = [c for c in b.heard if c is not None and c.origin == a.feed.origin]
    assert heard_b == [Change(a.feed.origin, frozenset({11, 12}), frozenset({5}))]
    assert not [c for c in a.heard if c is not None and c.origin == a.feed.origin]


async def test_a_lost_listening_connection_is_replaced_and_everything_read_again(
    pair: Pair,
) -> None:
    a, b = await pair.start("a"), await pair.start("b")
    await pair.barrier()
    pids = [a.feed.backend_pid, b.feed.backend_pid]
    assert all(pids)
    async with a.engine.begin() as conn:
        for pid in pids:
            await conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    # Each feed reconnects and says "anything may have changed" (None) again.
    for runner in (a, b):
        deadline = asyncio.get_running_loop().time() + WAIT_SECS
        while runner.heard.count(None) < 2:
            assert asyncio.get_running_loop().time() < deadline, "no reconnect"
            await asyncio.sleep(0.02)
        assert runner.feed.backend_pid not in pids
    await pair.barrier()  # and hears changes again


# ---- dispatching ------------------------------------------------------------------------------
async def test_a_dag_built_by_agents_of_both_runners_assigns_every_step_once(
    pair: Pair,
) -> None:
    a, b = await pair.start("a"), await pair.start("b")
    lib = drv("lib")
    mids = [drv(f"m{i}", lib) for i in range(6)]
    app = drv("app", *mids)
    build = await pair.add(a, [lib, *mids, app], [app])
    agents = [(a, a.agent("a1", max_jobs=2)), (b, b.agent("b1", max_jobs=2))]
    await pair.barrier()
    assigned: list[int] = []
    by_agent: dict[str, int] = {}
    for _round in range(20):
        await _tick_all(pair)
        got = False
        for runner, agent in agents:
            for x in agent.take_assigns():
                got = True
                assigned.append(x.step_id)
                by_agent[agent.venue.name] = by_agent.get(agent.venue.name, 0) + 1
                assert await runner.succeed(agent, x, pair.uploaded)
        if not got and await pair.build_state(build) == "succeeded":
            break
    assert await pair.build_state(build) == "succeeded"
    assert sorted(assigned) == sorted(set(assigned)) and len(assigned) == 8
    assert set(by_agent) == {"agent-a1", "agent-b1"}, by_agent
    await pair.barrier()
    for runner in (a, b):
        assert build not in runner.sched.builds  # over on both
        assert not runner.sched.leases


async def test_racing_claims_never_assign_a_step_twice(pair: Pair) -> None:
    a, b = await pair.start("a"), await pair.start("b")
    leaves = [drv(f"leaf{i}") for i in range(24)]
    top = drv("top", *leaves)
    build = await pair.add(b, [*leaves, top], [top])
    await pair.barrier()
    # Both know the same 24 runnable steps and have 8 free slots each: the top of both
    # queues is the same, so every claim of one round races.
    agents = [(a, a.agent("a1", max_jobs=4)), (a, a.agent("a2", max_jobs=4)),
              (b, b.agent("b1", max_jobs=4)), (b, b.agent("b2", max_jobs=4))]  # fmt: skip
    seen: dict[int, str] = {}
    for _round in range(30):
        await asyncio.gather(a.sched.tick(pair.clock.now), b.sched.tick(pair.clock.now))
        done = []
        for runner, agent in agents:
            for x in agent.take_assigns():
                assert x.step_id not in seen, f"step {x.step_id} assigned twice"
                seen[x.step_id] = agent.venue.name
                done.append((runner, agent, x))
        for runner, agent, x in done:
            assert await runner.succeed(agent, x, pair.uploaded)
        await pair.barrier()
        if await pair.build_state(build) == "succeeded":
            break
    assert await pair.build_state(build) == "succeeded"
    assert len(seen) == 25
    assert {"agent-a1", "agent-a2"} & set(seen.values())
    assert {"agent-b1", "agent-b2"} & set(seen.values())


async def test_a_build_joining_a_step_the_other_runner_runs(pair: Pair) -> None:
    a, b = await pair.start("a"), await pair.start("b", listen=False)
    x = drv("x")
    first = await pair.add(a, [x], [x])
    agent_a = a.agent("a1")
    await a.sched.tick(pair.clock.now)
    [assign_x] = agent_a.take_assigns()
    # B has not heard of x (it is not listening yet): its new build finds x's row active and
    # unknown here, reads everything again and joins the running step instead of queueing
    # it a second time.
    y = drv("y", x)
    assert x.drv_path not in b.sched.by_drv
    second = await pair.add(b, [x, y], [y])
    assert b.sched.nodes[b.sched.by_drv[x.drv_path]].lease_id == assign_x.lease_id
    await pair.listen(b)
    agent_b = b.agent("b1")
    await _tick_all(pair)
    assert agent_b.take_assigns() == []  # x is a's, y waits for it
    assert (await pair.step(x)).lease_id == assign_x.lease_id
    assert await a.succeed(agent_a, assign_x, pair.uploaded)
    await pair.barrier()
    await _tick_all(pair)
    assigns = agent_a.take_assigns() + agent_b.take_assigns()
    assert [s.drv_path for s in assigns] == [y.drv_path]
    [assign_y] = assigns
    runner = a if assign_y in agent_a.outbox or agent_a.venue.running else b
    agent = agent_a if runner is a else agent_b
    assert await runner.succeed(agent, assign_y, pair.uploaded)
    await pair.barrier()
    assert await pair.build_state(first) == "succeeded"
    assert await pair.build_state(second) == "succeeded"


async def test_the_same_new_build_on_both_runners_at_once_makes_one_step_per_drv(
    pair: Pair,
) -> None:
    a, b = await pair.start("a"), await pair.start("b")
    base = drv("base")
    tops = [drv(f"t{i}", base) for i in range(4)]
    builds = await asyncio.gather(
        pair.add(a, [base, *tops], tops), pair.add(b, [base, *tops], tops)
    )
    async with a.engine.connect() as conn:
        rows = await queries.fetch_steps_by_drv(conn, [d.drv_path for d in [base, *tops]])
    assert len(rows) == 5  # one step per derivation, shared by both builds
    agent = a.agent("a1", max_jobs=8)
    other = b.agent("b1", max_jobs=8)
    assigned: list[int] = []
    for _round in range(10):
        await _tick_all(pair)
        for runner, ag in ((a, agent), (b, other)):
            for x in ag.take_assigns():
                assigned.append(x.step_id)
                assert await runner.succeed(ag, x, pair.uploaded)
        if all([await pair.build_state(i) == "succeeded" for i in builds]):
            break
    assert sorted(assigned) == sorted({int(r.id) for r in rows.values()})


async def test_cancelling_on_one_runner_stops_the_agent_of_the_other(pair: Pair) -> None:
    a, b = await pair.start("a"), await pair.start("b")
    x = drv("x")
    build = await pair.add(a, [x], [x])
    agent = a.agent("a1")
    await a.sched.tick(pair.clock.now)
    [assign] = agent.take_assigns()
    await a.sched.accepted(
        agent.venue, p.Accepted(step_id=assign.step_id, lease_id=assign.lease_id)
    )
    await pair.barrier()
    assert await b.sched.cancel_build(build)
    await pair.barrier(a)
    await a.sched.tick(pair.clock.now)
    assert agent.aborts() == [assign.step_id]
    assert assign.step_id not in agent.venue.running
    # Its result comes too late: acknowledged, not recorded.
    assert not await a.succeed(agent, assign, pair.uploaded)
    assert (await pair.step(x)).state == StepState.CANCELLED
    assert await pair.build_state(build) == "cancelled"


async def test_a_bump_on_one_runner_reorders_the_queue_of_the_other(pair: Pair) -> None:
    a, b = await pair.start("a"), await pair.start("b")
    low, high = drv("low"), drv("high")
    await pair.add(a, [low], [low])
    bumped = await pair.add(a, [high], [high])
    await pair.barrier()
    assert await b.sched.bump_build(bumped, 10)
    await pair.barrier(a)
    agent = a.agent("a1")
    await a.sched.tick(pair.clock.now)
    assert [x.drv_path for x in agent.take_assigns()] == [high.drv_path]


async def test_a_restart_on_one_runner_queues_the_failed_steps_on_the_other(pair: Pair) -> None:
    a, b = await pair.start("a"), await pair.start("b")
    x = drv("x")
    y = drv("y", x)
    build = await pair.add(a, [x, y], [y])
    agent = a.agent("a1")
    await a.sched.tick(pair.clock.now)
    [first] = agent.take_assigns()
    await a.sched.accepted(agent.venue, p.Accepted(step_id=first.step_id, lease_id=first.lease_id))
    assert await a.sched.result(
        agent.venue,
        p.Result(step_id=first.step_id, lease_id=first.lease_id, outcome=p.Outcome.BUILD_FAILURE),
    )
    assert await pair.build_state(build) == "failed"
    assert (await pair.step(y)).state == StepState.DEPENDENCY_FAILED
    await pair.barrier()
    assert await b.sched.restart_build(build)
    await pair.barrier(a)
    await a.sched.tick(pair.clock.now)
    [again] = agent.take_assigns()
    assert again.drv_path == x.drv_path and again.step_id == first.step_id
    assert await a.succeed(agent, again, pair.uploaded)
    await a.sched.tick(pair.clock.now)
    [last] = agent.take_assigns()
    assert last.drv_path == y.drv_path
    assert await a.succeed(agent, last, pair.uploaded)
    await pair.barrier()
    assert await pair.build_state(build) == "succeeded"
    await b.sched.tick(pair.clock.now)
    assert build not in b.sched.builds  # b heard it is over


# ---- leases ---------------------------------------------------------------------------------
async def test_leases_held_by_a_live_runner_are_not_expired_by_the_other(pair: Pair) -> None:
    a, b = await pair.start("a"), await pair.start("b")
    x = drv("x")
    await pair.add(a, [x], [x])
    agent = a.agent("a1")
    spare = b.agent("b1")
    await a.sched.tick(pair.clock.now)
    [assign] = agent.take_assigns()
    await pair.barrier()
    lease = CONFIG.lease_secs
    # Heartbeats on a renew the lease; a stores the renewal once it is a third ahead.
    for t in (lease * 0.5, lease * 1.0, lease * 1.5, lease * 2.0):
        pair.clock.now += lease * 0.5
        a.sched.heartbeat(agent.venue, [assign.step_id])
        await a.sched.tick(pair.clock.now)
        await b.sched.tick(pair.clock.now)
        assert spare.take_assigns() == [], f"b took over a live lease at +{t}"
    row = await pair.step(x)
    assert row.lease_id == assign.lease_id and row.state == StepState.ASSIGNED
    assert row.lease_expires_at is not None and row.lease_expires_at > pair.clock.now
    # Runner a is gone (no more ticks, no heartbeats): once the stored expiry passes, b
    # expires the lease and its own agent gets the step (after the retry backoff).
    pair.clock.now = row.lease_expires_at + 1
    await b.sched.tick(pair.clock.now)
    pair.clock.now += CONFIG.retry_max_secs
    await b.sched.tick(pair.clock.now)
    [again] = spare.take_assigns()
    assert again.step_id == assign.step_id and again.lease_id != assign.lease_id
    # a's agent reports late: its lease is no longer the step's.
    assert not await a.succeed(agent, assign, pair.uploaded)


# ---- catching up -----------------------------------------------------------------------------
async def _z_waits_on_x_run_by_a(pair: Pair) -> tuple[Runner, Runner, int, int, Agent]:
    """A runs x (its agent's result committed); B's build has z waiting on x, which A never
    heard of (A does not listen), so z's row is still waiting: B must settle it when it
    catches up. Returns (a, b, B's build, z's step, B's agent)."""
    a, b = await pair.start("a", listen=False), await pair.start("b")
    x = drv("x")
    await pair.add(a, [x], [x])
    agent_a = a.agent("a1")
    await a.sched.tick(pair.clock.now)
    [assign_x] = agent_a.take_assigns()
    await pair.barrier(b)
    z = drv("z", x)
    build = await pair.add(b, [x, z], [z])
    z_id = b.sched.by_drv[z.drv_path]
    assert await a.succeed(agent_a, assign_x, pair.uploaded)
    assert (await pair.step(z)).state == StepState.WAITING
    await pair.barrier(b)
    return a, b, build, z_id, b.agent("b1")


async def test_waiting_steps_another_runner_unblocked_are_settled_on_catching_up(
    pair: Pair,
) -> None:
    _a, b, build, z_id, agent = await _z_waits_on_x_run_by_a(pair)
    await b.sched.tick(pair.clock.now)
    [assign_z] = agent.take_assigns()
    assert assign_z.step_id == z_id
    assert await b.succeed(agent, assign_z, pair.uploaded)
    assert await pair.build_state(build) == "succeeded"
    assert build not in b.sched.builds


async def test_a_success_caught_up_from_the_other_runner_counts_for_locality(
    pair: Pair,
) -> None:
    _a, b, _build, z_id, agent = await _z_waits_on_x_run_by_a(pair)
    await b.sched.tick(pair.clock.now)
    [assign_z] = agent.take_assigns()
    assert assign_z.step_id == z_id
    # x succeeded on A's agent: B knows z's input is in that agent's store.
    assert b.sched.nodes[z_id].inputs_on == {"a1": 1}


async def test_a_failed_catch_up_leaves_memory_as_it_was(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    _a, b, build, z_id, agent = await _z_waits_on_x_run_by_a(pair)

    async def load(*, fresh_start: bool = True) -> None:
        raise AssertionError("a catch-up changes memory after its commit: no reload")

    monkeypatch.setattr(b.sched, "load", load)
    # Settling z fails: the transaction rolls back, z stays waiting here and in the
    # database, and nothing is reloaded (x's success, committed elsewhere, is copied).
    monkeypatch.setattr(persist, "settled", _broken)
    await b.sched.tick(pair.clock.now)
    assert agent.take_assigns() == []
    z = b.sched.nodes[z_id]
    assert z.state is StepState.WAITING and z_id not in b.sched.index
    assert (await pair.step_by_id(z_id)).state == StepState.WAITING
    assert build in b.sched.builds
    # The next catch-up settles it.
    monkeypatch.undo()
    monkeypatch.setattr(b.sched, "load", load)
    await b.sched.tick(pair.clock.now)
    [assign_z] = agent.take_assigns()
    assert assign_z.step_id == z_id
    assert await b.succeed(agent, assign_z, pair.uploaded)
    assert await pair.build_state(build) == "succeeded"


async def test_a_failed_read_of_a_catch_up_leaves_memory_as_it_was(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    _a, b, build, z_id, agent = await _z_waits_on_x_run_by_a(pair)
    [x_id] = b.sched.nodes[z_id].deps
    before = b.sched.nodes[x_id].state
    assert not before.is_final

    async def load(*, fresh_start: bool = True) -> None:
        raise AssertionError("a catch-up changes memory after its reads: no reload")

    monkeypatch.setattr(b.sched, "load", load)
    monkeypatch.setattr(reads, "steps", _broken)
    await b.sched.tick(pair.clock.now)
    assert agent.take_assigns() == []
    assert b.sched.nodes[x_id].state is before  # nothing copied
    monkeypatch.undo()
    monkeypatch.setattr(b.sched, "load", load)
    await b.sched.tick(pair.clock.now)  # the same rows are read again
    assert b.sched.nodes.get(x_id) is None or b.sched.nodes[x_id].state is StepState.SUCCEEDED
    [assign_z] = agent.take_assigns()
    assert assign_z.step_id == z_id
    assert await b.succeed(agent, assign_z, pair.uploaded)
    assert await pair.build_state(build) == "succeeded"


# ---- tokens ---------------------------------------------------------------------------------
async def test_tokens_created_or_revoked_on_one_runner_count_on_the_other(
    make_runner: MakeRunner, database_url: str
) -> None:
    a = await make_runner(serve=True, database={"url": database_url})
    b = await make_runner(serve=True, database={"url": database_url})
    for runner in (a, b):
        assert isinstance(runner.comps.feed, PgChangeFeed)
        await asyncio.wait_for(runner.comps.feed.connected.wait(), WAIT_SECS)
    resp = await a.client(Role.ADMIN).post("/api/v1/tokens", json={"role": "client"})
    assert resp.status_code == 201, resp.text
    secret, name = resp.json()["token"], resp.json()["name"]
    on_b = b.client(token=secret)

    async def status_on_b() -> int:
        return (await on_b.get("/api/v1/status")).status_code

    await eventually(lambda: _is(status_on_b(), 200))
    resp = await a.client(Role.ADMIN).delete(f"/api/v1/tokens/{name}")
    assert resp.status_code == 200, resp.text
    await eventually(lambda: _is(status_on_b(), 401))


async def _is(got: Awaitable[int], want: int) -> bool:
    return await got == want
