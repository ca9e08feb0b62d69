"""``ingest_client_closure``: a .drv closure read from a Nix store into the cache in batches
(how Nix CI publishes an evaluation). Exactly the closure is published, signed, with its
derivations recorded, and real Nix substitutes it; a failure part way publishes no narinfo
without its NAR, nothing of the failing batch, and leaves no staged file."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from sqlalchemy import select

from bigtent.agent.drvfetch import drv_from_text
from bigtent.client.upload import nar_hash_to_nix32, upload_order
from bigtent.errors import BadRequest, NarMismatch
from bigtent.nix import base32
from bigtent.nix.nar import dump_path
from bigtent.nix.store import NixStore
from bigtent.runner.cache.closureingest import ClientPath, ingest_client_closure
from bigtent.runner.db import queries
from bigtent.runner.db.tables import derivations, store_paths
from bigtent.runner.scheduler.carried import carried
from tests.integration.runner.conftest import (
    Drvs,
    MakeRunner,
    Nix,
    RunnerHarness,
    nix_copy_from,
    statements,
    verify_signed,
)


async def _closure(drvs: Drvs) -> list[ClientPath]:
    """The closure of ``drvs.top`` as Nix CI reads it: ``nix path-info``, references first."""
    store = NixStore(options={"substituters": ""})
    infos = await store.path_info([drvs.top], recursive=True, derivation=True)
    return [
        ClientPath(
            path=i.path,
            nar_hash=base32.parse_hash(nar_hash_to_nix32(i.nar_hash), "sha256"),
            nar_size=i.nar_size,
            references=frozenset(r for r in i.references if r != i.path),
            nar=functools.partial(dump_path, store.real_path(i.path)),
        )
        for i in upload_order(infos, [i.path for i in infos])
    ]


async def _recorded(runner: RunnerHarness) -> tuple[dict[str, str], set[str]]:
    """Every narinfo row (path -> NAR file) and every derivation row."""
    async with runner.comps.engine.connect() as conn:
        rows = {r.path: r.url for r in await conn.execute(select(store_paths))}
        drv_rows = {r.drv_path for r in await conn.execute(select(derivations))}
    return rows, drv_rows


async def _no_narinfo_without_nar(runner: RunnerHarness) -> None:
    rows, _ = await _recorded(runner)
    for path, url in rows.items():
        assert (runner.state_dir / "cache" / url).is_file(), f"{path}: its NAR {url} is missing"
    assert runner.temp_files() == []


@pytest.mark.parametrize("batch_paths", [1, 200])
async def test_closure_published_exactly_and_substituted_by_nix(
    make_runner: MakeRunner, nix: Nix, drvs: Drvs, tmp_path: Path, batch_paths: int
) -> None:
    # batch_paths=1: every path its own transaction, each derivation's inputs from earlier
    # batches; 200: one batch, the inputs' hashes modulo from within it.
    runner = await make_runner(serve=True)
    cache = runner.comps.cache
    closure = await _closure(drvs)
    assert [c.path for c in closure] == list(drvs.closure)

    published = await ingest_client_closure(
        cache, runner.comps.engine, closure, batch_paths=batch_paths
    )

    assert published == len(drvs.closure) == 3
    rows, drv_rows = await _recorded(runner)
    assert set(rows) == set(drvs.closure)
    assert drv_rows == {drvs.top, drvs.dep}
    for path in drvs.closure:
        resp = await runner.narinfo(path)
        assert resp.status_code == 200
        info = verify_signed(runner, resp.text)
        assert info.ca is not None and info.ca.startswith(("text:", "fixed:"))
    with statements(runner.comps.engine) as seen:  # remembered since their commit
        recorded = await cache.derivations([drvs.top, drvs.dep])
    assert seen == []
    async with runner.comps.engine.connect() as conn:
        assert recorded == await queries.fetch_derivations(conn, [drvs.top, drvs.dep])
    assert dict(recorded[drvs.top].outputs) == nix.outputs(drvs.top)
    assert recorded[drvs.top].hash_modulo is not None
    # Each .drv's text is recorded for assignments: the agent's own check accepts it, and the
    # inputs resolve to the source and the dependency's output.
    async with runner.comps.engine.connect() as conn:
        found = await queries.assignment_derivations(conn, [drvs.top, drvs.dep])
    assert set(found.drvs) == {drvs.top, drvs.dep}
    for path, drv in found.drvs.items():
        drv_from_text(path, drv.text.encode(), "the recorded text")
    top = carried(found.drvs[drvs.top], found.outputs)
    assert top is not None
    assert top.inputs == sorted([drvs.source, nix.outputs(drvs.dep)["out"]])
    await _no_narinfo_without_nar(runner)

    # Real Nix, checking the runner's signatures, substitutes the .drv closure into a fresh
    # chroot store.
    code, out = await nix_copy_from(runner, [drvs.top], tmp_path / "fresh")
    assert code == 0, out
    for path in drvs.closure:
        assert (tmp_path / "fresh" / path.lstrip("/")).exists(), path

    # Again: everything is cached already, nothing is published twice.
    assert await ingest_client_closure(cache, runner.comps.engine, closure) == 0


async def test_bad_nar_part_way_publishes_the_batches_before_it_only(
    make_runner: MakeRunner, drvs: Drvs
) -> None:
    runner = await make_runner()
    closure = await _closure(drvs)
    last = closure[-1]
    lying = [
        *closure[:-1],
        ClientPath(last.path, b"\0" * 32, last.nar_size, last.references, last.nar),
    ]

    with pytest.raises(NarMismatch, match="hash mismatch"):
        await ingest_client_closure(runner.comps.cache, runner.comps.engine, lying, batch_paths=1)

    rows, drv_rows = await _recorded(runner)
    assert set(rows) == {c.path for c in closure[:-1]}
    assert drvs.top not in drv_rows
    await _no_narinfo_without_nar(runner)


async def test_bad_nar_in_a_batch_publishes_nothing_of_it(
    make_runner: MakeRunner, drvs: Drvs
) -> None:
    runner = await make_runner()
    closure = await _closure(drvs)
    first = closure[0]
    short = ClientPath(first.path, first.nar_hash, first.nar_size + 8, first.references, first.nar)

    with pytest.raises(NarMismatch, match="shorter"):
        await ingest_client_closure(
            runner.comps.cache, runner.comps.engine, [short, *closure[1:]], batch_paths=200
        )

    assert await _recorded(runner) == ({}, set())
    await _no_narinfo_without_nar(runner)
    assert await runner.present(list(drvs.closure)) == set()


async def test_failed_transaction_records_nothing_of_the_batch(
    make_runner: MakeRunner, drvs: Drvs, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The NAR files are in place when the transaction fails (they are moved first): no
    # narinfo or derivation row of the batch is recorded, and none is remembered.
    runner = await make_runner()
    closure = await _closure(drvs)

    async def broken(conn: object, drvs: object) -> None:
        raise OSError("database went away")

    monkeypatch.setattr(queries, "insert_derivations", broken)
    with pytest.raises(OSError, match="went away"):
        await ingest_client_closure(runner.comps.cache, runner.comps.engine, closure)

    assert await _recorded(runner) == ({}, set())
    assert await runner.present(list(drvs.closure)) == set()
    for path in drvs.closure:
        assert (await runner.narinfo(path)).status_code == 404
    assert runner.temp_files() == []


async def test_referrer_before_its_reference_is_refused(
    make_runner: MakeRunner, drvs: Drvs
) -> None:
    runner = await make_runner()
    closure = await _closure(drvs)

    with pytest.raises(BadRequest, match="not in the cache yet"):
        await ingest_client_closure(
            runner.comps.cache, runner.comps.engine, list(reversed(closure))
        )

    assert await _recorded(runner) == ({}, set())
    await _no_narinfo_without_nar(runner)
