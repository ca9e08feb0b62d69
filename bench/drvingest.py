"""Benchmark: an evaluation's ``.drv`` closure into the cache, in the runner's process.

    python bench/drvingest.py [--jobs 1000] [--deps] [--batch 200] [--profile single|batch]
                              [--quick] [--json]

N trivial jobs (``bench/eval.py``'s flake: each job a derivation with no inputs, plus, with
``--deps``, a shared dependency derivation and a ``builtins.toFile`` source every job uses)
are instantiated by one ``nix-instantiate`` into a chroot store, the way Nix CI evaluates
into ``STATE/ci/eval-store``. Then their closure goes into a fresh cache (SQLite, local
storage, zstd) twice, each time into a new database and storage:

- ``single``: through ``ingest_client_path``, four paths at a time, one transaction per path
  (how Nix CI uploaded the closure before ``ingest_client_closure``);
- ``batch``: through ``ingest_client_closure`` (a worker thread verifies a batch of NARs,
  one transaction records the batch).

``--profile WAY`` runs that way under cProfile and prints the top functions by cumulative
and by own time.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import functools
import io
import os
import pstats
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Stopwatch, emit, header, local_cache, machine

PROFILED_LINES = 25


def expression(jobs: int, deps: bool) -> str:
    salt = uuid.uuid4().hex
    dep = (
        f'''dep = derivation {{ name = "dep"; system = builtins.currentSystem;
      builder = "/bin/sh"; salt = "{salt}"; args = [ "-c" "echo dep > $out" ]; }};
    src = builtins.toFile "src-{salt[:8]}" "hello";'''
        if deps
        else ""
    )
    uses = (
        'inherit dep; inherit src; args = [ "-c" "cat $src > $out" ];'
        if deps
        else ('args = [ "-c" "echo $name > $out" ];')
    )
    return f"""let {dep} in builtins.genList (i: derivation {{
  name = "job${{toString i}}"; system = builtins.currentSystem; builder = "/bin/sh";
  PATH = "/usr/bin:/bin"; salt = "{salt}"; {uses}
}}) {jobs}
"""


async def ingest(way: str, work: Path, store_uri: str, drvs: list[str], batch: int) -> float:
    from bigtent.client.upload import nar_hash_to_nix32, upload_order
    from bigtent.nix import base32
    from bigtent.nix.nar import dump_path
    from bigtent.nix.store import NixStore
    from bigtent.runner.cache.closureingest import ClientPath, ingest_client_closure
    from bigtent.runner.cache.ingest import ingest_client_path

    root = work / f"{way}-{uuid.uuid4().hex[:6]}"
    engine, cache = await local_cache(root)
    store = NixStore(store=store_uri, options={"substituters": ""})
    try:
        t = Stopwatch()
        infos = await store.path_info(drvs, recursive=True, derivation=True)
        order = upload_order(infos, [i.path for i in infos])
        if way == "batch":
            paths = [
                ClientPath(
                    path=i.path,
                    nar_hash=base32.parse_hash(nar_hash_to_nix32(i.nar_hash), "sha256"),
                    nar_size=i.nar_size,
                    references=frozenset(r for r in i.references if r != i.path),
                    nar=functools.partial(dump_path, store.real_path(i.path)),
                )
                for i in order
            ]
            n = await ingest_client_closure(cache, engine, paths, batch_paths=batch)
        else:
            done = {i.path: asyncio.Event() for i in order}
            slots = asyncio.Semaphore(4)

            async def chunks(path: Path) -> Any:
                it = dump_path(path)
                while (chunk := await asyncio.to_thread(next, it, None)) is not None:
                    yield chunk

            async def one(i: Any) -> None:
                for ref in i.references:
                    if ref != i.path and ref in done:
                        await done[ref].wait()
                async with slots:
                    await ingest_client_path(
                        cache,
                        engine,
                        i.path.rsplit("/", 1)[-1],
                        chunks(store.real_path(i.path)),
                        nar_hash=nar_hash_to_nix32(i.nar_hash),
                        nar_size=str(i.nar_size),
                        references=" ".join(
                            r.rsplit("/", 1)[-1] for r in i.references if r != i.path
                        ),
                    )
                done[i.path].set()

            async with asyncio.TaskGroup() as tg:
                for i in order:
                    tg.create_task(one(i))
            n = len(order)
        secs = t()
        assert n == len(order), (n, len(order))
        assert await cache.present([i.path for i in order]) == {i.path for i in order}
        return secs
    finally:
        cache.close()
        await engine.dispose()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--deps", action="store_true", help="every job uses a shared dep and source")
    ap.add_argument("--profile", choices=["single", "batch"])
    ap.add_argument("--quick", action="store_true", help="200 jobs")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.jobs = 200
    m = machine()
    with tempfile.TemporaryDirectory(prefix="bigtent-bench-drvingest-") as tmp:
        work = Path(tmp)
        store_uri = f"local?root={work / 'eval-store'}"
        (work / "jobs.nix").write_text(expression(args.jobs, args.deps))
        env = {**os.environ, "XDG_CACHE_HOME": str(work / "xdg")}
        t = Stopwatch()
        out = subprocess.run(
            ["nix-instantiate", "--store", store_uri, "--option", "substituters", "",
             str(work / "jobs.nix")],
            capture_output=True, text=True, env=env, check=True,
        )  # fmt: skip
        instantiate = t()
        drvs = [line for line in out.stdout.splitlines() if line]
        run: dict[str, Any] = {"jobs": args.jobs, "deps": args.deps, "batch": args.batch}
        run["instantiate_secs"] = instantiate
        profiles: dict[str, str] = {}
        for way in ("single", "batch"):
            if way == args.profile:
                prof = cProfile.Profile()
                prof.enable()
                secs = asyncio.run(ingest(way, work, store_uri, drvs, args.batch))
                prof.disable()
                text = io.StringIO()
                stats = pstats.Stats(prof, stream=text)
                stats.sort_stats("cumulative").print_stats(PROFILED_LINES)
                stats.sort_stats("tottime").print_stats(PROFILED_LINES)
                profiles[way] = text.getvalue()
            else:
                secs = asyncio.run(ingest(way, work, store_uri, drvs, args.batch))
            run[f"{way}_secs"] = secs
        run["paths"] = len(drvs) + (2 if args.deps else 0)
    result = {"machine": m, "run": run}
    if args.json:
        emit(result, True)
        return 0
    header("bench/drvingest.py: an evaluation's .drv closure into the cache", m)
    for way, profile in profiles.items():
        print(f"# cProfile of {way}:\n{profile}")
    print(f"paths: {run['paths']} (jobs {args.jobs}, deps {args.deps}), batch {args.batch}")
    print(f"nix-instantiate:                   {instantiate:8.2f} s")
    print(f"single (4 at a time, 1 tx a path): {run['single_secs']:8.2f} s")
    print(f"batch (ingest_client_closure):     {run['batch_secs']:8.2f} s")
    print(f"single / batch:                    {run['single_secs'] / run['batch_secs']:8.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
