"""Benchmark: reporting a 1,000-job evaluation to GitHub (check runs through a GitHub App).

A ``ForgeReporter`` on a real database (SQLite in a temporary directory, or
``--database-url``) reports to the tests' fake GitHub on loopback HTTPS (the production client:
app JWT verified by the fake with the app's public key, an installation token, check runs).
The evaluation goes the way the CI side reports it, as fast as it can: queued, evaluating,
building with every job queued, then each job running and then finished (one in
``--fail-every`` fails), one report per change, then the final report. So the reporter sees
``2 * jobs + 4`` reports in a burst far denser than real builds give.

Measured:

- ``report()`` latency (what the CI side waits for: the outbox write), percentiles;
- calls made to GitHub against reports made (coalescing, the cap of 47 job checks);
- the final report → every check run completed on the fake;
- baseline in the same run: the same final check runs created straight through the client
  (``GithubApp``, no outbox), one after another.

    python bench/forge.py [--jobs 1000] [--fail-every 20] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from bigtent.config.forge import ForgeKind, ForgeSection, ForgeTarget
from bigtent.runner.db.migrate import create_engine, migrate_database
from bigtent.runner.forge.github import GithubApp
from bigtent.runner.forge.model import EvalReport, EvalState, JobReport, JobState
from bigtent.runner.forge.reporting import wanted_checks
from bigtent.runner.forge.service import ForgeReporter
from tests.e2e.fake_github import FakeGithub
from tests.integration.runner.oidc_issuer import make_tls

APP_ID = 4711
SHA = "b" * 40
LOG_TAIL = "".join(f"line {i}: building, compiling, linking\n" for i in range(200))


def _report(target: ForgeTarget, state: EvalState, jobs: dict[str, JobReport]) -> EvalReport:
    return EvalReport(
        project="bench",
        target=target,
        commit_sha=SHA,
        evaluation_id=1,
        state=state,
        url="https://ci.example/evals/1",
        jobs=tuple(jobs.values()),
    )


async def _wait(predicate: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("the fake GitHub did not get the final check runs in time")
        await asyncio.sleep(0.01)


async def run(n_jobs: int, fail_every: int, database_url: str | None, tmp: Path) -> dict[str, Any]:
    (tmp / "tls").mkdir()
    tls = make_tls(tmp / "tls")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_file = tmp / "app.pem"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    url = database_url or f"sqlite+aiosqlite:///{tmp / 'bench.db'}"
    await migrate_database(url)
    engine = create_engine(url)
    fake = FakeGithub(tls, "unused", lambda _d: None, app_id=APP_ID, app_public_key=public)
    target = ForgeTarget(
        ForgeKind.GITHUB,
        fake.url,
        "acme/bench",
        app_id=APP_ID,
        app_key_file=str(key_file),
        ca_file=str(tls.ca_file),
    )
    reporter = ForgeReporter(engine, ForgeSection())
    await reporter.start()
    latencies: list[float] = []

    async def report(state: EvalState, jobs: dict[str, JobReport]) -> None:
        started = time.perf_counter()
        await reporter.report(_report(target, state, jobs))
        latencies.append(time.perf_counter() - started)

    try:
        attrs = [f"checks.x86_64-linux.job{i:04}" for i in range(n_jobs)]
        jobs = {a: JobReport(a, JobState.QUEUED) for a in attrs}
        burst = time.perf_counter()
        await report(EvalState.QUEUED, {})
        await report(EvalState.EVALUATING, {})
        await report(EvalState.BUILDING, jobs)
        failed = 0
        for i, attr in enumerate(attrs):
            jobs[attr] = JobReport(attr, JobState.RUNNING)
            await report(EvalState.BUILDING, jobs)
            if fail_every and i % fail_every == fail_every - 1:
                failed += 1
                jobs[attr] = JobReport(
                    attr,
                    JobState.FAILED,
                    summary="builder failed with exit code 1",
                    log_tail=LOG_TAIL,
                    url=f"https://ci.example/jobs/{i}",
                )
            else:
                jobs[attr] = JobReport(attr, JobState.SUCCEEDED)
            await report(EvalState.BUILDING, jobs)
        burst_secs = time.perf_counter() - burst
        final_state = EvalState.FAILED if failed else EvalState.SUCCEEDED
        final = time.perf_counter()
        await report(final_state, jobs)
        expected = wanted_checks(_report(target, final_state, jobs))

        def all_posted() -> bool:
            runs = {r["name"]: r for r in fake.check_runs}
            return all(
                c.name in runs and runs[c.name]["status"] == "completed" for c in expected
            ) and runs[expected[0].name].get("conclusion") == str(expected[0].conclusion)

        await _wait(all_posted, timeout=120)
        final_secs = time.perf_counter() - final
        calls = [c for c in fake.calls if "/check-runs" in c.path]
        token_requests = fake.token_requests
    finally:
        await reporter.stop()

    # Baseline: the same final check runs created straight through the client, in order.
    app = GithubApp(fake.url, APP_ID, str(key_file), ca_file=str(tls.ca_file))
    try:
        installation = await app.installation_id("acme/bench")
        await app.token(installation)
        started = time.perf_counter()
        for check in expected:
            await app.create_check_run("acme/bench", installation, "c" * 40, check)
        direct_secs = time.perf_counter() - started
    finally:
        await app.aclose()
        fake.stop()
        await engine.dispose()
    return {
        "jobs": n_jobs,
        "failed_jobs": failed,
        "reports": len(latencies),
        "report_ms": {k: round(v * 1000, 2) for k, v in common.percentiles(latencies).items()},
        "burst_secs": round(burst_secs, 2),
        "check_runs_wanted": len(expected),
        "github_calls": len(calls),
        "github_posts": sum(1 for c in calls if c.method == "POST"),
        "github_patches": sum(1 for c in calls if c.method == "PATCH"),
        "token_requests": token_requests,
        "final_report_to_posted_secs": round(final_secs, 3),
        "baseline_direct_create_secs": round(direct_secs, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--fail-every", type=int, default=20)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--quick", action="store_true", help="100 jobs")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    n_jobs = 100 if args.quick else args.jobs
    m = common.machine()
    if not args.json:
        common.header("bigtent forge reporting benchmark", m)
    with tempfile.TemporaryDirectory(prefix="bigtent-bench-forge-") as tmp:
        result = asyncio.run(run(n_jobs, args.fail_every, args.database_url, Path(tmp)))
    result = {"machine": m, **result}
    if args.json:
        common.emit(result, True)
        return
    r = result
    print(f"evaluation of {r['jobs']} jobs, {r['failed_jobs']} failed: {r['reports']} reports")
    print(
        f"report() latency ms: p50 {r['report_ms']['p50']}, p95 {r['report_ms']['p95']}, "
        f"p99 {r['report_ms']['p99']} (burst of every report: {r['burst_secs']} s)"
    )
    print(
        f"GitHub calls: {r['github_calls']} ({r['github_posts']} POST, "
        f"{r['github_patches']} PATCH) for {r['reports']} reports; "
        f"{r['check_runs_wanted']} check runs; {r['token_requests']} access token request(s)"
    )
    print(
        f"final report -> every check run completed: {r['final_report_to_posted_secs']} s; "
        f"baseline, the same {r['check_runs_wanted']} runs created straight through the client: "
        f"{r['baseline_direct_create_secs']} s"
    )


if __name__ == "__main__":
    main()
