"""What every benchmark in ``bench/`` shares: the machine record, process measurements from
``/proc``, percentiles, and the ``--json`` / text output.

Benchmarks print ratios against a baseline measured in the same run (a shared machine makes
absolute numbers noisy), and record the machine and its load when they started.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from bigtent.runner.cache.service import Cache

REPO = Path(__file__).resolve().parents[1]
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def machine() -> dict[str, Any]:
    """The machine and its load right now: CPU model, cores, RAM, kernel, load average."""
    model = "?"
    lscpu = shutil.which("lscpu")
    if lscpu is not None:
        out = subprocess.run([lscpu], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
                break
    uptime = shutil.which("uptime")
    up = subprocess.run([uptime], capture_output=True, text=True).stdout.strip() if uptime else ""
    nix = shutil.which("nix-store")
    nix_version = (
        subprocess.run([nix, "--version"], capture_output=True, text=True).stdout.strip()
        if nix
        else None
    )
    return {
        "date": datetime.now().isoformat(timespec="seconds"),
        "cpu_model": model,
        "cores": os.cpu_count(),
        "ram_gib": round(os.sysconf("SC_PHYS_PAGES") * _PAGE / 2**30, 1),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "nix": nix_version,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "uptime": up,
    }


def machine_line(m: dict[str, Any]) -> str:
    load = " ".join(f"{x:.2f}" for x in m["load_average"])
    return (
        f"{m['cores']} cores ({m['cpu_model']}), {m['ram_gib']} GiB, {m['kernel']}, "
        f"Python {m['python']}; load average at start {load}"
    )


def header(title: str, m: dict[str, Any]) -> None:
    """The first lines of a text report."""
    print(f"# {title}, {m['date']}")
    print(f"# machine: {machine_line(m)}")
    if m["uptime"]:
        print(f"# uptime: {m['uptime']}")


def emit(result: dict[str, Any], as_json: bool) -> None:
    """The machine-readable result (``--json``: one JSON object on stdout)."""
    if as_json:
        json.dump(result, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")


def percentiles(values: Sequence[float], qs: Sequence[int] = (50, 95, 99)) -> dict[str, float]:
    """Nearest-rank percentiles (``p50`` ...) and the maximum; empty input gives NaNs."""
    if not values:
        return {f"p{q}": float("nan") for q in qs} | {"max": float("nan"), "n": 0}
    ordered = sorted(values)
    out: dict[str, float] = {}
    for q in qs:
        rank = max(1, -(-q * len(ordered) // 100))  # ceil(q/100 * n), at least 1
        out[f"p{q}"] = ordered[rank - 1]
    out["max"] = ordered[-1]
    out["n"] = len(ordered)
    return out


def cpu_secs(pid: int | str = "self") -> float:
    """User + system CPU seconds of a process (``/proc/PID/stat``)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def memory_bytes(pid: int | str = "self") -> dict[str, int]:
    """Resident set size now (``rss``) and its peak (``hwm``), from ``/proc/PID/status``."""
    out = {"rss": 0, "hwm": 0}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            out["rss"] = int(line.split()[1]) * 1024
        elif line.startswith("VmHWM:"):
            out["hwm"] = int(line.split()[1]) * 1024
    return out


def raise_nofile(wanted: int) -> int:
    """Raise the soft limit of open files towards ``wanted`` (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mib(n: float) -> float:
    return round(n / 2**20, 1)


class Stopwatch:
    """Seconds since it was made (``perf_counter``)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start


# ---- a runner process -------------------------------------------------------------------------
@dataclass
class Runner:
    """``bigtent runner`` in its own process on a loopback port, SQLite and local storage."""

    url: str
    tokens: dict[str, str]
    """Role -> bearer token."""
    public_key: str
    proc: subprocess.Popen[bytes]
    state_dir: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@contextmanager
def runner(
    work: Path, *, compression: str = "zstd", log_level: str = "", extra: Sequence[str] = ()
) -> Iterator[Runner]:
    """Start a runner; wait until it answers ``GET /api/v1/status``; stop it afterwards."""
    import httpx

    from bigtent.nix.keys import generate_key
    from bigtent.runner.auth.tokens import generate_token, token_digest

    state = work / f"runner-{uuid.uuid4().hex[:8]}"
    state.mkdir(parents=True)
    key = generate_key("bench-1")
    (state / "cache.sk").write_text(key.to_text())
    tokens = {role: generate_token() for role in ("agent", "client", "admin")}
    port = free_port()
    lines = [
        "[runner]",
        f'listen = "127.0.0.1:{port}"',
        f"state_dir = {json.dumps(str(state))}",
        "allow_plaintext = true",
        "[cache]",
        f"signing_key_file = {json.dumps(str(state / 'cache.sk'))}",
        f'compression = "{compression}"',
    ]
    for role, token in tokens.items():
        lines += [
            "[[auth.tokens]]",
            f'name = "bench-{role}"',
            f'role = "{role}"',
            f'sha256 = "{token_digest(token)}"',
            # The benchmarks build trusted (their outputs go to the main cache).
            *(["trusted = true"] if role == "client" else []),
        ]
    config = state / "runner.toml"
    config.write_text("\n".join([*lines, *extra]) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BIGTENT_")}
    argv = [sys.executable, "-m", "bigtent", *([log_level] if log_level else [])]
    # The runner refuses a database without its schema: migrate it first.
    migrated = subprocess.run(
        [sys.executable, "-m", "bigtent", "db", "migrate", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
    )
    if migrated.returncode != 0:
        sys.exit(f"bench: bigtent db migrate failed:\n{migrated.stderr[-3000:]}")
    proc = subprocess.Popen(
        [*argv, "runner", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=(state / "runner.log").open("wb"),
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    r = Runner(url, tokens, key.public_key().to_text(), proc, state)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                log = (state / "runner.log").read_text(errors="replace")[-3000:]
                sys.exit(f"bench: the runner did not start:\n{log}")
            try:
                resp = httpx.get(
                    url + "/api/v1/status",
                    headers={"Authorization": f"Bearer {tokens['client']}"},
                    timeout=2,
                )
                if resp.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        yield r
    finally:
        r.stop()


async def local_cache(root: Path) -> tuple[AsyncEngine, Cache]:
    """A cache as the runner makes one, in this process, under ``root`` (a new directory):
    a migrated SQLite database, local storage and a fresh signing key. The caller closes the
    cache and disposes of the engine."""
    from bigtent.config import CacheSection
    from bigtent.nix.keys import generate_key
    from bigtent.runner.cache.service import Cache
    from bigtent.runner.cache.storage import LocalStorage
    from bigtent.runner.db.migrate import create_engine, migrate

    root.mkdir()
    engine = create_engine(f"sqlite+aiosqlite:///{root / 'db.sqlite'}")
    await migrate(engine)
    storage = LocalStorage(root / "cache")
    return engine, Cache(
        engine, storage, generate_key("bench-1"), CacheSection(), "http://127.0.0.1:1"
    )
