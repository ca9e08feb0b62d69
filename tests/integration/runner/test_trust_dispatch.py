"""Trust in the scheduler service against a real SQLite database (architecture §6): trusted and
untrusted builds of one derivation get separate steps, each goes only to venues of its trust,
an untrusted build shares live trusted steps, repository-scoped venues take only their
repositories' steps, and all of it survives a reload from the database."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path

import pytest
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncEngine

from bigtent import protocol as p
from bigtent.runner.db import queries
from bigtent.runner.scheduler.model import PlannedStep, Venue
from bigtent.states import BuildState, StepState
from tests.integration.runner.test_dispatcher import CONFIG, X86, Agent, Farm, drv


@pytest.fixture
def farm(engine: AsyncEngine, tmp_path: Path) -> Farm:
    return Farm(engine, tmp_path, CONFIG)


async def add(
    farm: Farm,
    planned: Sequence[queries.DrvInfo],
    roots: Sequence[queries.DrvInfo],
    *,
    trusted: bool,
    repository: str | None = None,
) -> int:
    """Create a build as the API would (``planned`` dependencies first)."""
    async with farm.engine.begin() as conn:
        for d in planned:
            await queries.insert_derivation(conn, d)
    paths = {d.drv_path for d in planned}
    steps = [PlannedStep(d, tuple(i for i in d.input_drvs if i in paths)) for d in planned]
    return await farm.sched.add_build(
        priority=0,
        created_by="test",
        roots={d.drv_path: d.drv_path for d in roots},
        planned=steps,
        repository=repository,
        ref=None,
        trusted=trusted,
    )


def agent(
    farm: Farm,
    machine_id: str,
    *,
    trusted: bool = True,
    repositories: Collection[str] | None = None,
    max_jobs: int = 2,
) -> Agent:
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
        trusted=trusted,
        repositories=None if repositories is None else frozenset(repositories),
    )
    return Agent(venue, outbox, farm.sched.attach(venue, []))


async def step_row(farm: Farm, d: queries.DrvInfo, *, trusted: bool) -> object:
    async with farm.engine.connect() as conn:
        return (await queries.fetch_steps_by_drv(conn, [d.drv_path], trusted=trusted)).get(
            d.drv_path
        )


async def test_trusted_and_untrusted_builds_of_one_drv_get_separate_steps_and_venues(
    farm: Farm,
) -> None:
    lib = drv("lib")
    app = drv("app", lib)
    trusted_agent = agent(farm, "t")
    untrusted_agent = agent(farm, "u", trusted=False)
    untrusted_build = await add(farm, [lib, app], [app], trusted=False)
    await farm.tick()
    # Only the untrusted venue gets work; the idle, capable trusted one gets none.
    assert trusted_agent.assigns() == []
    (a,) = untrusted_agent.take_assigns()
    assert a.drv_path == lib.drv_path
    trusted_build = await add(farm, [lib, app], [app], trusted=True)
    await farm.tick()
    (t,) = trusted_agent.take_assigns()
    assert t.drv_path == lib.drv_path and t.step_id != a.step_id
    assert untrusted_agent.assigns() == []
    row_t = await step_row(farm, lib, trusted=True)
    row_u = await step_row(farm, lib, trusted=False)
    assert row_t is not None and row_u is not None
    assert (row_t.id, row_u.id) == (t.step_id, a.step_id)  # type: ignore[attr-defined]
    assert farm.sched.by_drv[lib.drv_path] == t.step_id
    assert farm.sched.untrusted_by_drv[lib.drv_path] == a.step_id
    # Each finishes on its own side; dependents follow on the same side.
    assert await farm.succeed(untrusted_agent, a)
    assert await farm.succeed(trusted_agent, t)
    await farm.tick()
    (a2,) = untrusted_agent.take_assigns()
    (t2,) = trusted_agent.take_assigns()
    assert a2.drv_path == t2.drv_path == app.drv_path
    assert await farm.succeed(untrusted_agent, a2)
    assert await farm.succeed(trusted_agent, t2)
    assert await farm.build_state(untrusted_build) == BuildState.SUCCEEDED
    assert await farm.build_state(trusted_build) == BuildState.SUCCEEDED


async def test_an_untrusted_build_shares_a_live_trusted_step(farm: Farm) -> None:
    lib = drv("lib")
    app = drv("app", lib)
    other = drv("other", lib)
    trusted_agent = agent(farm, "t")
    await add(farm, [lib, app], [app], trusted=True)
    await farm.tick()
    (t,) = trusted_agent.take_assigns()
    assert t.drv_path == lib.drv_path
    # The untrusted build needs lib too: it joins the running trusted step (no second lib
    # step), and its own step waits for it.
    untrusted_build = await add(farm, [lib, other], [other], trusted=False)
    assert lib.drv_path not in farm.sched.untrusted_by_drv
    own = farm.sched.nodes[farm.sched.untrusted_by_drv[other.drv_path]]
    assert own.req.trusted is False and own.deps == {t.step_id}
    assert untrusted_build in farm.sched.nodes[t.step_id].builds
    # The trusted step still depends on trusted steps only (in the database too).
    async with farm.engine.connect() as conn:
        deps = await queries.fetch_step_deps(conn, [t.step_id])
    assert deps == []
    untrusted_agent = agent(farm, "u", trusted=False)
    await farm.tick()
    assert untrusted_agent.assigns() == []  # other waits for lib
    assert await farm.succeed(trusted_agent, t)
    await farm.tick()
    (u,) = untrusted_agent.take_assigns()
    assert u.drv_path == other.drv_path
    assert await farm.succeed(untrusted_agent, u)
    assert await farm.build_state(untrusted_build) == BuildState.SUCCEEDED


async def test_a_failed_trusted_step_is_not_shared(farm: Farm) -> None:
    lib = drv("lib")
    trusted_agent = agent(farm, "t")
    await add(farm, [lib], [lib], trusted=True)
    await farm.tick()
    (t,) = trusted_agent.take_assigns()
    await farm.report(trusted_agent, t, p.Outcome.BUILD_FAILURE, "boom")
    # A finished trusted step is not queued again by an untrusted build: it builds its own.
    await add(farm, [lib], [lib], trusted=False)
    assert farm.sched.untrusted_by_drv.get(lib.drv_path) not in (None, t.step_id)
    assert await farm.state(lib) == StepState.FAILED  # the trusted row, untouched


async def test_repository_scoped_venues_take_only_their_repositories(farm: Farm) -> None:
    mine, theirs, anon = drv("mine"), drv("theirs"), drv("anon")
    oidc = agent(farm, "oidc", repositories={"acme/widgets"}, max_jobs=3)
    await add(farm, [theirs], [theirs], trusted=True, repository="evil/corp")
    await add(farm, [anon], [anon], trusted=True)
    await add(farm, [mine], [mine], trusted=True, repository="acme/widgets")
    await farm.tick()
    assert [a.drv_path for a in oidc.take_assigns()] == [mine.drv_path]
    # The other two wait for an unscoped venue; the scoped one stays idle beside them.
    token = agent(farm, "token", max_jobs=3)
    await farm.tick()
    assert {a.drv_path for a in token.take_assigns()} == {theirs.drv_path, anon.drv_path}
    assert oidc.assigns() == []


async def test_a_step_shared_with_an_allowed_build_is_takeable(farm: Farm) -> None:
    lib = drv("lib")
    oidc = agent(farm, "oidc", repositories={"acme/widgets"})
    await add(farm, [lib], [lib], trusted=True, repository="evil/corp")
    await farm.tick()
    assert oidc.assigns() == []
    await add(farm, [lib], [lib], trusted=True, repository="acme/widgets")
    await farm.tick()
    (a,) = oidc.take_assigns()
    assert a.drv_path == lib.drv_path


async def test_trust_and_repositories_survive_a_reload(farm: Farm) -> None:
    lib = drv("lib")
    build = await add(farm, [lib], [lib], trusted=False, repository="acme/widgets")
    again = farm.new_scheduler()
    await again.load()
    sid = again.untrusted_by_drv[lib.drv_path]
    assert lib.drv_path not in again.by_drv
    assert again.nodes[sid].req.trusted is False
    assert again.builds[build].repository == "acme/widgets"
    assert again.builds[build].trusted is False
    farm.sched = again
    trusted_oidc = agent(farm, "oidc-t", repositories={"acme/widgets"})
    untrusted_oidc = agent(farm, "oidc-u", trusted=False, repositories={"acme/widgets"})
    await farm.tick()
    assert trusted_oidc.assigns() == []
    assert [a.step_id for a in untrusted_oidc.take_assigns()] == [sid]


async def test_restart_keeps_each_steps_trust(farm: Farm) -> None:
    lib = drv("lib")
    app = drv("app", lib)
    other = drv("other", lib)
    trusted_agent = agent(farm, "t")
    untrusted_agent = agent(farm, "u", trusted=False)
    await add(farm, [lib, app], [app], trusted=True)
    await farm.tick()
    (t,) = trusted_agent.take_assigns()
    # Shares the live trusted lib (and would share app too: it is live, waiting); owns other.
    build = await add(farm, [lib, other], [other], trusted=False)
    await farm.report(trusted_agent, t, p.Outcome.BUILD_FAILURE, "boom")
    assert await farm.build_state(build) == BuildState.FAILED
    assert await farm.sched.restart_build(build)
    await farm.tick()
    # lib runs again as the trusted step it is, on the trusted venue only.
    (t2,) = trusted_agent.take_assigns()
    assert t2.step_id == t.step_id
    assert untrusted_agent.assigns() == []
    assert await farm.succeed(trusted_agent, t2)
    await farm.tick()
    (u,) = untrusted_agent.take_assigns()
    assert u.drv_path == other.drv_path
    assert u.step_id == farm.sched.untrusted_by_drv[other.drv_path]
    assert await farm.succeed(untrusted_agent, u)
    assert await farm.build_state(build) == BuildState.SUCCEEDED
