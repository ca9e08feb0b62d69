"""Benchmark: plain `nix-build` building on the farm through `bigtent-nix-hook` and through
the store proxy (`nix-build --store unix://…` to `bigtent nix-proxy`), against
`bigtent build`, Nix's own SSH remote builders and local `nix-build -j2`, in one run, on the
same DAG shape (a fresh salt for each, so nothing is cached).

    python bench/nixhook.py [--layers 5 --width 6 | --dag-bench] [--no-ssh] [--json]
                            [--before REV]

Both farm variants use one `bigtent up` (2 agents x 2 jobs) and fetch the results into the
local store; the hook and proxy variants build into an empty chroot store with `max-jobs = 0`.
`--dag-bench` is bench/dag.py's 101-derivation DAG (10 layers x 10). `--before REV` also runs
the hook of git revision REV (its `src` exported to a temporary directory, put first on the
hook's PYTHONPATH) on the same farm, in the same run. The helper's log gives where each
derivation's time went in it (upload, submit, build, copy), averaged per variant.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from dag import (  # type: ignore[import-not-found]  # bench/dag.py, run as a script
    NO_SUBST,
    SANDBOX,
    bigtent_build,
    dag_file,
    farm,
    machine,
    ssh_builder,
    timed,
)

HOOK = Path(sys.executable).parent / "bigtent-nix-hook"
BIGTENT = Path(sys.executable).parent / "bigtent"


@contextlib.contextmanager
def store_proxy(work: Path, env: dict[str, str]) -> Iterator[str]:
    """``bigtent nix-proxy`` for an empty chroot store; yields its ``unix://`` URI."""
    token = work / "proxy-token"
    token.write_text(env["BIGTENT_TOKEN"] + "\n")
    sock = work / "proxy.sock"
    argv = [str(BIGTENT), "nix-proxy", "--runner", env["BIGTENT_URL"], "--token-file", str(token)]
    argv += ["--socket", str(sock), "--store", f"local?root={work / 'proxy-store'}"]
    with (work / "proxy.log").open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(
                    "the store proxy did not start: " + (work / "proxy.log").read_text()
                )
            time.sleep(0.05)
        yield f"unix://{sock}?root={work / 'proxy-store'}"
    finally:
        proc.terminate()
        proc.wait(10)


def hook_script(
    work: Path, env: dict[str, str], name: str = "bigtent-hook", pythonpath: Path | None = None
) -> Path:
    """nix.conf's ``build-hook``: a wrapper with the runner and the token file (Nix 2.8 takes
    the setting as one path), as docs/nix-integration.md shows."""
    token = work / "hook-token"
    token.write_text(env["BIGTENT_TOKEN"] + "\n")
    script = work / name
    sock = work / f"{name}.sock"  # its own helper, gone 10 s after the run
    prefix = f"PYTHONPATH={pythonpath} " if pythonpath is not None else ""
    script.write_text(
        f"#!/bin/sh\n{prefix}exec {HOOK} --runner {env['BIGTENT_URL']} --token-file {token} "
        f'--socket {sock} --helper-idle 10 "$@"\n'
    )
    script.chmod(0o755)
    return script


PROXY = "nix-build --store unix:// through bigtent nix-proxy (same farm)"
PHASE = re.compile(r"\.drv: ((?:\w+ [0-9.]+ s(?:, )?)+)$")


def helper_phases(log: Path, since: int) -> dict[str, float]:
    """The mean seconds per derivation of each phase the helper logged (``PhaseClock``),
    from byte ``since`` of its log on."""
    spans: dict[str, list[float]] = {}
    if not log.exists():
        return {}
    with log.open() as f:
        f.seek(since)
        for line in f:
            m = PHASE.search(line.rstrip())
            if m is None:
                continue
            for part in m.group(1).split(", "):
                name, secs, _ = part.split(" ")
                spans.setdefault(name, []).append(float(secs))
    return {name: round(statistics.mean(v), 3) for name, v in spans.items()}


def export_src(rev: str, dest: Path) -> Path:
    """``src`` of git revision ``rev`` under ``dest``, byte-compiled."""
    repo = Path(__file__).resolve().parents[1]
    archive = subprocess.run(
        ["git", "-C", str(repo), "archive", rev, "src"], capture_output=True, check=True
    ).stdout
    dest.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    src = dest / "src"
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(src)], check=False)
    return src


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--width", type=int, default=6)
    ap.add_argument("--no-ssh", action="store_true", help="skip the Nix SSH builder baseline")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    ap.add_argument("--quick", action="store_true", help="a 3x3 DAG, no SSH")
    ap.add_argument(
        "--dag-bench", action="store_true", help="bench/dag.py's DAG: 10 layers x 10, 101 drvs"
    )
    ap.add_argument("--before", metavar="REV", help="also run the hook of this git revision")
    args = ap.parse_args()
    if args.quick:
        args.layers, args.width, args.no_ssh = 3, 3, True
    if args.dag_bench:
        args.layers, args.width = 10, 10
    stream = sys.stderr if args.json else sys.stdout

    def say(text: str = "") -> None:
        print(text, file=stream, flush=True)

    n = args.layers * args.width + 1
    load = os.getloadavg()
    say(f"# bigtent nix-hook benchmark, {datetime.now().isoformat(timespec='seconds')}")
    say(f"# machine: {machine()}; load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    results: dict[str, float] = {}

    def record(name: str, secs: float) -> None:
        results[name] = secs
        say(f"# measured: {name}: {secs:.2f} s")

    # Byte-compile bigtent as an installation would (PYTHONDONTWRITEBYTECODE may be set): a
    # hook process per derivation should not pay for compiling its module each time.
    package = Path(__file__).resolve().parents[1] / "src" / "bigtent"
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(package)], check=False)
    with tempfile.TemporaryDirectory(prefix="bigtent-bench-") as tmp:
        work = Path(tmp)
        os.environ["XDG_CACHE_HOME"] = str(work / "xdg")
        dag = dict(layers=args.layers, width=args.width)
        local = ["nix-build", str(dag_file(work, **dag)), "-A", "top", "-j2", "--no-out-link"]
        record("nix-build -j2 (local)", timed([*local, *NO_SUBST, *SANDBOX]))
        if not args.no_ssh and Path("/usr/sbin/sshd").exists():
            with ssh_builder(work) as (builders, env):
                argv = ["nix-build", str(dag_file(work, **dag)), "-A", "top", "--no-out-link"]
                argv += ["--max-jobs", "0", "--builders", builders, *NO_SUBST]
                record("nix-build, SSH remote builders (2 jobs)", timed(argv, env=env))
        with farm(work, agents=2, jobs=2) as env:
            t, _ = bigtent_build(env, dag_file(work, **dag), "--no-out-link")
            record("bigtent build (2 agents x 2 jobs, results fetched)", t)
            with store_proxy(work, env) as uri:
                argv = ["nix-build", "--store", uri, str(dag_file(work, **dag)), "-A", "top"]
                argv += ["--no-out-link", "--max-jobs", "0", *NO_SUBST]
                record(PROXY, timed(argv, env=env))
            proxy_phases = [
                line.split(": ", 1)[-1].strip()
                for line in (work / "proxy.log").read_text().splitlines()
                if " roots: upload " in line
            ]
            phases: dict[str, dict[str, float]] = {}
            variants: list[tuple[str, Path | None]] = [("", None)]
            if args.before:
                old_src = export_src(args.before, work / "old")
                variants.append((f" [before: {args.before}]", old_src))
            for i, (label, pythonpath) in enumerate(variants):
                script = hook_script(work, env, f"bigtent-hook-{i}", pythonpath)
                helper_log = work / f"bigtent-hook-{i}.sock.log"
                store = work / f"hook-store-{i}"
                hook_env = {**env, "NIX_REMOTE": f"local?root={store}"}
                argv = ["nix-build", str(dag_file(work, **dag)), "-A", "top", "--no-out-link"]
                argv += ["--option", "build-hook", str(script)]
                argv += ["--max-jobs", "0", *NO_SUBST]
                # Instantiating into the empty chroot store is part of the run, as for the
                # others.
                cold_name = f"nix-build through bigtent-nix-hook (same farm){label}"
                record(cold_name, timed(argv, env=hook_env))
                phases[cold_name] = helper_phases(helper_log, 0)
                # Again with a new salt: the helper the first run started is still there.
                argv[1] = str(dag_file(work, **dag))
                since = helper_log.stat().st_size if helper_log.exists() else 0
                warm_name = f"nix-build through bigtent-nix-hook, helper running{label}"
                record(warm_name, timed(argv, env=hook_env))
                phases[warm_name] = helper_phases(helper_log, since)

    say(f"\n## {n} trivial derivations ({args.layers} layers x {args.width}, fan-in 3)\n")
    base = results["nix-build -j2 (local)"]
    say("| what | wall time (s) | vs local nix-build -j2 |")
    say("|---|---|---|")
    for name, secs in results.items():
        say(f"| {name} | {secs:.2f} | {secs / base:.2f}x |")
    hook = results["nix-build through bigtent-nix-hook (same farm)"]
    warm = results["nix-build through bigtent-nix-hook, helper running"]
    ours = results["bigtent build (2 agents x 2 jobs, results fetched)"]
    ssh = results.get("nix-build, SSH remote builders (2 jobs)")
    proxy = results[PROXY]
    say(f"\nnix-build through the proxy / bigtent build: {proxy / ours:.2f}x (target: within 1.5x)")
    say(f"nix-build through the hook / bigtent build: {hook / ours:.2f}x (target: within 1.5x)")
    say(f"the same, helper already running: {warm / ours:.2f}x")
    if ssh is not None:
        say(f"Nix SSH builders / nix-build through the proxy: {ssh / proxy:.1f}x (target: >= 10x)")
        say(f"Nix SSH builders / nix-build through the hook: {ssh / hook:.1f}x (target: >= 10x)")
        say(f"the same, helper already running: {ssh / warm:.1f}x")
    say(f"\nthe store proxy's one build: {'; '.join(proxy_phases)}")
    say("\nmean seconds per derivation in the helper (the phases it logged):")
    for name, spans in phases.items():
        if spans:
            say(f"- {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in spans.items()))
    if args.json:
        json.dump(
            {
                "benchmark": "nixhook",
                "machine": machine(),
                "load_average_start": [round(x, 2) for x in load],
                "load_average_end": [round(x, 2) for x in os.getloadavg()],
                "derivations": n,
                "wall_secs": results,
                "proxy_vs_bigtent_build": proxy / ours,
                "ssh_vs_proxy": ssh / proxy if ssh is not None else None,
                "hook_vs_bigtent_build": hook / ours,
                "warm_hook_vs_bigtent_build": warm / ours,
                "ssh_vs_hook": ssh / hook if ssh is not None else None,
                "helper_phases_mean_secs": phases,
                "proxy_phases": proxy_phases,
            },
            sys.stdout,
            indent=2,
        )
        sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    started = time.monotonic()
    code = main()
    print(f"# bench took {time.monotonic() - started:.0f} s", file=sys.stderr)
    sys.exit(code)
