"""CI evaluation cannot read the runner's files, and an untrusted evaluation's Nix messages
reach neither the forge nor non-admin readers (docs/security.md "CI evaluation").

The attack: a fork's pull request whose flake reads a file of the runner's state directory
through ``builtins.fetchTree { type = "path"; …; narHash }`` (locked, so pure evaluation takes
it). With a wrong hash Nix's error would print the file's real hash; with the right one,
``throw (builtins.readFile …)`` would print the file."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import secrets
import threading
import uuid
from functools import partial
from pathlib import Path

import httpx
import pytest

from bigtent.config import Role
from bigtent.config.ci import EvaluationSection
from bigtent.nix.nar import dump_path
from bigtent.nix.store import BoundedEval
from bigtent.runner.ci.evaluator import Evaluator
from bigtent.runner.forge.model import EvalReport, EvalState
from bigtent.runner.forge.null import RecordingReporter
from tests.conftest import current_system, nix_children_see_our_root
from tests.e2e.ci_repo import Repo, make_repo, pr_payload
from tests.integration.runner.conftest import MakeRunner, RunnerHarness
from tests.integration.runner.test_ci_service import _headers, _push, _served, needs_nix

WRONG = "sha256-" + "A" * 43 + "="

pytestmark = [nix_children_see_our_root]


def _ended(eval_id: int, report: EvalReport) -> bool:
    return report.evaluation_id == eval_id and report.state is EvalState.EVAL_ERROR


def _sri(path: Path) -> str:
    digest = hashlib.sha256(b"".join(dump_path(path))).digest()
    return "sha256-" + base64.b64encode(digest).decode()


def _stealing_flake(secret: Path, nar_hash: str) -> str:
    system = current_system()
    return f"""{{
  outputs = {{ self }}: let
    stolen = builtins.readFile (builtins.fetchTree {{
      type = "path"; path = "{secret}"; narHash = "{nar_hash}";
    }});
  in {{
    checks.{system} = {{
      leak = derivation {{
        name = "leak"; system = "{system}"; builder = "/bin/sh";
        args = [ "-c" "echo > $out" ]; key = stolen;
      }};
      thrown = throw stolen;
    }};
  }};
}}
"""


async def _pull_request(runner: RunnerHarness, repo: Repo, number: int, sha: str) -> int:
    repo.pull_ref(number, sha)
    body = json.dumps(pr_payload(number, sha, "mallory/widgets", "CONTRIBUTOR")).encode()
    headers = {**_headers(body), "X-GitHub-Event": "pull_request"}
    async with httpx.AsyncClient(base_url=runner.url or "") as c:
        resp = await c.post("/api/v1/hooks/github", content=body, headers=headers)
    assert resp.status_code == 202, resp.text
    eval_id: int = resp.json()["evaluation"]
    return eval_id


async def _everything_shown(
    runner: RunnerHarness, recorder: RecordingReporter, eval_id: int, role: Role
) -> str:
    """Every report the forge got for the evaluation and what ``role`` reads of it."""
    client = runner.client(role)
    shown = [repr([r for r in recorder.reports if r.evaluation_id == eval_id])]
    for url in (
        f"/api/v1/evaluations/{eval_id}",
        f"/api/v1/evaluations/{eval_id}/report",
        "/api/v1/projects/widgets",
        "/api/v1/projects/widgets/evaluations?ref=refs/pull/7/head",
        f"/ci/evaluations/{eval_id}",
    ):
        resp = await client.get(url)
        assert resp.status_code == 200, (url, resp.text)
        shown.append(resp.text)
    return "\n".join(shown)


@needs_nix
async def test_a_fork_cannot_read_the_runner_s_files_nor_learn_their_hash(
    make_runner: MakeRunner, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path)
    repo.commit({"flake.nix": "{ outputs = { self }: { }; }"})
    runner, recorder = await _served(make_runner, tmp_path, repo)
    value = f"runner-signing-key:{secrets.token_hex(16)}"
    secret = runner.state_dir / "stolen.sk"
    secret.write_text(value)
    real = _sri(secret)
    hidden = (value, real, real.removeprefix("sha256-")[:20])

    def assert_hidden(text: str) -> None:
        for item in hidden:
            assert item not in text

    repo.git("checkout", "-q", "-b", "feature")
    for attempt, nar_hash in enumerate((WRONG, real)):
        sha = repo.commit({"flake.nix": _stealing_flake(secret, nar_hash)}, f"try {attempt}")
        eval_id = await _pull_request(runner, repo, 7, sha)
        ended = await recorder.wait_for(partial(_ended, eval_id), timeout=120)
        # The forge learns that it failed, and where to look: not Nix's message.
        assert "untrusted commit" in ended.error and ended.url in ended.error
        assert_hidden(await _everything_shown(runner, recorder, eval_id, Role.CLIENT))
        # An admin sees Nix's message: the file does not even exist for the evaluation.
        admin = (await runner.client(Role.ADMIN).get(f"/api/v1/evaluations/{eval_id}")).json()
        assert "No such file or directory" in admin["error"] and str(secret) in admin["error"]
        assert_hidden(admin["error"])

    # Another project's private mirror is not there either (fetchGit with a rev is locked).
    other = make_repo(tmp_path, "private")
    private = f"private-source:{secrets.token_hex(8)}"
    other_sha = other.commit({"secret.txt": private})
    mirror = runner.state_dir / "ci" / "git" / "private.git"
    other.git("clone", "-q", "--bare", str(other.path), str(mirror))
    system = current_system()
    sha = repo.commit(
        {
            "flake.nix": f"""{{ outputs = {{ self }}: {{ checks.{system}.x = throw
  (builtins.readFile ((builtins.fetchGit {{ url = "file://{mirror}"; rev = "{other_sha}"; }})
  + "/secret.txt")); }}; }}"""
        },
        "try the other project",
    )
    eval_id = await _pull_request(runner, repo, 7, sha)
    await recorder.wait_for(
        lambda r: (
            r.evaluation_id == eval_id and r.state in (EvalState.EVAL_ERROR, EvalState.FAILED)
        ),
        timeout=120,
    )
    admin_text = (await runner.client(Role.ADMIN).get(f"/api/v1/evaluations/{eval_id}")).text
    assert private not in admin_text and '"state":"eval_error"' in admin_text
    assert private not in await _everything_shown(runner, recorder, eval_id, Role.CLIENT)

    # A trusted push with the same code cannot read the file either (its message is public).
    repo.git("checkout", "-q", "main")
    sha = repo.commit({"flake.nix": _stealing_flake(secret, real)}, "trusted try")
    eval_id = await _push(runner, repo, sha)
    ended = await recorder.wait_for(
        lambda r: r.evaluation_id == eval_id and r.state is EvalState.EVAL_ERROR, timeout=120
    )
    assert "No such file or directory" in ended.error
    assert_hidden(ended.error)
    # Nothing of it entered the cache.
    for nar in runner.nar_files() if (runner.state_dir / "cache" / "nar").exists() else []:
        assert value.encode() not in nar.read_bytes()


@needs_nix
async def test_without_a_working_sandbox_only_trusted_commits_are_evaluated(
    make_runner: MakeRunner, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path)
    flake = '{ outputs = { self }: { checks.SYS.a = derivation { name = "a"; system = "SYS"; builder = "/bin/sh"; args = [ "-c" "echo > $out" ]; salt = "SALT"; }; }; }'  # noqa: E501
    flake = flake.replace("SYS", current_system()).replace("SALT", uuid.uuid4().hex)
    main = repo.commit({"flake.nix": flake})
    runner, recorder = await _served(make_runner, tmp_path, repo)
    assert runner.comps.ci is not None
    evaluator = runner.comps.ci.evaluator
    assert evaluator.isolated  # the probe at start found bwrap working
    evaluator.bwrap = str(tmp_path / "no-bwrap")
    problem = await evaluator.probe()
    assert problem is not None and "install bubblewrap" in problem
    assert evaluator.refuses_untrusted

    repo.git("checkout", "-q", "-b", "feature")
    sha = repo.commit({"flake.nix": flake.replace('"a"', '"b"')})
    refused = await _pull_request(runner, repo, 8, sha)
    await recorder.wait_for(
        lambda r: r.evaluation_id == refused and r.state is EvalState.EVAL_ERROR
    )
    admin = (await runner.client(Role.ADMIN).get(f"/api/v1/evaluations/{refused}")).json()
    assert "untrusted evaluation refused" in admin["error"] and "no-bwrap" in admin["error"]
    assert admin["build_id"] is None

    trusted = await _push(runner, repo, main)
    await recorder.wait_for(
        lambda r: r.evaluation_id == trusted and r.state is EvalState.BUILDING, timeout=120
    )


async def test_the_start_up_probe_says_why_the_sandbox_does_not_work(tmp_path: Path) -> None:
    evaluator = Evaluator(tmp_path, EvaluationSection(), {})
    evaluator.bwrap = str(tmp_path / "missing" / "bwrap")
    problem = await evaluator.probe()
    assert problem is not None and "install bubblewrap" in problem
    assert evaluator.refuses_untrusted and not evaluator.isolated
    assert evaluator.sandbox_for(tmp_path / "ci" / "git" / "p.git") is None
    unsafe = Evaluator(tmp_path, EvaluationSection(sandbox="none"), {})  # type: ignore[arg-type]
    assert await unsafe.probe() is not None and not unsafe.refuses_untrusted


@pytest.mark.skipif(not Path("/usr/bin/bwrap").exists(), reason="needs bubblewrap")
async def test_the_start_up_probe_passes_with_bubblewrap(tmp_path: Path) -> None:
    evaluator = Evaluator(tmp_path, EvaluationSection(), {})
    assert await evaluator.probe() is None
    assert evaluator.isolated and not evaluator.refuses_untrusted


@needs_nix
async def test_without_the_sandbox_the_forge_and_clients_still_learn_nothing(
    make_runner: MakeRunner, tmp_path: Path
) -> None:
    """The second defence alone: with ``sandbox = "none"`` (the admin's explicit choice) the
    file is read and Nix's message holds its real hash, which only an admin sees."""
    repo = make_repo(tmp_path)
    repo.commit({"flake.nix": "{ outputs = { self }: { }; }"})
    runner, recorder = await _served(make_runner, tmp_path, repo, sandbox="none")
    assert runner.comps.ci is not None and not runner.comps.ci.evaluator.refuses_untrusted
    secret = runner.state_dir / "stolen.sk"
    secret.write_text(f"runner-signing-key:{secrets.token_hex(16)}")
    real = _sri(secret)
    repo.git("checkout", "-q", "-b", "feature")
    sha = repo.commit({"flake.nix": _stealing_flake(secret, WRONG)})
    eval_id = await _pull_request(runner, repo, 7, sha)
    ended = await recorder.wait_for(partial(_ended, eval_id), timeout=120)
    assert "untrusted commit" in ended.error
    admin = (await runner.client(Role.ADMIN).get(f"/api/v1/evaluations/{eval_id}")).json()
    assert real in admin["error"]  # the leak the sandbox prevents, kept from everyone else:
    assert real not in await _everything_shown(runner, recorder, eval_id, Role.CLIENT)


@needs_nix
@pytest.mark.skipif(not Path("/usr/bin/bwrap").exists(), reason="needs bubblewrap")
@pytest.mark.parametrize("network", [True, False])
async def test_network_false_keeps_the_evaluation_off_the_network(
    tmp_path: Path, network: bool
) -> None:
    """SSRF: a locked fetch (a URL with a hash) makes the request even when its hash is
    wrong; without the network the request never leaves the sandbox."""
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"metadata")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        limits = EvaluationSection(network=network)
        evaluator = Evaluator(tmp_path, limits, {"download-attempts": "1"})
        mirror = tmp_path / "ci" / "git" / "p.git"
        for path in (mirror, evaluator.store_dir, evaluator.xdg_dir(mirror)):
            path.mkdir(parents=True, exist_ok=True)
        url = f"http://127.0.0.1:{server.server_port}/latest/meta-data"
        expr = f'builtins.fetchurl {{ url = "{url}"; sha256 = "{WRONG}"; }}'
        run = await BoundedEval(evaluator.store).run(
            expr,
            max_memory_bytes=2**31,
            timeout_secs=60,
            max_stdout_bytes=4096,
            sandbox=evaluator.sandbox_for(mirror),
        )
    finally:
        server.shutdown()
        thread.join()
    assert run.exit_code != 0
    assert bool(hits) is network, (hits, run.stderr)
