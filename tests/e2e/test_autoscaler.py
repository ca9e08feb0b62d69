"""End to end: the autoscaler launches real GitHub Actions agents through a fake GitHub.

A real runner serves HTTPS (test CA) and trusts a loopback OIDC issuer. Its
``[[autoscale.github]]`` pool dispatches to a fake GitHub API on loopback (tests/e2e/
fake_github.py), which records each dispatch and, like GitHub running the workflow, starts a
real ``bigtent agent --ephemeral --oidc github`` process with the workflow's inputs and an
``ACTIONS_ID_TOKEN_REQUEST_URL`` that mints the issuer's JWTs (tests/github_actions.py). The
agents register with their launch ids, build real (small) derivations and exit.

Time is never slept through: every wait is for a condition, and "nothing happens meanwhile"
is measured in autoscaler passes (the ``ticks`` the API reports).
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import current_system, wait_until
from tests.e2e.conftest import HOST_TOOLS, Farm, Proc, _toml_list, free_port
from tests.e2e.fake_github import Dispatch, Failure, FakeGithub, Mode
from tests.github_actions import ActionsTokenEndpoint, running_endpoint
from tests.integration.runner.oidc_issuer import (
    LocalIssuer,
    SigningKey,
    TlsFiles,
)

pytestmark = [pytest.mark.e2e, pytest.mark.nix, pytest.mark.slow]

WORKFLOW_REPO = "acme/bigtent-agents"
WORKFLOW_REF = f"{WORKFLOW_REPO}/.github/workflows/bigtent-agent.yml@refs/heads/main"
BUILD_REPO = "acme/widgets"
WAIT_SECS = 120


@pytest.fixture
def endpoint(issuer: LocalIssuer, key: SigningKey) -> Iterator[ActionsTokenEndpoint]:
    """The Actions ID token service of the workflow's jobs: they run in the workflow
    repository, from its main branch."""
    claims = {
        "repository": WORKFLOW_REPO,
        "sub": f"repo:{WORKFLOW_REPO}:ref:refs/heads/main",
        "job_workflow_ref": WORKFLOW_REF,
        "workflow_ref": WORKFLOW_REF,
    }
    yield from running_endpoint(issuer, key, claims=claims)


@dataclass
class Github:
    """The fake GitHub and its jobs: a dispatch's run starts a real agent as the workflow
    would (``bigtent-agent.yml``'s run step, plus the test's store, CA and a short idle
    limit), ``queue_ticks`` autoscaler passes after the dispatch (GitHub's queue delay,
    counted in passes of the runner so that the runner demonstrably looks while they start).
    """

    tls: TlsFiles
    endpoint: ActionsTokenEndpoint
    token: str = field(default_factory=lambda: "ghs_" + secrets.token_urlsafe(24))
    queue_ticks: int = 5
    farm: Farm | None = None
    fake: FakeGithub | None = None
    jobs: dict[str, Proc] = field(default_factory=dict)
    """Launch id -> the agent process of its run."""
    errors: list[BaseException] = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start_fake(self) -> FakeGithub:
        self.fake = FakeGithub(self.tls, self.token, self._dispatched)
        return self.fake

    def _dispatched(self, dispatch: Dispatch) -> None:
        assert self.farm is not None
        after = launches(self.farm)["ticks"] + self.queue_ticks
        thread = threading.Thread(target=self._start_later, args=(dispatch, after), daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _start_later(self, dispatch: Dispatch, after_ticks: int) -> None:
        try:
            assert self.farm is not None
            farm = self.farm
            wait_until(
                lambda: launches(farm)["ticks"] >= after_ticks,
                timeout=WAIT_SECS,
                what="the runner to look at its queue",
            )
            self.start_job(dispatch)
        except BaseException as exc:  # reported by the test (join)
            self.errors.append(exc)

    def start_job(self, dispatch: Dispatch) -> Proc:
        """Run the workflow's job for this dispatch: ``bigtent agent`` with its inputs."""
        assert self.farm is not None
        farm = self.farm
        inputs = dispatch.inputs
        with self._lock:
            run_id = 1000 + len(self.jobs)
            work = farm.root / "jobs" / str(run_id)
            work.mkdir(parents=True)
            cfg = work / "agent.toml"
            assert farm.tls is not None
            cfg.write_text(
                f"""
[agent]
store = "local?root={work / "root"}"
work_dir = "{work}"
sandbox_paths = {_toml_list(HOST_TOOLS)}
ca_file = "{farm.tls.ca_file}"
"""
            )
            env = farm.env(
                GITHUB_RUN_ID=str(run_id),
                GITHUB_RUN_ATTEMPT="1",
                BIGTENT_LAUNCH_ID=inputs["launch_id"],
                **self.endpoint.env(),
            )
            del env["BIGTENT_AGENT_TOKEN"]
            proc = farm._spawn(
                f"job-{run_id}",
                [
                    "-v",
                    "agent",
                    "--config",
                    str(cfg),
                    "--ephemeral",
                    "--oidc",
                    "github",
                    "--audience",
                    inputs["audience"],
                    "--runner-url",
                    inputs["runner_url"],
                    "--name",
                    inputs["name"],
                    "--system",
                    inputs["systems"],
                    "--supported-feature",
                    inputs["supported_features"],
                    "--mandatory-feature",
                    inputs["mandatory_features"],
                    "--max-jobs",
                    inputs["max_jobs"],
                    "--max-idle-secs",
                    "2",
                ],
                env,
            )
            self.jobs[inputs["launch_id"]] = proc
            return proc

    def join(self) -> None:
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(WAIT_SECS)
        if self.errors:
            raise self.errors[0]


@pytest.fixture
def github(tls: TlsFiles, endpoint: ActionsTokenEndpoint) -> Iterator[Github]:
    gh = Github(tls, endpoint)
    fake = gh.start_fake()
    try:
        yield gh
    finally:
        fake.stop()


def runner_config(
    github: Github, issuer: LocalIssuer, tls: TlsFiles, port: int, token_file: Path, **pool: Any
) -> str:
    assert github.fake is not None
    settings = {
        "max_jobs": 1,
        "max_inflight": 4,
        "launch_ttl_secs": 120,
        "cooldown_secs": 1,
        "poll_interval_secs": 0.3,
        **pool,
    }
    keys = "\n".join(f"{k} = {v}" for k, v in settings.items())
    return f"""
[[auth.oidc]]
issuer = "{issuer.url}"
audiences = ["bigtent"]
ca_file = "{tls.ca_file}"
repositories = ["{WORKFLOW_REPO}"]
workflow_refs = ["{WORKFLOW_REF}"]

[autoscale]
min_tick_interval_secs = 0.1

[[autoscale.github]]
name = "gha"
systems = ["{current_system()}"]
allowed_build_repositories = ["{BUILD_REPO}"]
workflow_repository = "{WORKFLOW_REPO}"
workflow = "bigtent-agent.yml"
ref = "main"
token_file = "{token_file}"
runner_url = "https://127.0.0.1:{port}"
audience = "bigtent"
api_url = "{github.fake.url}"
api_ca_file = "{tls.ca_file}"
{keys}
"""


def start_farm(
    farm_factory: Callable[..., Farm],
    github: Github,
    issuer: LocalIssuer,
    tls: TlsFiles,
    tmp_path: Path,
    **pool: Any,
) -> Farm:
    token_file = tmp_path / "dispatch-token"
    token_file.write_text(github.token + "\n")
    port = free_port()
    farm = farm_factory(
        runner_extra=runner_config(github, issuer, tls, port, token_file, **pool),
        tls=tls,
        port=port,
    )
    github.farm = farm
    return farm


def launches(farm: Farm) -> dict[str, Any]:
    with farm.api() as c:
        resp = c.get("/api/v1/launches")
    assert resp.status_code == 200, resp.text
    data: dict[str, Any] = resp.json()
    return data


def launch_states(farm: Farm) -> dict[str, str]:
    return {x["launch_id"]: x["state"] for x in launches(farm)["launches"]}


def submit(farm: Farm, *attrs: str) -> tuple[Proc, int]:
    """``bigtent build --repository BUILD_REPO`` of independent derivations, in the
    background; returns once the runner holds the build."""
    dag = farm.dag_file(layers=1, width=len(attrs))
    args = ["build", str(dag), *(a for attr in attrs for a in ("-A", attr)), "--no-download"]
    args += ["--repository", BUILD_REPO, "--ref", "refs/heads/main"]
    proc = farm._spawn("build", args, farm.env())

    def created() -> bool:
        if proc.popen.poll() not in (None, 0):
            raise AssertionError("bigtent build failed:\n" + proc.log.read_text()[-3000:])
        with farm.api() as c:
            return bool(c.get("/api/v1/builds").json()["builds"])

    wait_until(created, timeout=WAIT_SECS, what="the build to be created")
    with farm.api() as c:
        build = c.get("/api/v1/builds").json()["builds"][0]
    assert (build["repository"], build["trusted"]) == (BUILD_REPO, True)
    return proc, int(build["id"])


def steps(farm: Farm, build_id: int) -> list[dict[str, Any]]:
    with farm.api() as c:
        found: list[dict[str, Any]] = c.get(f"/api/v1/builds/{build_id}/steps").json()["steps"]
    return found


def exit_code(proc: Proc) -> int:
    try:
        return proc.popen.wait(WAIT_SECS)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{proc.name} did not exit:\n{proc.log.read_text()[-3000:]}") from exc


def wait_ticks(farm: Farm, n: int) -> None:
    """Let the autoscaler look at the queue ``n`` more times."""
    target = launches(farm)["ticks"] + n
    wait_until(lambda: launches(farm)["ticks"] >= target, timeout=WAIT_SECS, what=f"{n} passes")


def test_queued_work_launches_exactly_the_agents_it_needs(
    farm_factory: Callable[..., Farm],
    github: Github,
    issuer: LocalIssuer,
    tls: TlsFiles,
    tmp_path: Path,
) -> None:
    farm = start_farm(farm_factory, github, issuer, tls, tmp_path)
    fake = github.fake
    assert fake is not None
    build, build_id = submit(farm, "nodes.dag-0-0", "nodes.dag-0-1")

    # Two runnable steps, one slot an agent: two launches, and no more while they start
    # (each run starts only after five more passes of the autoscaler).
    wait_until(lambda: len(fake.dispatches) >= 2, timeout=WAIT_SECS, what="dispatches")
    assert exit_code(build) == 0, farm.logs()
    github.join()
    assert len(fake.dispatches) == 2

    first = fake.dispatches[0]
    assert first.path == f"/repos/{WORKFLOW_REPO}/actions/workflows/bigtent-agent.yml/dispatches"
    assert first.ref == "main" and first.answered == 204
    assert first.inputs | {"launch_id": ""} == {
        "name": "gha",
        "runner_url": farm.url,
        "audience": "bigtent",
        "systems": current_system(),
        "supported_features": "",
        "mandatory_features": "",
        "max_jobs": "1",
        "launch_id": "",
        "bigtent_version": "0.1.0",
    }
    launch_ids = {d.inputs["launch_id"] for d in fake.dispatches}
    assert len(launch_ids) == 2 and all(len(i) == 32 for i in launch_ids)

    # Each agent registered with its launch id, built one step, and exited 0 when idle.
    assert set(github.jobs) == launch_ids
    for proc in github.jobs.values():
        assert exit_code(proc) == 0, proc.log.read_text()[-3000:]
    data = launches(farm)
    rows = {x["launch_id"]: x for x in data["launches"]}
    assert set(rows) == launch_ids
    assert {x["state"] for x in rows.values()} == {"registered"}
    names = {x["agent_name"] for x in rows.values()}
    assert all(n.startswith("gha-gh10") for n in names), names
    # Launched agents built the steps (one may take both: the first free slot wins).
    built_by = {s["agent_name"] for s in steps(farm, build_id)}
    assert built_by and built_by <= names
    assert all(s["state"] == "succeeded" for s in steps(farm, build_id))
    with farm.api() as c:
        agents = {a["name"]: a for a in c.get("/api/v1/agents").json()["agents"]}
    for row in rows.values():
        agent = agents[row["agent_name"]]
        assert agent["launch_id"] == row["launch_id"] and agent["auth_kind"] == "oidc"
        assert agent["oidc"]["repository"] == WORKFLOW_REPO

    # The queue is empty: however often it looks, nothing more is launched.
    wait_ticks(farm, 5)
    assert len(fake.dispatches) == 2
    (pool,) = launches(farm)["pools"]
    assert pool["counters"] == {
        "launches": 2,
        "registrations": 2,
        "expiries": 0,
        "dispatch_failures": 0,
    }
    assert pool["pending"] == 0 and pool["deficit"] == 0

    shown = subprocess.run(
        [sys.executable, "-m", "bigtent", "launches"],
        capture_output=True,
        text=True,
        env=farm.env(BIGTENT_TOKEN=farm.admin_token),
        timeout=60,
        check=True,
    ).stdout
    assert "launched 2, registered 2, expired 0, dispatch failures 0" in shown
    assert all(i in shown for i in launch_ids)
    everything = farm.logs() + shown
    for secret in (github.token, *github.endpoint.issued, github.endpoint.request_token):
        assert secret not in everything


def test_cooldown_expiry_and_restart(
    farm_factory: Callable[..., Farm],
    github: Github,
    issuer: LocalIssuer,
    tls: TlsFiles,
    tmp_path: Path,
) -> None:
    fake = github.fake
    assert fake is not None
    # GitHub first refuses (rate limit, wait 5 s), then accepts two dispatches whose runs
    # never start.
    fake.then(Failure(429, retry_after="5"), Mode.RECORD, Mode.RECORD)
    farm = start_farm(farm_factory, github, issuer, tls, tmp_path, launch_ttl_secs=4)
    _, build_id = submit(farm, "nodes.dag-0-0")

    # The failed dispatch starts the cooldown; no dispatch during it.
    wait_until(lambda: len(fake.dispatches) >= 1, timeout=WAIT_SECS, what="a dispatch")
    # The fake records the request before the runner has read its answer: wait for the record.
    wait_until(
        lambda: [x["state"] for x in launches(farm)["launches"]] == ["failed"],
        timeout=WAIT_SECS,
        what="the refused dispatch to be recorded",
    )
    (failed,) = launches(farm)["launches"]
    assert failed["state"] == "failed" and "HTTP 429" in failed["error"]
    (pool,) = launches(farm)["pools"]
    assert pool["cooldown_until"] is not None
    ticks_at_failure = launches(farm)["ticks"]
    wait_until(lambda: len(fake.dispatches) >= 2, timeout=WAIT_SECS, what="the next dispatch")
    refused, accepted = fake.dispatches[:2]
    assert refused.answered == 429 and accepted.answered == 204
    assert accepted.at - refused.at >= 5.0  # Retry-After, not the 1 s cooldown_secs
    assert launches(farm)["ticks"] - ticks_at_failure >= 5  # it looked, and waited

    # That run never starts: after launch_ttl_secs the launch expires (counted as failed)
    # and the work, still waiting, gets a new launch.
    wait_until(lambda: len(fake.dispatches) >= 3, timeout=WAIT_SECS, what="a relaunch")
    second_id = accepted.inputs["launch_id"]
    third_id = fake.dispatches[2].inputs["launch_id"]
    data = launches(farm)
    rows = {x["launch_id"]: x for x in data["launches"]}
    assert rows[second_id]["state"] == "expired"
    assert "no agent registered within launch_ttl_secs (4 s)" in rows[second_id]["error"]
    assert rows[third_id]["state"] == "pending"
    assert data["counters"]["expiries"] == 1 and data["counters"]["dispatch_failures"] == 1

    # The runner restarts (with a longer TTL, so the late job can still claim its launch):
    # the pending launch is remembered, and nothing is launched again.
    assert farm.runner is not None
    farm.runner.stop()
    farm.runner_extra = farm.runner_extra.replace("launch_ttl_secs = 4", "launch_ttl_secs = 120")
    farm.start_runner()
    wait_ticks(farm, 10)
    assert len(fake.dispatches) == 3
    (pool,) = launches(farm)["pools"]
    assert pool["pending"] == 1 and pool["deficit"] == 0
    assert launch_states(farm)[third_id] == "pending"

    # GitHub finally runs the queued job: its agent claims the launch and builds the step.
    proc = github.start_job(fake.dispatches[2])
    assert exit_code(proc) == 0, proc.log.read_text()[-3000:]
    assert launch_states(farm) == {
        failed["launch_id"]: "failed",
        second_id: "expired",
        third_id: "registered",
    }
    (step,) = steps(farm, build_id)
    assert step["state"] == "succeeded" and step["agent_name"].startswith("gha-gh10")
    assert len(fake.dispatches) == 3
