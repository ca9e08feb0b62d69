"""Nix CI end to end: a real git repository, signed webhooks, evaluation by real Nix, builds
on real agents, and what the forge would be told (``GET /evaluations/{id}/report``, the
``Reporter``'s input)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from bigtent.nix.store_path import StorePath
from tests.conftest import current_system, nix_children_see_our_root, wait_until
from tests.e2e.ci_repo import (
    Repo,
    checks_flake,
    deliver,
    file_jobs,
    git_daemon,
    make_repo,
    pr_payload,
    project_toml,
    push_payload,
)
from tests.e2e.ci_repo import (
    evaluation as _evaluation,
)
from tests.e2e.ci_repo import (
    wait_final as _wait_final,
)
from tests.e2e.conftest import Farm, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.nix, nix_children_see_our_root]

SECRET = b"webhook-secret-for-tests"


def _files(root: Path) -> tuple[Path, Path]:
    secret = root / "hook.secret"
    secret.write_bytes(SECRET + b"\n")
    token = root / "forge.token"
    token.write_text("forge-token\n")
    return secret, token


def _forge(token: Path) -> dict[str, Any]:
    return {
        "forge": "forgejo",
        "forge_api_url": "https://127.0.0.1:9/api/v1",
        "forge_token_file": str(token),
    }


def _report(farm: Farm, eval_id: int) -> dict[str, Any]:
    with farm.api() as c:
        resp = c.get(f"/api/v1/evaluations/{eval_id}/report")
        resp.raise_for_status()
        data: dict[str, Any] = resp.json()
        return data


@pytest.fixture
def ci_farm(farm_factory: Callable[..., Farm], tmp_path: Path) -> Callable[..., tuple[Farm, Repo]]:
    def make(jobs: dict[str, str], agents: int = 1, **project: Any) -> tuple[Farm, Repo]:
        repo = make_repo(tmp_path)
        secret, token = _files(tmp_path)
        repo.commit({"flake.nix": checks_flake(jobs, uuid.uuid4().hex)}, "first")
        toml = project_toml("widgets", repo, secret, branches=["main"], **_forge(token), **project)
        farm = farm_factory(agents=agents, runner_extra=toml)
        return farm, repo

    return make


def test_push_evaluates_builds_and_reports_every_job(
    ci_farm: Callable[..., tuple[Farm, Repo]],
) -> None:
    farm, repo = ci_farm(
        {"pass": "echo ok > $out", "fail": "echo this-job-fails; exit 3", "broken": "THROW"}
    )
    sha = repo.git("rev-parse", "HEAD")
    started = time.monotonic()
    resp = deliver(farm.url, "push", push_payload(repo, sha), SECRET)
    answered = time.monotonic() - started
    assert resp.status_code == 202, resp.text
    eval_id = resp.json()["evaluation"]
    assert isinstance(eval_id, int)
    assert answered < 5.0  # the work is queued, not done in the request

    ev = _wait_final(farm, eval_id)
    system = current_system()
    jobs = {j["attr"]: j for j in ev["jobs"]}
    assert ev["state"] == "failed", ev
    assert ev["commit"] == sha and ev["trusted"] is True
    assert jobs[f"checks.{system}.pass"]["state"] == "succeeded"
    assert jobs[f"checks.{system}.fail"]["state"] == "failed"
    assert jobs[f"checks.{system}.broken"]["state"] == "failed"
    assert jobs[f"checks.{system}.broken"]["drv_path"] is None
    assert "job broken is broken" in jobs[f"checks.{system}.broken"]["error"]

    # One build with every job named.
    with farm.api() as c:
        build = c.get(f"/api/v1/builds/{ev['build_id']}").json()
    assert build["repository"] == "acme/widgets" and build["ref"] == "refs/heads/main"
    assert build["created_by"] == "ci/widgets"

    # What the forge is told: states per job, the failed job's log tail.
    report = _report(farm, eval_id)
    assert report["state"] == "failed" and report["commit_sha"] == sha
    assert report["target"]["repository"] == "acme/widgets"
    by_attr = {j["attr"]: j for j in report["jobs"]}
    assert by_attr[f"checks.{system}.pass"]["state"] == "succeeded"
    failed = by_attr[f"checks.{system}.fail"]
    assert failed["state"] == "failed" and "this-job-fails" in failed["log_tail"]
    assert "job broken is broken" in by_attr[f"checks.{system}.broken"]["summary"]

    # The same delivery id again is a replay: refused, nothing new.
    payload = push_payload(repo, sha)
    first = deliver(farm.url, "push", payload, SECRET, delivery="same-delivery")
    assert first.status_code == 202 and first.json()["evaluation"] == eval_id
    again = deliver(farm.url, "push", payload, SECRET, delivery="same-delivery")
    assert again.status_code == 400 and "replay" in again.json()["error"]

    # The dashboard: projects -> refs -> evaluations -> jobs.
    page = httpx.get(f"{farm.url}/ci").text
    assert f'href="/ci/evaluations/{eval_id}"' in page and "refs/heads/main" in page
    page = httpx.get(f"{farm.url}/ci/projects/widgets").text
    assert f"checks.{system}.fail" in page and 'id="jobs-matrix"' in page
    page = httpx.get(f"{farm.url}/ci/evaluations/{eval_id}").text
    assert f'data-attr="checks.{system}.broken"' in page and "job broken is broken" in page

    # The CLI's views.
    out = farm.bigtent("evals", "widgets", "--json", check=True).stdout
    assert [e["id"] for e in json.loads(out)] == [eval_id]
    jobs_cli = farm.bigtent("jobs", str(eval_id))
    assert jobs_cli.returncode == 1 and f"checks.{system}.fail" in jobs_cli.stdout


def test_check_run_rerequested_restarts_only_the_failed_jobs(
    ci_farm: Callable[..., tuple[Farm, Repo]],
) -> None:
    farm, repo = ci_farm({"pass": "echo ok > $out", "fail": "echo no; exit 3"})
    sha = repo.git("rev-parse", "HEAD")
    eval_id = deliver(farm.url, "push", push_payload(repo, sha), SECRET).json()["evaluation"]
    ev = _wait_final(farm, eval_id)
    assert ev["state"] == "failed"
    with farm.api() as c:
        before = c.get(f"/api/v1/builds/{ev['build_id']}/attempts").json()["attempts"]
    rerun = {
        "action": "rerequested",
        "check_run": {"external_id": str(eval_id)},
        "repository": {"full_name": "acme/widgets"},
    }
    resp = deliver(farm.url, "check_run", rerun, SECRET)
    assert resp.status_code == 202 and resp.json()["restarted"] is True, resp.text

    def attempts() -> list[dict[str, Any]]:
        with farm.api() as c:
            data: list[dict[str, Any]] = c.get(f"/api/v1/builds/{ev['build_id']}/attempts").json()[
                "attempts"
            ]
            return data

    wait_until(lambda: len(attempts()) > len(before), timeout=60, what="a new attempt")
    ev = _wait_final(farm, eval_id)
    assert ev["state"] == "failed"
    new = attempts()[len(before) :]
    assert new and all(a["drv_path"].endswith("-fail.drv") for a in new)


def test_force_push_supersedes_and_cancels(ci_farm: Callable[..., tuple[Farm, Repo]]) -> None:
    farm, repo = ci_farm({"slow": "sleep 60; echo > $out", "quick": "echo ok > $out"})
    first = repo.git("rev-parse", "HEAD")
    old = deliver(farm.url, "push", push_payload(repo, first), SECRET).json()["evaluation"]

    def building() -> bool:
        ev = _evaluation(farm, old)
        return ev["state"] == "building" and any(j["state"] == "running" for j in ev["jobs"])

    wait_until(building, timeout=60, what="the first commit to build")
    second = repo.commit(
        {"flake.nix": checks_flake({"quick": "echo again > $out"}, uuid.uuid4().hex)},
        "rewritten",
        amend=True,
    )
    new = deliver(farm.url, "push", push_payload(repo, second, forced=True), SECRET).json()[
        "evaluation"
    ]
    ev_old = _wait_final(farm, old, timeout=30)
    assert ev_old["state"] == "cancelled" and ev_old["superseded_by"] == new
    with farm.api() as c:
        build = c.get(f"/api/v1/builds/{ev_old['build_id']}").json()
    assert build["state"] == "cancelled"
    assert _wait_final(farm, new)["state"] == "succeeded"


def test_pull_request_from_a_fork_builds_untrusted(
    farm_factory: Callable[..., Farm], tmp_path: Path
) -> None:
    repo = make_repo(tmp_path)
    secret, token = _files(tmp_path)
    repo.commit({"flake.nix": checks_flake({"base": "echo > $out"}, "s")}, "base")
    farm = farm_factory(
        agents=0,
        runner_extra=project_toml("widgets", repo, secret, branches=["main"], **_forge(token)),
    )
    farm.start_agent("trusted")
    farm.start_agent("outsider", agent_extra="untrusted = true")
    # The fork's commit, as the forge keeps it under refs/pull/5/head.
    repo.git("checkout", "-q", "-b", "feature")
    sha = repo.commit(
        {"flake.nix": checks_flake({"pr": "echo from-fork > $out"}, uuid.uuid4().hex)}, "pr"
    )
    repo.git("checkout", "-q", "main")
    repo.pull_ref(5, sha)
    resp = deliver(farm.url, "pull_request", pr_payload(5, sha, "mallory/widgets", "NONE"), SECRET)
    assert resp.status_code == 202, resp.text
    ev = _wait_final(farm, resp.json()["evaluation"])
    assert ev["state"] == "succeeded", ev
    assert ev["trusted"] is False and ev["ref"] == "refs/pull/5/head"
    with farm.api() as c:
        build = c.get(f"/api/v1/builds/{ev['build_id']}").json()
        steps = c.get(f"/api/v1/builds/{ev['build_id']}/steps").json()["steps"]
        assert build["trusted"] is False
        assert steps and {s["agent_name"] for s in steps} == {"outsider"}
        assert all(s["trusted"] is False for s in steps)
        (job,) = ev["jobs"]
        drv = c.get(f"/api/v1/builds/{ev['build_id']}").json()["roots"][0]
        out_path = next(iter(drv["outputs"].values()))
        hash_part = StorePath.parse(out_path).hash_part
        # Its outputs are in the untrusted cache only.
        assert httpx.get(f"{farm.url}/cache/{hash_part}.narinfo").status_code == 404
        assert httpx.get(f"{farm.url}/cache/untrusted/{hash_part}.narinfo").status_code == 200
    assert job["state"] == "succeeded"


def test_non_flake_project_and_the_projects_api(
    farm_factory: Callable[..., Farm], tmp_path: Path
) -> None:
    repo = make_repo(tmp_path, "plain")
    repo.commit(
        {"ci.nix": file_jobs({"one": "echo 1 > $out", "two": "echo 2 > $out"}, uuid.uuid4().hex)}
    )
    farm = farm_factory(agents=1)
    refused = farm.bigtent(
        "projects", "add", "plain", repo.url, "--branch", "main", "--json",
        token=farm.admin_token,
    )  # fmt: skip
    assert refused.returncode != 0 and "file://" in refused.stderr  # the runner host's files
    with git_daemon(repo, free_port()) as url:
        _non_flake_project(farm, url)


def _non_flake_project(farm: Farm, url: str) -> None:
    added = farm.bigtent(
        "projects", "add", "plain", url, "--branch", "main", "--file", "ci.nix",
        "--attr", "ci", "--json", token=farm.admin_token,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    listed = json.loads(farm.bigtent("projects", "--json", check=True).stdout)
    assert [(p["name"], p["source"], p["evaluate"]) for p in listed] == [("plain", "api", "file")]
    with farm.api() as c:
        resp = c.post("/api/v1/projects/plain/evaluate")
        assert resp.status_code == 202, resp.text
        eval_id = resp.json()["evaluation"]
    ev = _wait_final(farm, eval_id)
    assert ev["state"] == "succeeded", ev
    assert sorted(j["attr"] for j in ev["jobs"]) == ["ci.one", "ci.two"]
    shown = json.loads(farm.bigtent("projects", "show", "plain", "--json", check=True).stdout)
    assert shown["refs"][0]["ref"] == "refs/heads/main"
    assert shown["refs"][0]["latest"]["state"] == "succeeded"
    removed = farm.bigtent("projects", "remove", "plain", token=farm.admin_token)
    assert removed.returncode == 0, removed.stderr
    assert json.loads(farm.bigtent("projects", "--json", check=True).stdout) == []


def test_memory_limit_stops_evaluation_while_agents_and_cache_stay_served(
    farm_factory: Callable[..., Farm], tmp_path: Path
) -> None:
    repo = make_repo(tmp_path)
    secret, token = _files(tmp_path)
    grow = (
        'builtins.foldl\' (acc: i: [ (builtins.concatStringsSep "" (builtins.genList'
        " (j: toString (i * j)) 100)) acc ]) [ ] (builtins.genList (x: x) 50000000)"
    )
    repo.commit(
        {"flake.nix": f"{{ outputs = {{ self }}: {{ checks.{current_system()}.hog = {grow}; }}; }}"}
    )
    toml = project_toml("widgets", repo, secret, branches=["main"], **_forge(token))
    farm = farm_factory(agents=1, runner_extra=toml + "\n[evaluation]\nmax_memory_mib = 1024\n")
    sha = repo.git("rev-parse", "HEAD")
    eval_id = deliver(farm.url, "push", push_payload(repo, sha), SECRET).json()["evaluation"]
    latencies: list[float] = []
    seen: list[str] = []
    with farm.api() as c, httpx.Client(base_url=farm.url) as anon:
        deadline = time.monotonic() + 120
        state = "queued"
        while state in ("queued", "evaluating") and time.monotonic() < deadline:
            t = time.monotonic()
            assert anon.get("/cache/nix-cache-info").status_code == 200
            latencies.append(time.monotonic() - t)
            (agent,) = c.get("/api/v1/agents").json()["agents"]
            if not seen or seen[-1] != agent["last_seen"]:
                seen.append(agent["last_seen"])
            state = c.get(f"/api/v1/evaluations/{eval_id}").json()["state"]
    ev = _evaluation(farm, eval_id)
    assert ev["state"] == "eval_error", ev
    assert "max_memory_mib = 1024" in ev["error"] and "out of memory" in ev["error"]
    print(
        f"during the evaluation: {len(latencies)} /cache requests, slowest "
        f"{max(latencies) * 1000:.0f} ms; the agent's heartbeat moved last_seen "
        f"{len(seen) - 1} times"
    )
    assert max(latencies) < 1.0, latencies
    assert len(seen) >= 2, "no heartbeat of the agent was recorded during the evaluation"
