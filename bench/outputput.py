"""Benchmark: the runner's CPU for one agent output upload of a small NAR, in its process.

    python bench/outputput.py [--uploads 2000] [--rounds 3] [--profile] [--json]

A cache as the runner makes it (SQLite, local storage, zstd, a signing key) and the DAG of
``bench/dag.py``'s ``--cpu-dag N`` (``examples/dag.nix``: 10 layers, fan-in 3), each step
holding a lease (a stand-in for the scheduler: ``lease_holder`` answers the step), uploaded
layer by layer. Each step's output, a NAR of a few hundred bytes naming its inputs' paths (as
the DAG's outputs do), goes in
through ``ingest_output`` (the PUT route's call, after the agent's credential: declared hash
and size as headers, the lease, the reference candidates from the input closure, the NAR
check, compression, staging, signing, the insert). The CPU per upload of the event loop's
thread (``time.thread_time``: what the runner's loop spends) and of the whole process
(``time.process_time``: also the SQLite driver's thread) is printed, best of ``--rounds``
rounds, each in a fresh database.

The same script measures another checkout's code when run with that checkout's venv
(``OTHER/.venv/bin/python bench/outputput.py``): it imports ``bigtent`` from the
interpreter's environment. ``--profile`` prints cProfile's top functions of one more round
and its Python calls per upload (a count: the same on a busy machine).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import hashlib
import io
import logging
import os
import pstats
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import emit, header, local_cache, machine

PROFILED_LINES = 30
FAN_IN = 3


@dataclass
class _Req:
    trusted: bool = True


@dataclass
class _Node:
    id: int
    drv_path: str
    outputs: dict[str, str]
    req: _Req = field(default_factory=_Req)


class _Leases:
    """The scheduler's ``lease_holder``: one current lease per step."""

    def __init__(self) -> None:
        self.nodes: dict[str, _Node] = {}

    def lease_holder(self, lease_id: str) -> _Node | None:
        return self.nodes.get(lease_id)


def _store_path(name: str, salt: str) -> str:
    from bigtent.nix.store_path import make_text_path

    return make_text_path(name, hashlib.sha256(salt.encode()).digest(), [])


def _nar_of(work: Path, text: str) -> bytes:
    from bigtent.nix.nar import dump_path

    f = work / "out"
    f.write_text(text)
    return b"".join(dump_path(f))


async def one_round(
    work: Path, uploads: int, profile: cProfile.Profile | None
) -> tuple[float, float]:
    from bigtent.nix import base32
    from bigtent.runner.cache.outputs import ingest_output
    from bigtent.runner.cache.upstreams import Upstreams
    from bigtent.runner.db.queries import DrvInfo

    root = work / uuid.uuid4().hex[:8]
    engine, cache = await local_cache(root)
    upstreams = Upstreams([], 1, 1.0)
    leases = _Leases()
    salt = uuid.uuid4().hex
    steps: list[tuple[str, str, bytes]] = []  # lease, output path, NAR
    drvs = []
    layers = min(10, max(1, uploads // 10))
    width = max(1, uploads // layers)
    below: list[tuple[str, str]] = []  # the layer below: (drv, output)
    for layer in range(layers):
        here = []
        for i in range(width):
            name = f"dag-{layer}-{i}"
            deps = [below[(i + k) % width] for k in range(min(FAN_IN, width))] if below else []
            drv = _store_path(f"{name}.drv", f"{salt}-drv-{name}")
            out = _store_path(name, f"{salt}-out-{name}")
            drvs.append(
                DrvInfo(
                    drv_path=drv,
                    name=name,
                    system="x86_64-linux",
                    required_features=frozenset(),
                    outputs={"out": out},
                    input_drvs={d: ("out",) for d, _ in deps},
                    input_srcs=(),
                )
            )
            lease = uuid.uuid4().hex
            leases.nodes[lease] = _Node(len(steps) + 1, drv, {"out": out})
            text = f"{layer}-{i} {' '.join(o for _, o in deps)}\n"
            steps.append((lease, out, _nar_of(root, text)))
            here.append((drv, out))
        below = here
    cache.remember_derivations(drvs)

    async def body(nar: bytes) -> AsyncIterator[bytes]:
        yield nar

    scheduler: Any = leases
    try:
        start, start_loop = time.process_time(), time.thread_time()
        if profile is not None:
            profile.enable()
        for lease, out, nar in steps:
            info = await ingest_output(
                cache,
                upstreams,
                scheduler,
                lease,
                "out",
                body(nar),
                nar_hash=base32.format_hash("sha256", hashlib.sha256(nar).digest()),
                nar_size=str(len(nar)),
            )
            assert info.store_path == out
        if profile is not None:
            profile.disable()
        secs, loop_secs = time.process_time() - start, time.thread_time() - start_loop
        # An output of the top layer names its inputs: the scan found them.
        last = await cache.fetch_narinfo(steps[-1][1])
        assert last is not None
        assert len(last.references) == (min(FAN_IN, width) if layers > 1 else 0)
        return secs, loop_secs
    finally:
        await upstreams.aclose()
        cache.close()
        await engine.dispose()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--uploads", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="cProfile one more round")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=io.StringIO())  # logged, as the runner
    m = machine()
    import bigtent

    where = str(Path(bigtent.__file__).resolve().parents[2])
    with tempfile.TemporaryDirectory(prefix="bigtent-bench-outputput-") as tmp:
        work = Path(tmp)
        rounds = [asyncio.run(one_round(work, args.uploads, None)) for _ in range(args.rounds)]
        text = ""
        calls = None
        if args.profile:
            prof = cProfile.Profile()
            asyncio.run(one_round(work, args.uploads, prof))
            out = io.StringIO()
            stats = pstats.Stats(prof, stream=out)
            calls = stats.total_calls / args.uploads  # type: ignore[attr-defined]
            stats.sort_stats("cumulative").print_stats(PROFILED_LINES)
            stats.sort_stats("tottime").print_stats(PROFILED_LINES)
            text = out.getvalue()
    per = [r / args.uploads * 1000 for r, _ in rounds]
    loop = [r / args.uploads * 1000 for _, r in rounds]
    result = {
        "machine": m,
        "run": {
            "code": where,
            "uploads": args.uploads,
            "ms_per_upload": per,
            "loop_ms_per_upload": loop,
            "best": min(per),
            "loop_best": min(loop),
            "calls_per_upload": calls,
        },
    }
    if args.json:
        emit(result, True)
        return 0
    header("bench/outputput.py: a small output's upload, in the runner's process", m)
    print(text, end="")
    print(f"code: {where}  load: {os.getloadavg()[0]:.2f}")
    if calls is not None:
        print(f"Python calls per upload (cProfile, load-independent): {calls:.0f}")
    for what, ms in (("event loop thread", loop), ("process (all threads)", per)):
        print(
            f"CPU per upload, {what}: best {min(ms):.3f} ms "
            f"(rounds: {', '.join(f'{p:.3f}' for p in ms)}; {args.uploads} uploads)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
