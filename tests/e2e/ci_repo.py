"""A real git repository holding a flake (or a Nix file) for the CI tests, and signed webhook
deliveries for it."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from tests.conftest import current_system, wait_until

if TYPE_CHECKING:
    from tests.e2e.conftest import Farm

FINAL = ("succeeded", "failed", "eval_error", "cancelled")
"""The states an evaluation ends in."""

GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.test",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.test",
}


def checks_flake(jobs: dict[str, str], salt: str, extra: str = "") -> str:
    """A flake without inputs whose ``checks.<system>`` has one job per (name, shell command);
    a command ``THROW`` makes the job throw at evaluation."""
    system = current_system()
    lines = []
    for name, cmd in jobs.items():
        if cmd == "THROW":
            lines.append(f'      {name} = throw "job {name} is broken";')
        else:
            lines.append(f"      {name} = mk {json.dumps(name)} {json.dumps(cmd)};")
    body = "\n".join(lines)
    return f"""{{
  outputs = {{ self }}: let
    mk = name: cmd: derivation {{
      inherit name; system = "{system}"; builder = "/bin/sh"; PATH = "/usr/bin:/bin";
      salt = "{salt}"; args = [ "-c" cmd ];
    }};
  in {{
    checks.{system} = {{
{body}
    }};
{extra}
  }};
}}
"""


def file_jobs(jobs: dict[str, str], salt: str) -> str:
    """A plain Nix file (no flake) whose ``ci`` attribute holds the jobs."""
    system = current_system()
    lines = "\n".join(
        f"    {name} = mk {json.dumps(name)} {json.dumps(cmd)};" for name, cmd in jobs.items()
    )
    return f"""{{ }}: let
  mk = name: cmd: derivation {{
    inherit name; system = "{system}"; builder = "/bin/sh"; PATH = "/usr/bin:/bin";
    salt = "{salt}"; args = [ "-c" cmd ];
  }};
in {{
  ci = {{
{lines}
  }};
}}
"""


@dataclass
class Repo:
    path: Path

    def git(self, *args: str) -> str:
        out = subprocess.run(
            ["git", *args],
            cwd=self.path,
            env={**GIT_ENV, "PATH": "/usr/bin:/bin", "HOME": str(self.path.parent)},
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()

    @property
    def url(self) -> str:
        return f"file://{self.path}"

    def commit(self, files: dict[str, str], message: str = "change", amend: bool = False) -> str:
        for name, text in files.items():
            (self.path / name).write_text(text)
        self.git("add", "-A")
        self.git("commit", "-q", "--amend" if amend else "--no-amend", "-m", message)
        return self.git("rev-parse", "HEAD")

    def pull_ref(self, number: int, sha: str) -> None:
        """What a forge keeps for a pull request: ``refs/pull/N/head``."""
        self.git("update-ref", f"refs/pull/{number}/head", sha)


@contextlib.contextmanager
def git_daemon(repo: Repo, port: int) -> Iterator[str]:
    """Serve ``repo`` read-only over ``git://127.0.0.1:PORT/`` (projects added through the
    API may not clone ``file://`` URLs); yields its URL once ``git ls-remote`` answers."""
    proc = subprocess.Popen(
        [
            "git",
            "daemon",
            "--reuseaddr",
            "--export-all",
            "--listen=127.0.0.1",
            f"--port={port}",
            f"--base-path={repo.path.parent}",
            str(repo.path.parent),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"git://127.0.0.1:{port}/{repo.path.name}"

    def answers() -> bool:
        check = subprocess.run(["git", "ls-remote", url], capture_output=True, check=False)
        return check.returncode == 0

    try:
        wait_until(answers, timeout=30, what=f"git daemon at {url}")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def make_repo(root: Path, name: str = "widgets") -> Repo:
    path = root / f"{name}-{uuid.uuid4().hex[:6]}"
    path.mkdir(parents=True)
    repo = Repo(path)
    repo.git("init", "-q", "-b", "main")
    return repo


def push_payload(repo: Repo, sha: str, ref: str = "refs/heads/main", **kw: Any) -> dict[str, Any]:
    return {
        "ref": ref,
        "after": sha,
        "repository": {
            "full_name": "acme/widgets",
            "clone_url": repo.url,
            "default_branch": "main",
        },
        **kw,
    }


def pr_payload(number: int, sha: str, head_repo: str, association: str) -> dict[str, Any]:
    return {
        "action": "synchronize",
        "number": number,
        "pull_request": {
            "number": number,
            "head": {"sha": sha, "ref": "feature", "repo": {"full_name": head_repo}},
            "base": {"ref": "main", "repo": {"full_name": "acme/widgets"}},
            "author_association": association,
        },
        "repository": {"full_name": "acme/widgets", "default_branch": "main"},
    }


def deliver(
    url: str,
    event: str,
    payload: dict[str, Any] | bytes,
    secret: bytes,
    *,
    delivery: str | None = None,
    forge: str = "github",
    signature: str | None = None,
    body: bytes | None = None,
) -> httpx.Response:
    """POST a webhook the way the forge does: HMAC-SHA256 of the raw body under ``secret``
    (``signature`` overrides it; ``body`` replaces the body after signing)."""
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    digest = hmac.new(secret, raw, hashlib.sha256).hexdigest()
    delivery = delivery or uuid.uuid4().hex
    if forge == "github":
        headers = {
            "X-GitHub-Event": event,
            "X-GitHub-Delivery": delivery,
            "X-Hub-Signature-256": signature if signature is not None else f"sha256={digest}",
        }
    else:
        headers = {
            "X-Forgejo-Event": event,
            "X-Forgejo-Delivery": delivery,
            "X-Forgejo-Signature": signature if signature is not None else digest,
        }
    headers = {k: v for k, v in headers.items() if v}
    headers["Content-Type"] = "application/json"
    return httpx.post(
        f"{url}/api/v1/hooks/{forge}", content=body if body is not None else raw, headers=headers
    )


def project_toml(name: str, repo: Repo, secret_file: Path, **extra: Any) -> str:
    lines = [
        "[[projects]]",
        f'name = "{name}"',
        f'url = "{repo.url}"',
        'repository = "acme/widgets"',
        f'webhook_secret_file = "{secret_file}"',
        f'systems = ["{current_system()}"]',
    ]
    for k, v in extra.items():
        lines.append(f"{k} = {json.dumps(v)}")
    return "\n".join(lines) + "\n"


def evaluation(farm: Farm, eval_id: int) -> dict[str, Any]:
    """``GET /api/v1/evaluations/{id}`` of the farm's runner."""
    with farm.api() as c:
        resp = c.get(f"/api/v1/evaluations/{eval_id}")
        resp.raise_for_status()
        data: dict[str, Any] = resp.json()
        return data


def wait_final(farm: Farm, eval_id: int, timeout: float = 120) -> dict[str, Any]:
    """The evaluation once it has ended (bounded wait)."""
    found: dict[str, Any] = {}

    def done() -> bool:
        found.update(evaluation(farm, eval_id))
        return found["state"] in FINAL

    wait_until(done, timeout=timeout, what=f"evaluation {eval_id} to end")
    return found
