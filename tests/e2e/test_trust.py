"""End to end, real Nix (architecture §6): an untrusted build runs only on an untrusted agent
while a trusted one idles, its outputs are served by the untrusted cache, not the main one, and
`bigtent build` fetches them with a real Nix trusting the untrusted key; a later trusted build
of the same derivations builds them again on the trusted agent, into the main cache."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bigtent.nix.store_path import StorePath
from tests.conftest import wait_until
from tests.e2e.conftest import Farm
from tests.integration.runner.oidc_issuer import (
    LocalIssuer,
    SigningKey,
    TlsFiles,
    make_tls,
    mint,
    running_issuer,
)

pytestmark = [pytest.mark.e2e, pytest.mark.nix]


def _steps(farm: Farm, build_id: int) -> list[dict[str, Any]]:
    with farm.api() as c:
        steps: list[dict[str, Any]] = c.get(f"/api/v1/builds/{build_id}/steps").json()["steps"]
    return steps


def _narinfo_status(farm: Farm, prefix: str, path: str) -> int:
    hash_part = StorePath.parse(path).hash_part
    return httpx.get(f"{farm.url}{prefix}/{hash_part}.narinfo", timeout=10).status_code


def test_untrusted_builds_stay_on_untrusted_agents_and_out_of_the_main_cache(
    farm_factory: Callable[..., Farm],
) -> None:
    farm = farm_factory()
    farm.start_agent("trusted", max_jobs=2)
    farm.start_agent("untrusted", max_jobs=2, extra_args=["--untrusted"])
    dag = farm.dag_file(layers=2, width=2, fanIn=2)

    # A pull request ref makes even the trusted client's build untrusted.
    code, out = farm.build_json(
        str(dag), "-A", "top", "--repository", "acme/widgets", "--ref", "refs/pull/7/merge"
    )
    assert code == 0, out
    assert (out["trusted"], out["repository"], out["ref"]) == (
        False,
        "acme/widgets",
        "refs/pull/7/merge",
    )
    steps = _steps(farm, out["build_id"])
    assert len(steps) == 5
    assert {s["agent_name"] for s in steps} == {"untrusted"}  # the trusted agent idled
    assert {s["trusted"] for s in steps} == {False}
    outputs = [p for s in steps for p in s["outputs"].values()]
    for path in outputs:
        assert _narinfo_status(farm, "/cache", path) == 404, path
        assert _narinfo_status(farm, "/cache/untrusted", path) == 200, path
    # `bigtent build` fetched the result through Nix from the untrusted cache, under its key.
    result = farm.root / "result"
    assert result.is_symlink() and result.read_text().startswith("top-0 ")

    # The same derivations, trusted: built again, on the trusted agent, into the main cache.
    (result).unlink()
    code, again = farm.build_json(str(dag), "-A", "top", "--repository", "acme/widgets")
    assert code == 0, again
    assert again["trusted"] is True
    trusted_steps = _steps(farm, again["build_id"])
    assert {s["drv_path"] for s in trusted_steps} == {s["drv_path"] for s in steps}
    assert {s["agent_name"] for s in trusted_steps} == {"trusted"}
    assert {s["trusted"] for s in trusted_steps} == {True}
    for path in outputs:
        assert _narinfo_status(farm, "/cache", path) == 200, path
    assert result.is_symlink()

    # An untrusted client token: untrusted whatever it asks; `builds` shows the trust.
    with farm.api() as c:
        resp = c.post("/api/v1/tokens", json={"role": "client", "name": "pr-bot"})
    assert resp.status_code == 201, resp.text
    code, third = farm.build_json(
        str(dag), "-A", "top", "--no-download", token=resp.json()["token"]
    )
    assert code == 0, third
    assert third["trusted"] is False
    assert _steps(farm, third["build_id"]) == []  # all built already
    listing = json.loads(farm.bigtent("builds", "--json", check=True).stdout)
    trust = {b["id"]: (b["trusted"], b["ref"]) for b in listing}
    assert trust[out["build_id"]] == (False, "refs/pull/7/merge")
    assert trust[again["build_id"]] == (True, None)


# ---- an OIDC agent, a real agent process presenting a CI job's ID token ----------------------
REPO = "acme/widgets"


@pytest.fixture
def issuer(tmp_path: Path) -> Iterator[tuple[LocalIssuer, SigningKey, TlsFiles]]:
    (tmp_path / "tls").mkdir()
    tls = make_tls(tmp_path / "tls")
    key = SigningKey.generate("e2e-key")
    for issuer in running_issuer(tls, [key]):
        yield issuer, key, tls


def _job_token(issuer: LocalIssuer, key: SigningKey) -> str:
    now = int(time.time())
    return mint(
        key,
        {
            "iss": issuer.url,
            "aud": "bigtent",
            "sub": f"repo:{REPO}:pull_request",
            "repository": REPO,
            "ref": "refs/pull/7/merge",
            "iat": now,
            "nbf": now,
            "exp": now + 900,
        },
    )


def test_an_oidc_agent_for_pull_requests_builds_only_untrusted_builds_of_its_repository(
    farm_factory: Callable[..., Farm], issuer: tuple[LocalIssuer, SigningKey, TlsFiles]
) -> None:
    iss, key, tls = issuer
    farm = farm_factory(
        runner_extra=f"""
[[auth.oidc]]
issuer = "{iss.url}"
audiences = ["bigtent"]
ca_file = "{tls.ca_file}"
repositories = ["{REPO}"]
allow_untrusted = true
"""
    )
    farm.start_agent("trusted", max_jobs=2)
    farm.start_agent("ci", max_jobs=2, token=_job_token(iss, key))
    with farm.api() as c:
        agents = {a["name"]: a for a in c.get("/api/v1/agents").json()["agents"]}
    assert agents["ci"]["auth_kind"] == "oidc"
    assert (agents["ci"]["trusted"], agents["ci"]["build_repositories"]) == (False, [REPO])
    assert agents["trusted"]["trusted"] is True

    # An untrusted build of another repository: nobody may take it; it waits (in the
    # background) while the rest runs.
    waiting = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bigtent",
            "build",
            str(farm.dag_file(layers=1, width=2)),
            "-A",
            "top",
            "--no-download",
            "--repository",
            "evil/corp",
            "--ref",
            "refs/pull/9/merge",
        ],
        env=farm.env(),
        cwd=farm.root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        waiting_id = _wait_for_build(farm, "evil/corp")
        # Its own repository's pull request: built by the OIDC agent only, into the untrusted
        # cache; the idle trusted agent gets none of it.
        code, out = farm.build_json(
            str(farm.dag_file(layers=2, width=2)),
            "-A",
            "top",
            "--repository",
            REPO,
            "--ref",
            "refs/pull/7/merge",
        )
        assert code == 0, out
        assert out["trusted"] is False
        steps = _steps(farm, out["build_id"])
        assert {s["agent_name"] for s in steps} == {"ci"}
        for path in (p for s in steps for p in s["outputs"].values()):
            assert _narinfo_status(farm, "/cache", path) == 404, path
            assert _narinfo_status(farm, "/cache/untrusted", path) == 200, path
        # A trusted build of its repository goes to the trusted agent, never to it.
        code, main = farm.build_json(
            str(farm.dag_file(layers=1, width=2)),
            "-A",
            "top",
            "--no-download",
            "--repository",
            REPO,
            "--ref",
            "refs/heads/main",
        )
        assert code == 0, main
        assert main["trusted"] is True
        assert {s["agent_name"] for s in _steps(farm, main["build_id"])} == {"trusted"}
        # All that time the other repository's build waited, untouched.
        with farm.api() as c:
            assert c.get(f"/api/v1/builds/{waiting_id}").json()["state"] == "queued"
        assert all(s["agent_name"] is None for s in _steps(farm, int(waiting_id)))
        farm.bigtent("cancel", str(waiting_id), check=True)
        assert waiting.wait(60) != 0
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait(10)


def _wait_for_build(farm: Farm, repository: str) -> str:
    found: list[str] = []

    def created() -> bool:
        with farm.api() as c:
            builds = c.get("/api/v1/builds").json()["builds"]
        found[:] = [str(b["id"]) for b in builds if b["repository"] == repository]
        return bool(found)

    wait_until(created, timeout=120, what=f"a build of {repository}")
    return found[0]
