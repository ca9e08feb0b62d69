"""The autoscaler service over a real SQLite database and a real scheduler, with fake venues,
a fake clock and an in-process GitHub (httpx.MockTransport) that records every dispatch.

The loop is driven one ``tick(now)`` at a time; only the wake-up test runs the real loop, and
it waits on a condition, never on time.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncEngine

from bigtent import protocol as p
from bigtent.config import SchedulerSection
from bigtent.config.autoscale import AutoscaleSection, GithubPoolSection
from bigtent.runner.auth.policy import AgentIdentity
from bigtent.runner.autoscale.github import GithubWorkflow
from bigtent.runner.autoscale.service import Autoscaler
from bigtent.runner.db import queries
from bigtent.runner.logs.store import LogStore
from bigtent.runner.scheduler.model import PlannedStep, Venue
from bigtent.runner.scheduler.service import Scheduler
from bigtent.states import LaunchState
from tests.conftest import eventually
from tests.integration.runner.test_dispatcher import T0, X86, Clock, drv

REPO = "acme/widgets"
WORKFLOW_REPO = "acme/bigtent-agents"
TOKEN = "ghs_autoscaler_test_token"
POOL: dict[str, Any] = {
    "name": "gha",
    "systems": [X86],
    "supported_features": ["big"],
    "max_jobs": 1,
    "allowed_build_repositories": [REPO],
    "max_inflight": 3,
    "launch_ttl_secs": 300,
    "cooldown_secs": 30,
    "poll_interval_secs": 10,
    "workflow_repository": WORKFLOW_REPO,
    "token": TOKEN,
    "runner_url": "https://ci.example.org:8443",
    "audience": "bigtent",
}


@dataclass
class FakeGithub:
    """Answers every dispatch with the next queued response (default 204) and records it."""

    answers: list[httpx.Response] = field(default_factory=list)
    requests: list[httpx.Request] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.answers.pop(0) if self.answers else httpx.Response(204)

    @property
    def launch_ids(self) -> list[str]:
        return [json.loads(r.content)["inputs"]["launch_id"] for r in self.requests]


@dataclass
class Harness:
    engine: AsyncEngine
    tmp_path: Path
    clock: Clock = field(default_factory=Clock)
    github: FakeGithub = field(default_factory=FakeGithub)
    uploaded: set[str] = field(default_factory=set)
    sched: Scheduler | None = None
    scaler: Autoscaler | None = None
    _n: int = 0

    async def start(self, *, min_tick: float = 0.0, **pool: Any) -> Autoscaler:
        """A scheduler loaded from the database and an autoscaler over it (again: a restart)."""

        async def present(paths: Sequence[str]) -> set[str]:
            return set(paths) & self.uploaded

        self.sched = Scheduler(
            self.engine,
            SchedulerSection(),
            LogStore(self.tmp_path / "logs", 1 << 20),
            present,
            clock=self.clock,
        )
        await self.sched.load()
        section = AutoscaleSection(
            github=[GithubPoolSection.model_validate(POOL | pool)], min_tick_interval_secs=min_tick
        )
        workflows = [
            GithubWorkflow(cfg, TOKEN, transport=httpx.MockTransport(self.github))
            for cfg in section.github
        ]
        if self.scaler is not None:
            await self.scaler.aclose()
        self.scaler = Autoscaler(section, workflows, self.engine, self.sched, clock=self.clock)
        await self.scaler.load()
        return self.scaler

    async def build(
        self,
        drvs: Sequence[queries.DrvInfo],
        *,
        repository: str | None = REPO,
        trusted: bool = True,
    ) -> int:
        """A build of ``drvs`` (dependencies first) for ``repository``."""
        assert self.sched is not None
        async with self.engine.begin() as conn:
            for d in drvs:
                await queries.insert_derivation(conn, d)
        paths = {d.drv_path for d in drvs}
        planned = [PlannedStep(d, tuple(i for i in d.input_drvs if i in paths)) for d in drvs]
        build_id = await self.sched.add_build(
            priority=0,
            created_by="test",
            roots={d.drv_path: d.drv_path for d in drvs},
            planned=planned,
        )
        # Until builds record their repository at creation (trust scoping), set it here.
        async with self.engine.begin() as conn:
            await queries.update_build(conn, build_id, repository=repository, trusted=trusted)
        return build_id

    def steps(self, n: int, prefix: str = "s") -> list[queries.DrvInfo]:
        self._n += 1
        return [drv(f"{prefix}{self._n}-{i}") for i in range(n)]

    def agent(
        self, machine_id: str, *, max_jobs: int = 1, launch_id: str | None = None
    ) -> tuple[Venue, list[BaseModel]]:
        assert self.sched is not None
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
            launch_id=launch_id,
        )
        self.sched.attach(venue, [])
        return venue, outbox

    async def tick(self, at: float | None = None) -> float:
        assert self.scaler is not None
        if at is not None:
            self.clock.now = at
        return await self.scaler.tick(self.clock.now)

    async def launches(self) -> dict[str, Any]:
        async with self.engine.connect() as conn:
            return {r.launch_id: r for r in await queries.fetch_launches(conn)}

    async def states(self) -> list[str]:
        return sorted(r.state for r in (await self.launches()).values())


def identity(repository: str = WORKFLOW_REPO) -> AgentIdentity:
    return AgentIdentity(
        issuer="https://token.actions.githubusercontent.com",
        repository=repository,
        subject=f"repo:{repository}:ref:refs/heads/main",
        workflow_ref=f"{repository}/.github/workflows/bigtent-agent.yml@refs/heads/main",
        ref="refs/heads/main",
    )


@pytest.fixture
async def h(engine: AsyncEngine, tmp_path: Path) -> AsyncIterator[Harness]:
    harness = Harness(engine, tmp_path)
    yield harness
    if harness.scaler is not None:
        await harness.scaler.aclose()


# ---- launching --------------------------------------------------------------------------------
async def test_queued_work_causes_exactly_the_needed_launches(h: Harness) -> None:
    await h.start(max_jobs=2, max_inflight=5)
    await h.build(h.steps(5))
    wake_at = await h.tick()
    # 5 steps, 2 slots an agent: 3 agents.
    assert len(h.github.requests) == 3
    assert wake_at == T0 + POOL["poll_interval_secs"]
    rows = await h.launches()
    assert sorted(rows) == sorted(h.github.launch_ids)
    assert all(r.state == LaunchState.PENDING and r.pool == "gha" for r in rows.values())
    body = json.loads(h.github.requests[0].content)
    assert body["ref"] == "main"
    assert body["inputs"] | {"launch_id": "-"} == {
        "name": "gha",
        "runner_url": "https://ci.example.org:8443",
        "audience": "bigtent",
        "systems": X86,
        "supported_features": "big",
        "mandatory_features": "",
        "max_jobs": "2",
        "launch_id": "-",
        "bigtent_version": POOL.get("bigtent_version", "0.1.0"),
    }
    assert h.github.requests[0].headers["authorization"] == f"Bearer {TOKEN}"
    # While they start, nothing more is launched, however often it looks.
    for i in range(1, 6):
        await h.tick(T0 + i * 10)
    assert len(h.github.requests) == 3
    assert h.scaler is not None
    (summary,) = h.scaler.describe(h.clock.now)
    assert (summary["pending"], summary["demand"], summary["covered"]) == (3, 5, 5)
    assert summary["counters"] == {
        "launches": 3,
        "registrations": 0,
        "expiries": 0,
        "dispatch_failures": 0,
    }


async def test_max_inflight_bounds_the_pending_launches(h: Harness) -> None:
    await h.start(max_inflight=3)
    await h.build(h.steps(7))
    await h.tick()
    assert len(h.github.requests) == 3
    await h.tick(T0 + 10)
    assert len(h.github.requests) == 3


async def test_only_steps_the_pool_may_take_are_demand(h: Harness) -> None:
    await h.start()
    await h.build(h.steps(2, "other"), repository="acme/other")  # repository not allowed
    await h.build(h.steps(2, "untrusted"), trusted=False)  # untrusted build
    await h.build(h.steps(2, "none"), repository=None)  # no repository
    await h.build([drv("kvm", features=["kvm"])])  # a feature the pool lacks
    await h.tick()
    assert h.github.requests == []
    await h.build(h.steps(1, "ok"))
    await h.tick(T0 + 1)
    assert len(h.github.requests) == 1


async def test_work_a_connected_agent_can_take_launches_nothing(h: Harness) -> None:
    await h.start()
    h.agent("persistent", max_jobs=2)
    await h.build(h.steps(3))
    await h.tick()
    assert len(h.github.requests) == 1  # 3 steps, 2 free slots
    # A draining agent or one in backoff is no supply.
    await h.build(h.steps(2))
    assert h.sched is not None
    h.sched.venues["persistent"].draining = True
    await h.tick(T0 + 1)
    assert len(h.github.requests) == 3  # max_inflight 3


# ---- registration -----------------------------------------------------------------------------
async def test_a_registered_launch_is_the_pool_agent_and_not_counted_twice(h: Harness) -> None:
    scaler = await h.start()
    await h.build(h.steps(2))
    await h.tick()
    first, second = h.github.launch_ids
    # The agent of the first launch registers: its free slot takes one step, the second
    # launch (still pending) the other.
    await scaler.registered(first, "m1", "gha-gh1.1-aaaaaaaa", identity())
    rows = await h.launches()
    assert rows[first].state == LaunchState.REGISTERED
    assert (rows[first].agent_machine_id, rows[first].agent_name) == ("m1", "gha-gh1.1-aaaaaaaa")
    assert set(scaler.pending) == {second}
    assert await scaler.claim_scope(first, "m1", identity()) == frozenset({REPO})
    assert await scaler.claim_scope(first, "m2", identity()) is None  # another machine
    assert await scaler.claim_scope(second, "m2", None) is None  # no OIDC identity
    assert await scaler.claim_scope("no-such-launch", "m2", identity()) is None
    h.agent("m1", launch_id=first)
    await h.tick(T0 + 1)
    assert len(h.github.requests) == 2
    assert scaler.counters()["gha"]["registrations"] == 1
    # A reconnect of the same machine changes nothing; another machine cannot take it over.
    await scaler.registered(first, "m1", "gha-gh1.1-aaaaaaaa", identity())
    await scaler.registered(first, "m9", "intruder", identity())
    assert (await h.launches())[first].agent_machine_id == "m1"
    assert scaler.counters()["gha"]["registrations"] == 1


async def test_only_an_oidc_agent_of_the_workflow_repository_claims_a_launch(h: Harness) -> None:
    scaler = await h.start()
    await h.build(h.steps(1))
    await h.tick()
    (launch_id,) = h.github.launch_ids
    await scaler.registered(launch_id, "m1", "token-agent", None)
    await scaler.registered(launch_id, "m2", "elsewhere", identity("acme/widgets"))
    await scaler.registered("0" * 32, "m3", "made-up", identity())
    assert await h.states() == ["pending"]
    assert set(scaler.pending) == {launch_id}


async def test_a_connected_agent_with_a_pending_launch_id_is_counted_once(h: Harness) -> None:
    """Between its attach and the launch's registration in the database, an agent is both
    connected and pending: its slot is counted once (and it is free, so nothing launches)."""
    await h.start()
    await h.build(h.steps(1))
    await h.tick()
    (launch_id,) = h.github.launch_ids
    h.agent("m1", launch_id=launch_id)
    await h.build(h.steps(1))
    await h.tick(T0 + 1)
    # Two steps, one free slot (the pool agent): one more launch, not zero and not two.
    assert len(h.github.requests) == 2


async def test_a_busy_agent_with_a_pending_launch_id_is_not_pending_supply(h: Harness) -> None:
    """The agent of a launch registered and got work at once, before its registration reached
    the database: it is busy, and its launch must not also count as an agent on its way."""
    await h.start()
    await h.build(h.steps(1))
    await h.tick()
    (launch_id,) = h.github.launch_ids
    venue, _ = h.agent("m1", launch_id=launch_id)
    venue.running.add(10**9)  # busy with some other step
    await h.build(h.steps(1))
    await h.tick(T0 + 1)
    # Two steps wait, nothing free, nothing on its way: two more launches.
    assert len(h.github.requests) == 3


# ---- expiry and cooldown ------------------------------------------------------------------------
async def test_a_launch_that_never_registers_expires_and_is_replaced(h: Harness) -> None:
    scaler = await h.start(launch_ttl_secs=60)
    await h.build(h.steps(1))
    wake_at = await h.tick()
    (first,) = h.github.launch_ids
    assert wake_at == T0 + 10  # the poll comes before the expiry
    await h.tick(T0 + 59)
    assert len(h.github.requests) == 1
    await h.tick(T0 + 60)
    rows = await h.launches()
    assert rows[first].state == LaunchState.EXPIRED
    assert "no agent registered within launch_ttl_secs (60 s)" in rows[first].error
    assert scaler.counters()["gha"]["expiries"] == 1
    # The work still waits: a new launch in the same pass.
    assert len(h.github.requests) == 2
    assert await h.states() == ["expired", "pending"]
    # Its agent turning up late still registers (and gets the pool's scope).
    await scaler.registered(first, "late", "gha-late", identity())
    assert (await h.launches())[first].state == LaunchState.REGISTERED


async def test_a_failed_dispatch_cools_the_pool_down_for_retry_after(h: Harness) -> None:
    scaler = await h.start(cooldown_secs=30)
    h.github.answers.append(
        httpx.Response(429, headers={"Retry-After": "120"}, json={"message": "slow down"})
    )
    await h.build(h.steps(2))
    wake_at = await h.tick()
    assert len(h.github.requests) == 1  # the first failure stops the rest of the pass
    (row,) = (await h.launches()).values()
    assert row.state == LaunchState.FAILED and "HTTP 429: slow down" in row.error
    assert row.retry_at == T0 + 120
    assert TOKEN not in row.error
    assert wake_at == T0 + 10
    assert scaler.counters()["gha"]["dispatch_failures"] == 1
    (summary,) = scaler.describe(T0)
    assert summary["cooldown_until"] == T0 + 120
    for at in (T0 + 30, T0 + 60, T0 + 119.9):
        await h.tick(at)
    assert len(h.github.requests) == 1  # no dispatch during the cooldown
    await h.tick(T0 + 120)
    assert len(h.github.requests) == 3
    assert await h.states() == ["failed", "pending", "pending"]


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(500, text="boom"),
        httpx.Response(403, json={"message": "Resource not accessible by integration"}),
    ],
)
async def test_other_failures_cool_down_for_cooldown_secs(
    h: Harness, answer: httpx.Response
) -> None:
    await h.start(cooldown_secs=30)
    h.github.answers.append(answer)
    await h.build(h.steps(1))
    await h.tick()
    await h.tick(T0 + 29)
    assert len(h.github.requests) == 1
    await h.tick(T0 + 30)
    assert len(h.github.requests) == 2


async def test_a_timed_out_dispatch_fails_and_cools_down(h: Harness) -> None:
    await h.start(cooldown_secs=30)
    await h.build(h.steps(1))

    def timeout(request: httpx.Request) -> httpx.Response:
        h.github.requests.append(request)
        raise httpx.ConnectTimeout("timed out")

    assert h.scaler is not None
    pool = h.scaler.pools["gha"]
    await pool.workflow.aclose()
    pool.workflow = GithubWorkflow(pool.config, TOKEN, transport=httpx.MockTransport(timeout))
    await h.tick()
    (row,) = (await h.launches()).values()
    assert row.state == LaunchState.FAILED and "timed out" in row.error
    await h.tick(T0 + 29)
    assert len(h.github.requests) == 1


# ---- restart ----------------------------------------------------------------------------------
async def test_a_restart_neither_forgets_pending_launches_nor_launches_again(h: Harness) -> None:
    await h.start()
    await h.build(h.steps(2))
    await h.tick()
    assert len(h.github.requests) == 2
    scaler = await h.start()  # a new scheduler and autoscaler over the same database
    assert len(scaler.pending) == 2
    await h.tick(T0 + 10)
    assert len(h.github.requests) == 2
    # The launches still expire on time after the restart.
    await h.tick(T0 + POOL["launch_ttl_secs"])
    assert await h.states() == ["expired", "expired", "pending", "pending"]


async def test_a_restart_keeps_the_cooldown(h: Harness) -> None:
    await h.start()
    h.github.answers.append(httpx.Response(429, headers={"Retry-After": "100"}))
    await h.build(h.steps(1))
    await h.tick()
    scaler = await h.start()
    assert scaler.cooldown_until == {"gha": T0 + 100}
    await h.tick(T0 + 50)
    assert len(h.github.requests) == 1
    await h.tick(T0 + 100)
    assert len(h.github.requests) == 2


# ---- the loop ---------------------------------------------------------------------------------
async def test_new_runnable_work_wakes_the_loop(h: Harness) -> None:
    """The poll interval is an hour: only the scheduler's wake-up can cause the launch. The
    step the pool takes becomes runnable when its dependency (built by a connected agent that
    lacks the feature it needs) succeeds."""
    scaler = await h.start(poll_interval_secs=3600)
    first = drv("wake-a")
    second = drv("wake-b", first, features=["big"])
    await h.build([first, second])
    venue, outbox = h.agent("plain")
    assert h.sched is not None
    await h.sched.tick(h.clock.now)
    (assign,) = [m for m in outbox if isinstance(m, p.Assign)]
    task = asyncio.create_task(scaler.run())
    try:
        await eventually(lambda: scaler.ticks >= 1, timeout=10, what="the first pass")
        assert h.github.requests == []  # the runnable step is the agent's
        h.uploaded.update(assign.outputs.values())
        await h.sched.accepted(venue, p.Accepted(step_id=assign.step_id, lease_id=assign.lease_id))
        msg = p.Result(step_id=assign.step_id, lease_id=assign.lease_id, outcome=p.Outcome.SUCCESS)
        assert await h.sched.result(venue, msg)
        await eventually(lambda: len(h.github.requests) == 1, timeout=10, what="a launch")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
