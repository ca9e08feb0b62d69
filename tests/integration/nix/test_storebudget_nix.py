"""The agent's store collection against real Nix (2.8) in a chroot store: Nix's GC honours
the roots the agent keeps for running steps, and deletes the rest."""

from __future__ import annotations

from pathlib import Path

import pytest

from bigtent.nix.store import NixStore
from bigtent.storebudget import StepRoots, StoreBudget, StoreCollector, gc_roots_dir

pytestmark = [pytest.mark.nix]


async def _add(store: NixStore, tmp_path: Path, name: str, size: int) -> str:
    src = tmp_path / "src" / name
    src.parent.mkdir(exist_ok=True)
    src.write_bytes(name.encode() * size)
    return (await store.run("nix-store", ["--add", str(src)])).strip()


async def test_a_collection_keeps_running_steps_paths_and_deletes_the_rest(
    tmp_path: Path,
) -> None:
    store = NixStore(store=f"local?root={tmp_path / 'root'}")
    inputs = await _add(store, tmp_path, "input", 4096)
    output = await _add(store, tmp_path, "output", 4096)
    old = await _add(store, tmp_path, "old", 8192)
    roots = StepRoots(gc_roots_dir(store.store, tmp_path / "work"))
    roots.reset()
    roots.add(7, [inputs, output, "/nix/store/" + "0" * 32 + "-not-built-yet"])
    released: list[bool] = []

    async def release_idle() -> None:
        released.append(True)

    free = {"bytes": 0}
    collector = StoreCollector(
        store, StoreBudget(min_free_bytes=1 << 40), lambda: free["bytes"], release_idle
    )
    done = await collector.maybe_collect()
    assert done is not None and released == [True]
    assert done.paths_deleted == 1 and done.asked_bytes == (2 << 40)
    assert await store.valid_paths([inputs, output, old]) == {inputs, output}
    assert not store.real_path(old).exists()

    roots.remove(7)  # the step ended, its outputs uploaded
    done = await collector.maybe_collect()
    assert done is not None and done.paths_deleted == 2
    assert await store.valid_paths([inputs, output]) == set()
    assert collector.collections == 2

    # Enough free disk: no collection.
    free["bytes"] = 1 << 41
    assert await collector.maybe_collect() is None
    assert collector.collections == 2
