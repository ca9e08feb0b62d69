"""Benchmark: the binary cache's throughput (ingest, serving, substitution by real Nix).

A build of N "part" derivations and a "top" one depending on all of them is instantiated by
the host's Nix and uploaded to a runner, as ``bigtent build`` does. A simulated agent (a real
WebSocket session) takes the assignments and uploads, for each part, a NAR of a generated
tree (half incompressible bytes, half text), through the real upload path
(``PUT /api/v1/agent/upload/{lease}/out``: lease check, streaming hash and size checks, NAR
parsing, reference scan, compression, storage, signed narinfo), then reports success; the
top output's NAR names every part's path, so the runner finds them as its references and
the top output's closure is the whole set. About 1 GiB in all (``--size-mib``).

Measured, each with a baseline from the same run:

- ingest throughput, compression off and zstd, against ``sha256sum`` over the same NAR files
  (page cache warm for both);
- serving: every NAR, and every narinfo many times, fetched with ``curl --parallel`` from the
  runner's ``/cache`` and from a static file server over the same files: uvicorn (the
  runner's server, same settings) with Starlette's ``StaticFiles`` — the same stack with
  nothing of bigtent's, so the ratio is what bigtent's handlers cost (nginx is not on these
  machines; Python's ``http.server`` would flatter the runner);
- ``nix-store --realise`` of the top output (the whole closure substituted into an empty
  chroot store) from the runner, from the static server, and from a ``file://`` binary cache
  of the same files.

Serving and substitution are measured ``--rounds`` times, the sources in turn, and the best
round of each kept; ``sha256sum`` the best of three (on a loaded machine one slow round says
little).

    python bench/cache.py [--size-mib 1024] [--rounds 3] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
from bench import common
from websockets.asyncio.client import connect

from bigtent import protocol as p
from bigtent.client.api import RunnerClient
from bigtent.client.observer import SilentObserver
from bigtent.client.upload import upload_closure
from bigtent.nix import base32
from bigtent.nix.nar import dump_path
from bigtent.nix.store import NixStore

NO_SUBST = {"substituters": ""}
UPLOAD_CONCURRENCY = 4
TARGET_INGEST_RATIO = 0.9
"""Ingest without compression at least this fraction of ``sha256sum``'s throughput."""
TARGET_SERVE_RATIO = 0.9
"""NARs served at least this fraction of the static file server's throughput."""
TARGET_REALISE_RATIO = 1.3
"""``nix-store --realise`` from the runner within this multiple of the time from ``file://``."""
NIX_EXPR = """{ n, salt }:
let
  part = i: derivation {
    name = "part-${toString i}";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "exit 1" ];
    inherit salt;
  };
in derivation {
  name = "top";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "exit 1" ];
  inherit salt;
  parts = builtins.genList part n;
}
"""


# ---- the NARs -----------------------------------------------------------------------------------
def nar_sizes(total_mib: int) -> list[int]:
    """Payload sizes summing to about ``total_mib``: by bytes, half in a few large outputs
    (128 MiB), a quarter in medium ones (32 MiB), an eighth each in 2 MiB and 512 KiB ones;
    scaled down proportionally for small totals."""
    total = total_mib << 20
    sizes: list[int] = []
    for share, size in ((0.5, 128 << 20), (0.25, 32 << 20), (0.125, 2 << 20), (0.125, 512 << 10)):
        size = min(size, max(64 << 10, int(total * share) // 4))
        sizes += [size] * max(1, round(total * share / size))
    return sizes


@dataclass(frozen=True, slots=True)
class Nar:
    file: Path
    size: int
    sha256: bytes

    @property
    def hash_header(self) -> str:
        return "sha256:" + base32.encode(self.sha256)


def payload(rng: random.Random, size: int) -> bytes:
    """Half random bytes, half text-like (zstd finds something to do, as in real outputs)."""
    words = [rng.randbytes(rng.randint(2, 9)).hex() for _ in range(512)]
    text = " ".join(rng.choice(words) for _ in range(size // 8)).encode()[: size // 2]
    return rng.randbytes(size - len(text)) + text


def write_nar(work: Path, name: str, content: bytes) -> Nar:
    """The NAR of a directory holding ``content`` in one file, written to ``work/nars``."""
    tree = work / "trees" / name
    (tree / "lib").mkdir(parents=True)
    (tree / "lib" / "data").write_bytes(content)
    (tree / "README").write_text(f"{name}\n")
    out = work / "nars" / f"{name}.nar"
    out.parent.mkdir(exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    with out.open("wb") as f:
        for chunk in dump_path(tree):
            digest.update(chunk)
            size += len(chunk)
            f.write(chunk)
    shutil.rmtree(tree)
    return Nar(out, size, digest.digest())


# ---- uploading as an agent ---------------------------------------------------------------------
@dataclass
class Ingest:
    bytes: int = 0
    first_start: float | None = None
    last_end: float = 0.0
    uploads: int = 0


async def agent_uploads(
    url: str, token: str, parts: dict[str, Nar], work: Path
) -> tuple[Ingest, str]:
    """Register, take the assignments (all parts at once), upload their NARs 4 at a time,
    then report them successes; then the same for the top output, whose NAR names every
    part's output path (its references). The agent's ``accepted`` and ``result`` messages go
    after the part uploads, so the timed window holds the upload path only (the scheduler
    benchmark measures the step lifecycle). Returns the timing of the part uploads and the
    top output's path."""
    ingest = Ingest()
    ws_url = url.replace("http://", "ws://") + "/api/v1/agent/ws"
    headers = {"Authorization": f"Bearer {token}"}
    slots = asyncio.Semaphore(UPLOAD_CONCURRENCY)
    top_path = ""
    part_paths: list[str] = []
    reports: list[tuple[p.Assign, p.OutputInfo]] = []
    running: set[p.StepId] = set()
    all_parts = asyncio.Event()
    done = asyncio.Event()
    async with (
        connect(ws_url, additional_headers=headers, max_size=p.MAX_MESSAGE_BYTES) as ws,
        httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as http,
    ):
        await ws.send(
            p.encode(
                p.Register(
                    machine_id=p.MachineId(f"bench-cache-{uuid.uuid4().hex[:8]}"),
                    name="bench-cache",
                    systems=[current_system()],
                    max_jobs=p.MAX_LIST_ITEMS,
                )
            )
        )
        registered = p.parse_runner_message(await ws.recv())
        assert isinstance(registered, p.Registered), registered

        async def report(a: p.Assign, info: p.OutputInfo) -> None:
            await ws.send(p.encode(p.Accepted(step_id=a.step_id, lease_id=a.lease_id)))
            result = p.Result(
                step_id=a.step_id, lease_id=a.lease_id, outcome=p.Outcome.SUCCESS, outputs=[info]
            )
            await ws.send(p.encode(result))
            running.discard(a.step_id)

        async def step(a: p.Assign) -> None:
            nonlocal top_path
            running.add(a.step_id)
            out_path = a.outputs["out"]
            name = a.drv_path.split("-", 1)[1].removesuffix(".drv")
            if name == "top":
                top_path = out_path
                nar = write_nar(work, "top", "\n".join(sorted(part_paths)).encode())
            else:
                nar = parts[name]
                part_paths.append(out_path)
            async with slots:
                t = time.perf_counter()
                if name != "top" and ingest.first_start is None:
                    ingest.first_start = t
                resp = await http.put(
                    a.upload_urls["out"],
                    content=_chunks(nar.file),
                    headers={p.NAR_HASH_HEADER: nar.hash_header, p.NAR_SIZE_HEADER: str(nar.size)},
                )
            if resp.status_code != 200:
                raise RuntimeError(f"upload of {out_path}: HTTP {resp.status_code} {resp.text}")
            info = p.OutputInfo(
                name="out", path=out_path, nar_hash=nar.hash_header, nar_size=nar.size
            )
            if name == "top":
                await report(a, info)
                done.set()
                return
            ingest.last_end = time.perf_counter()
            ingest.bytes += nar.size
            ingest.uploads += 1
            reports.append((a, info))
            if ingest.uploads == len(parts):
                all_parts.set()
            elif len(reports) == p.MAX_LIST_ITEMS:
                # More parts than one agent may hold: free the slots for the next ones.
                for item in reports:
                    await report(*item)
                reports.clear()

        async def heartbeats() -> None:
            # Leases of assignments waiting for their turn to upload must not run out.
            while True:
                await asyncio.sleep(registered.heartbeat_secs)
                await ws.send(p.encode(p.Heartbeat(running=sorted(running)[: p.MAX_LIST_ITEMS])))

        tasks: list[asyncio.Task[None]] = []

        async def receive() -> None:
            async for raw in ws:
                msg = p.parse_runner_message(raw)
                if isinstance(msg, p.Assign):
                    tasks.append(asyncio.create_task(step(msg)))

        receiving = asyncio.create_task(receive())
        beating = asyncio.create_task(heartbeats())
        try:
            await asyncio.wait_for(all_parts.wait(), 3600)
            for item in reports:
                await report(*item)
            await asyncio.wait_for(done.wait(), 3600)
        finally:
            receiving.cancel()
            beating.cancel()
        for t in tasks:
            await t
    return ingest, top_path


async def _chunks(path: Path) -> AsyncIterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            yield chunk


def current_system() -> str:
    out = subprocess.run(
        ["nix-instantiate", "--option", "substituters", "", "--eval", "--expr",
         "builtins.currentSystem"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return out.stdout.strip().strip('"')


async def submit(url: str, token: str, top_drv: str) -> None:
    """What ``bigtent build`` does before waiting: upload the .drv closure, create the build."""
    async with RunnerClient(url, token=token) as client:
        await upload_closure(client, NixStore(options=NO_SUBST), [top_drv], SilentObserver())
        await client.create_build([top_drv])


def instantiate(work: Path, n: int) -> str:
    expr = work / "cache-bench.nix"
    expr.write_text(NIX_EXPR)
    out = subprocess.run(
        ["nix-instantiate", str(expr), "--arg", "n", str(n), "--argstr", "salt",
         uuid.uuid4().hex, "--option", "substituters", ""],
        capture_output=True, text=True,
    )  # fmt: skip
    if out.returncode != 0:
        sys.exit(f"bench: nix-instantiate failed:\n{out.stderr[-3000:]}")
    return out.stdout.strip().splitlines()[-1]


def ingest_run(
    work: Path, compression: str, nars: list[Nar], n_parts: int
) -> tuple[dict[str, Any], Any]:
    """One runner with ``compression``; returns the measurement and (for the zstd run, which
    stays up for the serving benchmarks) the open runner context."""
    top_drv = instantiate(work, n_parts)
    ctx = common.runner(work, compression=compression)
    r = ctx.__enter__()
    try:
        asyncio.run(submit(r.url, r.tokens["client"], top_drv))
        parts = {f"part-{i}": nar for i, nar in enumerate(nars)}
        cpu0, client0 = common.cpu_secs(r.pid), common.cpu_secs()
        profiler = None
        if os.environ.get("BENCH_PYSPY"):
            # Developer aid: sample the runner while it ingests (py-spy installed).
            out = f"{os.environ['BENCH_PYSPY']}.{compression}.txt"
            profiler = subprocess.Popen(
                ["py-spy", "record", "-p", str(r.pid), "-r", "200", "-f", "raw", "-o", out],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        ingest, top_path = asyncio.run(agent_uploads(r.url, r.tokens["agent"], parts, work))
        cpu, client_cpu = common.cpu_secs(r.pid) - cpu0, common.cpu_secs() - client0
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            profiler.wait(60)
        assert ingest.first_start is not None
        secs = ingest.last_end - ingest.first_start
        result = {
            "compression": compression,
            "nars": ingest.uploads,
            "bytes": ingest.bytes,
            "secs": secs,
            "mib_per_sec": ingest.bytes / secs / 2**20,
            "runner_cpu_secs": cpu,
            "runner_cpu_secs_per_gib": cpu / (ingest.bytes / 2**30),
            "runner_cores": cpu / secs,
            "client_cores": client_cpu / secs,
            "top": top_path,
        }
        return result, (ctx, r)
    except BaseException:
        ctx.__exit__(None, None, None)
        raise


# ---- baselines and serving ----------------------------------------------------------------------
def sha256sum(files: Sequence[Path], runs: int = 3) -> dict[str, Any]:
    """``sha256sum`` over ``files``, the best of ``runs`` (the machine may be loaded): wall
    time and its CPU time."""
    size = sum(f.stat().st_size for f in files)
    for f in files:  # page cache warm, as for the uploads
        with f.open("rb") as fh:
            while fh.read(1 << 24):
                pass
    best: tuple[float, float] | None = None
    for _ in range(runs):
        cpu0 = _children_cpu()
        t = time.perf_counter()
        subprocess.run(["sha256sum", *map(str, files)], check=True, capture_output=True)
        secs, cpu = time.perf_counter() - t, _children_cpu() - cpu0
        best = (secs, cpu) if best is None or secs < best[0] else best
    assert best is not None
    secs, cpu = best
    return {
        "bytes": size,
        "secs": secs,
        "mib_per_sec": size / secs / 2**20,
        "cpu_secs_per_gib": cpu / (size / 2**30),
    }


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def static_main(directory: str, port: int) -> int:
    """The baseline static server: uvicorn (as the runner runs it) and Starlette's
    StaticFiles over a directory holding the same files as the runner's cache."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.routing import Mount
    from starlette.staticfiles import StaticFiles

    app = Starlette(routes=[Mount("/cache", StaticFiles(directory=directory))])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    return 0


@contextmanager
def static_server(directory: Path, work: Path) -> Iterator[tuple[str, int]]:
    port = common.free_port()
    log = work / "static.log"
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--static-server", str(directory),
         "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=log.open("wb"),
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/cache"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/nix-cache-info", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit("bench: the static server did not start:\n" + log.read_text())
            time.sleep(0.1)
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(30)


def mirror(r: common.Runner, paths: Sequence[str], dest: Path) -> dict[str, str]:
    """A plain binary-cache directory with the runner's files: nix-cache-info, the narinfos
    as the runner serves them, and its NAR files (hard links). Returns hash part -> NAR URL."""
    (dest / "nar").mkdir(parents=True)
    info = httpx.get(r.url + "/cache/nix-cache-info", timeout=30)
    (dest / "nix-cache-info").write_text(info.text)
    urls: dict[str, str] = {}
    with httpx.Client(base_url=r.url + "/cache", timeout=30) as http:
        for path in paths:
            hash_part = path.removeprefix("/nix/store/")[:32]
            text = http.get(f"/{hash_part}.narinfo").text
            (dest / f"{hash_part}.narinfo").write_text(text)
            url = next(
                line.split(": ", 1)[1] for line in text.splitlines() if line.startswith("URL: ")
            )
            urls[hash_part] = url
            os.link(r.state_dir / "cache" / url, dest / url)
    return urls


def curl_fetch(urls: Sequence[str], work: Path, parallel: int) -> dict[str, Any]:
    """Fetch every URL once with one ``curl --parallel`` (keep-alive, a C client)."""
    config = work / f"curl-{uuid.uuid4().hex[:8]}.cfg"
    config.write_text("".join(f'url = "{u}"\noutput = "/dev/null"\n' for u in urls))
    t = time.perf_counter()
    out = subprocess.run(
        ["curl", "--silent", "--show-error", "--fail", "--parallel", "--parallel-max",
         str(parallel), "--config", str(config), "--write-out", "%{size_download}\n"],
        capture_output=True, text=True,
    )  # fmt: skip
    secs = time.perf_counter() - t
    if out.returncode != 0:
        sys.exit(f"bench: curl failed: {out.stderr[-2000:]}")
    size = sum(int(x) for x in out.stdout.split())
    return {"requests": len(urls), "bytes": size, "secs": secs,
            "mib_per_sec": size / secs / 2**20, "requests_per_sec": len(urls) / secs}  # fmt: skip


def serving(
    runner_url: str, static_url: str, urls: dict[str, str], work: Path, repeat: int, rounds: int
) -> dict[str, Any]:
    """NARs and narinfos from each server, ``rounds`` times in turn (the machine may be
    loaded): the best round of each."""
    out: dict[str, Any] = {}
    for _ in range(rounds):
        for name, base in (("runner", runner_url), ("static", static_url)):
            nars = curl_fetch([f"{base}/{u}" for u in urls.values()], work, 4)
            narinfos = curl_fetch([f"{base}/{h}.narinfo" for h in urls] * repeat, work, 8)
            best = out.setdefault(name, {"nar": nars, "narinfo": narinfos})
            if nars["mib_per_sec"] > best["nar"]["mib_per_sec"]:
                best["nar"] = nars
            if narinfos["requests_per_sec"] > best["narinfo"]["requests_per_sec"]:
                best["narinfo"] = narinfos
    return out


def realise_each(
    work: Path, sources: dict[str, tuple[str, int | None]], key: str, top: str, rounds: int
) -> dict[str, Any]:
    """``realise`` from each source (name -> substituter URL and server pid), ``rounds``
    times in turn: the fastest round of each."""
    out: dict[str, Any] = {}
    for _ in range(rounds):
        for name, (url, pid) in sources.items():
            got = realise(work, url, key, top, pid)
            if name not in out or got["secs"] < out[name]["secs"]:
                out[name] = got
    return out


def realise(
    work: Path, substituter: str, public_key: str, top: str, server_pid: int | None = None
) -> dict[str, Any]:
    """Substitute ``top`` and its closure into an empty chroot store with real Nix; with the
    CPU time Nix and (``server_pid``) the server spent."""
    root = work / f"sub-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "XDG_CACHE_HOME": str(root / "xdg")}
    env.pop("NIX_REMOTE", None)
    server0 = common.cpu_secs(server_pid) if server_pid is not None else 0.0
    nix0 = _children_cpu()
    t = time.perf_counter()
    out = subprocess.run(
        ["nix-store", "--store", f"local?root={root}", "--realise", top,
         "--option", "substituters", substituter,
         "--option", "trusted-public-keys", public_key,
         "--option", "narinfo-cache-negative-ttl", "0"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    secs = time.perf_counter() - t
    nix_cpu = _children_cpu() - nix0
    server_cpu = common.cpu_secs(server_pid) - server0 if server_pid is not None else None
    if out.returncode != 0:
        sys.exit(f"bench: nix-store --realise from {substituter} failed:\n{out.stderr[-3000:]}")
    paths = [x for x in (root / "nix" / "store").iterdir() if not x.name.startswith(".")]
    size = sum(f.stat().st_size for d in paths for f in _files(d))
    shutil.rmtree(root, ignore_errors=True)
    return {
        "secs": secs,
        "paths": len(paths),
        "bytes": size,
        "mib_per_sec": size / secs / 2**20,
        "nix_cpu_secs": nix_cpu,
        "server_cpu_secs": server_cpu,
    }


def _files(path: Path) -> Iterator[Path]:
    if path.is_symlink() or path.is_file():
        yield path
    elif path.is_dir():
        for child in path.iterdir():
            yield from _files(child)


# ---- the parent ------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument(
        "--size-mib", "--size", type=int, default=1024, help="NAR bytes to ingest (MiB)"
    )
    ap.add_argument("--narinfo-repeat", type=int, default=20, help="narinfo fetches per path")
    ap.add_argument(
        "--rounds", type=int, default=3, help="serving and realise rounds (the best is kept)"
    )
    ap.add_argument("--quick", action="store_true", help="16 MiB, narinfos fetched twice")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    ap.add_argument("--static-server", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.static_server:
        return static_main(args.static_server, args.port)
    if args.quick:
        args.size_mib, args.narinfo_repeat, args.rounds = 16, 2, 1
    for tool in ("nix-store", "nix-instantiate", "curl", "sha256sum"):
        if shutil.which(tool) is None:
            sys.exit(f"bench: {tool} is needed")
    m = common.machine()
    result: dict[str, Any] = {
        "benchmark": "cache",
        "machine": m,
        "size_mib": args.size_mib,
        "rounds": args.rounds,
    }
    with tempfile.TemporaryDirectory(prefix="bigtent-bench-cache-") as tmp:
        work = Path(tmp)
        os.environ["XDG_CACHE_HOME"] = str(work / "xdg")
        rng = random.Random(11)
        sizes = nar_sizes(args.size_mib)
        nars = [write_nar(work, f"part-{i}", payload(rng, s)) for i, s in enumerate(sizes)]
        result["nars"] = {"count": len(nars), "bytes": sum(n.size for n in nars)}
        result["sha256sum"] = sha256sum([n.file for n in nars])
        _say(args, f"sha256sum: {result['sha256sum']['mib_per_sec']:.0f} MiB/s")
        plain, (ctx, r) = ingest_run(work, "none", nars, len(nars))
        ctx.__exit__(None, None, None)
        result["ingest_none"] = plain
        _say(args, f"ingest, no compression: {plain['mib_per_sec']:.0f} MiB/s")
        zstd, (ctx, r) = ingest_run(work, "zstd", nars, len(nars))
        result["ingest_zstd"] = zstd
        _say(args, f"ingest, zstd: {zstd['mib_per_sec']:.0f} MiB/s")
        try:
            # Every path of the top output's closure, as a Nix client would fetch it.
            top = zstd["top"]
            refs = httpx.get(f"{r.url}/cache/{top[11:43]}.narinfo", timeout=30).text
            closure = [top] + [
                "/nix/store/" + ref
                for line in refs.splitlines()
                if line.startswith("References: ")
                for ref in line.split()[1:]
                if not top.endswith(ref)
            ]
            result["closure_paths"] = len(closure)
            static_dir = work / "static"
            urls = mirror(r, closure, static_dir)
            with static_server(static_dir, work) as (static_url, static_pid):
                result["serving"] = serving(
                    r.url + "/cache", static_url, urls, work, args.narinfo_repeat, args.rounds
                )
                _say(args, "serving measured")
                sources: dict[str, tuple[str, int | None]] = {
                    "runner": (r.url + "/cache", r.pid),
                    "static": (static_url, static_pid),
                    "file": (f"file://{static_dir}", None),
                }
                result["realise"] = realise_each(work, sources, r.public_key, top, args.rounds)
        finally:
            ctx.__exit__(None, None, None)
    result["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    result["headline"] = headline(result)
    if args.json:
        common.emit(result, True)
    else:
        report(result)
    return 0


def headline(result: dict[str, Any]) -> dict[str, Any]:
    sha = result["sha256sum"]["mib_per_sec"]
    s = result["serving"]
    nar_ratio = s["runner"]["nar"]["mib_per_sec"] / s["static"]["nar"]["mib_per_sec"]
    narinfo_ratio = (
        s["runner"]["narinfo"]["requests_per_sec"] / s["static"]["narinfo"]["requests_per_sec"]
    )
    rz = result["realise"]
    realise_ratio = rz["runner"]["secs"] / rz["file"]["secs"]
    return {
        "ingest_none_vs_sha256sum": result["ingest_none"]["mib_per_sec"] / sha,
        "ingest_zstd_vs_sha256sum": result["ingest_zstd"]["mib_per_sec"] / sha,
        # CPU per byte, sha256sum's over the runner's (the load moves the wall-time ratio).
        "ingest_none_cpu_vs_sha256sum": result["sha256sum"]["cpu_secs_per_gib"]
        / result["ingest_none"]["runner_cpu_secs_per_gib"],
        "serve_nar_vs_static": nar_ratio,
        "serve_narinfo_vs_static": narinfo_ratio,
        "realise_runner_vs_file": realise_ratio,
        "realise_runner_vs_static": rz["runner"]["secs"] / rz["static"]["secs"],
        "target_ingest": TARGET_INGEST_RATIO,
        "target_serving": TARGET_SERVE_RATIO,
        "target_realise": TARGET_REALISE_RATIO,
        "met_ingest": result["ingest_none"]["mib_per_sec"] / sha >= TARGET_INGEST_RATIO,
        "met_serving": nar_ratio >= TARGET_SERVE_RATIO,
        "met_realise": realise_ratio <= TARGET_REALISE_RATIO,
    }


def report(result: dict[str, Any]) -> None:
    common.header("bigtent cache throughput benchmark", result["machine"])
    n = result["nars"]
    print(
        f"# {n['count']} NARs, {n['bytes'] / 2**20:.0f} MiB; "
        f"uploads {UPLOAD_CONCURRENCY} at a time\n"
    )
    sha = result["sha256sum"]["mib_per_sec"]
    print("| ingest | MiB/s | vs sha256sum | CPU s per GiB |")
    print("|---|---|---|---|")
    print(
        f"| sha256sum (baseline, best of 3) | {sha:.0f} | 1.00x "
        f"| {result['sha256sum']['cpu_secs_per_gib']:.1f} |"
    )
    for key, label in (
        ("ingest_none", "runner, compression none"),
        ("ingest_zstd", "runner, zstd"),
    ):
        i = result[key]
        print(
            f"| {label} | {i['mib_per_sec']:.0f} | {i['mib_per_sec'] / sha:.2f}x "
            f"| {i['runner_cpu_secs_per_gib']:.1f} |"
        )
    s = result["serving"]
    print("\n| serving (zstd files) | NAR MiB/s | narinfo requests/s |")
    print("|---|---|---|")
    for key, label in (("static", "uvicorn + StaticFiles (baseline)"), ("runner", "runner /cache")):
        print(
            f"| {label} | {s[key]['nar']['mib_per_sec']:.0f} "
            f"| {s[key]['narinfo']['requests_per_sec']:.0f} |"
        )
    rz = result["realise"]
    print(
        f"\n| nix-store --realise of the top output ({result['closure_paths']} paths) | s | MiB/s "
        "| Nix CPU s | server CPU s |"
    )
    print("|---|---|---|---|---|")
    for key, label in (("file", "file:// binary cache"), ("static", "static HTTP server"),
                       ("runner", "runner /cache")):  # fmt: skip
        server = rz[key]["server_cpu_secs"]
        print(
            f"| {label} | {rz[key]['secs']:.2f} | {rz[key]['mib_per_sec']:.0f} "
            f"| {rz[key]['nix_cpu_secs']:.2f} | {'-' if server is None else f'{server:.2f}'} |"
        )
    h = result["headline"]
    print()
    print(
        f"ingest / sha256sum: {h['ingest_none_vs_sha256sum']:.2f}x without compression "
        f"(target >= {TARGET_INGEST_RATIO}x: {_met(h['met_ingest'])}), "
        f"{h['ingest_zstd_vs_sha256sum']:.2f}x with zstd; by CPU per byte "
        f"{h['ingest_none_cpu_vs_sha256sum']:.2f}x"
    )
    print(
        f"serving / static server: NARs {h['serve_nar_vs_static']:.2f}x "
        f"(target >= {TARGET_SERVE_RATIO}x: {_met(h['met_serving'])}), narinfos "
        f"{h['serve_narinfo_vs_static']:.2f}x"
    )
    print(
        f"substitution by nix-store --realise: runner takes {h['realise_runner_vs_file']:.2f}x "
        f"the time of file:// (target <= {TARGET_REALISE_RATIO}x: {_met(h['met_realise'])}), "
        f"{h['realise_runner_vs_static']:.2f}x that of the static server"
    )
    print(f"load average at the end: {result['load_average_end']}")


def _met(met: bool) -> str:
    return "met" if met else "NOT met"


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.json:
        print(f"# {text}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
