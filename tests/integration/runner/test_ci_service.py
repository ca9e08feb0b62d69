"""Nix CI in one runner process: webhook attacks that must store nothing, the reports a
``RecordingReporter`` receives (evaluation error with Nix's message, building, superseded),
the memory limit, and claims by several runners on one database."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from bigtent.config import Role
from bigtent.runner.ci.triggers import CiEvalState
from bigtent.runner.db import ci_queries as q
from bigtent.runner.db.migrate import create_engine
from bigtent.runner.db.tables import ci_evaluations, ci_webhook_deliveries
from bigtent.runner.forge.model import EvalState
from bigtent.runner.forge.null import RecordingReporter
from tests.conftest import current_system, have_nix, nix_children_see_our_root
from tests.e2e.ci_repo import Repo, checks_flake, make_repo, pr_payload, push_payload
from tests.integration.runner.conftest import MakeRunner, RunnerHarness, eventually

SECRET = b"integration-secret"


def _project(repo_url: str, secret: Path, token: Path, **extra: Any) -> dict[str, Any]:
    return {
        "name": "widgets",
        "url": repo_url,
        "repository": "acme/widgets",
        "branches": ["main"],
        "webhook_secret_file": str(secret),
        "systems": [current_system()],
        "forge": "forgejo",
        "forge_api_url": "https://127.0.0.1:9/api/v1",
        "forge_token_file": str(token),
        **extra,
    }


def _secret_files(tmp_path: Path) -> tuple[Path, Path]:
    secret = tmp_path / "hook.secret"
    secret.write_bytes(SECRET)
    token = tmp_path / "token"
    token.write_text("t")
    return secret, token


def _headers(body: bytes, secret: bytes = SECRET, delivery: str | None = None) -> dict[str, str]:
    digest = hmac.new(secret, body, hashlib.sha256).hexdigest()
    return {
        "X-GitHub-Event": "push",
        "X-GitHub-Delivery": delivery or uuid.uuid4().hex,
        "X-Hub-Signature-256": f"sha256={digest}",
        "Content-Type": "application/json",
    }


async def _stored(runner: RunnerHarness) -> tuple[int, int]:
    async with runner.comps.engine.connect() as conn:
        evals = (await conn.execute(select(func.count()).select_from(ci_evaluations))).scalar()
        deliveries = (
            await conn.execute(select(func.count()).select_from(ci_webhook_deliveries))
        ).scalar()
    return int(evals or 0), int(deliveries or 0)


class FakeRemote:
    """``git ls-remote`` of the hook runner's project: the refs as they are now."""

    def __init__(self) -> None:
        self.refs = {"refs/heads/main": "a" * 40}
        self.calls = 0

    async def __call__(self, url: str, refs: list[str]) -> dict[str, str]:
        self.calls += 1
        return {r: sha for r, sha in self.refs.items() if r in refs}


@pytest.fixture
async def hook_runner(make_runner: MakeRunner, tmp_path: Path) -> RunnerHarness:
    secret, token = _secret_files(tmp_path)
    runner = await make_runner(
        projects=[_project("file:///nonexistent/widgets", secret, token)],
        evaluation={"webhook_max_bytes": 4096, "api_secrets_dir": str(tmp_path / "api")},
    )
    assert runner.comps.ci is not None
    runner.comps.ci.ls_remote = FakeRemote()
    return runner


def _push_body(sha: str = "a" * 40, repository: str = "acme/widgets") -> bytes:
    return json.dumps(
        {
            "ref": "refs/heads/main",
            "after": sha,
            "repository": {"full_name": repository, "default_branch": "main"},
        }
    ).encode()


async def test_webhook_attacks_store_nothing(hook_runner: RunnerHarness) -> None:
    c = hook_runner.client(None)
    body = _push_body()
    good = _headers(body)

    wrong = await c.post("/api/v1/hooks/github", content=body, headers=_headers(body, b"guess"))
    assert wrong.status_code == 401
    missing = {k: v for k, v in good.items() if k != "X-Hub-Signature-256"}
    assert (await c.post("/api/v1/hooks/github", content=body, headers=missing)).status_code == 401
    changed = body.replace(b"a" * 40, b"b" * 40)
    assert (await c.post("/api/v1/hooks/github", content=changed, headers=good)).status_code == 401
    other = _push_body(repository="someone/else")
    unknown = await c.post("/api/v1/hooks/github", content=other, headers=_headers(other))
    assert unknown.status_code == 404
    big = json.dumps({"pad": "x" * 5000}).encode()
    too_big = await c.post("/api/v1/hooks/github", content=big, headers=_headers(big))
    assert too_big.status_code == 413
    assert await _stored(hook_runner) == (0, 0)

    # A good delivery is stored once; the same delivery again is refused as a replay.
    ok = await c.post("/api/v1/hooks/github", content=body, headers=good)
    assert ok.status_code == 202, ok.text
    assert await _stored(hook_runner) == (1, 1)
    replay = await c.post("/api/v1/hooks/github", content=body, headers=good)
    assert replay.status_code == 400 and "replay" in replay.json()["error"]
    assert await _stored(hook_runner) == (1, 1)


async def test_webhooks_need_no_bearer_token_but_other_ci_routes_do(
    hook_runner: RunnerHarness,
) -> None:
    anonymous = hook_runner.client(None)
    assert (await anonymous.get("/api/v1/projects")).status_code == 401
    listed = await hook_runner.client().get("/api/v1/projects")
    assert [p["name"] for p in listed.json()["projects"]] == ["widgets"]
    assert listed.json()["projects"][0]["source"] == "config"
    # Removing a project of the config is refused: the config would bring it back.
    admin = hook_runner.client(Role.ADMIN)
    refused = await admin.delete("/api/v1/projects/widgets")
    assert refused.status_code == 409 and "[[projects]]" in refused.json()["error"]


# ---- with real Nix and git -------------------------------------------------------------------

_has_nix = pytest.mark.skipif(not have_nix(), reason="needs Nix")


def needs_nix(test: Any) -> Any:
    """Tests that evaluate a flake: Nix starts ``git`` for it."""
    return _has_nix(nix_children_see_our_root(test))


async def _served(
    make_runner: MakeRunner, tmp_path: Path, repo: Repo, **evaluation: Any
) -> tuple[RunnerHarness, RecordingReporter]:
    secret, token = _secret_files(tmp_path)
    runner = await make_runner(
        serve=True,
        projects=[_project(repo.url, secret, token)],
        evaluation={"watch_interval_secs": 0.2, **evaluation},
    )
    recorder = RecordingReporter()
    assert runner.comps.ci is not None
    runner.comps.ci.reporter = recorder
    return runner, recorder


async def _push(runner: RunnerHarness, repo: Repo, sha: str) -> int:
    body = json.dumps(push_payload(repo, sha)).encode()
    async with httpx.AsyncClient(base_url=runner.url or "") as c:
        resp = await c.post("/api/v1/hooks/github", content=body, headers=_headers(body))
    assert resp.status_code == 202, resp.text
    eval_id: int = resp.json()["evaluation"]
    return eval_id


@needs_nix
async def test_reports_of_an_eval_error_then_building_then_superseded(
    make_runner: MakeRunner, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path)
    broken = repo.commit({"flake.nix": "{ outputs = { self }: { checks = undefinedThing; }; }"})
    runner, recorder = await _served(make_runner, tmp_path, repo)

    bad = await _push(runner, repo, broken)
    report = await recorder.wait_for(
        lambda r: r.evaluation_id == bad and r.state is EvalState.EVAL_ERROR
    )
    assert "undefined variable 'undefinedThing'" in report.error
    assert report.commit_sha == broken and report.target.repository == "acme/widgets"
    assert [r.state for r in recorder.reports if r.evaluation_id == bad] == [
        EvalState.QUEUED,
        EvalState.EVALUATING,
        EvalState.EVAL_ERROR,
    ]

    # No agent: the next commit's build waits, and the one after supersedes it.
    first = repo.commit({"flake.nix": checks_flake({"a": "echo > $out"}, uuid.uuid4().hex)})
    building = await _push(runner, repo, first)
    report = await recorder.wait_for(
        lambda r: r.evaluation_id == building and r.state is EvalState.BUILDING
    )
    assert [j.attr for j in report.jobs] == [f"checks.{current_system()}.a"]
    second = repo.commit({"flake.nix": checks_flake({"a": "echo 2 > $out"}, uuid.uuid4().hex)})
    newer = await _push(runner, repo, second)
    cancelled = await recorder.wait_for(
        lambda r: r.evaluation_id == building and r.state is EvalState.CANCELLED
    )
    assert [j.state.value for j in cancelled.jobs] == ["cancelled"]
    async with runner.comps.engine.connect() as conn:
        row = await q.fetch_evaluation(conn, building)
    assert row is not None and row.superseded_by == newer
    # Evaluated before the force-push below: once the ref is back at the first commit, a
    # fetch of the second fails (an evaluation error, final, with nothing to supersede).
    await recorder.wait_for(lambda r: r.evaluation_id == newer and r.state is EvalState.BUILDING)
    assert runner.comps.scheduler.builds.get(int(row.build_id)) is None  # cancelled, gone

    # A force-push back to the first commit evaluates it again and supersedes the newer one.
    recorder.reports.clear()
    repo.git("reset", "-q", "--hard", first)
    assert await _push(runner, repo, first) == building
    await recorder.wait_for(lambda r: r.evaluation_id == newer and r.state is EvalState.CANCELLED)
    again = await recorder.wait_for(
        lambda r: r.evaluation_id == building and r.state is EvalState.BUILDING
    )
    assert [j.state.value for j in again.jobs] == ["queued"]


@needs_nix
async def test_memory_limit_stops_the_evaluation_and_the_runner_stays_responsive(
    make_runner: MakeRunner, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path)
    # Grows steadily (a list of fresh strings) until the 512 MiB limit stops it: ~2 s here.
    grow = (
        'builtins.foldl\' (acc: i: [ (builtins.concatStringsSep "" (builtins.genList'
        " (j: toString (i * j)) 100)) acc ]) [ ] (builtins.genList (x: x) 20000000)"
    )
    hog = f"{{ outputs = {{ self }}: {{ checks.{current_system()}.hog = {grow}; }}; }}"
    sha = repo.commit({"flake.nix": hog})
    runner, recorder = await _served(make_runner, tmp_path, repo, max_memory_mib=512)
    eval_id = await _push(runner, repo, sha)
    latencies: list[float] = []
    lags: list[float] = []
    loop = asyncio.get_running_loop()

    async def lag() -> None:
        while True:  # how late a 10 ms timer fires: the event loop's responsiveness
            t = loop.time()
            await asyncio.sleep(0.01)
            lags.append(loop.time() - t - 0.01)

    async def probe() -> None:
        async with httpx.AsyncClient(base_url=runner.url or "") as c:
            while True:
                t = loop.time()
                resp = await c.get("/cache/nix-cache-info")
                assert resp.status_code == 200
                latencies.append(loop.time() - t)
                await asyncio.sleep(0.05)

    await recorder.wait_for(
        lambda r: r.evaluation_id == eval_id and r.state is EvalState.EVALUATING
    )
    probes = [asyncio.create_task(probe()), asyncio.create_task(lag())]
    try:
        report = await recorder.wait_for(
            lambda r: r.evaluation_id == eval_id and r.state is EvalState.EVAL_ERROR, timeout=120
        )
    finally:
        for task in probes:
            task.cancel()
    assert "max_memory_mib = 512" in report.error
    assert "out of memory" in report.error
    print(
        f"during the evaluation: {len(latencies)} /cache requests, slowest "
        f"{max(latencies) * 1000:.1f} ms; event loop lag at most {max(lags) * 1000:.1f} ms"
    )
    assert len(latencies) >= 5, "the evaluation ended too soon to measure anything"
    assert max(latencies) < 0.5 and max(lags) < 0.25, (latencies, lags)


async def test_several_runners_claim_each_evaluation_once(
    make_database: Any, tmp_path: Path
) -> None:
    url = make_database()
    engines = [create_engine(url), create_engine(url)]
    try:
        async with engines[0].begin() as conn:
            ids = [
                await q.insert_evaluation(
                    conn,
                    project="p",
                    ref="refs/heads/main",
                    commit_sha=f"{i:040x}",
                    fetch_ref="refs/heads/main",
                    trigger="push",
                    trusted=True,
                    state=CiEvalState.QUEUED.value,
                    created_at=0.0,
                )
                for i in range(20)
            ]
            # The same commit again: no second evaluation.
            again = await q.insert_evaluation(
                conn,
                project="p",
                ref="refs/heads/main",
                commit_sha=f"{0:040x}",
                fetch_ref="refs/heads/main",
                trigger="poll",
                trusted=True,
                state=CiEvalState.QUEUED.value,
                created_at=0.0,
            )
        assert again is None

        async def claim(engine: Any, who: str, eval_id: int) -> bool:
            async with engine.begin() as conn:
                moved: bool = await q.transition(
                    conn,
                    eval_id,
                    [CiEvalState.QUEUED.value],
                    state=CiEvalState.EVALUATING.value,
                    claimed_by=who,
                )
                return moved

        results = await asyncio.gather(
            *(claim(e, f"r{n}", i) for i in ids for n, e in enumerate(engines) if i is not None)
        )
        assert sum(results) == len(ids)
        async with engines[0].connect() as conn:
            rows = await q.fetch_evaluations_in(conn, [CiEvalState.EVALUATING.value])
        assert len(rows) == len(ids) and {r.claimed_by for r in rows} <= {"r0", "r1"}
    finally:
        for e in engines:
            await e.dispose()


@needs_nix
async def test_polling_finds_new_commits_and_supersedes(
    make_runner: MakeRunner, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path)
    first = repo.commit({"flake.nix": checks_flake({"a": "echo > $out"}, uuid.uuid4().hex)})
    secret, token = _secret_files(tmp_path)
    runner = await make_runner(
        serve=True,
        projects=[_project(repo.url, secret, token, poll_interval_secs=5)],
        evaluation={"watch_interval_secs": 0.2},
    )
    engine = runner.comps.engine

    async def evaluations() -> list[Any]:
        async with engine.connect() as conn:
            return await q.fetch_evaluations(conn, "widgets", 10)

    async def found(sha: str) -> bool:
        return any(e.commit_sha == sha for e in await evaluations())

    await eventually(lambda: found(first), timeout=30)
    second = repo.commit({"flake.nix": checks_flake({"a": "echo 2 > $out"}, uuid.uuid4().hex)})
    await eventually(lambda: found(second), timeout=30)

    async def first_cancelled() -> bool:
        return any(e.commit_sha == first and e.state == "cancelled" for e in await evaluations())

    # No agent: the first commit's build was still waiting, the second supersedes it.
    await eventually(first_cancelled, timeout=30)
    rows = {e.commit_sha: e for e in await evaluations()}
    assert len(rows) == 2 and {e.trigger for e in rows.values()} == {"poll"}
    assert rows[first].superseded_by == rows[second].id


@needs_nix
async def test_outside_fork_waits_for_approval(make_runner: MakeRunner, tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    repo.commit({"flake.nix": checks_flake({"a": "echo > $out"}, "base")})
    repo.git("checkout", "-q", "-b", "feature")
    sha = repo.commit({"flake.nix": checks_flake({"pr": "echo > $out"}, uuid.uuid4().hex)})
    repo.pull_ref(9, sha)
    secret, token = _secret_files(tmp_path)
    runner = await make_runner(
        serve=True,
        projects=[_project(repo.url, secret, token, require_approval_for_outside=True)],
        evaluation={"watch_interval_secs": 0.2},
    )
    recorder = RecordingReporter()
    assert runner.comps.ci is not None
    runner.comps.ci.reporter = recorder
    body = json.dumps(pr_payload(9, sha, "mallory/widgets", "FIRST_TIME_CONTRIBUTOR")).encode()
    headers = {**_headers(body), "X-GitHub-Event": "pull_request"}
    async with httpx.AsyncClient(base_url=runner.url or "") as c:
        resp = await c.post("/api/v1/hooks/github", content=body, headers=headers)
    assert resp.status_code == 202, resp.text
    eval_id = resp.json()["evaluation"]
    admin = runner.client(Role.ADMIN)
    shown = (await admin.get(f"/api/v1/evaluations/{eval_id}")).json()
    assert shown["state"] == "awaiting_approval" and shown["trusted"] is False
    assert [r.state for r in recorder.reports] == [EvalState.QUEUED]
    # Nothing happens until an admin approves; a client token may not.
    client = runner.client(Role.CLIENT)
    assert (await client.post(f"/api/v1/evaluations/{eval_id}/approve")).status_code == 403
    assert (await admin.post(f"/api/v1/evaluations/{eval_id}/approve")).status_code == 200
    report = await recorder.wait_for(
        lambda r: r.evaluation_id == eval_id and r.state is EvalState.BUILDING
    )
    assert [j.attr for j in report.jobs] == [f"checks.{current_system()}.pr"]
    async with runner.comps.engine.connect() as conn:
        row = await q.fetch_evaluation(conn, eval_id)
    assert row is not None and row.build_id is not None
    build = runner.comps.scheduler.builds[int(row.build_id)]
    assert build.trusted is False


async def test_adding_an_invalid_project_says_what_is_wrong(hook_runner: RunnerHarness) -> None:
    admin = hook_runner.client(Role.ADMIN)
    resp = await admin.post("/api/v1/projects", json={"name": "x", "url": "/not/a/url"})
    assert resp.status_code == 400
    assert resp.json()["error"].startswith("invalid project: url: ")
    resp = await admin.post(
        "/api/v1/projects", json={"name": "widgets", "url": "https://example.test/x.git"}
    )
    assert resp.status_code == 409  # the config's project has that name


async def test_api_projects_cannot_send_runner_files_anywhere(
    hook_runner: RunnerHarness, tmp_path: Path
) -> None:
    """An admin token must not make the runner send its files (the cache's signing key) to a
    URL of the admin's choosing, nor clone the runner host's repositories."""
    admin = hook_runner.client(Role.ADMIN)
    signing_key = hook_runner.state_dir / "cache.sk"
    evil = {
        "name": "evil",
        "url": "https://example.test/acme/evil.git",
        "repository": "acme/evil",
        "forge": "forgejo",
        "forge_api_url": "https://evil.example/api/v1",
        "forge_token_file": str(signing_key),
    }
    resp = await admin.post("/api/v1/projects", json=evil)
    assert resp.status_code == 400, resp.text
    assert "forge_token_file" in resp.json()["error"]
    escape = tmp_path / "api" / ".." / "hook.secret"
    for bad in (
        {"webhook_secret_file": str(escape)},
        {"forge_token_file": "api/token"},  # relative: not inside
        {"url": "file:///srv/private/repo"},
        {"forge_api_url": "http://forge.example/api/v1"},
    ):
        resp = await admin.post("/api/v1/projects", json={**evil, **bad})
        assert resp.status_code == 400, (bad, resp.text)
    # Inside evaluation.api_secrets_dir, over https (or http to loopback): taken.
    (tmp_path / "api").mkdir()
    inside = tmp_path / "api" / "evil.token"
    inside.write_text("t")
    ok = {**evil, "forge_token_file": str(inside), "forge_api_url": "http://127.0.0.1:9/api"}
    resp = await admin.post("/api/v1/projects", json=ok)
    assert resp.status_code == 201, resp.text
    assert await _stored(hook_runner) == (0, 0)
    # Clients see that secret files are set, not where they are; admins see the paths.
    listed = (await hook_runner.client().get("/api/v1/projects")).json()["projects"]
    assert {p["name"]: p["forge_token_file"] for p in listed} == {
        "widgets": "(set)",
        "evil": "(set)",
    }
    assert str(tmp_path) not in json.dumps(listed)
    shown = (await hook_runner.client().get("/api/v1/projects/evil")).json()
    assert shown["forge_token_file"] == "(set)"
    as_admin = (await admin.get("/api/v1/projects")).json()["projects"]
    assert {p["name"]: p["forge_token_file"] for p in as_admin}["evil"] == str(inside)


async def test_api_project_stored_before_the_checks_is_skipped(
    hook_runner: RunnerHarness,
) -> None:
    bad = {
        "name": "old",
        "url": "https://example.test/o.git",
        "forge": "forgejo",
        "repository": "acme/old",
        "forge_api_url": "https://evil.example/api/v1",
        "forge_token_file": str(hook_runner.state_dir / "cache.sk"),
    }
    async with hook_runner.comps.engine.begin() as conn:
        await q.insert_project(conn, "old", "api", bad, 0.0)
    ci = hook_runner.comps.ci
    assert ci is not None
    await ci.reload_projects()
    assert set(ci.projects) == {"widgets"}


async def test_a_replayed_push_of_an_older_commit_is_stale(hook_runner: RunnerHarness) -> None:
    """The signature covers the body, not the delivery id: a captured push of commit A sent
    again with a new id must not evaluate A again nor supersede the newer B."""
    ci = hook_runner.comps.ci
    assert ci is not None
    remote = ci.ls_remote
    assert isinstance(remote, FakeRemote)
    c = hook_runner.client(None)
    old, new = "a" * 40, "b" * 40
    body_a = _push_body(old)
    assert (
        await c.post("/api/v1/hooks/github", content=body_a, headers=_headers(body_a))
    ).status_code == 202
    remote.refs["refs/heads/main"] = new
    body_b = _push_body(new)
    resp = await c.post("/api/v1/hooks/github", content=body_b, headers=_headers(body_b))
    newer = resp.json()["evaluation"]
    replayed = await c.post("/api/v1/hooks/github", content=body_a, headers=_headers(body_a))
    assert replayed.status_code == 202
    assert replayed.json()["accepted"] is False and replayed.json()["reason"].startswith("stale")
    async with hook_runner.comps.engine.connect() as conn:
        rows = {r.commit_sha: r for r in await q.fetch_evaluations(conn, "widgets", 10)}
    assert rows[new].id == newer and rows[new].state != CiEvalState.CANCELLED
    assert rows[old].state == CiEvalState.CANCELLED and rows[old].superseded_by == newer
    # A deleted branch: a push to it is stale too.
    del remote.refs["refs/heads/main"]
    again = await c.post("/api/v1/hooks/github", content=body_b, headers=_headers(body_b))
    assert again.json()["accepted"] is False and "no longer exists" in again.json()["reason"]


async def test_one_unreadable_webhook_secret_fails_no_other_project(
    make_runner: MakeRunner, tmp_path: Path
) -> None:
    secret, token = _secret_files(tmp_path)
    broken = {
        **_project("https://example.test/acme/other.git", tmp_path / "missing.secret", token),
        "name": "other",
        "repository": "acme/other",
    }
    runner = await make_runner(
        projects=[broken, _project("file:///nonexistent/widgets", secret, token)]
    )
    assert runner.comps.ci is not None
    runner.comps.ci.ls_remote = FakeRemote()
    body = _push_body()
    resp = await runner.client(None).post(
        "/api/v1/hooks/github", content=body, headers=_headers(body)
    )
    assert resp.status_code == 202, resp.text
    assert resp.json()["project"] == "widgets"


async def test_delivery_ids_are_forgotten_after_the_replay_window(
    hook_runner: RunnerHarness,
) -> None:
    ci = hook_runner.comps.ci
    assert ci is not None
    now = hook_runner.comps.scheduler.clock()
    async with hook_runner.comps.engine.begin() as conn:
        assert await q.record_delivery(conn, "old", "github", now - 8 * 86400)
        assert await q.record_delivery(conn, "new", "github", now - 60)
        assert not await q.record_delivery(conn, "new", "github", now)
    await ci._tick()  # one pass of the CI loop (prunes at its first pass)
    assert await _stored(hook_runner) == (0, 1)
