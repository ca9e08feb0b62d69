"""Planning a build in parts (``runner.builds.plan_parts``) against a real SQLite database:
leaves are handed over while the walk goes on, every needed derivation exactly once, each
after its dependencies."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from bigtent.config import CacheSection
from bigtent.errors import NotFound
from bigtent.nix import base32
from bigtent.nix.compression import Compression
from bigtent.nix.keys import generate_key
from bigtent.nix.narinfo import NarInfo
from bigtent.runner import builds
from bigtent.runner.builds import plan_build, plan_parts
from bigtent.runner.cache.service import Cache
from bigtent.runner.cache.storage import LocalStorage
from bigtent.runner.cache.upstreams import Upstreams
from bigtent.runner.db import queries
from bigtent.runner.db.migrate import create_engine, migrate
from bigtent.runner.scheduler.model import PlanPart

X86 = "x86_64-linux"


def drv(name: str, *deps: queries.DrvInfo) -> queries.DrvInfo:
    digest = hashlib.sha256(name.encode()).digest()
    return queries.DrvInfo(
        drv_path=f"/nix/store/{base32.encode(digest[:20])}-{name}.drv",
        name=name,
        system=X86,
        required_features=frozenset(),
        outputs={"out": f"/nix/store/{base32.encode(digest[12:])}-{name}"},
        input_drvs={d.drv_path: ("out",) for d in deps},
        input_srcs=(),
    )


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path}/x.db")
    await migrate(engine)
    yield engine
    await engine.dispose()


@pytest.fixture
async def cache(engine: AsyncEngine, tmp_path: Path) -> Cache:
    storage = LocalStorage(tmp_path / "cache")
    # The NAR file ``mark_built`` names: a path whose file is missing is not in the cache.
    (tmp_path / "cache" / "nar" / "x.nar").write_bytes(b"")
    return Cache(
        engine,
        storage,
        generate_key("test-1"),
        CacheSection(compression=Compression.NONE),
        "http://127.0.0.1:1",
    )


async def record(engine: AsyncEngine, drvs: Sequence[queries.DrvInfo]) -> None:
    async with engine.begin() as conn:
        for d in drvs:
            await queries.insert_derivation(conn, d)


async def mark_built(engine: AsyncEngine, d: queries.DrvInfo) -> None:
    """Put the derivation's output in the cache index: it needs no step."""
    info = NarInfo(
        store_path=d.outputs["out"],
        url="nar/x.nar",
        compression="none",
        file_hash=None,
        file_size=None,
        nar_hash="sha256:" + "0" * 52,
        nar_size=8,
        references=(),
        deriver=None,
        sigs=(),
    )
    async with engine.begin() as conn:
        await queries.insert_store_path(conn, info, created_at=0.0)


async def collect(cache: Cache, roots: Sequence[queries.DrvInfo]) -> list[PlanPart]:
    return [p async for p in plan_parts(cache, Upstreams([], 4, 5.0), [r.drv_path for r in roots])]


def graph() -> tuple[list[queries.DrvInfo], list[queries.DrvInfo], queries.DrvInfo]:
    """A fan-out, a chain, a diamond, and a built derivation with an unbuilt input below it
    (which must not be planned). Returns (all, roots, the built one)."""
    leaves = [drv(f"leaf{i}") for i in range(40)]
    fan = drv("fan", *leaves)
    chain = [drv("c0")]
    for i in range(1, 25):
        chain.append(drv(f"c{i}", chain[-1]))
    base = drv("base")
    left, right = drv("left", base), drv("right", base)
    top = drv("top", left, right, fan)
    hidden = drv("hidden")
    built = drv("built", hidden)
    app = drv("app", built, chain[-1])
    return [*leaves, fan, *chain, base, left, right, top, hidden, built, app], [top, app], built


async def test_parts_cover_the_needed_steps_once_each_dependencies_first(
    engine: AsyncEngine, cache: Cache, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(builds, "WALK_BATCH", 4)
    everything, roots, built = graph()
    await record(engine, everything)
    await mark_built(engine, built)
    parts = await collect(cache, roots)

    seen: list[str] = []
    for part in parts:
        for step in part.steps:
            assert all(d in seen for d in step.deps), f"{step.drv.name} before its inputs"
            seen.append(step.drv.drv_path)
    expected = {d.drv_path for d in everything} - {built.drv_path, drv("hidden").drv_path}
    assert len(seen) == len(set(seen)) and set(seen) == expected
    # Leaves come first, in parts of their own, while the walk goes on; the roots come last.
    assert len(parts) > 2
    for part in parts[:-1]:
        assert part.roots is None
        assert all(step.deps == () for step in part.steps)
    assert parts[-1].roots == {r.drv_path: r.drv_path for r in roots}
    assert parts[0].steps[0].drv.name != "top"
    # Heights: exact for the last part, the depth found by the walk (a lower bound) for leaves.
    assert parts[-1].heights[drv("c0").drv_path] == 26
    for part in parts[:-1]:
        assert all(h >= 2 for h in part.heights.values())
    whole = await plan_build(cache, Upstreams([], 4, 5.0), [r.drv_path for r in roots])
    assert [s.drv.drv_path for s in whole.planned] == seen


async def test_a_built_root_needs_no_step(engine: AsyncEngine, cache: Cache) -> None:
    x = drv("x")
    await record(engine, [x])
    await mark_built(engine, x)
    parts = await collect(cache, [x])
    assert [len(p.steps) for p in parts] == [0]
    assert parts[-1].roots == {x.drv_path: None}


async def test_an_unknown_derivation_deep_down_fails_after_leaves_were_handed_over(
    engine: AsyncEngine, cache: Cache, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(builds, "WALK_BATCH", 2)
    leaves = [drv(f"leaf{i}") for i in range(4)]
    missing = drv("never-uploaded")
    deep = drv("deep", missing)
    top = drv("top", *leaves, deep)
    await record(engine, [*leaves, deep, top])
    got: list[PlanPart] = []
    with pytest.raises(NotFound, match="never-uploaded"):
        async for part in plan_parts(cache, Upstreams([], 4, 5.0), [top.drv_path]):
            got.append(part)
    assert got and all(p.roots is None for p in got)


async def test_a_bad_request_fails_before_any_part(cache: Cache) -> None:
    with pytest.raises(NotFound):
        await collect(cache, [drv("nowhere")])
