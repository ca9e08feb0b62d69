"""Benchmark: many agents connected to one runner (agent fan-in).

1,000 simulated agents, each a real WebSocket session speaking the real protocol (the
``bigtent.protocol`` models), run as asyncio tasks in a separate load process on loopback.
They register (ramped over ``--ramp-secs``), then heartbeat at the interval the runner hands
out (10 s by default) for ``--duration`` seconds. Measured:

- the runner's CPU (``/proc/PID/stat``, in cores) while the agents register and while they
  heartbeat, and its RSS (and peak);
- register latency: WebSocket connect (HTTP upgrade with the token), and ``register`` to
  ``registered``;
- heartbeat latency. The protocol does not acknowledge heartbeats, so each heartbeat is
  followed at once by a probe the runner must answer: a ``result`` for a step that does not
  exist, acknowledged with ``result_ack`` (recorded: false). A session's messages are handled
  in order, so the time from sending the heartbeat to that acknowledgement covers the
  heartbeat's handling (its lease renewals and its write of the agent row) plus the probe's.

Baseline, measured in the same run under the same load: a bare WebSocket server on the same
stack (uvicorn, the same WebSocket implementation, Starlette) that answers ``register`` and
the probe from canned messages and does nothing else. Its CPU is the floor any runner on this
stack pays for the traffic; the runner's is shown against it.

    python bench/fanin.py [--agents 1000] [--ramp-secs 20] [--duration 60] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
from bench import common
from websockets.asyncio.client import ClientConnection, connect

from bigtent import protocol as p
from bigtent.apilimits import MAX_ID

TARGET_CORES = 1.0
TARGET_RSS_BYTES = 2**30
PROBE_STEP = p.StepId(MAX_ID)
"""The step id of the probe ``result`` (no step has it)."""


# ---- the load process -------------------------------------------------------------------------
class Load:
    """N agents against one URL: register, then heartbeat + probe until told to stop."""

    def __init__(self, url: str, token: str, agents: int, ramp_secs: float) -> None:
        self.ws_url = url.replace("http://", "ws://") + "/api/v1/agent/ws"
        self.headers = {"Authorization": f"Bearer {token}"}
        self.agents = agents
        self.ramp_secs = ramp_secs
        self.connect_secs: list[float] = []
        self.register_secs: list[float] = []
        self.heartbeat_secs: list[float] = []
        self.errors: list[str] = []
        self.registered = 0
        self.all_registered = asyncio.Event()
        self.measuring = False
        self.stop = asyncio.Event()

    async def run(self, duration: float) -> None:
        tasks = []
        for i in range(self.agents):
            tasks.append(asyncio.create_task(self.agent(i)))
            if self.ramp_secs:
                await asyncio.sleep(self.ramp_secs / self.agents)
        try:
            await asyncio.wait_for(self.all_registered.wait(), 120)
        except TimeoutError:
            self.errors.append(f"only {self.registered} of {self.agents} registered")
        print(f"REGISTERED {self.registered}", flush=True)
        self.measuring = True
        await asyncio.sleep(duration)
        self.measuring = False
        print("DONE", flush=True)
        self.stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def agent(self, i: int) -> None:
        t0 = time.perf_counter()
        try:
            async with connect(
                self.ws_url,
                additional_headers=self.headers,
                max_size=p.MAX_MESSAGE_BYTES,
                open_timeout=120,
                close_timeout=5,
            ) as ws:
                t1 = time.perf_counter()
                await ws.send(p.encode(register(i)))
                reply = p.parse_runner_message(await ws.recv())
                t2 = time.perf_counter()
                if not isinstance(reply, p.Registered):
                    raise RuntimeError(f"expected registered, got {reply.type}")
                self.connect_secs.append(t1 - t0)
                self.register_secs.append(t2 - t1)
                self.registered += 1
                if self.registered == self.agents:
                    self.all_registered.set()
                await self.heartbeats(ws, reply.heartbeat_secs)
        except Exception as exc:  # a failed agent is counted; the others go on
            self.errors.append(f"agent {i}: {type(exc).__name__}: {exc}")

    async def heartbeats(self, ws: ClientConnection, interval: float) -> None:
        # Agents started at different times: the first beat comes at a random point.
        if await self._sleep(random.uniform(0, interval)):
            return
        while True:
            t = time.perf_counter()
            await ws.send(p.encode(heartbeat()))
            await ws.send(p.encode(probe()))
            reply = p.parse_runner_message(await ws.recv())
            if not isinstance(reply, p.ResultAck) or reply.step_id != PROBE_STEP:
                raise RuntimeError(f"expected the probe's result_ack, got {reply.type}")
            if self.measuring:
                self.heartbeat_secs.append(time.perf_counter() - t)
            if await self._sleep(max(0.0, interval - (time.perf_counter() - t))):
                return

    async def _sleep(self, secs: float) -> bool:
        """Sleep; True when told to stop meanwhile."""
        try:
            await asyncio.wait_for(self.stop.wait(), secs)
        except TimeoutError:
            return False
        return True


def register(i: int) -> p.Register:
    return p.Register(
        machine_id=p.MachineId(f"fanin-{i:05d}-{os.getpid()}"),
        name=f"fanin-{i}",
        hostname=f"load-{i // 100}",
        systems=["x86_64-linux", "i686-linux"] if i % 4 else ["aarch64-linux"],
        supported_features=["big-parallel"] if i % 10 == 0 else [],
        max_jobs=4,
        cpu_count=8,
        version="bench",
    )


def heartbeat() -> p.Heartbeat:
    return p.Heartbeat(
        load=1.5,
        memory_used_bytes=8 << 30,
        memory_total_bytes=32 << 30,
        free_store_bytes=200 << 30,
        free_build_bytes=100 << 30,
        psi_cpu_some_avg10=3.2,
        running=[],
    )


def probe() -> p.Result:
    return p.Result(step_id=PROBE_STEP, lease_id=p.LeaseId("probe"), outcome=p.Outcome.SUCCESS)


def load_main(args: argparse.Namespace) -> int:
    common.raise_nofile(65536)
    load = Load(args.load, os.environ["BENCH_AGENT_TOKEN"], args.agents, args.ramp_secs)
    asyncio.run(load.run(args.duration))
    out = {
        "agents": args.agents,
        "registered": load.registered,
        "connect": common.percentiles(load.connect_secs),
        "register": common.percentiles(load.register_secs),
        "heartbeat": common.percentiles(load.heartbeat_secs),
        "errors": load.errors[:20],
        "error_count": len(load.errors),
        "load_cpu_secs": common.cpu_secs(),
    }
    Path(args.out).write_text(json.dumps(out))
    return 0


# ---- the baseline server ----------------------------------------------------------------------
def baseline_main(port: int) -> int:
    """A bare server on the runner's stack: canned answers to ``register`` and the probe."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.routing import WebSocketRoute
    from starlette.websockets import WebSocket, WebSocketDisconnect

    registered = p.encode(
        p.Registered(
            session_id="baseline",
            heartbeat_secs=float(os.environ.get("BENCH_HEARTBEAT_SECS", "10")),
            lease_secs=60.0,
            cache_url="http://127.0.0.1/cache",
            cache_public_key="bench-1:AAAA",
        )
    )
    ack = p.encode(p.ResultAck(step_id=PROBE_STEP, lease_id=p.LeaseId("probe"), recorded=False))

    async def session(ws: WebSocket) -> None:
        await ws.accept()
        try:
            await ws.receive_text()
            await ws.send_text(registered)
            while True:
                if json.loads(await ws.receive_text()).get("type") == "result":
                    await ws.send_text(ack)
        except WebSocketDisconnect:
            pass

    app = Starlette(routes=[WebSocketRoute("/api/v1/agent/ws", session)])
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        ws="websockets-sansio",
        backlog=2048,
    )
    return 0


@contextmanager
def baseline_server(work: Path, heartbeat_secs: float) -> Iterator[tuple[str, int]]:
    port = common.free_port()
    log = work / "baseline.log"
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--baseline-server", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
        env={**os.environ, "BENCH_HEARTBEAT_SECS": str(heartbeat_secs)},
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
                break
            except httpx.HTTPError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    sys.exit("bench: the baseline server did not start:\n" + log.read_text())
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}", proc.pid
    finally:
        proc.terminate()
        proc.wait(30)


# ---- the parent -------------------------------------------------------------------------------
def measure(args: argparse.Namespace, url: str, token: str, pid: int, work: Path) -> dict[str, Any]:
    """Run the load process against ``url`` and sample the server process ``pid``."""
    out = work / f"load-{common.Stopwatch().start:.0f}-{random.randrange(1 << 30)}.json"
    cpu0, t0 = common.cpu_secs(pid), time.perf_counter()
    load = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--load",
            url,
            "--agents",
            str(args.agents),
            "--ramp-secs",
            str(args.ramp_secs),
            "--duration",
            str(args.duration),
            "--out",
            str(out),
        ],
        stdout=subprocess.PIPE,
        env={**os.environ, "BENCH_AGENT_TOKEN": token},
    )
    assert load.stdout is not None
    marks: dict[str, tuple[float, float, dict[str, int]]] = {}
    profiler: subprocess.Popen[bytes] | None = None
    for raw in load.stdout:
        word = raw.decode().split()[0] if raw.strip() else ""
        if word in ("REGISTERED", "DONE"):
            marks[word] = (common.cpu_secs(pid), time.perf_counter(), common.memory_bytes(pid))
        if word == "REGISTERED" and os.environ.get("BENCH_PYSPY"):
            # Developer aid: sample the server while the agents heartbeat (py-spy installed).
            prof_out = f"{os.environ['BENCH_PYSPY']}.{pid}.txt"
            profiler = subprocess.Popen(
                [
                    *("py-spy", "record", "-p", str(pid), "-d", str(int(args.duration))),
                    *("-r", "200", "-f", "raw", "-o", prof_out),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
    load.wait()
    if profiler is not None:
        profiler.wait()
    if load.returncode != 0 or "DONE" not in marks:
        sys.exit(f"bench: the load process failed (exit {load.returncode})")
    result: dict[str, Any] = json.loads(out.read_text())
    (cpu1, t1, mem1), (cpu2, t2, mem2) = marks["REGISTERED"], marks["DONE"]
    result |= {
        "register_phase": {
            "secs": t1 - t0,
            "cpu_secs": cpu1 - cpu0,
            "cores": (cpu1 - cpu0) / (t1 - t0),
        },
        "steady": {"secs": t2 - t1, "cpu_secs": cpu2 - cpu1, "cores": (cpu2 - cpu1) / (t2 - t1)},
        "rss_bytes": mem2["rss"],
        "rss_peak_bytes": mem2["hwm"],
        "rss_after_register_bytes": mem1["rss"],
    }
    return result


def connected_agents(url: str, token: str) -> int:
    resp = httpx.get(
        url + "/api/v1/agents", headers={"Authorization": f"Bearer {token}"}, timeout=30
    )
    resp.raise_for_status()
    return sum(1 for a in resp.json()["agents"] if a["connected"])


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--agents", "--size", type=int, default=1000, help="simulated agents")
    ap.add_argument("--ramp-secs", type=float, default=20.0)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of heartbeats")
    ap.add_argument("--heartbeat-secs", type=float, default=10.0)
    ap.add_argument("--quick", action="store_true", help="50 agents, 2 s heartbeats, 8 s")
    ap.add_argument("--no-baseline", action="store_true", help="skip the bare-server baseline")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    ap.add_argument("--load", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--baseline-server", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.baseline_server:
        return baseline_main(args.baseline_server)
    if args.load:
        return load_main(args)
    if args.quick:
        args.agents, args.ramp_secs, args.duration, args.heartbeat_secs = 50, 1.0, 8.0, 2.0
    m = common.machine()
    nofile = common.raise_nofile(65536)
    if nofile < 2 * args.agents + 100:
        sys.exit(f"bench: the open-files limit is {nofile}; {args.agents} agents need more")
    result: dict[str, Any] = {
        "benchmark": "fanin",
        "machine": m,
        "agents": args.agents,
        "ramp_secs": args.ramp_secs,
        "duration_secs": args.duration,
        "heartbeat_secs": args.heartbeat_secs,
        "nofile_soft_limit": nofile,
    }
    with tempfile.TemporaryDirectory(prefix="bigtent-bench-fanin-") as tmp:
        work = Path(tmp)
        extra = ["[scheduler]", f"heartbeat_secs = {args.heartbeat_secs}"]
        with common.runner(work, extra=extra) as r:
            if not args.json:
                print(f"# {args.agents} agents against the runner ...", file=sys.stderr)
            result["runner"] = measure(args, r.url, r.tokens["agent"], r.pid, work)
            result["runner"]["connected_seen_by_api"] = None
        if not args.no_baseline:
            with baseline_server(work, args.heartbeat_secs) as (url, pid):
                if not args.json:
                    print(f"# {args.agents} agents against the bare server ...", file=sys.stderr)
                result["baseline"] = measure(args, url, "none", pid, work)
    result["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    run = result["runner"]
    base = result.get("baseline")
    result["headline"] = {
        "runner_cores_heartbeating": run["steady"]["cores"],
        "runner_cores_registering": run["register_phase"]["cores"],
        "runner_rss_mib": common.mib(run["rss_bytes"]),
        "runner_rss_peak_mib": common.mib(run["rss_peak_bytes"]),
        "register_p50_ms": 1e3 * run["register"]["p50"],
        "register_p99_ms": 1e3 * run["register"]["p99"],
        "heartbeat_p50_ms": 1e3 * run["heartbeat"]["p50"],
        "heartbeat_p95_ms": 1e3 * run["heartbeat"]["p95"],
        "heartbeat_p99_ms": 1e3 * run["heartbeat"]["p99"],
        "cpu_vs_bare_server": (
            run["steady"]["cores"] / base["steady"]["cores"]
            if base and base["steady"]["cores"]
            else None
        ),
        "met_cpu": run["steady"]["cores"] < TARGET_CORES
        and run["register_phase"]["cores"] < TARGET_CORES,
        "met_memory": run["rss_peak_bytes"] < TARGET_RSS_BYTES,
        "errors": run["error_count"],
    }
    if args.json:
        common.emit(result, True)
    else:
        report(result)
    return 0


def report(result: dict[str, Any]) -> None:
    common.header("bigtent agent fan-in benchmark", result["machine"])
    print(
        f"# {result['agents']} agents registering over {result['ramp_secs']:.0f} s, then "
        f"heartbeating every {result['heartbeat_secs']:.0f} s for {result['duration_secs']:.0f} s"
        f" (open-files limit {result['nofile_soft_limit']})\n"
    )
    print(
        "| server | CPU registering (cores) | CPU heartbeating (cores) | RSS MiB (peak) "
        "| connect p50/p99 ms | register p50/p95/p99 ms | heartbeat p50/p95/p99 ms | errors |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in ("runner", "baseline"):
        r = result.get(name)
        if r is None:
            continue
        label = "bigtent runner" if name == "runner" else "bare WebSocket server (baseline)"
        print(
            f"| {label} | {r['register_phase']['cores']:.3f} | {r['steady']['cores']:.3f} "
            f"| {common.mib(r['rss_bytes'])} ({common.mib(r['rss_peak_bytes'])}) "
            f"| {_ms(r['connect'], 'p50')}/{_ms(r['connect'], 'p99')} "
            f"| {_ms(r['register'], 'p50')}/{_ms(r['register'], 'p95')}/"
            f"{_ms(r['register'], 'p99')} "
            f"| {_ms(r['heartbeat'], 'p50')}/{_ms(r['heartbeat'], 'p95')}/"
            f"{_ms(r['heartbeat'], 'p99')} | {r['error_count']} |"
        )
    h = result["headline"]
    print()
    print(
        f"runner CPU while heartbeating: {h['runner_cores_heartbeating']:.3f} cores, while "
        f"registering: {h['runner_cores_registering']:.3f} (target < {TARGET_CORES:.0f}: "
        f"{'met' if h['met_cpu'] else 'NOT met'}); runner RSS peak {h['runner_rss_peak_mib']} "
        f"MiB (target < 1024: {'met' if h['met_memory'] else 'NOT met'})"
    )
    if h["cpu_vs_bare_server"] is not None:
        print(f"runner CPU / bare server CPU while heartbeating: {h['cpu_vs_bare_server']:.2f}x")
    print(
        "heartbeat latency = heartbeat sent -> the probe's result_ack received (the probe is "
        "handled right after the heartbeat, in order)"
    )
    print(f"load average at the end: {result['load_average_end']}")


def _ms(p: dict[str, float], q: str) -> str:
    return f"{1e3 * p[q]:.1f}"


if __name__ == "__main__":
    sys.exit(main())
