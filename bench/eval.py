"""Benchmark: Nix CI on a generated flake with N jobs (default 1,000), from the webhook to the
first dispatched step and to every job's result, against plain ``nix eval`` of the same flake
measured in the same run.

    python bench/eval.py [--jobs 1000] [--agents 1] [--until-dispatch] [--json]

A real runner process with one ``[[projects]]`` entry (a ``file://`` git repository), real
agents, a signed push webhook. Measured:

- webhook answered (the work is queued, not done in the request);
- webhook -> evaluation building: fetch, ``nix eval`` of every job (enumerated and
  instantiated), upload of the ``.drv`` closure, admission of one build: the moment the
  ``Reporter`` gets the report naming every job (what becomes the check runs);
- webhook -> first dispatched step (its ``assigned_at``);
- webhook -> evaluation final (every job's result reported);
- the evaluating Nix process's peak resident memory (``VmHWM``, sampled from ``/proc``);
- baseline: ``nix eval --json`` of ``checks.<system>`` mapped to ``drvPath`` (the same
  enumeration and instantiation) in a fresh store, wall time and peak memory.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import contextlib

from bench.common import (
    Stopwatch,
    emit,
    header,
    machine,
    memory_bytes,
    mib,
    runner,
)

HOST_TOOLS = ["/bin=/usr/bin", "/usr", "/lib=/usr/lib", "/lib64=/usr/lib64"]
SECRET = b"bench-secret"
GIT_ENV = {
    "GIT_AUTHOR_NAME": "b",
    "GIT_AUTHOR_EMAIL": "b@example.test",
    "GIT_COMMITTER_NAME": "b",
    "GIT_COMMITTER_EMAIL": "b@example.test",
}


def current_system() -> str:
    out = subprocess.run(
        ["nix-instantiate", "--option", "substituters", "", "--eval", "--expr",
         "builtins.currentSystem"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return out.stdout.strip().strip('"')


def flake(jobs: int, system: str, salt: str) -> str:
    """``checks.<system>.jobN``: N trivial derivations."""
    return f"""{{
  outputs = {{ self }}: {{
    checks.{system} = builtins.listToAttrs (builtins.genList (i: {{
      name = "job${{toString i}}";
      value = derivation {{
        name = "job${{toString i}}"; system = "{system}"; builder = "/bin/sh";
        PATH = "/usr/bin:/bin"; salt = "{salt}"; args = [ "-c" "echo $name > $out" ];
      }};
    }}) {jobs});
  }};
}}
"""


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, **GIT_ENV}
    return subprocess.run(
        ["git", *args], cwd=repo, env=env, capture_output=True, text=True, check=True
    ).stdout.strip()


def make_repo(work: Path, jobs: int, system: str) -> tuple[Path, str]:
    repo = work / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "flake.nix").write_text(flake(jobs, system, uuid.uuid4().hex))
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "jobs")
    return repo, git(repo, "rev-parse", "HEAD")


def baseline(repo: Path, work: Path, system: str) -> dict[str, Any]:
    """Plain ``nix eval`` enumerating and instantiating the same jobs, in a fresh store."""
    store = work / "baseline-store"
    argv = [
        "/usr/bin/time", "-f", "%M",
        "nix", "--extra-experimental-features", "nix-command flakes",
        "--store", f"local?root={store}", "--option", "substituters", "",
        "eval", "--json", f"git+file://{repo}#checks.{system}",
        "--apply", "builtins.mapAttrs (n: v: v.drvPath)",
    ]  # fmt: skip
    env = {**os.environ, "XDG_CACHE_HOME": str(work / "baseline-xdg")}
    t = Stopwatch()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    secs = t()
    if proc.returncode != 0:
        sys.exit(f"bench: baseline nix eval failed:\n{proc.stderr[-3000:]}")
    peak_kib = int(proc.stderr.strip().splitlines()[-1])
    return {"secs": secs, "jobs": len(json.loads(proc.stdout)), "peak_rss_bytes": peak_kib * 1024}


class EvalWatcher(threading.Thread):
    """Samples the peak resident memory of the runner's evaluating ``nix eval`` process."""

    def __init__(self, runner_pid: int) -> None:
        super().__init__(daemon=True)
        self.runner_pid = runner_pid
        self.peak = 0
        self.stop = threading.Event()

    def _evaluators(self) -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
                if ppid != self.runner_pid:
                    continue
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
            except (OSError, ValueError):
                continue
            if b"eval" in cmd and b"--expr" in cmd:
                found.append(int(entry.name))
        return found

    def run(self) -> None:
        while not self.stop.is_set():
            for pid in self._evaluators():
                with contextlib.suppress(OSError, ValueError):
                    self.peak = max(self.peak, memory_bytes(pid)["hwm"])
            time.sleep(0.01)


def start_agent(work: Path, url: str, token: str, name: str, jobs: int) -> subprocess.Popen[bytes]:
    home = work / "agents" / name
    home.mkdir(parents=True)
    cfg = home / "agent.toml"
    cfg.write_text(
        f"""[agent]
runner_url = "{url}"
name = "{name}"
max_jobs = {jobs}
store = "local?root={home / "root"}"
work_dir = "{home}"
sandbox_paths = {json.dumps(HOST_TOOLS)}
"""
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BIGTENT_", "NIX_"))}
    env.update(BIGTENT_AGENT_TOKEN=token, XDG_CACHE_HOME=str(home / "xdg"))
    return subprocess.Popen(
        [sys.executable, "-m", "bigtent", "agent", "--config", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=(home / "agent.log").open("wb"),
        env=env,
    )


def wait(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            sys.exit(f"bench: timed out waiting for {what}")
        time.sleep(0.02)


def ts(iso: str | None) -> float | None:
    return datetime.fromisoformat(iso).timestamp() if iso else None


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    system = current_system()
    repo, sha = make_repo(work, args.jobs, system)
    base = baseline(repo, work, system)
    secret = work / "hook.secret"
    secret.write_bytes(SECRET)
    project = [
        "[evaluation]",
        f"max_memory_mib = {args.max_memory_mib}",
        "[[projects]]",
        'name = "bench"',
        f'url = "file://{repo}"',
        'repository = "bench/flake"',
        'branches = ["main"]',
        f'systems = ["{system}"]',
        f'webhook_secret_file = "{secret}"',
    ]
    with runner(work, extra=project, log_level="-v") as r:
        headers = {"Authorization": f"Bearer {r.tokens['admin']}"}
        agents = [
            start_agent(work, r.url, r.tokens["agent"], f"a{i}", args.agent_jobs)
            for i in range(args.agents)
        ]
        try:

            def connected() -> bool:
                got = httpx.get(f"{r.url}/api/v1/agents", headers=headers).json()["agents"]
                return sum(bool(a["connected"]) for a in got) == int(args.agents)

            wait(connected, 120, "the agents")
            watcher = EvalWatcher(r.pid)
            watcher.start()
            body = json.dumps(
                {
                    "ref": "refs/heads/main",
                    "after": sha,
                    "repository": {"full_name": "bench/flake", "default_branch": "main"},
                }
            ).encode()
            sig = hmac.new(SECRET, body, hashlib.sha256).hexdigest()
            sent = time.time()
            t = Stopwatch()
            resp = httpx.post(
                f"{r.url}/api/v1/hooks/github",
                content=body,
                headers={
                    "X-GitHub-Event": "push",
                    "X-GitHub-Delivery": uuid.uuid4().hex,
                    "X-Hub-Signature-256": f"sha256={sig}",
                },
            )
            answered = t()
            if resp.status_code != 202:
                sys.exit(f"bench: webhook refused: {resp.status_code} {resp.text}")
            eval_id = resp.json()["evaluation"]
            marks: dict[str, float] = {}
            state: dict[str, Any] = {}

            def progress() -> bool:
                ev = httpx.get(f"{r.url}/api/v1/evaluations/{eval_id}", headers=headers).json()
                state.update(ev)
                if ev["state"] not in ("queued", "evaluating") and "building" not in marks:
                    marks["building"] = t()
                    watcher.stop.set()
                if ev["state"] in ("succeeded", "failed", "eval_error", "cancelled"):
                    return True
                return args.until_dispatch and "building" in marks and bool(assigned_steps())

            def assigned_steps() -> list[float]:
                steps[:] = httpx.get(
                    f"{r.url}/api/v1/builds/{state['build_id']}/steps", headers=headers
                ).json()["steps"]
                return [a for s in steps if (a := ts(s["assigned_at"])) is not None]

            steps: list[dict[str, Any]] = []
            wait(progress, args.timeout, "the evaluation to end")
            marks["final"] = t()
            watcher.stop.set()
            if state["state"] not in ("succeeded", "building"):
                sys.exit(f"bench: evaluation {state['state']}: {state.get('error')}")
            assigned = assigned_steps()
            first = min(assigned) - sent if assigned else None
        finally:
            for a in agents:
                a.terminate()
            for a in agents:
                try:
                    a.wait(30)
                except subprocess.TimeoutExpired:
                    a.kill()
    ci_log = [
        line.split(" ", 3)[-1]
        for line in (r.state_dir / "runner.log").read_text(errors="replace").splitlines()
        if "bigtent.runner.ci" in line or "bigtent.runner.cache.closureingest" in line
    ]
    logged_peak = 0
    for line in ci_log:
        if "peak memory" in line:
            logged_peak = int(float(line.rsplit(" ", 2)[-2]) * 2**20)
    return {
        "ci_log": ci_log,
        "evaluator_peak_rss_bytes_logged": logged_peak,
        "jobs": args.jobs,
        "agents": args.agents,
        "webhook_answered_secs": answered,
        "webhook_to_building_secs": marks["building"],
        "webhook_to_first_dispatch_secs": first,
        "webhook_to_final_secs": None if args.until_dispatch else marks["final"],
        "evaluator_peak_rss_bytes": watcher.peak,
        "steps": len(steps),
        "baseline_nix_eval": base,
    }


def report(result: dict[str, Any]) -> None:
    header("bench/eval.py: Nix CI, webhook to results", result["machine"])
    r = result["run"]
    b = r["baseline_nix_eval"]
    for line in r["ci_log"]:
        print(f"# runner: {line}")
    print(f"jobs: {r['jobs']} ({r['steps']} steps built by {r['agents']} agent(s))")
    print(f"webhook answered:                  {r['webhook_answered_secs'] * 1000:8.1f} ms")
    print(f"webhook -> every job reported:     {r['webhook_to_building_secs']:8.2f} s")
    first = r["webhook_to_first_dispatch_secs"]
    print(f"webhook -> first dispatched step:  {first:8.2f} s" if first is not None else "")
    if r["webhook_to_final_secs"] is not None:
        print(f"webhook -> all results:            {r['webhook_to_final_secs']:8.2f} s")
    print(
        f"evaluator peak memory:             {mib(r['evaluator_peak_rss_bytes_logged']):8.1f} MiB"
        f" (the runner's samples; {mib(r['evaluator_peak_rss_bytes']):.1f} MiB from outside)"
    )
    print(f"baseline nix eval (same jobs):     {b['secs']:8.2f} s, {mib(b['peak_rss_bytes'])} MiB")
    print(f"every job reported / plain nix eval: {r['webhook_to_building_secs'] / b['secs']:.2f}x")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--agents", type=int, default=1)
    ap.add_argument("--agent-jobs", type=int, default=2)
    ap.add_argument("--max-memory-mib", type=int, default=2048)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument(
        "--until-dispatch",
        action="store_true",
        help="stop once the first step is dispatched (do not wait for every result)",
    )
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--quick", action="store_true", help="50 jobs (a smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.jobs = min(args.jobs, 50)
    m = machine()
    with tempfile.TemporaryDirectory(prefix="bigtent-bench-eval-") as tmp:
        run = measure(args, Path(tmp))
    result = {"machine": m, "run": run}
    if args.json:
        emit(result, True)
    else:
        report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
