"""Benchmark: the runner's CPU per request on its hot routes, against a bare server's.

A runner (``bigtent runner``, its own process, SQLite, local storage) is given one cached path
(a .drv uploaded as ``bigtent build`` does) and one queued build. Then, one route at a time,
N sequential requests on one kept-alive connection:

- ``narinfo``: ``GET /cache/<hash>.narinfo`` (Nix's substituter on an agent, per input);
- ``nar``: ``GET /cache/nar/<file>`` (the same path's NAR file);
- ``narinfo-404``: ``GET /cache/<hash>.narinfo`` of a path the cache lacks (Nix asks first);
- ``build``: ``GET /api/v1/builds/<id>`` with a client token (``bigtent build`` polls it);
- ``upload``: ``PUT /api/v1/agent/upload/<lease>/out`` with an agent token and a 64-byte body,
  for a lease that is not current (answered 409 after the checks before the NAR is read:
  the request path of an agent's output upload without the ingest itself).

The runner's CPU (utime + stime from ``/proc``) over the N requests, per request, is compared
with the floor: uvicorn with the same protocol (httptools) and a bare Starlette app answering
the same status, headers and bytes from memory. Each route is measured ``--rounds`` times,
the two servers in turn, and the best round of each kept (a shared machine makes single
rounds noisy). ``BENCH_PYSPY=PREFIX`` (py-spy on PATH) samples the runner meanwhile, as in
``bench/dag.py``: PREFIX.http-ROUTE.txt.

    python bench/requests_cpu.py [--requests 2000] [--rounds 3] [--quick] [--json]
    python bench/requests_cpu.py --floor PORT ANSWERS.json   # the floor server (internal)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
from bench import common
from bench.dag import profiled

NIX_EXPR = (
    'derivation { name = "bench-http-%s"; system = builtins.currentSystem; '
    'builder = "/bin/sh"; args = [ "-c" "echo > $out" ]; }'
)
MISSING_HASH = "0" * 32
LEASE = "no-such-lease"
UPLOAD_BODY = b"\0" * 64


# ---- the floor: a bare Starlette app ----------------------------------------------------------
def floor_server(port: int, answers_file: Path) -> None:
    """Serve every (method, path) of ``answers_file`` with its recorded status, headers and
    body, from memory: uvicorn + Starlette and nothing else."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    answers = json.loads(answers_file.read_text())
    table = {
        (a["method"], a["path"]): (a["status"], a["headers"], bytes.fromhex(a["body"]))
        for a in answers
    }

    async def answer(request: Request) -> Response:
        if request.method == "PUT":
            async for _ in request.stream():
                pass
        status, headers, body = table[(request.method, request.url.path)]
        return Response(body, status_code=status, headers=headers)

    routes = [Route("/{rest:path}", answer, methods=["GET", "PUT"])]
    uvicorn.run(
        Starlette(routes=routes),
        host="127.0.0.1",
        port=port,
        http="httptools",
        log_config=None,
        access_log=False,
    )


@contextmanager
def floor(work: Path, answers: list[dict[str, Any]]) -> Iterator[tuple[str, int]]:
    path = work / "answers.json"
    path.write_text(json.dumps(answers))
    port = common.free_port()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--floor", str(port), str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit("bench: the floor server did not start")
            try:
                httpx.get(url + answers[0]["path"], timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.05)
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(10)


# ---- the runner's state -----------------------------------------------------------------------
def seed(url: str, tokens: dict[str, str]) -> tuple[str, str, int]:
    """One .drv in the cache and a build of it: (its hash part, its NAR URL, the build's id)."""
    from bigtent.client.api import RunnerClient
    from bigtent.client.observer import SilentObserver
    from bigtent.client.upload import upload_closure
    from bigtent.nix.store import NixStore

    async def go() -> tuple[str, int]:
        store = NixStore()
        [drv] = await store.instantiate(None, expr=NIX_EXPR % os.getpid())
        client = RunnerClient(url, token=tokens["client"])
        try:
            await upload_closure(client, store, [drv], SilentObserver())
            build = await client.create_build([drv])
        finally:
            await client.aclose()
        return drv, build.id

    drv, build_id = asyncio.run(go())
    hash_part = Path(drv).name[:32]
    narinfo = httpx.get(f"{url}/cache/{hash_part}.narinfo").text
    nar_url = next(line.split(": ", 1)[1] for line in narinfo.splitlines() if line[:4] == "URL:")
    return hash_part, nar_url, build_id


def requests_of(hash_part: str, nar_url: str, build_id: int) -> dict[str, dict[str, Any]]:
    return {
        "narinfo": {"method": "GET", "path": f"/cache/{hash_part}.narinfo", "role": None},
        "nar": {"method": "GET", "path": f"/cache/{nar_url}", "role": None},
        "narinfo-404": {"method": "GET", "path": f"/cache/{MISSING_HASH}.narinfo", "role": None},
        "build": {"method": "GET", "path": f"/api/v1/builds/{build_id}", "role": "client"},
        "upload": {"method": "PUT", "path": f"/api/v1/agent/upload/{LEASE}/out", "role": "agent"},
    }


def headers_for(req: dict[str, Any], tokens: dict[str, str]) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {tokens[req['role']]}"} if req["role"] else {}
    if req["method"] == "PUT":
        headers |= {"X-Nar-Hash": "sha256:" + "0" * 52, "X-Nar-Size": str(len(UPLOAD_BODY))}
    return headers


def record(url: str, kind: str, req: dict[str, Any], tokens: dict[str, str]) -> dict[str, Any]:
    """The runner's answer to ``req``, for the floor to give back."""
    resp = httpx.request(
        req["method"],
        url + req["path"],
        headers=headers_for(req, tokens),
        content=UPLOAD_BODY if req["method"] == "PUT" else None,
    )
    kept = {k: v for k, v in resp.headers.items() if k not in ("content-length", "date", "server")}
    return {
        "kind": kind,
        "method": req["method"],
        "path": req["path"],
        "status": resp.status_code,
        "headers": kept,
        "body": resp.content.hex(),
    }


def cpu_per_request(
    url: str, pid: int, req: dict[str, Any], headers: dict[str, str], n: int, status: int
) -> float:
    """The server's CPU microseconds per request over ``n`` sequential kept-alive requests."""
    body = UPLOAD_BODY if req["method"] == "PUT" else None
    with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
        send: Callable[[], httpx.Response] = lambda: client.request(  # noqa: E731
            req["method"], req["path"], content=body
        )
        for _ in range(20):  # warm up: connection, caches
            send()
        before = common.cpu_secs(pid)
        for _ in range(n):
            resp = send()
            if resp.status_code != status:
                sys.exit(f"bench: {req['path']} answered {resp.status_code}, not {status}")
        return (common.cpu_secs(pid) - before) / n * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="200 requests, one round")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--floor", nargs=2, metavar=("PORT", "ANSWERS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.requests, args.rounds = 200, 1
    if args.floor:
        floor_server(int(args.floor[0]), Path(args.floor[1]))
        return 0
    m = common.machine()
    if not args.json:
        common.header("bigtent HTTP request path: runner CPU per request", m)
    results: dict[str, Any] = {"machine": m, "requests": args.requests, "routes": {}}
    with tempfile.TemporaryDirectory(prefix="bench-http-") as tmp, common.runner(Path(tmp)) as r:
        hash_part, nar_url, build_id = seed(r.url, r.tokens)
        reqs = requests_of(hash_part, nar_url, build_id)
        answers = [record(r.url, kind, req, r.tokens) for kind, req in reqs.items()]
        with floor(Path(tmp), answers) as (floor_url, floor_pid):
            for answer in answers:
                kind = answer["kind"]
                req = reqs[kind]
                headers = headers_for(req, r.tokens)
                runner_us: list[float] = []
                floor_us: list[float] = []
                for _ in range(args.rounds):
                    with profiled(r.pid, f"http-{kind}"):
                        runner_us.append(
                            cpu_per_request(
                                r.url, r.pid, req, headers, args.requests, answer["status"]
                            )
                        )
                    floor_us.append(
                        cpu_per_request(
                            floor_url, floor_pid, req, headers, args.requests, answer["status"]
                        )
                    )
                best, best_floor = min(runner_us), min(floor_us)
                results["routes"][kind] = {
                    "status": answer["status"],
                    "bytes": len(answer["body"]) // 2,
                    "runner_us": round(best),
                    "floor_us": round(best_floor),
                    "ratio": round(best / best_floor, 2) if best_floor else None,
                    "rounds_runner_us": [round(x) for x in runner_us],
                    "rounds_floor_us": [round(x) for x in floor_us],
                }
                if not args.json:
                    print(
                        f"{kind:12} {answer['status']} {len(answer['body']) // 2:6d} B  "
                        f"runner {best:6.0f} us  floor {best_floor:5.0f} us  "
                        f"x{results['routes'][kind]['ratio']}  "
                        f"(rounds {[round(x) for x in runner_us]})"
                    )
    results["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    if not args.json:
        print(f"# load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    common.emit(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
