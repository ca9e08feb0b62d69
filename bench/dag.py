"""Benchmark: a 101-derivation DAG through `bigtent up`, against local `nix-build -j2` and
Nix's own SSH remote builders, measured in the same run; a DAG of `sleep 1` derivations,
makespan against its critical path and against local Nix building the same DAG with as many
jobs as the farm has slots; and the runner's CPU time per step over a wide DAG of
1,000 trivial derivations (utime + stime from /proc/PID/stat, before submitting and after
the build ended).

    python bench/dag.py [--layers 10 --width 10] [--no-ssh] [--sleep-layers 4] [--cpu-dag 1000]

Prints each wall time, the ratios and every target with met / not met. Every run uses a
fresh salt, so nothing is cached. Run it with another checkout's interpreter (that
checkout's `.venv/bin/python bench/dag.py`) to measure that checkout's `bigtent`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
from bench.common import cpu_secs

REPO = Path(__file__).resolve().parents[1]
DAG_NIX = REPO / "examples" / "dag.nix"
NO_SUBST = ["--option", "substituters", ""]
# The targets: (key, what, limit, "max" = at most the limit / "min" = at least it).
TARGETS: tuple[tuple[str, str, float, str], ...] = (
    ("bigtent_vs_local", "bigtent / local nix-build -j2", 1.5, "max"),
    ("download_vs_local", "bigtent with download / local nix-build -j2", 1.7, "max"),
    ("ssh_vs_bigtent", "Nix SSH builders / bigtent", 20.0, "min"),
    ("makespan_ratio", "makespan / critical path", 1.05, "max"),
    ("runner_cpu_ms_per_step", "runner CPU per step (ms)", 2.0, "max"),
)
HOST_TOOLS = "/bin=/usr/bin /usr /lib=/usr/lib /lib64=/usr/lib64"
# The DAG's builders are /bin/sh: the local baseline maps the host tools into Nix's sandbox
# itself, as the agents' sandbox_paths do, instead of relying on the machine's nix.conf.
SANDBOX = ["--option", "extra-sandbox-paths", HOST_TOOLS]


def dag_file(work: Path, **args: object) -> Path:
    params = {"salt": uuid.uuid4().hex, **args}
    body = " ".join(f"{k} = {json.dumps(v)};" for k, v in params.items())
    path = work / f"dag-{uuid.uuid4().hex[:8]}.nix"
    path.write_text(f"import {DAG_NIX} {{ {body} }}\n")
    return path


def timed(argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(
            f"bench: {' '.join(argv[:3])} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )
    return elapsed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_env(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.removeprefix("export ").strip()
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            env[key] = shlex.split(value)[0] if value else ""
    return env


@contextmanager
def profiled(pid: int, name: str) -> Iterator[None]:
    """Developer aid: ``BENCH_PYSPY=PREFIX`` samples the runner with py-spy meanwhile
    (py-spy on PATH), into PREFIX.NAME.txt (raw, collapsed stacks)."""
    prefix = os.environ.get("BENCH_PYSPY")
    if not prefix:
        yield
        return
    profiler = subprocess.Popen(
        [
            "py-spy",
            "record",
            "-p",
            str(pid),
            "-r",
            "200",
            "-f",
            "raw",
            "-o",
            f"{prefix}.{name}.txt",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        profiler.send_signal(signal.SIGINT)
        profiler.wait(60)


CENSUS_DIR = REPO / "bench" / "sqlcensus"


def census_env() -> None:
    """Developer aid: ``BENCH_SQL_CENSUS=PREFIX`` counts the runner's SQL statements
    (``bench/sqlcensus``); the farm's processes inherit this process's environment."""
    if os.environ.get("BENCH_SQL_CENSUS"):
        path = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = str(CENSUS_DIR) + (os.pathsep + path if path else "")


def census(pid: int) -> dict[str, int] | None:
    """The runner's statement counts so far (``BENCH_SQL_CENSUS``), or None when off."""
    prefix = os.environ.get("BENCH_SQL_CENSUS")
    if not prefix:
        return None
    path = Path(f"{prefix}.{pid}.json")
    seq = json.loads(path.read_text())["seq"] if path.exists() else 0
    os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError, ValueError):
            got = json.loads(path.read_text())
            if got["seq"] > seq:
                return dict(got["counts"])
        time.sleep(0.05)
    sys.exit("bench: the runner wrote no statement census (BENCH_SQL_CENSUS)")


def census_report(
    before: dict[str, int], after: dict[str, int], steps: int
) -> tuple[dict[str, Any], list[str]]:
    """Statements per step between two censuses, and the report's lines (the most frequent
    statements first)."""
    delta = {k: v - before.get(k, 0) for k, v in after.items() if v > before.get(k, 0)}
    ends = {k: delta.pop(k) for k in ("(commit)", "(rollback)") if k in delta}
    total = sum(delta.values())
    lines = [
        f"\n## SQL statements per step over the CPU DAG: {total / steps:.2f}; transactions "
        + ", ".join(f"{k} {n / steps:.2f}" for k, n in sorted(ends.items()))
        + "\n"
    ]
    for stmt, n in sorted(delta.items(), key=lambda kv: -kv[1])[:30]:
        lines.append(f"- {n / steps:6.2f}  {stmt[:150]}")
    report = {
        "statements_per_step": total / steps,
        "transactions_per_step": {k.strip("()"): n / steps for k, n in ends.items()},
        "statements": delta,
    }
    return report, lines


PHASE_LINE = re.compile(r"step \d+ \((\S+\.drv)\): success \((.*)\)\s*$")
PHASE = re.compile(r"(\w+) ([0-9.]+) s")
EDGE = re.compile(r'^"([^"]+)" -> "([^"]+)"')


def agent_log_marks(state: Path) -> dict[Path, int]:
    """Where each agent's log of the farm ends now (``agent_steps`` reads from there)."""
    return {log: log.stat().st_size for log in sorted((state / "logs").glob("agent-*.log"))}


def agent_steps(marks: dict[Path, int]) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Developer aid: the steps the farm's agents logged as succeeded since ``marks``: their
    phases (fetch, substitute, build, upload; seconds per step by phase) and which agent
    built each .drv."""
    phases: dict[str, list[float]] = {}
    where: dict[str, str] = {}
    for log, line in new_lines(marks):
        m = PHASE_LINE.search(line)
        if m is None:
            continue
        where[m.group(1)] = log.name
        for name, secs in PHASE.findall(m.group(2)):
            phases.setdefault(name, []).append(float(secs))
    return phases, where


def new_lines(marks: dict[Path, int]) -> Iterator[tuple[Path, str]]:
    """Each agent log's lines written since ``marks`` (``agent_log_marks``), with the log."""
    for log, start in marks.items():
        with log.open("rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
        for line in text.splitlines():
            yield log, line


STEP_LINE = re.compile(
    r"^(\S+ \S+) INFO bigtent\.agent\.(?:build|executor): step (\d+) \(\S+\): "
    r"(building|success)"
)


def handoffs(state: Path, marks: dict[Path, int]) -> str:
    """Developer aid: the hand-offs around each step the agents started and finished since
    ``marks``, median / 90th percentile: from the runner's dispatch decision
    (``steps.assigned_at``) to the agent starting the step (its "building" line, before it
    substitutes inputs), and from the agent's "success" line (after the upload) to the
    runner's commit of the step's end (``steps.finished_at``). Log lines have millisecond
    times; the runner's database is SQLite (``bigtent up``)."""
    started: dict[int, float] = {}
    succeeded: dict[int, float] = {}
    for _, line in new_lines(marks):
        m = STEP_LINE.match(line)
        if m is None:
            continue
        when = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        (started if m.group(3) == "building" else succeeded)[int(m.group(2))] = when
    ids = sorted(started.keys() & succeeded.keys())
    if not ids:
        return "hand-offs: no step seen"
    with contextlib.closing(sqlite3.connect(state / "bigtent.db")) as db:
        holes = ",".join("?" * len(ids))
        rows = db.execute(
            f"SELECT id, assigned_at, finished_at FROM steps WHERE id IN ({holes})", ids
        ).fetchall()
    to_start = sorted(1000 * (started[i] - a) for i, a, _ in rows if a is not None)
    to_commit = sorted(1000 * (f - succeeded[i]) for i, _, f in rows if f is not None)

    def stat(values: list[float]) -> str:
        if not values:
            return "-"
        p90 = values[min(len(values) - 1, len(values) * 9 // 10)]
        return f"{values[len(values) // 2]:.1f} / {p90:.1f}"

    return (
        "hand-offs per step, median / p90 ms: dispatch decision -> agent starts the step "
        f"{stat(to_start)}; agent's success -> runner's commit {stat(to_commit)}"
    )


def phases_report(phases: dict[str, list[float]]) -> tuple[dict[str, Any], str]:
    """Per phase: steps, mean, median and 90th percentile (ms), and the report's line."""
    report: dict[str, Any] = {}
    parts = []
    for name, values in phases.items():
        values = sorted(values)
        stats = {
            "steps": len(values),
            "mean_ms": 1000 * sum(values) / len(values),
            "median_ms": 1000 * values[len(values) // 2],
            "p90_ms": 1000 * values[min(len(values) - 1, (len(values) * 9) // 10)],
        }
        report[name] = stats
        parts.append(
            f"{name} {stats['mean_ms']:.1f} / {stats['median_ms']:.1f} / {stats['p90_ms']:.1f}"
        )
    return report, "agents' phases per step, mean / median / p90 ms: " + "; ".join(parts)


def locality(where: dict[str, str]) -> tuple[dict[str, int], str]:
    """Developer aid: of the built steps' inputs built in the same run, how many were built
    by the same agent (valid in its store: nothing to substitute) and how many by another
    (substituted from the runner's cache). The DAG's edges come from ``nix-store -q
    --graph`` of its top derivation."""
    tops = [d for d in where if "-dag-top-" in d]
    local = remote = 0
    if tops:
        graph = subprocess.run(
            ["nix-store", "-q", "--graph", *tops], capture_output=True, text=True, check=False
        ).stdout
        for line in graph.splitlines():
            m = EDGE.match(line)
            if m is None:
                continue
            a, b = (where.get(f"/nix/store/{x}") for x in m.groups())
            if a is not None and b is not None:
                local, remote = (local + 1, remote) if a == b else (local, remote + 1)
    report = {"inputs_same_agent": local, "inputs_other_agent": remote}
    share = local / (local + remote) if local + remote else 0.0
    return report, (
        f"inputs built by the same agent: {local} of {local + remote} ({share:.0%}); "
        f"by the other (substituted from the runner): {remote}"
    )


def runner_pid(up_pid: int) -> int:
    """The pid of the runner `bigtent up` started: its child running `bigtent runner`."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if ppid == up_pid and b"runner" in argv and b"bigtent" in argv:
            return int(proc.name)
    sys.exit("bench: no runner process under bigtent up")


def verdict(value: float | None, limit: float, sense: str) -> bool | None:
    if value is None:
        return None
    return value <= limit if sense == "max" else value >= limit


@contextmanager
def farm(work: Path, agents: int, jobs: int) -> Iterator[dict[str, str]]:
    state = work / f"farm-{uuid.uuid4().hex[:8]}"
    env_file = state / "env"
    up = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bigtent",
            "up",
            "--agents",
            str(agents),
            "--jobs",
            str(jobs),
            "--state-dir",
            str(state),
            "--port",
            str(free_port()),
            "--host-tools",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(work / "up.log").open("wb"),
    )
    try:
        deadline = time.monotonic() + 60
        while not env_file.exists():
            if up.poll() is not None or time.monotonic() > deadline:
                sys.exit("bench: bigtent up did not start:\n" + (work / "up.log").read_text())
            time.sleep(0.1)
        env = {**os.environ, **read_env(env_file), "NIX_CONFIG": "substituters =\n"}

        def connected() -> int:
            try:
                r = httpx.get(
                    env["BIGTENT_URL"] + "/api/v1/agents",
                    headers={"Authorization": f"Bearer {env['BIGTENT_TOKEN']}"},
                )
            except httpx.HTTPError:
                return 0
            return sum(1 for a in r.json()["agents"] if a["connected"])

        while connected() < agents:
            if time.monotonic() > deadline:
                sys.exit("bench: agents did not connect")
            time.sleep(0.1)
        env["BENCH_RUNNER_PID"] = str(runner_pid(up.pid))
        env["BENCH_STATE_DIR"] = str(state)
        yield env
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(30)
        except subprocess.TimeoutExpired:
            up.kill()


def bigtent_build(env: dict[str, str], nix_file: Path, *extra: str) -> tuple[float, dict[str, Any]]:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "bigtent", "build", str(nix_file), "-A", "top", "--json", *extra],
        env=env,
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"bench: bigtent build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return elapsed, json.loads(proc.stdout)


@contextmanager
def ssh_builder(work: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """A loopback sshd whose Nix store is a separate directory (a remote-program wrapper)."""
    d = work / "ssh"
    d.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", d / "host"], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", d / "client"], check=True)
    shutil.copy(d / "client.pub", d / "authorized_keys")
    port = free_port()
    (d / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {d / 'host'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nUsePAM no\nStrictModes no\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
    )
    store = d / "remote-store"
    wrapper = d / "nix-store-remote"
    wrapper.write_text(
        "#!/bin/sh\nexport NIX_REMOTE=local\n"
        f"export NIX_CONFIG='extra-sandbox-paths = {HOST_TOOLS}\nsubstituters ='\n"
        'exec /usr/bin/nix-store "$@"\n'
    )
    wrapper.chmod(0o755)
    Path("/run/sshd").mkdir(exist_ok=True)
    sshd = subprocess.Popen(
        ["/usr/sbin/sshd", "-D", "-e", "-f", str(d / "sshd_config")],
        stderr=(d / "sshd.log").open("wb"),
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    sys.exit("bench: sshd did not start")
                time.sleep(0.05)
        builders = (
            f"ssh://root@127.0.0.1?remote-store={store}&remote-program={wrapper} "
            f"{platform.machine()}-linux {d / 'client'} 2 1"
        )
        env = {
            **os.environ,
            "NIX_SSHOPTS": f"-p {port} -o StrictHostKeyChecking=no "
            "-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR",
        }
        yield builders, env
    finally:
        sshd.terminate()
        sshd.wait(10)


def machine() -> str:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    nix = subprocess.run(["nix-store", "--version"], capture_output=True, text=True).stdout
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}, {nix.strip()}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--width", type=int, default=10)
    ap.add_argument("--no-ssh", action="store_true", help="skip the Nix SSH builder baseline")
    ap.add_argument("--sleep-layers", type=int, default=4)
    ap.add_argument("--sleep-width", type=int, default=4)
    ap.add_argument("--size", type=int, help="layers and width of the DAG (both)")
    ap.add_argument(
        "--cpu-dag",
        type=int,
        default=1000,
        metavar="N",
        help="runner CPU per step over a wide DAG of about N derivations (10 layers; 0: skip)",
    )
    ap.add_argument(
        "--quick", action="store_true", help="3x3 DAG, no SSH, 2x2 sleep DAG, 100-step CPU DAG"
    )
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = ap.parse_args()
    census_env()
    if args.size:
        args.layers = args.width = args.size
    if args.quick:
        args.layers, args.width, args.no_ssh = 3, 3, True
        args.sleep_layers, args.sleep_width = 2, 2
        args.cpu_dag = 100
    stream = sys.stderr if args.json else sys.stdout

    def say(text: str = "") -> None:
        print(text, file=stream, flush=True)

    n = args.layers * args.width + 1
    load = os.getloadavg()
    say(f"# bigtent DAG benchmark, {datetime.now().isoformat(timespec='seconds')}")
    say(f"# machine: {machine()}; load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    results: dict[str, float] = {}

    def record(name: str, secs: float) -> None:
        results[name] = secs
        say(f"# measured: {name}: {secs:.2f} s")

    with tempfile.TemporaryDirectory(prefix="bigtent-bench-") as tmp:
        work = Path(tmp)
        os.environ["XDG_CACHE_HOME"] = str(work / "xdg")
        dag = dict(layers=args.layers, width=args.width)

        record(
            "nix-build -j2 (local)",
            timed(
                [
                    "nix-build",
                    str(dag_file(work, **dag)),
                    "-A",
                    "top",
                    "-j2",
                    "--no-out-link",
                    *NO_SUBST,
                    *SANDBOX,
                ]
            ),
        )
        if not args.no_ssh and Path("/usr/sbin/sshd").exists():
            with ssh_builder(work) as (builders, env):
                record(
                    "nix-build, SSH remote builders (2 jobs)",
                    timed(
                        [
                            "nix-build",
                            str(dag_file(work, **dag)),
                            "-A",
                            "top",
                            "--no-out-link",
                            "--max-jobs",
                            "0",
                            "--builders",
                            builders,
                            *NO_SUBST,
                        ],
                        env=env,
                    ),
                )
        cpu: dict[str, Any] = {}
        with farm(work, agents=2, jobs=2) as env:
            pid = int(env["BENCH_RUNNER_PID"])
            before = cpu_secs(pid)
            marks = agent_log_marks(Path(env["BENCH_STATE_DIR"]))
            with profiled(pid, "dag"):
                t, _ = bigtent_build(env, dag_file(work, **dag), "--no-download")
            cpu["dag_runner_cpu_ms_per_step"] = (cpu_secs(pid) - before) * 1000 / n
            phases, where = agent_steps(marks)
            cpu["dag_agent_phases"], dag_phases = phases_report(phases)
            cpu["dag_locality"], dag_locality = locality(where)
            record("bigtent build --no-download (2 agents x 2 jobs)", t)
            t, _ = bigtent_build(env, dag_file(work, **dag), "--no-out-link")
            record("bigtent build, with download of the results", t)
            if args.cpu_dag > 0:
                # A wide DAG: 10 layers (fewer for small N), the rest as width, plus the top.
                cpu_layers = min(10, max(1, args.cpu_dag // 10))
                cpu_width = max(1, args.cpu_dag // cpu_layers)
                steps = cpu_layers * cpu_width + 1
                wide = dag_file(work, layers=cpu_layers, width=cpu_width)
                counted = census(pid)
                marks = agent_log_marks(Path(env["BENCH_STATE_DIR"]))
                before = cpu_secs(pid)
                with profiled(pid, "cpu-dag"):
                    t, _ = bigtent_build(env, wide, "--no-download")
                used = cpu_secs(pid) - before
                phases, where = agent_steps(marks)
                cpu["cpu_dag_agent_phases"], wide_phases = phases_report(phases)
                cpu["cpu_dag_locality"], wide_locality = locality(where)
                if counted is not None:
                    cpu["sql_census"], lines = census_report(counted, census(pid) or {}, steps)
                    for line in lines:
                        say(line)
                cpu.update(
                    cpu_dag_steps=steps,
                    cpu_dag_wall_secs=t,
                    cpu_dag_runner_cpu_secs=used,
                    runner_cpu_ms_per_step=used * 1000 / steps,
                )
                say(
                    f"# measured: runner CPU over a {steps}-step DAG "
                    f"({cpu_layers} layers x {cpu_width}): {used:.2f} s in {t:.2f} s"
                )
        # Makespan against the critical path: sleep-1 derivations, plenty of slots. The
        # baseline: local Nix building the same kind of DAG (instantiated first, so no
        # evaluation is timed) with as many jobs as the farm has slots.
        sl = dict(layers=args.sleep_layers, width=args.sleep_width, sleep=1)
        slots = 2 * args.sleep_width
        local_drv = subprocess.run(
            ["nix-instantiate", str(dag_file(work, **sl)), "-A", "top"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        local_makespan = timed(
            ["nix-store", "--realise", local_drv, "-j", str(slots), *NO_SUBST, *SANDBOX]
        )
        with farm(work, agents=2, jobs=args.sleep_width) as env:
            # The steady state: a farm's first build also pays each agent slot's first
            # substitution (Nix's cache-info request, its narinfo cache's database).
            bigtent_build(env, dag_file(work, layers=2, width=args.sleep_width), "--no-download")
            marks = agent_log_marks(Path(env["BENCH_STATE_DIR"]))
            _, out = bigtent_build(env, dag_file(work, **sl), "--no-download")
            phases, where = agent_steps(marks)
            cpu["sleep_agent_phases"], sleep_phases = phases_report(phases)
            sleep_handoffs = handoffs(Path(env["BENCH_STATE_DIR"]), marks)
            cpu["sleep_locality"], sleep_locality = locality(where)
            created = datetime.fromisoformat(out["created_at"])
            finished = datetime.fromisoformat(out["finished_at"])
            makespan = (finished - created).total_seconds()
    say(f"\n## {n} trivial derivations ({args.layers} layers x {args.width}, fan-in 3)\n")
    base = results["nix-build -j2 (local)"]
    ssh = results.get("nix-build, SSH remote builders (2 jobs)")
    ours = results["bigtent build --no-download (2 agents x 2 jobs)"]
    fetched = results["bigtent build, with download of the results"]
    say("| what | wall time (s) | vs local nix-build -j2 |")
    say("|---|---|---|")
    for name, secs in results.items():
        say(f"| {name} | {secs:.2f} | {secs / base:.2f}x |")
    say(f"\nbigtent / local nix-build -j2: {ours / base:.2f}x")
    if ssh is not None:
        say(f"Nix SSH builders / bigtent: {ssh / ours:.1f}x")
    say(
        f"runner CPU per step, {n}-step DAG: {cpu['dag_runner_cpu_ms_per_step']:.2f} ms"
        " (includes its .drv uploads)"
    )
    say(dag_phases)
    say(dag_locality)
    critical = args.sleep_layers + 1
    say(
        f"\n## makespan: {args.sleep_layers * args.sleep_width + 1} `sleep 1` derivations, "
        f"critical path {critical} x 1 s, 2 agents x {args.sleep_width} jobs, after a warm-up "
        "build on the same farm\n"
    )
    say(
        f"makespan (build created -> finished on the runner): {makespan:.2f} s; "
        f"critical path: {critical} s; ratio {makespan / critical:.3f}"
    )
    say(
        f"local Nix, the same DAG (`nix-store --realise -j {slots}` of its instantiated "
        f"derivation): {local_makespan:.2f} s; ratio {local_makespan / critical:.3f}; "
        f"bigtent / local Nix: {makespan / local_makespan:.3f}"
    )
    say(sleep_phases)
    say(sleep_handoffs)
    say(sleep_locality)
    values: dict[str, float | None] = {
        "bigtent_vs_local": ours / base,
        "download_vs_local": fetched / base,
        "ssh_vs_bigtent": ssh / ours if ssh is not None else None,
        "makespan_ratio": makespan / critical,
        "runner_cpu_ms_per_step": cpu.get("runner_cpu_ms_per_step"),
    }
    if "cpu_dag_steps" in cpu:
        say(
            f"\nrunner CPU per step over the {cpu['cpu_dag_steps']}-step DAG: "
            f"{values['runner_cpu_ms_per_step']:.2f} ms "
            f"({cpu['cpu_dag_runner_cpu_secs']:.2f} s CPU, {cpu['cpu_dag_wall_secs']:.2f} s wall)"
        )
        say(wide_phases)
        say(wide_locality)
    targets: dict[str, dict[str, Any]] = {}
    say("\n## targets\n")
    for key, what, limit, sense in TARGETS:
        value, met = values[key], verdict(values[key], limit, sense)
        targets[key] = {"value": value, "limit": limit, "sense": sense, "met": met}
        bound = "at most" if sense == "max" else "at least"
        shown = "not measured" if value is None else f"{value:.2f}"
        state = "skipped" if met is None else ("met" if met else "NOT MET")
        say(f"- {what}: {shown} (target: {bound} {limit:g}) — {state}")
    if args.json:
        json.dump(
            {
                "benchmark": "dag",
                "machine": machine(),
                "load_average_start": [round(x, 2) for x in load],
                "load_average_end": [round(x, 2) for x in os.getloadavg()],
                "derivations": n,
                "wall_secs": results,
                **values,
                "makespan_secs": makespan,
                "critical_path_secs": critical,
                "local_makespan_secs": local_makespan,
                **cpu,
                "targets": targets,
            },
            sys.stdout,
            indent=2,
        )
        sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
