"""Cache retention against a real runner, with real Nix as the judge: after a collection every
pinned and recent closure substitutes completely into a fresh store with the runner's key,
evicted paths are gone (404) and no narinfo is left without its NAR file."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from bigtent.config import RetentionSection, Role
from bigtent.nix.nar import dump_path
from bigtent.nix.store_path import StorePath
from bigtent.runner.cache.verify import cache_tables, verify_cache
from bigtent.runner.db import queries
from bigtent.runner.db.tables import store_paths, untrusted_store_paths
from bigtent.runner.metrics import UploadKind
from bigtent.runner.retention.collector import Collector
from tests.integration.runner.conftest import (
    MakeRunner,
    Nix,
    RunnerHarness,
    nix_copy_from,
    statements,
    upload_closure,
)

DAY = 86400.0
RETENTION: dict[str, object] = {
    "enabled": False,
    "max_idle_days": 30,
    "grace_secs": 0,
    "keep_builds": 1,
}


@dataclass(frozen=True)
class Closure:
    top: str
    paths: tuple[str, ...]
    """Every path of top's closure, dependencies first."""


def make_closure(nix: Nix, tmp: Path, dep_nonce: str | None = None) -> Closure:
    """A .drv closure: top.drv -> dep.drv and a toFile source whose NAR ("hello") every
    closure shares (one NAR file for several paths). ``dep_nonce`` makes closures share dep."""
    top_nonce = uuid.uuid4().hex
    dep_nonce = dep_nonce or uuid.uuid4().hex
    expr = f"""
let
  src = builtins.toFile "greeting-{top_nonce[:8]}" "hello";
  dep = derivation {{
    name = "dep"; system = builtins.currentSystem; builder = "/bin/sh"; nonce = "{dep_nonce}";
    args = ["-c" "echo hi > $out"];
  }};
in derivation {{
  name = "top"; system = builtins.currentSystem; builder = "/bin/sh"; nonce = "{top_nonce}";
  args = ["-c" "read x < ${{src}}; echo $x ${{dep}} > $out"];
}}
"""
    top = nix.instantiate(expr, tmp)
    return Closure(top, nix.closure(top))


async def age(runner: RunnerHarness, paths: tuple[str, ...], days: float) -> None:
    """Make ``paths`` look published ``days`` ago and never used since."""
    async with runner.comps.engine.begin() as conn:
        await conn.execute(
            update(store_paths)
            .where(store_paths.c.path.in_(paths))
            .values(created_at=time.time() - days * DAY, last_used_at=None)
        )
    # Uses not written yet (an upload asks whether its references are cached) are as old.
    assert runner.comps.usage is not None
    runner.comps.usage.forget()


def collector(runner: RunnerHarness) -> Collector:
    assert runner.comps.collector is not None
    return runner.comps.collector


async def assert_consistent(runner: RunnerHarness) -> None:
    """Every narinfo's NAR file is there with its size and hash, every reference of a cached
    path is cached, and no NAR file is left that no narinfo names."""
    comps = runner.comps
    report = await verify_cache(comps.engine, comps.cache.storage, cache_tables(), repair=False)
    assert report.bad == []
    async with comps.engine.connect() as conn:
        rows = await queries.cache_rows(conn, store_paths)
        doomed = await queries.doomed_files(conn)
    cached = {r.path for r in rows}
    for row in rows:
        assert set(row.references) <= cached, f"{row.path} references evicted paths"
    files = {f"nar/{p.name}" for p in runner.nar_files()}
    assert files == {r.url for r in rows}
    assert doomed == []


async def present(runner: RunnerHarness, paths: tuple[str, ...]) -> set[str]:
    """Which of ``paths`` the runner serves a narinfo for (asking counts as a use: the uses
    are dropped again, as if these requests never came)."""
    got = {p for p in paths if (await runner.narinfo(p)).status_code == 200}
    usage = runner.comps.usage
    assert usage is not None
    usage.forget()
    return got


async def fresh_copy(runner: RunnerHarness, tmp: Path, top: str) -> tuple[int, str]:
    return await nix_copy_from(runner, [top], tmp / f"store-{uuid.uuid4().hex[:8]}")


async def test_collection_keeps_pinned_and_recent_closures_and_deletes_idle_ones(
    make_runner: MakeRunner, nix: Nix, tmp_path: Path
) -> None:
    runner = await make_runner(serve=True, cache={"retention": RETENTION})
    pinned, recent, idle = (make_closure(nix, tmp_path) for _ in range(3))
    for c in (pinned, recent, idle):
        await upload_closure(runner, nix, c.paths)
        await age(runner, c.paths, 60)
    admin = runner.client(Role.ADMIN)
    resp = await admin.put("/api/v1/pins/release", json={"paths": [pinned.top], "keep_days": 10})
    assert resp.status_code == 200, resp.text
    assert resp.json()["missing"] == []
    # A client asking for the recent closure's top counts as a use (of that path; its
    # closure is kept through references).
    assert (await runner.narinfo(recent.top)).status_code == 200

    dry = (await admin.post("/api/v1/gc", json={"dry_run": True})).json()
    assert dry["caches"]["main"]["deleted"] == 3
    assert await present(runner, idle.paths) == set(idle.paths)  # a dry run deletes nothing

    resp = await admin.post("/api/v1/gc", json={})
    assert resp.status_code == 200, resp.text
    report: dict[str, Any] = resp.json()
    main = report["caches"]["main"]
    assert main["deleted"] == 3
    assert main["deleted_by_reason"] == {"idle": 3, "quota": 0}
    assert main["roots"]["pin"] == 1
    assert {p["path"] for p in main["paths"]} == set(idle.paths)

    assert await present(runner, idle.paths) == set()
    assert await present(runner, pinned.paths + recent.paths) == set(pinned.paths + recent.paths)
    # The three toFile sources share one NAR file: deleting the idle one's narinfo kept it.
    await assert_consistent(runner)
    for kept in (pinned, recent):
        rc, out = await fresh_copy(runner, tmp_path, kept.top)
        assert rc == 0, out
    rc, out = await fresh_copy(runner, tmp_path, idle.top)
    assert rc != 0

    # The API and metrics show the run; a second collection finds nothing to do.
    status = (await runner.client(Role.CLIENT).get("/api/v1/gc")).json()
    assert status["last_run"]["paths_deleted"] == 3
    assert status["caches"]["main"]["paths"] == 6
    again = (await admin.post("/api/v1/gc", json={})).json()
    assert again["paths_deleted"] == 0
    metrics = runner.comps.metrics.render()[0].decode()
    assert 'bigtent_cache_gc_paths_deleted_total{cache="main",reason="idle"} 3.0' in metrics
    assert 'bigtent_cache_paths{cache="main"} 6.0' in metrics


async def test_published_paths_are_present_from_memory_until_a_collection_deletes_them(
    make_runner: MakeRunner, nix: Nix, tmp_path: Path
) -> None:
    """The scheduler asks ``Cache.present`` whether a step's outputs are published, right
    after this runner published them: memory answers, without the database; a collection
    that deleted them is known at once (never "present" for a deleted path)."""
    runner = await make_runner(serve=True, cache={"retention": RETENTION})
    idle, kept = make_closure(nix, tmp_path), make_closure(nix, tmp_path)
    for c in (idle, kept):
        await upload_closure(runner, nix, c.paths)
    await age(runner, idle.paths, 60)
    cache = runner.comps.cache
    with statements(runner.comps.engine) as seen:
        assert await cache.present(idle.paths + kept.paths) == set(idle.paths + kept.paths)
    assert seen == []
    assert runner.comps.usage is not None
    runner.comps.usage.forget()  # asking counted as a use: as if it never happened
    resp = await runner.client(Role.ADMIN).post("/api/v1/gc", json={})
    assert resp.status_code == 200, resp.text
    assert {p["path"] for p in resp.json()["caches"]["main"]["paths"]} == set(idle.paths)
    assert await cache.present(idle.paths + kept.paths) == set(kept.paths)


async def test_pins_need_an_admin_and_expire(
    make_runner: MakeRunner, nix: Nix, tmp_path: Path
) -> None:
    runner = await make_runner(cache={"retention": RETENTION})
    c = make_closure(nix, tmp_path)
    resp = await runner.client(Role.CLIENT).put("/api/v1/pins/x", json={"paths": [c.top]})
    assert resp.status_code == 403
    admin = runner.client(Role.ADMIN)
    resp = await admin.put("/api/v1/pins/x", json={"paths": [c.top]})
    assert resp.json()["missing"] == [c.top]
    resp = await admin.put("/api/v1/pins/bad name", json={"paths": [c.top]})
    assert resp.status_code == 400
    resp = await admin.put("/api/v1/pins/y", json={"paths": ["/tmp/x"]})
    assert resp.status_code == 400
    pins = (await runner.client(Role.CLIENT).get("/api/v1/pins")).json()["pins"]
    assert [p["name"] for p in pins] == ["x"]
    async with runner.comps.engine.begin() as conn:
        await queries.upsert_pin(conn, queries.Pin("old", (c.top,), 0.0, "t", time.time() - 1))
    pins = (await runner.client(Role.CLIENT).get("/api/v1/pins")).json()["pins"]
    assert [p["name"] for p in pins] == ["x"]  # expired pins are not listed (nor roots)
    assert (await admin.delete("/api/v1/pins/x")).status_code == 200
    assert (await admin.delete("/api/v1/pins/x")).status_code == 404


async def test_quota_evicts_least_recently_used_closures_down_to_the_low_watermark(
    make_runner: MakeRunner, nix: Nix, tmp_path: Path
) -> None:
    runner = await make_runner(serve=True, cache={"retention": RETENTION})
    closures = [make_closure(nix, tmp_path) for _ in range(4)]
    for days, c in zip((10, 20, 30, 40), closures, strict=True):
        await upload_closure(runner, nix, c.paths)
        await age(runner, c.paths, days)
    async with runner.comps.engine.connect() as conn:
        rows = {r.path: r for r in await queries.cache_rows(conn, store_paths)}
    total = sum({r.url: r.file_size for r in rows.values()}.values())

    def own_bytes(c: Closure) -> int:  # the shared source file is not a closure's own
        return sum(rows[p].file_size for p in c.paths if "-greeting-" not in p)

    low = total - own_bytes(closures[3]) - own_bytes(closures[2])
    gc = collector(runner)
    gc.config = RetentionSection.model_validate(
        {**RETENTION, "max_idle_days": 0, "quota_high_bytes": total - 1, "quota_low_bytes": low}
    )
    report = await gc.collect()
    main = report.caches["main"]
    assert main.bytes_freed == total - low
    # The two least recently used closures went; a source of the second may stay: it shares
    # its NAR file with the kept closures' sources, so evicting it would free nothing once the
    # low watermark is reached.
    assert await present(runner, closures[3].paths) == set()
    gone = {p for p in closures[2].paths if "-greeting-" not in p}
    assert await present(runner, closures[2].paths) & gone == set()
    assert main.by_reason["idle"] == 0 and main.by_reason["quota"] in (5, 6)
    for c in closures[:2]:
        assert await present(runner, c.paths) == set(c.paths)
        rc, out = await fresh_copy(runner, tmp_path, c.top)
        assert rc == 0, out
    await assert_consistent(runner)
    sizes = await gc.sizes()
    assert sizes["main"][1] == low <= total - 1


async def test_what_is_used_published_or_needed_during_a_collection_is_not_lost(
    make_runner: MakeRunner, nix: Nix, tmp_path: Path
) -> None:
    runner = await make_runner(serve=True, cache={"retention": RETENTION})
    asked, referenced, needed, idle = (make_closure(nix, tmp_path) for _ in range(4))
    for c in (asked, referenced, needed, idle):
        await upload_closure(runner, nix, c.paths)
        await age(runner, c.paths, 60)
    dep = next(p for p in referenced.paths if p.endswith("-dep.drv"))
    dep_nonce = Path(dep).read_text().split('"nonce","')[1].split('"')[0]
    newcomer = make_closure(nix, tmp_path, dep_nonce=dep_nonce)
    assert dep in newcomer.paths
    client = runner.client(Role.CLIENT)

    async def meanwhile(phase: str) -> None:
        if phase != "marked":
            return
        # Between the mark (which chose all four closures) and the sweep: a Nix client asks
        # for one, a client uploads a path referencing another's dep, a build needs a third.
        assert (await runner.narinfo(asked.top)).status_code == 200
        await upload_closure(runner, nix, tuple(p for p in newcomer.paths if p != dep))
        resp = await client.post("/api/v1/builds", json={"drvs": [needed.top]})
        assert resp.status_code == 201, resp.text

    gc = collector(runner)
    gc.on_phase = meanwhile
    report = await gc.collect()
    assert report.caches["main"].decision.counts()["idle"] == 12
    assert await present(runner, idle.paths) == set()
    for kept in (asked, newcomer, needed):
        assert await present(runner, kept.paths) == set(kept.paths)
        rc, out = await fresh_copy(runner, tmp_path, kept.top)
        assert rc == 0, out
    await assert_consistent(runner)


async def test_a_collection_cut_short_after_deleting_narinfos_is_finished_by_the_next(
    make_runner: MakeRunner, nix: Nix, tmp_path: Path
) -> None:
    runner = await make_runner(serve=True, cache={"retention": {**RETENTION, "sweep_batch": 1}})
    kept, idle = make_closure(nix, tmp_path), make_closure(nix, tmp_path)
    for c in (kept, idle):
        await upload_closure(runner, nix, c.paths)
    await age(runner, idle.paths, 60)
    files_before = runner.nar_files()

    class Killed(Exception):
        pass

    async def die(phase: str) -> None:
        if phase == "doomed":
            raise Killed

    gc = collector(runner)
    gc.on_phase = die
    with pytest.raises(Killed):
        await gc.collect()
    # One narinfo went, its file is doomed but still there: nothing names it, so nothing
    # serves it; every narinfo still has its file.
    assert len(await present(runner, idle.paths)) == 2
    assert runner.nar_files() == files_before
    async with runner.comps.engine.connect() as conn:
        assert len(await queries.doomed_files(conn)) == 1
    report = await verify_cache(
        runner.comps.engine, runner.comps.cache.storage, cache_tables(), repair=False
    )
    assert report.bad == []
    gc.on_phase = None
    report2 = await gc.collect()
    assert report2.resumed_files == 1
    assert await present(runner, idle.paths) == set()
    await assert_consistent(runner)
    rc, out = await fresh_copy(runner, tmp_path, kept.top)
    assert rc == 0, out


async def test_a_file_published_again_after_it_was_doomed_is_kept(
    make_runner: MakeRunner, nix: Nix, tmp_path: Path
) -> None:
    runner = await make_runner(cache={"retention": RETENTION})
    c = make_closure(nix, tmp_path)
    await upload_closure(runner, nix, c.paths)
    await age(runner, c.paths, 60)
    gc = collector(runner)

    async def republish(phase: str) -> None:
        if phase == "doomed":
            # The same paths come back (a client uploads them again) before the files go.
            await upload_closure(runner, nix, c.paths)

    gc.on_phase = republish
    await gc.collect()
    assert await present(runner, c.paths) == set(c.paths)
    await assert_consistent(runner)


async def test_the_dashboard_shows_the_cache_against_its_quota_and_the_last_collection(
    make_runner: MakeRunner, nix: Nix, tmp_path: Path
) -> None:
    quota = 10 * 1024 * 1024
    runner = await make_runner(cache={"retention": {**RETENTION, "quota_high_bytes": quota}})
    c = make_closure(nix, tmp_path)
    await upload_closure(runner, nix, c.paths)
    await age(runner, c.paths, 60)
    page = (await runner.client(None).get("/")).text
    assert 'id="cache-quota"' in page and "% of its 10.0 MiB quota" in page
    assert 'id="cache-gc"' not in page
    report = await collector(runner).collect()
    assert report.paths_deleted == 3
    page = (await runner.client(None).get("/")).text
    assert 'id="cache-gc"' in page and "freed" in page


def test_quota_percent() -> None:
    from bigtent.runner.dashboard.present import quota_percent

    assert quota_percent(50, 200) == 25
    assert quota_percent(300, 200) == 150
    assert quota_percent(5, None) is None


async def _cli(runner: RunnerHarness, *args: str, role: Role = Role.ADMIN) -> tuple[int, str, str]:
    assert runner.url is not None
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "BIGTENT_URL": runner.url,
        "BIGTENT_TOKEN": runner.tokens[role],
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bigtent", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_the_cli_pins_and_collects(make_runner: MakeRunner, nix: Nix, tmp_path: Path) -> None:
    runner = await make_runner(serve=True, cache={"retention": RETENTION})
    pinned, idle = make_closure(nix, tmp_path), make_closure(nix, tmp_path)
    for c in (pinned, idle):
        await upload_closure(runner, nix, c.paths)
        await age(runner, c.paths, 60)
    link = tmp_path / "result"
    link.symlink_to(pinned.top)
    code, out, err = await _cli(runner, "pin", "add", "rel", str(link), "--keep-days", "5")
    assert code == 0, err
    assert "pinned 1 path(s) as rel until" in out
    code, out, err = await _cli(runner, "pin", "add", "bad", "/tmp/not-a-store-path")
    assert code == 2 and "is not a store path" in err and "Traceback" not in err
    code, out, err = await _cli(runner, "pin", "list", "--json", role=Role.CLIENT)
    assert code == 0 and [p["paths"] for p in json.loads(out)] == [[pinned.top]]
    code, out, err = await _cli(runner, "gc", "--dry-run")
    assert code == 0, err
    assert f"would delete: {idle.top} (main cache, idle)" in out
    assert "main cache: would delete 3 of 6 path(s) (3 idle, 0 quota)" in out
    code, out, err = await _cli(runner, "gc", role=Role.CLIENT)
    assert code == 3 and "Traceback" not in err  # an admin's job
    code, out, err = await _cli(runner, "gc", "--json")
    assert code == 0, err
    assert json.loads(out)["paths_deleted"] == 3
    code, out, err = await _cli(runner, "pin", "remove", "rel")
    assert code == 0 and "removed pin rel" in out
    code, out, err = await _cli(runner, "pin", "remove", "rel")
    assert code == 1 and "no pin 'rel'" in err


async def _publish_untrusted(runner: RunnerHarness, tmp: Path, name: str, refs: list[str]) -> str:
    """An output in the untrusted cache (as an untrusted step's upload would publish it)."""
    cache = runner.comps.untrusted_cache
    assert cache is not None
    src = tmp / name
    src.write_text(f"{name} {uuid.uuid4().hex} {' '.join(refs)}\n")
    nar = b"".join(dump_path(src))

    async def chunks() -> AsyncIterator[bytes]:
        yield nar

    got, staged = await cache.receive(
        chunks(),
        kind=UploadKind.OUTPUT,
        declared_size=len(nar),
        declared_hash=hashlib.sha256(nar).digest(),
    )
    path = StorePath.parse(f"/nix/store/{uuid.uuid4().hex[:32].translate(_NIX32)}-{name}")
    await cache.publish(staged, path, got, refs)
    return path.path


_NIX32 = str.maketrans("eotu", "abcd")  # hex digits and these four are nix32 digits


async def test_the_untrusted_cache_has_its_own_policy_and_keeps_its_references(
    make_runner: MakeRunner, nix: Nix, tmp_path: Path
) -> None:
    runner = await make_runner(cache={"retention": RETENTION})
    referenced, recent_main = make_closure(nix, tmp_path), make_closure(nix, tmp_path)
    for c in (referenced, recent_main):
        await upload_closure(runner, nix, c.paths)
    await age(runner, referenced.paths, 40)  # idle for the main cache, but referenced
    await age(runner, recent_main.paths, 8)  # within the main cache's 30 days
    kept = await _publish_untrusted(runner, tmp_path, "kept", [referenced.top])
    old = await _publish_untrusted(runner, tmp_path, "old", [])
    async with runner.comps.engine.begin() as conn:
        await conn.execute(
            update(untrusted_store_paths)
            .where(untrusted_store_paths.c.path == old)
            .values(created_at=time.time() - 8 * DAY)  # past the untrusted cache's 7 days
        )
    report = await collector(runner).collect()
    assert {p for p, _, _ in report.caches["untrusted"].listed} == {old}
    assert report.caches["main"].decision.roots["referenced"] == 1
    assert report.caches["main"].deleted == 0
    untrusted = runner.comps.untrusted_cache
    assert untrusted is not None
    assert await untrusted.present([kept, old]) == {kept}
    assert await runner.comps.cache.present(list(referenced.paths + recent_main.paths)) == set(
        referenced.paths + recent_main.paths
    )
