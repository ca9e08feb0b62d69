"""``queries.fetch_builds`` (the dashboard's ``/builds``, ``GET /api/v1/builds``):
filters, newest first, keyset paging, bounds; and the rows a build list shows."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine

from bigtent.runner.db import queries

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
