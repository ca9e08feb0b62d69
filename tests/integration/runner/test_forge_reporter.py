"""ForgeReporter against fake forges on loopback HTTPS (the production client code path, the
test CA): a GitHub App whose JSON web token the fake verifies with the app's public key, check
runs with stable names, the cap and the failed-job output, token caching, a secondary rate
limit, reports that survive a restart, a re-run, and Forgejo commit statuses."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy.ext.asyncio import AsyncEngine

from bigtent.config.forge import ForgeKind, ForgeSection, ForgeTarget
from bigtent.errors import ForgeFailed
from bigtent.runner.db import queries
from bigtent.runner.db.migrate import create_engine
from bigtent.runner.forge.forgejo import ForgejoStatuses
from bigtent.runner.forge.github import GithubApp
from bigtent.runner.forge.model import EvalReport, EvalState, JobReport, JobState
from bigtent.runner.forge.reporting import CommitStatus, StatusState
from bigtent.runner.forge.service import ForgeReporter
from tests.conftest import eventually
from tests.e2e.fake_forgejo import FakeForgejo
from tests.e2e.fake_github import Failure, FakeGithub
from tests.integration.runner.oidc_issuer import TlsFiles

APP_ID = 31337
SHA = "c0ffee" + "0" * 34
PREFIX = "checks.x86_64-linux"
EVAL_NAME = "bigtent/widgets/eval"
FAST = ForgeSection(min_update_interval_secs=0.0, retry_base_secs=0.2, retry_max_secs=1.0)


def _pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.fixture(scope="module")
def app_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def key_file(tmp_path: Path, app_key: rsa.RSAPrivateKey) -> Path:
    path = tmp_path / "app.pem"
    path.write_bytes(_pem(app_key))
    path.chmod(0o600)
    return path


@pytest.fixture
def github(tls: TlsFiles, app_key: rsa.RSAPrivateKey) -> Iterator[FakeGithub]:
    public = app_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fake = FakeGithub(tls, "unused", lambda _d: None, app_id=APP_ID, app_public_key=public)
    yield fake
    fake.stop()


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    eng = create_engine(database_url)
    yield eng
    await eng.dispose()


def github_target(github: FakeGithub, tls: TlsFiles, key_file: Path) -> ForgeTarget:
    return ForgeTarget(
        ForgeKind.GITHUB,
        github.url,
        "acme/widgets",
        app_id=APP_ID,
        app_key_file=str(key_file),
        ca_file=str(tls.ca_file),
    )


def report(
    target: ForgeTarget, state: EvalState, *jobs: JobReport, evaluation_id: int = 7, **kw: Any
) -> EvalReport:
    return EvalReport(
        project="widgets",
        target=target,
        commit_sha=SHA,
        evaluation_id=evaluation_id,
        state=state,
        url=f"https://ci.example/evals/{evaluation_id}",
        jobs=jobs,
        **kw,
    )


def job(name: str, state: JobState, **kw: str) -> JobReport:
    return JobReport(attr=f"{PREFIX}.{name}", state=state, **kw)


async def settled(engine: AsyncEngine, evaluation_id: int) -> bool:
    """The outbox holds nothing more to send for the evaluation, and no failure."""
    async with engine.connect() as conn:
        row = await queries.fetch_forge_outbox(conn, evaluation_id)
    return row is not None and not row.pending and row.attempts == 0


def completed(runs: list[dict[str, Any]]) -> bool:
    return len(runs) == 1 and runs[0]["status"] == "completed"


async def test_check_runs_for_an_evaluation_with_one_token_for_every_report(
    github: FakeGithub, tls: TlsFiles, key_file: Path, engine: AsyncEngine
) -> None:
    target = github_target(github, tls, key_file)
    reporter = ForgeReporter(engine, FAST)
    await reporter.start()
    try:
        await reporter.report(report(target, EvalState.QUEUED))
        await reporter.report(report(target, EvalState.EVALUATING))
        jobs = [job("fmt", JobState.RUNNING), job("unit", JobState.QUEUED)]
        await reporter.report(report(target, EvalState.BUILDING, *jobs))
        await eventually(
            lambda: [r["status"] for r in github.runs_named(EVAL_NAME)] == ["in_progress"],
            timeout=15,
        )
        failed = job(
            "unit",
            JobState.FAILED,
            summary="builder for unit.drv failed with exit code 1",
            log_tail="running tests\nFAIL: test_widget\n",
            url="https://ci.example/steps/12/log",
        )
        final = report(target, EvalState.FAILED, job("fmt", JobState.SUCCEEDED), failed)
        await reporter.report(final)
        await eventually(lambda: completed(github.runs_named(EVAL_NAME)), timeout=15)
        await eventually(
            lambda: completed(github.runs_named(f"bigtent/widgets/{PREFIX}.unit")), timeout=15
        )
        await eventually(lambda: settled(engine, 7), timeout=15)
    finally:
        await reporter.stop()
    (summary,) = github.runs_named(EVAL_NAME, SHA)
    assert summary["conclusion"] == "failure"
    assert summary["external_id"] == "7"
    assert summary["details_url"] == "https://ci.example/evals/7"
    assert summary["output"]["title"] == "1 of 2 jobs failed"
    assert f"`{PREFIX}.unit`: builder for unit.drv failed" in summary["output"]["summary"]
    (unit,) = github.runs_named(f"bigtent/widgets/{PREFIX}.unit", SHA)
    assert unit["conclusion"] == "failure"
    assert unit["external_id"] == f"7/{PREFIX}.unit"
    assert "FAIL: test_widget" in unit["output"]["text"]
    assert unit["details_url"] == "https://ci.example/steps/12/log"
    # a job that succeeded has no check run of its own; nothing carries an id in its name
    assert {r["name"] for r in github.check_runs} == {EVAL_NAME, f"bigtent/widgets/{PREFIX}.unit"}
    # one installation lookup and one access token for every call
    assert github.token_requests == 1
    assert [c.path for c in github.calls if c.method == "GET"] == [
        "/repos/acme/widgets/installation"
    ]


async def test_a_wrong_app_key_is_refused_by_the_fake_and_reported_clearly(
    github: FakeGithub, tls: TlsFiles, tmp_path: Path, engine: AsyncEngine
) -> None:
    wrong = tmp_path / "wrong.pem"
    wrong.write_bytes(_pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)))
    app = GithubApp(github.url, APP_ID, str(wrong), ca_file=str(tls.ca_file))
    try:
        with pytest.raises(ForgeFailed, match="github_app_key_file") as err:
            await app.installation_id("acme/widgets")
        assert err.value.status == 401
        assert "A JSON web token could not be decoded" in str(err.value)
    finally:
        await app.aclose()
    target = github_target(github, tls, wrong)
    reporter = ForgeReporter(engine, FAST)
    await reporter.report(report(target, EvalState.SUCCEEDED))
    await reporter.pass_once()
    async with engine.connect() as conn:
        row = await queries.fetch_forge_outbox(conn, 7)
    await reporter.stop()
    assert row is not None and row.pending and row.attempts == 1
    assert "github_app_key_file" in row.last_error
    assert github.check_runs == []


async def test_a_secondary_rate_limit_is_waited_out_then_the_run_is_created_once(
    github: FakeGithub, tls: TlsFiles, key_file: Path, engine: AsyncEngine
) -> None:
    github.fail_checks(Failure(403, retry_after="2"))
    reporter = ForgeReporter(engine, FAST)
    await reporter.start()
    try:
        await reporter.report(report(github_target(github, tls, key_file), EvalState.SUCCEEDED))
        await eventually(lambda: completed(github.runs_named(EVAL_NAME)), timeout=20)
        await eventually(lambda: settled(engine, 7), timeout=15)
    finally:
        await reporter.stop()
    posts = [c for c in github.calls if c.path.endswith("/check-runs")]
    assert [c.status for c in posts] == [403, 201]
    calls = reporter.metrics.forge_calls
    assert calls.labels("github", "rate_limited")._value.get() == 1
    assert calls.labels("github", "sent")._value.get() == 1
    assert posts[1].at - posts[0].at >= 2.0  # Retry-After honoured, not the 0.2 s backoff
    assert github.runs_named(EVAL_NAME)[0]["conclusion"] == "success"


async def test_a_final_status_stored_before_a_stop_is_sent_by_the_next_runner(
    github: FakeGithub, tls: TlsFiles, key_file: Path, engine: AsyncEngine
) -> None:
    target = github_target(github, tls, key_file)
    first = ForgeReporter(engine, FAST)
    await first.start()
    await first.report(report(target, EvalState.BUILDING, job("a", JobState.FAILED)))
    await eventually(lambda: len(github.check_runs) == 2, timeout=15)
    await eventually(lambda: settled(engine, 7), timeout=15)
    await first.stop()
    # The runner stops (its loop is gone) right after the final report was stored.
    stopped = ForgeReporter(engine, FAST)
    await stopped.report(report(target, EvalState.FAILED, job("a", JobState.FAILED)))
    await stopped.stop()
    async with engine.connect() as conn:
        row = await queries.fetch_forge_outbox(conn, 7)
    assert row is not None and row.pending and row.wanted_final
    assert github.runs_named(EVAL_NAME)[0]["status"] == "in_progress"

    second = ForgeReporter(engine, FAST)
    await second.start()
    try:
        await eventually(lambda: completed(github.runs_named(EVAL_NAME)), timeout=15)
    finally:
        await second.stop()
    # the same check run was updated (its id survived in the outbox), none was created twice
    runs = github.runs_named(EVAL_NAME)
    assert len(runs) == 1 and runs[0]["conclusion"] == "failure"
    assert len(github.check_runs) == 2


async def test_a_rerun_shows_a_new_run_of_the_same_name_and_leaves_the_old_one(
    github: FakeGithub, tls: TlsFiles, key_file: Path, engine: AsyncEngine
) -> None:
    """GitHub never reopens a completed check run: a job run again gets a new run of the same
    name (GitHub shows the newest), updated in place until it completes."""
    target = github_target(github, tls, key_file)
    name = f"bigtent/widgets/{PREFIX}.flaky"
    reporter = ForgeReporter(engine, FAST)
    await reporter.start()
    try:
        await reporter.report(report(target, EvalState.FAILED, job("flaky", JobState.FAILED)))
        await eventually(lambda: completed(github.runs_named(name)), timeout=15)
        (old,) = github.runs_named(name)
        # GitHub's check_run rerequested → the CI side restarts the job and reports again
        await reporter.report(report(target, EvalState.BUILDING, job("flaky", JobState.RUNNING)))
        await eventually(
            lambda: [r["status"] for r in github.runs_named(name)] == ["completed", "in_progress"],
            timeout=15,
        )
        await reporter.report(report(target, EvalState.SUCCEEDED, job("flaky", JobState.SUCCEEDED)))
        await eventually(
            lambda: (
                [r.get("conclusion") for r in github.runs_named(name)] == ["failure", "success"]
            ),
            timeout=15,
        )
        await eventually(lambda: settled(engine, 7), timeout=15)
    finally:
        await reporter.stop()
    runs = github.runs_named(name)
    assert runs[0] == old  # the failed run is left as it was
    assert runs[1]["external_id"] == f"7/{PREFIX}.flaky"
    assert [r.get("conclusion") for r in github.runs_named(EVAL_NAME)] == ["failure", "success"]
    # every call succeeded: no PATCH tried to reopen a completed run
    assert all(c.status < 300 for c in github.calls)


async def test_forgejo_commit_statuses_per_failed_job_and_for_the_evaluation(
    tls: TlsFiles, tmp_path: Path, engine: AsyncEngine
) -> None:
    forgejo = FakeForgejo(tls, "forgejo-secret")
    token_file = tmp_path / "forgejo.token"
    token_file.write_text("forgejo-secret\n")
    target = ForgeTarget(
        ForgeKind.FORGEJO,
        forgejo.api_url,
        "acme/widgets",
        token_file=str(token_file),
        ca_file=str(tls.ca_file),
    )
    forgejo.fail_next(503)
    reporter = ForgeReporter(engine, FAST)
    await reporter.start()
    try:
        await reporter.report(report(target, EvalState.EVALUATING))
        await eventually(lambda: EVAL_NAME in forgejo.latest(SHA), timeout=15)
        jobs = (
            job("ok", JobState.SUCCEEDED),
            job("bad", JobState.FAILED, summary="exit code 2", url="https://ci.example/s/3"),
        )
        await reporter.report(report(target, EvalState.FAILED, *jobs))
        await eventually(lambda: forgejo.latest(SHA)[EVAL_NAME].state == "failure", timeout=15)
        await eventually(lambda: len(forgejo.latest(SHA)) == 2, timeout=15)
    finally:
        await reporter.stop()
        forgejo.stop()
    latest = forgejo.latest(SHA)
    assert set(latest) == {EVAL_NAME, f"bigtent/widgets/{PREFIX}.bad"}
    assert latest[EVAL_NAME].description == "1 of 2 jobs failed"
    assert latest[EVAL_NAME].target_url == "https://ci.example/evals/7"
    bad = latest[f"bigtent/widgets/{PREFIX}.bad"]
    assert (bad.state, bad.description, bad.target_url) == (
        "failure",
        "failed: exit code 2",
        "https://ci.example/s/3",
    )
    assert [s.state for s in forgejo.statuses if s.context == EVAL_NAME] == ["pending", "failure"]
    assert all(s.repository == "acme/widgets" for s in forgejo.statuses)


async def test_reports_while_the_forge_is_down_are_sent_once_as_the_latest(
    github: FakeGithub, tls: TlsFiles, key_file: Path, engine: AsyncEngine
) -> None:
    """Reports coalesce in the outbox: after an outage only the newest state is sent."""
    target = github_target(github, tls, key_file)
    github.fail_checks(Failure(502), Failure(502))
    reporter = ForgeReporter(engine, FAST)
    await reporter.start()
    started = time.monotonic()
    try:
        await reporter.report(report(target, EvalState.EVALUATING))
        await eventually(lambda: len([c for c in github.calls if c.status == 502]) >= 1)
        await reporter.report(report(target, EvalState.BUILDING, job("a", JobState.RUNNING)))
        await reporter.report(report(target, EvalState.SUCCEEDED, job("a", JobState.SUCCEEDED)))
        await eventually(lambda: completed(github.runs_named(EVAL_NAME)), timeout=15)
    finally:
        await reporter.stop()
    assert time.monotonic() - started < 15
    posts = [c for c in github.calls if c.path.endswith("/check-runs")]
    assert [c.status for c in posts] == [502, 502, 201]
    assert posts[-1].body["status"] == "completed"
    assert [c for c in github.calls if c.method == "PATCH"] == []


async def test_two_runners_on_one_database_send_each_report_once(
    github: FakeGithub, tls: TlsFiles, key_file: Path, database_url: str
) -> None:
    """Each runner claims a row before sending it: with both sending at once, every check run
    is created once."""
    target = github_target(github, tls, key_file)
    engines = [create_engine(database_url), create_engine(database_url)]
    one, two = (ForgeReporter(e, FAST) for e in engines)
    try:
        for evaluation_id in range(1, 9):
            final = report(
                target, EvalState.FAILED, job("x", JobState.FAILED), evaluation_id=evaluation_id
            )
            await one.report(final)
        for _ in range(3):
            await asyncio.gather(one.pass_once(), two.pass_once())
        await eventually(lambda: len(github.check_runs) == 16, timeout=15)
        for _ in range(2):
            await asyncio.gather(one.pass_once(), two.pass_once())
    finally:
        await one.stop()
        await two.stop()
        for e in engines:
            await e.dispose()
    runs = github.check_runs
    assert len(runs) == 16
    assert sorted(r["external_id"] for r in runs if r["name"] == EVAL_NAME) == sorted(
        str(i) for i in range(1, 9)
    )
    assert one.calls + two.calls == 16


async def test_a_report_failing_too_long_is_given_up_and_a_new_report_revives_it(
    github: FakeGithub, tls: TlsFiles, key_file: Path, engine: AsyncEngine
) -> None:
    offset = [0.0]
    settings = ForgeSection(retry_base_secs=1.0, retry_max_secs=1.0, give_up_after_secs=30.0)
    reporter = ForgeReporter(engine, settings, clock=lambda: time.time() + offset[0])
    target = github_target(github, tls, key_file)
    github.fail_checks(*[Failure(500)] * 3)
    try:
        await reporter.report(report(target, EvalState.SUCCEEDED))
        await reporter.pass_once()  # fails: first failure
        offset[0] += 20
        await reporter.pass_once()  # fails, 20 s after the first
        state = await reporter.delivery(7)
        assert state is not None
        assert (state["pending"], state["gave_up"], state["attempts"]) == (True, False, 2)
        assert "HTTP 500" in state["last_error"]
        offset[0] += 20
        await reporter.pass_once()  # fails, 40 s after the first: given up
        state = await reporter.delivery(7)
        assert state is not None and state["gave_up"] and state["attempts"] == 3
        offset[0] += 20
        await reporter.pass_once()  # a given-up report is not tried again
        assert len([c for c in github.calls if c.status == 500]) == 3
        # the next report of the evaluation revives it (the forge may work again)
        await reporter.report(report(target, EvalState.FAILED))
        await reporter.pass_once()
        state = await reporter.delivery(7)
    finally:
        await reporter.stop()
    assert state is not None
    assert (state["pending"], state["gave_up"], state["attempts"]) == (False, False, 0)
    assert state["checks"][EVAL_NAME]["conclusion"] == "failure"
    assert isinstance(state["checks"][EVAL_NAME]["check_run_id"], int)
    assert await reporter.delivery(8) is None


async def test_forgejo_refuses_a_wrong_token_and_a_missing_token_file_says_so(
    tls: TlsFiles, tmp_path: Path
) -> None:
    forgejo = FakeForgejo(tls, "right")
    token_file = tmp_path / "token"
    token_file.write_text("wrong\n")
    statuses = ForgejoStatuses(forgejo.api_url, str(token_file), ca_file=str(tls.ca_file))
    status = CommitStatus(EVAL_NAME, StatusState.SUCCESS, "1 job succeeded", "")
    try:
        with pytest.raises(ForgeFailed, match="forge_token_file") as err:
            await statuses.set_status("acme/widgets", SHA, status)
        assert err.value.status == 401 and not err.value.permanent
        token_file.unlink()
        with pytest.raises(ForgeFailed, match="cannot read the forge token file"):
            await statuses.set_status("acme/widgets", SHA, status)
        token_file.write_text("right")
        await statuses.set_status("acme/widgets", SHA, status)
    finally:
        await statuses.aclose()
        forgejo.stop()
    assert [(s.context, s.state) for s in forgejo.statuses] == [(EVAL_NAME, "success")]
    assert "wrong" not in str(err.value)  # a credential never appears in an error


async def test_an_app_installed_anew_is_looked_up_again(
    github: FakeGithub, tls: TlsFiles, key_file: Path
) -> None:
    app = GithubApp(github.url, APP_ID, str(key_file), ca_file=str(tls.ca_file))
    try:
        first = await app.installation_id("acme/widgets")
        await app.token(first)
        app.forget_token(first)
        github.installation_id += 1  # uninstalled and installed again: a new id
        with pytest.raises(ForgeFailed, match="HTTP 404") as err:
            await app.token(first)
        assert not err.value.permanent  # the check is not at fault: tried again
        second = await app.installation_id("acme/widgets")
        assert second == first + 1
        await app.token(second)
    finally:
        await app.aclose()
    lookups = [c for c in github.calls if c.path == "/repos/acme/widgets/installation"]
    assert len(lookups) == 2
