"""``queries.fetch_builds`` (the dashboard's ``/builds``, ``GET /api/v1/builds``):
filters, newest first, keyset paging, bounds; and the rows a build list shows."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from bigtent.runner.db import queries
from tests.integration.runner.conftest import MakeRunner, RunnerHarness

T0 = 1_700_000_000.0


async def _builds(engine: AsyncEngine) -> dict[str, int]:
    rows = [
        ("a", "failed", "acme/widgets", "refs/heads/main", "alice"),
        ("b", "succeeded", "acme/widgets", "refs/heads/feature", "bob"),
        ("c", "succeeded", "acme/gadgets", "refs/heads/main", "alice"),
        ("d", "running", None, None, "alice"),
        ("e", "failed", "acme/widgets", "refs/heads/main", "ci"),
    ]
    out: dict[str, int] = {}
    async with engine.begin() as conn:
        for i, (key, state, repo, ref, who) in enumerate(rows):
            out[key] = await queries.insert_build(
                conn,
                state=state,
                priority=0,
                created_at=T0 + i,
                created_by=who,
                repository=repo,
                ref=ref,
                trusted=True,
            )
    return out


async def _ids(
    engine: AsyncEngine,
    *,
    state: str | None = None,
    repository: str | None = None,
    ref: str | None = None,
    creator: str | None = None,
    limit: int = 50,
    before_id: int | None = None,
) -> list[int]:
    """The dashboard's filters (empty means any) through the one query."""
    async with engine.connect() as conn:
        rows = await queries.fetch_builds(
            conn,
            limit,
            states=[state] if state else (),
            repository=repository or None,
            ref=ref or None,
            created_by=creator or None,
            before_id=before_id,
        )
    return [int(r.id) for r in rows]


async def test_filters_match_exactly_and_combine(engine: AsyncEngine) -> None:
    b = await _builds(engine)
    assert await _ids(engine) == [b[k] for k in "edcba"]  # newest first
    assert await _ids(engine, state="failed") == [b["e"], b["a"]]
    assert await _ids(engine, repository="acme/widgets") == [b["e"], b["b"], b["a"]]
    assert await _ids(engine, ref="refs/heads/main") == [b["e"], b["c"], b["a"]]
    assert await _ids(engine, creator="alice") == [b["d"], b["c"], b["a"]]
    assert await _ids(
        engine, state="failed", repository="acme/widgets", ref="refs/heads/main", creator="ci"
    ) == [b["e"]]
    # Exact, not a substring or a prefix; empty means any.
    assert await _ids(engine, repository="acme") == []
    assert await _ids(engine, creator="ali") == []
    assert await _ids(engine, state=None, repository="", ref=None, creator="") == [
        b[k] for k in "edcba"
    ]


async def test_keyset_pages_cover_every_build_once(engine: AsyncEngine) -> None:
    b = await _builds(engine)
    seen: list[int] = []
    before: int | None = None
    while page := await _ids(engine, repository="acme/widgets", limit=2, before_id=before):
        assert len(page) <= 2
        seen += page
        before = page[-1]
    assert seen == [b["e"], b["b"], b["a"]]


async def test_root_names_per_build(engine: AsyncEngine) -> None:
    b = await _builds(engine)
    drvs = [
        queries.DrvInfo(
            drv_path=f"/nix/store/{c * 32}-{name}.drv",
            name=name,
            system="x86_64-linux",
            required_features=frozenset(),
            outputs={"out": f"/nix/store/{c * 32}-{name}"},
            input_drvs={},
            input_srcs=(),
        )
        for c, name in (("1", "hello"), ("2", "world"), ("3", "abc"), ("4", "zed"))
    ]
    async with engine.begin() as conn:
        for d in drvs:
            await queries.insert_derivation(conn, d)
        await queries.insert_build_roots(conn, b["a"], {d.drv_path: None for d in drvs})
    async with engine.connect() as conn:
        names = await queries.fetch_root_names(conn, [b["a"], b["b"]])
        two = await queries.fetch_root_names(conn, [b["a"]], per_build=2)
    assert names == {b["a"]: (["abc", "hello", "world"], 4), b["b"]: ([], 0)}
    assert two == {b["a"]: (["abc", "hello"], 4)}


async def test_the_lists_took_reads_a_builds_attempts_once_per_ttl(engine: AsyncEngine) -> None:
    from sqlalchemy import insert

    from bigtent.runner.dashboard.present import busy_secs
    from bigtent.runner.dashboard.views import TookCache
    from bigtent.runner.db.tables import build_steps, derivations, step_attempts, steps

    async with engine.begin() as conn:
        build = await queries.insert_build(
            conn, state="running", priority=0, created_at=T0, created_by="x", trusted=True
        )
        drv = "/nix/store/" + "3" * 32 + "-x.drv"
        await conn.execute(
            insert(derivations).values(
                drv_path=drv,
                name="x",
                system="x86_64-linux",
                required_features="[]",
                outputs="{}",
                input_drvs="{}",
                input_srcs="[]",
            )
        )
        step = (
            await conn.execute(
                insert(steps)
                .values(drv_path=drv, state="runnable", created_at=T0, attempts=0)
                .returning(steps.c.id)
            )
        ).scalar_one()
        await conn.execute(insert(build_steps).values(build_id=build, step_id=step))

    async def attempt(start: float, end: float) -> None:
        async with engine.begin() as conn:
            await conn.execute(
                insert(step_attempts).values(
                    step_id=step,
                    attempt=1,
                    max_attempts=5,
                    started_at=start,
                    finished_at=end,
                    outcome="prepare_failure",
                )
            )

    async def took(cache: TookCache) -> float:
        async with engine.connect() as conn:
            row = await queries.fetch_build(conn, build)
            assert row is not None
            spans = await cache.spans(conn, [row])
        end = row.finished_at if row.finished_at is not None else T0 + 1000
        return busy_secs(spans[build], T0, end)

    cache = TookCache(ttl_secs=3600)
    await attempt(T0 + 10, T0 + 20)
    assert await took(cache) == 10.0
    await attempt(T0 + 100, T0 + 130)
    assert await took(cache) == 10.0  # within the TTL: not read again
    assert await took(TookCache(ttl_secs=0)) == 40.0
    # The build ends: its end changed, so it is read again (and then kept).
    async with engine.begin() as conn:
        await queries.update_build(conn, build, state="failed", finished_at=T0 + 125)
    assert await took(cache) == 35.0
    await attempt(T0 + 200, T0 + 210)  # a shared step's later attempt: after its end
    assert await took(cache) == 35.0


# ---- GET /api/v1/builds: a fixed number of statements for the whole list --------------------
async def _farm(engine: AsyncEngine, builds: int) -> list[int]:
    """``builds`` builds sharing four steps (runnable, building, failed, succeeded) and two
    roots: the succeeded step's and one that was cached (no step)."""
    states = ("runnable", "building", "failed", "succeeded")
    drvs = [
        queries.DrvInfo(
            drv_path=f"/nix/store/{str(i) * 32}-s{i}.drv",
            name=f"s{i}",
            system="x86_64-linux",
            required_features=frozenset(),
            outputs={"out": f"/nix/store/{str(i) * 32}-s{i}"},
            input_drvs={},
            input_srcs=(),
        )
        for i in range(5)
    ]
    async with engine.begin() as conn:
        await queries.insert_derivations(conn, drvs)
        step_ids = []
        for d, state in zip(drvs, states, strict=False):
            sid = await queries.insert_step(
                conn, drv_path=d.drv_path, state=state, created_at=T0, attempts=0
            )
            assert sid is not None
            step_ids.append(sid)
        ids = []
        for i in range(builds):
            b = await queries.insert_build(
                conn,
                state="running",
                priority=i,
                created_at=T0 + i,
                created_by="alice",
                trusted=True,
            )
            await queries.insert_build_steps(conn, b, step_ids)
            # A root on a step of the build, and one that was cached (no step).
            await queries.insert_build_roots(
                conn, b, {drvs[3].drv_path: step_ids[3], drvs[4].drv_path: None}
            )
            ids.append(b)
    return ids


async def _listed(runner: RunnerHarness) -> tuple[list[dict[str, Any]], int]:
    """``GET /api/v1/builds`` and how many SQL statements the runner executed for it."""
    statements: list[str] = []

    def count(*args: Any) -> None:
        statements.append(str(args[2]))

    sync_engine = runner.comps.engine.sync_engine
    event.listen(sync_engine, "before_cursor_execute", count)
    try:
        r = await runner.client().get("/api/v1/builds", params={"limit": 1000})
    finally:
        event.remove(sync_engine, "before_cursor_execute", count)
    assert r.status_code == 200, r.text
    return r.json()["builds"], len(statements)


@pytest.mark.parametrize("waiting", [False, True], ids=["none-waiting", "waiting"])
async def test_a_build_list_costs_the_same_statements_for_2_or_30_builds(
    make_runner: MakeRunner, monkeypatch: pytest.MonkeyPatch, waiting: bool
) -> None:
    runner = await make_runner()
    few = await _farm(runner.comps.engine, 2)
    if waiting:
        # The runnable step (the first of each build's) waits for capacity.
        async with runner.comps.engine.connect() as conn:
            step = (await queries.fetch_build_steps(conn, few[0]))[0]
        assert step.state == "runnable"
        monkeypatch.setattr(runner.comps.scheduler, "capacity_waiting", lambda: {step.id: T0})
    listed, two = await _listed(runner)
    assert [b["id"] for b in listed] == few[::-1]
    await _farm_more(runner, 28)
    listed, thirty = await _listed(runner)
    assert len(listed) == 30
    assert thirty == two
    assert two <= 4  # the builds, their counts, their roots (and the runnable steps)
    # Each listed build is the build as GET /builds/{id} shows it, without the details.
    for b in listed:
        one = (await runner.client().get(f"/api/v1/builds/{b['id']}")).json()
        for detail in ("events", "waiting_for_capacity", "failed_steps"):
            one.pop(detail)
        assert b == one
    first = listed[-1]
    assert first["counts"] == {
        "total": 4,
        "waiting": 0,
        "runnable": 1,
        "running": 1,
        "succeeded": 1,
        "failed": 1,
        "cancelled": 0,
    }
    assert [(r["state"], r["step_id"] is None) for r in first["roots"]] == [
        ("succeeded", False),
        ("cached", True),
    ]
    assert first["waiting_for_capacity_count"] == (1 if waiting else 0)


async def _farm_more(runner: RunnerHarness, builds: int) -> None:
    """More builds on the steps ``_farm`` made."""
    async with runner.comps.engine.begin() as conn:
        first = (await queries.fetch_builds(conn, 1))[0].id
        steps = [s.id for s in await queries.fetch_build_steps(conn, first)]
        roots = {r.drv_path: r.step_id for r in await queries.fetch_build_roots(conn, first)}
        for i in range(builds):
            b = await queries.insert_build(
                conn,
                state="queued",
                priority=0,
                created_at=T0 + 100 + i,
                created_by="bob",
                trusted=True,
            )
            await queries.insert_build_steps(conn, b, steps)
            await queries.insert_build_roots(conn, b, roots)
