"""Benchmark: a cache collection over 100,000 paths (``--paths``), in a runner process.

The runner (SQLite, local storage) is given a synthetic cache: chains of ``--chain`` paths,
each referencing the next, each with a small NAR file; every chain was last used between 0 and
60 days ago, so with ``max_idle_days = 30`` about half of them are idle. The index rows and
files are written straight into the runner's database and state directory (as a long-lived
cache would have them) while it idles.

Measured:

- the collection (``POST /api/v1/gc``): wall time, the runner's CPU seconds and its peak
  resident memory (``VmHWM``) against its resident memory before;
- serving while it runs: a client fetching narinfos of kept paths one after another (a Nix
  client's pattern), latency percentiles during the collection against the same loop before it;
- a second collection over the collected cache (nothing to delete: the cost of the mark alone).

    python bench/gc.py [--paths 100000] [--chain 10] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
from bench import common

from bigtent.nix import base32

DAY = 86400.0


def _hash_part(i: int) -> str:
    digest = hashlib.sha256(f"path {i}".encode()).digest()
    return base32.encode(digest[:20])


def populate(state: Path, paths: int, chain: int, seed: int = 1) -> tuple[list[str], int]:
    """Write ``paths`` index rows and NAR files; returns the hash parts of paths that stay
    (used within 30 days) and how many are idle."""
    rng = random.Random(seed)
    now = time.time()
    nar_dir = state / "cache" / "nar"
    nar_dir.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[Any, ...]] = []
    kept: list[str] = []
    idle = 0
    for start in range(0, paths, chain):
        used = now - rng.uniform(0, 60) * DAY
        members = list(range(start, min(start + chain, paths)))
        for i in members:
            hash_part = _hash_part(i)
            ref = [f"{_hash_part(i + 1)}-p{i + 1}"] if i + 1 in members else []
            body = f"nar of path {i}\n".encode()
            file_hash = base32.encode(hashlib.sha256(body).digest())
            url = f"nar/{file_hash}.nar"
            (nar_dir / f"{file_hash}.nar").write_bytes(body)
            rows.append(
                (
                    f"/nix/store/{hash_part}-p{i}",
                    hash_part,
                    "sha256:" + "0" * 52,
                    len(body),
                    url,
                    "none",
                    f"sha256:{file_hash}",
                    len(body),
                    json.dumps(ref),
                    None,
                    None,
                    "bench-1:" + "A" * 88,
                    used,
                    None,
                )
            )
            if used >= now - 30 * DAY:
                kept.append(hash_part)
            else:
                idle += 1
    db = sqlite3.connect(state / "bigtent.db", timeout=60)
    with db:
        db.executemany(
            "INSERT INTO store_paths (path, hash_part, nar_hash, nar_size, url, compression,"
            ' file_hash, file_size, "references", deriver, ca, sig, created_at, last_used_at)'
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
    db.close()
    return kept, idle


def latency_loop(
    url: str, hashes: list[str], stop: threading.Event, out: list[float], errors: list[str]
) -> None:
    rng = random.Random(2)
    with httpx.Client(base_url=url, timeout=30) as client:
        while not stop.is_set():
            h = rng.choice(hashes)
            t0 = time.perf_counter()
            resp = client.get(f"/cache/{h}.narinfo")
            out.append((time.perf_counter() - t0) * 1000)
            if resp.status_code != 200:
                errors.append(f"{h}: {resp.status_code}")


def measure_idle(url: str, hashes: list[str], secs: float) -> list[float]:
    stop = threading.Event()
    out: list[float] = []
    errors: list[str] = []
    t = threading.Thread(target=latency_loop, args=(url, hashes, stop, out, errors))
    t.start()
    time.sleep(secs)
    stop.set()
    t.join()
    if errors:
        sys.exit(f"bench: narinfo requests failed before the collection: {errors[:3]}")
    return out


def collect(r: common.Runner, hashes: list[str]) -> dict[str, Any]:
    stop = threading.Event()
    during: list[float] = []
    errors: list[str] = []
    t = threading.Thread(target=latency_loop, args=(r.url, hashes, stop, during, errors))
    rss_before = common.memory_bytes(r.pid)["rss"]
    cpu_before = common.cpu_secs(r.pid)
    t.start()
    clock = common.Stopwatch()
    resp = httpx.post(
        r.url + "/api/v1/gc",
        json={},
        headers={"Authorization": f"Bearer {r.tokens['admin']}"},
        timeout=3600,
    )
    wall = clock()
    stop.set()
    t.join()
    if resp.status_code != 200:
        sys.exit(f"bench: the collection failed: {resp.status_code} {resp.text[:2000]}")
    report = resp.json()
    mem = common.memory_bytes(r.pid)
    return {
        "wall_secs": round(wall, 2),
        "runner_cpu_secs": round(common.cpu_secs(r.pid) - cpu_before, 2),
        "rss_before_mib": common.mib(rss_before),
        "peak_rss_mib": common.mib(mem["hwm"]),
        "paths_deleted": report["paths_deleted"],
        "files_deleted": report["files_deleted"],
        "serving_during_ms": {k: round(v, 2) for k, v in common.percentiles(during).items()},
        "serving_errors": errors[:5],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paths", type=int, default=100_000)
    parser.add_argument("--chain", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true", help="2,000 paths (a smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.paths = min(args.paths, 2_000)
    m = common.machine()
    if not args.json:
        common.header(f"bench/gc.py: a collection over {args.paths} paths", m)
    extra = [
        "[cache.retention]",
        "enabled = false",
        "max_idle_days = 30",
        "grace_secs = 0",
    ]
    with (
        tempfile.TemporaryDirectory(prefix="bench-gc-") as tmp,
        common.runner(Path(tmp), compression="none", extra=extra) as r,
    ):
        clock = common.Stopwatch()
        kept, idle = populate(r.state_dir, args.paths, args.chain)
        populate_secs = clock()
        before = measure_idle(r.url, kept, 3.0)
        first = collect(r, kept)
        second = collect(r, kept)
    result: dict[str, Any] = {
        "machine": m,
        "paths": args.paths,
        "idle_paths": idle,
        "populate_secs": round(populate_secs, 1),
        "serving_before_ms": {k: round(v, 2) for k, v in common.percentiles(before).items()},
        "first": first,
        "second": second,
        "headline": {
            "collect_secs": first["wall_secs"],
            "paths_deleted": first["paths_deleted"],
            "peak_rss_mib": first["peak_rss_mib"],
            "narinfo_p99_ms_before": round(common.percentiles(before)["p99"], 2),
            "narinfo_p99_ms_during": first["serving_during_ms"]["p99"],
            "mark_only_secs": second["wall_secs"],
        },
    }
    if args.json:
        common.emit(result, True)
        return
    h = result["headline"]
    print(f"paths: {args.paths} ({idle} idle), written in {result['populate_secs']} s")
    print(
        f"collection: {h['collect_secs']} s wall, {first['runner_cpu_secs']} s runner CPU, "
        f"{first['paths_deleted']} paths and {first['files_deleted']} files deleted"
    )
    print(f"runner memory: {first['rss_before_mib']} MiB before, peak {h['peak_rss_mib']} MiB")
    print(f"narinfo latency before: {result['serving_before_ms']}")
    print(f"narinfo latency during: {first['serving_during_ms']}")
    print(f"second collection (mark only): {h['mark_only_secs']} s")


if __name__ == "__main__":
    main()
