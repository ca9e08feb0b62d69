"""Nix CI and forge reporting joined, with real processes: a real git repository, signed
webhooks to a real runner, evaluation by real Nix, builds on a real agent, and the runner's
``ForgeReporter`` reporting over loopback HTTPS (the production client code path, the test
CA) to a fake GitHub, which verifies the app's JSON web token with the app's public key and
records check runs, and to a fake Forgejo recording commit statuses."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.conftest import current_system, nix_children_see_our_root, wait_until
from tests.e2e.ci_repo import (
    Repo,
    checks_flake,
    deliver,
    file_jobs,
    make_repo,
    project_toml,
    push_payload,
)
from tests.e2e.ci_repo import (
    evaluation as _evaluation,
)
from tests.e2e.ci_repo import (
    wait_final as _wait_final,
)
from tests.e2e.conftest import Farm
from tests.e2e.fake_forgejo import FakeForgejo, Status
from tests.e2e.fake_github import FakeGithub
from tests.integration.runner.oidc_issuer import TlsFiles

pytestmark = [pytest.mark.e2e, pytest.mark.nix, nix_children_see_our_root]

SECRET = b"webhook-secret-for-forge-tests"
APP_ID = 424242
FORGEJO_TOKEN = "forgejo-token-for-tests"
EVAL_CHECK = "bigtent/widgets/eval"
FORGE_FAST = """
[forge]
min_update_interval_secs = 0.0
retry_base_secs = 0.2
retry_max_secs = 1.0
"""


@pytest.fixture(scope="module")
def app_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def github(tls: TlsFiles, app_key: rsa.RSAPrivateKey) -> Iterator[FakeGithub]:
    public = app_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fake = FakeGithub(tls, "unused", lambda _d: None, app_id=APP_ID, app_public_key=public)
    yield fake
    fake.stop()


@pytest.fixture
def forgejo(tls: TlsFiles) -> Iterator[FakeForgejo]:
    fake = FakeForgejo(tls, FORGEJO_TOKEN)
    yield fake
    fake.stop()


def _job(name: str) -> str:
    return f"checks.{current_system()}.{name}"


def _check(name: str) -> str:
    return f"bigtent/widgets/{_job(name)}"


def _attempts(farm: Farm, build_id: int) -> list[dict[str, Any]]:
    with farm.api() as c:
        resp = c.get(f"/api/v1/builds/{build_id}/attempts")
        resp.raise_for_status()
        data: list[dict[str, Any]] = resp.json()["attempts"]
        return data


def _push(farm: Farm, repo: Repo, sha: str, **kw: Any) -> int:
    resp = deliver(farm.url, "push", push_payload(repo, sha, **kw), SECRET)
    assert resp.status_code == 202, resp.text
    eval_id = resp.json()["evaluation"]
    assert isinstance(eval_id, int)
    return eval_id


def _last_run(github: FakeGithub, name: str, sha: str) -> dict[str, Any] | None:
    """The check run GitHub shows under ``name`` on ``sha`` (its newest)."""
    runs = github.runs_named(name, sha)
    return runs[-1] if runs else None


def _completed(github: FakeGithub, name: str, sha: str, runs: int = 1) -> bool:
    held = github.runs_named(name, sha)
    return len(held) >= runs and held[-1]["status"] == "completed"


@pytest.fixture
def github_farm(
    farm_factory: Callable[..., Farm],
    tmp_path: Path,
    tls: TlsFiles,
    github: FakeGithub,
    app_key: rsa.RSAPrivateKey,
) -> Callable[[dict[str, str]], tuple[Farm, Repo]]:
    def make(jobs: dict[str, str]) -> tuple[Farm, Repo]:
        repo = make_repo(tmp_path)
        repo.commit({"flake.nix": checks_flake(jobs, uuid.uuid4().hex)}, "first")
        secret = tmp_path / "hook.secret"
        secret.write_bytes(SECRET + b"\n")
        key_file = tmp_path / "app.pem"
        key_file.write_bytes(
            app_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_file.chmod(0o600)
        toml = project_toml(
            "widgets",
            repo,
            secret,
            branches=["main"],
            forge="github",
            forge_api_url=github.url,
            github_app_id=APP_ID,
            github_app_key_file=str(key_file),
            forge_ca_file=str(tls.ca_file),
        )
        farm = farm_factory(agents=1, runner_extra=toml + FORGE_FAST)
        return farm, repo

    return make


def test_push_to_github_check_runs_and_a_rerun_of_one_failed_job(
    github_farm: Callable[[dict[str, str]], tuple[Farm, Repo]], github: FakeGithub
) -> None:
    farm, repo = github_farm(
        {
            "pass": "echo ok > $out",
            "fail": "echo building; echo this-job-fails; exit 3",
            "other": "echo other-job-fails; exit 4",
        }
    )
    sha = repo.git("rev-parse", "HEAD")
    eval_id = _push(farm, repo, sha)
    ev = _wait_final(farm, eval_id)
    assert ev["state"] == "failed", ev
    build_id = ev["build_id"]

    wait_until(
        lambda: _completed(github, EVAL_CHECK, sha) and _completed(github, _check("fail"), sha),
        timeout=30,
        what="the fake GitHub to hold the completed check runs",
    )
    summary = _last_run(github, EVAL_CHECK, sha)
    assert summary is not None
    assert summary["conclusion"] == "failure"
    assert summary["head_sha"] == sha and summary["external_id"] == str(eval_id)
    assert summary["details_url"] == f"{farm.url}/ci/evaluations/{eval_id}"
    assert summary["output"]["title"] == "2 of 3 jobs failed"
    assert _job("fail") in summary["output"]["summary"]
    assert _job("other") in summary["output"]["summary"]
    failed = _last_run(github, _check("fail"), sha)
    assert failed is not None
    assert failed["conclusion"] == "failure" and failed["head_sha"] == sha
    assert failed["external_id"] == f"{eval_id}/{_job('fail')}"
    assert "this-job-fails" in failed["output"]["text"]
    assert failed["details_url"].startswith(f"{farm.url}/")
    # A job that succeeded has no check run of its own.
    assert {r["name"] for r in github.check_runs} == {
        EVAL_CHECK,
        _check("fail"),
        _check("other"),
    }
    # Every call carried the app's credentials: one token for them all.
    assert github.token_requests == 1

    # GitHub's "Re-run" of the failed job's check run: only that job's step runs again.
    before = _attempts(farm, build_id)
    rerun = {
        "action": "rerequested",
        "check_run": {"external_id": failed["external_id"], "name": failed["name"]},
        "repository": {"full_name": "acme/widgets"},
    }
    resp = deliver(farm.url, "check_run", rerun, SECRET)
    assert resp.status_code == 202 and resp.json()["restarted"] is True, resp.text
    wait_until(
        lambda: len(_attempts(farm, build_id)) > len(before), timeout=60, what="a new attempt"
    )
    ev = _wait_final(farm, eval_id)
    assert ev["state"] == "failed"
    new = _attempts(farm, build_id)[len(before) :]
    assert [a["drv_path"].rsplit("-", 1)[1] for a in new] == ["fail.drv"], new
    jobs = {j["attr"]: j["state"] for j in ev["jobs"]}
    assert jobs == {_job("pass"): "succeeded", _job("fail"): "failed", _job("other"): "failed"}

    # GitHub gets a new run of the same name (a completed run never changes); the other
    # failed job's run is left alone.
    wait_until(
        lambda: (
            _completed(github, _check("fail"), sha, runs=2)
            and _completed(github, EVAL_CHECK, sha, runs=2)
        ),
        timeout=30,
        what="new check runs for the re-run",
    )
    again = _last_run(github, _check("fail"), sha)
    assert again is not None and again["id"] != failed["id"]
    assert again["conclusion"] == "failure" and "this-job-fails" in again["output"]["text"]
    assert len(github.runs_named(_check("other"), sha)) == 1
    summary = _last_run(github, EVAL_CHECK, sha)
    assert summary is not None and summary["conclusion"] == "failure"


def test_force_push_cancels_the_old_commit_on_github(
    github_farm: Callable[[dict[str, str]], tuple[Farm, Repo]], github: FakeGithub
) -> None:
    farm, repo = github_farm({"slow": "sleep 60; echo > $out", "quick": "echo ok > $out"})
    first = repo.git("rev-parse", "HEAD")
    old = _push(farm, repo, first)

    def building() -> bool:
        ev = _evaluation(farm, old)
        return ev["state"] == "building" and any(j["state"] == "running" for j in ev["jobs"])

    wait_until(building, timeout=60, what="the first commit to build")
    wait_until(
        lambda: (
            (run := _last_run(github, EVAL_CHECK, first)) is not None
            and run["status"] == "in_progress"
        ),
        timeout=30,
        what="the first commit's summary run in progress",
    )
    second = repo.commit(
        {"flake.nix": checks_flake({"quick": "echo again > $out"}, uuid.uuid4().hex)},
        "rewritten",
        amend=True,
    )
    new = _push(farm, repo, second, forced=True)
    ev_old = _wait_final(farm, old, timeout=30)
    assert ev_old["state"] == "cancelled" and ev_old["superseded_by"] == new
    with farm.api() as c:
        build = c.get(f"/api/v1/builds/{ev_old['build_id']}").json()
    assert build["state"] == "cancelled"
    assert _wait_final(farm, new)["state"] == "succeeded"

    wait_until(
        lambda: _completed(github, EVAL_CHECK, first) and _completed(github, EVAL_CHECK, second),
        timeout=30,
        what="both commits' summary runs to complete",
    )
    cancelled = _last_run(github, EVAL_CHECK, first)
    assert cancelled is not None and cancelled["conclusion"] == "cancelled"
    assert "superseded" in cancelled["output"]["summary"]
    succeeded = _last_run(github, EVAL_CHECK, second)
    assert succeeded is not None and succeeded["conclusion"] == "success"
    # A job that never failed has no check run, on either commit.
    assert {r["name"] for r in github.check_runs} == {EVAL_CHECK}


def _forgejo_project(
    name: str, repo: Repo, root: Path, tls: TlsFiles, forgejo: FakeForgejo, **extra: Any
) -> str:
    """The runner's TOML for a project reporting to the fake Forgejo."""
    secret = root / "hook.secret"
    secret.write_bytes(SECRET + b"\n")
    token = root / "forgejo.token"
    token.write_text(FORGEJO_TOKEN + "\n")
    toml = project_toml(
        name,
        repo,
        secret,
        branches=["main"],
        forge="forgejo",
        forge_api_url=forgejo.api_url,
        forge_token_file=str(token),
        forge_ca_file=str(tls.ca_file),
        **extra,
    )
    return toml + FORGE_FAST


def _final_status(forgejo: FakeForgejo, commit: str, context: str) -> Status | None:
    """The status Forgejo shows under ``context`` on ``commit``, once it is not pending."""
    status = forgejo.latest(commit).get(context)
    return status if status is not None and status.state != "pending" else None


def test_forgejo_statuses_for_a_push_and_a_force_push(
    farm_factory: Callable[..., Farm], tmp_path: Path, tls: TlsFiles, forgejo: FakeForgejo
) -> None:
    repo = make_repo(tmp_path)
    sha = repo.commit(
        {
            "flake.nix": checks_flake(
                {"pass": "echo ok > $out", "fail": "echo forgejo-fails; exit 3"},
                uuid.uuid4().hex,
            )
        },
        "first",
    )
    farm = farm_factory(
        agents=1, runner_extra=_forgejo_project("widgets", repo, tmp_path, tls, forgejo)
    )
    eval_id = _push(farm, repo, sha)
    assert _wait_final(farm, eval_id)["state"] == "failed"

    def final(commit: str, context: str) -> Status | None:
        return _final_status(forgejo, commit, context)

    wait_until(
        lambda: final(sha, EVAL_CHECK) is not None and final(sha, _check("fail")) is not None,
        timeout=30,
        what="the fake Forgejo to hold the final statuses",
    )
    latest = forgejo.latest(sha)
    assert set(latest) == {EVAL_CHECK, _check("fail")}  # stable names, no ids
    assert latest[EVAL_CHECK].state == "failure"
    assert latest[EVAL_CHECK].description == "1 of 2 jobs failed"
    assert latest[EVAL_CHECK].target_url == f"{farm.url}/ci/evaluations/{eval_id}"
    assert latest[EVAL_CHECK].repository == "acme/widgets"
    assert latest[_check("fail")].state == "failure"
    assert latest[_check("fail")].target_url.startswith(f"{farm.url}/")
    # The evaluation was pending on the forge before it ended.
    assert any(s.context == EVAL_CHECK and s.state == "pending" for s in forgejo.statuses)

    # A new commit whose build is slow, then a force-push over it: the first is cancelled,
    # which Forgejo (without a "cancelled" state) shows as an error saying so.
    second = repo.commit(
        {"flake.nix": checks_flake({"slow": "sleep 60; echo > $out"}, uuid.uuid4().hex)},
        "slow",
    )
    old = _push(farm, repo, second)
    wait_until(
        lambda: _evaluation(farm, old)["state"] == "building",
        timeout=60,
        what="the slow commit to build",
    )
    third = repo.commit(
        {"flake.nix": checks_flake({"quick": "echo ok > $out"}, uuid.uuid4().hex)},
        "rewritten",
        amend=True,
    )
    new = _push(farm, repo, third, forced=True)
    assert _wait_final(farm, old, timeout=30)["state"] == "cancelled"
    assert _wait_final(farm, new)["state"] == "succeeded"
    wait_until(
        lambda: final(second, EVAL_CHECK) is not None and final(third, EVAL_CHECK) is not None,
        timeout=30,
        what="the final statuses of both commits",
    )
    cancelled = forgejo.latest(second)[EVAL_CHECK]
    assert cancelled.state == "error" and "cancelled" in cancelled.description
    assert forgejo.latest(third)[EVAL_CHECK].state == "success"


def test_a_non_flake_project_reports_its_jobs_to_forgejo(
    farm_factory: Callable[..., Farm], tmp_path: Path, tls: TlsFiles, forgejo: FakeForgejo
) -> None:
    repo = make_repo(tmp_path, "plain")
    jobs = {"one": "echo 1 > $out", "broken": "echo plain-job-fails; exit 5"}
    sha = repo.commit({"ci.nix": file_jobs(jobs, uuid.uuid4().hex)}, "first")
    toml = _forgejo_project(
        "plain", repo, tmp_path, tls, forgejo, evaluate="file", file="ci.nix", attr="ci"
    )
    farm = farm_factory(agents=1, runner_extra=toml)
    eval_id = _push(farm, repo, sha)
    ev = _wait_final(farm, eval_id)
    assert ev["state"] == "failed", ev
    assert {j["attr"]: j["state"] for j in ev["jobs"]} == {
        "ci.one": "succeeded",
        "ci.broken": "failed",
    }
    wait_until(
        lambda: (
            _final_status(forgejo, sha, "bigtent/plain/eval") is not None
            and _final_status(forgejo, sha, "bigtent/plain/ci.broken") is not None
        ),
        timeout=30,
        what="the fake Forgejo to hold the final statuses",
    )
    latest = forgejo.latest(sha)
    assert set(latest) == {"bigtent/plain/eval", "bigtent/plain/ci.broken"}
    assert latest["bigtent/plain/eval"].state == "failure"
    assert latest["bigtent/plain/eval"].description == "1 of 2 jobs failed"
    assert latest["bigtent/plain/ci.broken"].state == "failure"
    assert latest["bigtent/plain/ci.broken"].target_url.startswith(f"{farm.url}/")
