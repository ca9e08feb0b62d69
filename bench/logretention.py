"""Benchmark: step log retention over many logs (``scheduler.log_retention_days``).

N finished steps' logs (a ``.log.zst`` and a ``.log.idx`` each, as ``LogStore`` writes them)
lie in a directory: half older than the retention, half recent. One retention pass
(``logretention.expire_logs``: a scan of the directory in a worker thread, then deletes in
batches of 1,000 in a worker thread) runs while a ticker on the same event loop measures how
late it wakes (what a request served by the runner meanwhile would wait for the loop).

Measured: the pass's wall time, its scan and delete rate, the process's peak memory growth,
and the event loop's lateness (p50/p99/max) during the pass against the same ticker without
a pass (baseline).

    python bench/logretention.py [--logs 100000] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common

from bigtent.runner.logs.retention import DAY_SECS, expire_logs
from bigtent.runner.logs.store import LogStore

TICK_SECS = 0.005


def make_logs(root: Path, n: int, now: float) -> None:
    """``n`` logs, the even-numbered steps 10 days old, the odd ones an hour old."""
    payload = b"\x28\xb5\x2f\xfd" + os.urandom(200)  # a zstd magic and some bytes
    index = (1234).to_bytes(8, "little") + (204).to_bytes(8, "little")
    for step in range(1, n + 1):
        age = 10 * DAY_SECS if step % 2 == 0 else 3600.0
        for name, data in ((f"{step}.log.zst", payload), (f"{step}.log.idx", index)):
            path = root / name
            path.write_bytes(data)
            os.utime(path, (now - age, now - age))


async def lateness(stop: asyncio.Event) -> list[float]:
    """How late each tick of a ``TICK_SECS`` ticker wakes, until ``stop``."""
    late: list[float] = []
    while not stop.is_set():
        t = time.perf_counter()
        await asyncio.sleep(TICK_SECS)
        late.append(max(0.0, time.perf_counter() - t - TICK_SECS))
    return late


async def measure(root: Path, n: int, now: float) -> dict[str, Any]:
    logs = LogStore(root, 1 << 20)
    stop = asyncio.Event()
    baseline_task = asyncio.ensure_future(lateness(stop))
    await asyncio.sleep(1.0)
    stop.set()
    baseline = await baseline_task

    stop = asyncio.Event()
    ticker = asyncio.ensure_future(lateness(stop))
    before = common.memory_bytes()["hwm"]
    t = time.perf_counter()
    scan = time.perf_counter()
    stale = await asyncio.to_thread(logs.stale, now - 7 * DAY_SECS, 10 * n)
    scan_secs = time.perf_counter() - scan
    deleted, more = await expire_logs(logs, now - 7 * DAY_SECS, lambda s: False, limit=10 * n)
    wall = time.perf_counter() - t
    stop.set()
    during = await ticker
    left = sum(1 for _ in root.iterdir())
    return {
        "logs": n,
        "expired": len(stale),
        "deleted": deleted,
        "more": more,
        "files_left": left,
        "pass_secs": round(wall, 3),
        "scan_secs": round(scan_secs, 3),
        "scan_files_per_sec": round(2 * n / scan_secs) if scan_secs else None,
        "deleted_logs_per_sec": round(deleted / max(1e-9, wall - scan_secs)),
        "peak_memory_growth_mib": common.mib(common.memory_bytes()["hwm"] - before),
        "loop_lateness_ms": _ms(common.percentiles(during)),
        "baseline_lateness_ms": _ms(common.percentiles(baseline)),
    }


def _ms(p: dict[str, float]) -> dict[str, float]:
    return {k: (int(v) if k == "n" else round(v * 1000, 2)) for k, v in p.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--logs", "--size", type=int, default=100_000, help="step logs on disk")
    ap.add_argument("--quick", action="store_true", help="10,000 logs")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = ap.parse_args()
    if args.quick:
        args.logs = 10_000
    m = common.machine()
    root = Path(tempfile.mkdtemp(prefix="bigtent-bench-logs-"))
    try:
        now = time.time()
        t = time.perf_counter()
        make_logs(root, args.logs, now)
        made = time.perf_counter() - t
        result: dict[str, Any] = {"benchmark": "logretention", "machine": m}
        result |= asyncio.run(measure(root, args.logs, now))
        result["setup_secs"] = round(made, 1)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if not args.json:
        common.header("log retention", m)
        r = result
        print(
            f"{r['logs']} logs ({2 * r['logs']} files), {r['expired']} past retention: "
            f"pass {r['pass_secs']} s (scan {r['scan_secs']} s, "
            f"{r['scan_files_per_sec']} files/s; {r['deleted_logs_per_sec']} logs deleted/s)"
        )
        print(f"peak memory growth {r['peak_memory_growth_mib']} MiB")
        print(f"event loop lateness during the pass: {r['loop_lateness_ms']} ms")
        print(f"event loop lateness without a pass:  {r['baseline_lateness_ms']} ms")
    common.emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
