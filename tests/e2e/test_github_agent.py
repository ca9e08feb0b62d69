"""End to end: ``bigtent agent --ephemeral --oidc github`` as a GitHub Actions job would run it.

A real runner trusts the loopback OIDC issuer; a loopback stand-in for the Actions ID token
service mints that issuer's tokens for the job. The agent process fetches its token itself,
registers as an ephemeral OIDC agent with its launch id, builds one real derivation, uploads
it with the same kind of credential, and exits 0 (``--max-builds 1``). No token appears in any
process's output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.conftest import current_system
from tests.e2e.conftest import HOST_TOOLS, Farm, Proc, _toml_list
from tests.github_actions import REPOSITORY, ActionsTokenEndpoint, running_endpoint
from tests.integration.runner.oidc_issuer import (
    LocalIssuer,
    SigningKey,
    TlsFiles,
)

pytestmark = [pytest.mark.e2e, pytest.mark.nix]

EXIT_TIMEOUT_SECS = 120
LAUNCH_ID = "gha-x86_64-linux-000017"


@pytest.fixture
def endpoint(issuer: LocalIssuer, key: SigningKey) -> Iterator[ActionsTokenEndpoint]:
    yield from running_endpoint(issuer, key)


def oidc_runner_config(issuer: LocalIssuer, tls: TlsFiles) -> str:
    return f"""
[[auth.oidc]]
issuer = "{issuer.url}"
audiences = ["bigtent"]
ca_file = "{tls.ca_file}"
repositories = ["{REPOSITORY}"]
subject_prefixes = ["repo:{REPOSITORY}:ref:refs/heads/"]
"""


def start_github_agent(farm: Farm, endpoint: ActionsTokenEndpoint, *args: str) -> Proc:
    """The agent as the workflow runs it: no token, the job's variables, flags only."""
    work = farm.root / "agents" / "gha"
    work.mkdir(parents=True)
    cfg = work / "agent.toml"
    cfg.write_text(
        f"""
[agent]
store = "local?root={work / "root"}"
work_dir = "{work}"
sandbox_paths = {_toml_list(HOST_TOOLS)}
"""
    )
    env = farm.env(GITHUB_RUN_ID="4242", GITHUB_RUN_ATTEMPT="1", **endpoint.env())
    del env["BIGTENT_AGENT_TOKEN"]
    return farm._spawn(
        "agent-gha",
        ["-v", "agent", "--config", str(cfg), "--runner-url", farm.url, "--name", "gha", *args],
        env,
    )


def _agents(farm: Farm) -> list[dict[str, Any]]:
    with farm.api() as c:
        agents: list[dict[str, Any]] = c.get("/api/v1/agents").json()["agents"]
    return agents


def test_an_oidc_agent_registers_with_its_launch_id_builds_and_exits(
    farm_factory: Callable[..., Farm],
    issuer: LocalIssuer,
    tls: TlsFiles,
    endpoint: ActionsTokenEndpoint,
) -> None:
    farm = farm_factory(runner_extra=oidc_runner_config(issuer, tls))
    system = current_system()
    dag = farm.dag_file(layers=1, width=1)
    build = farm._spawn(
        "build",
        # OIDC agents serve only their repositories' builds.
        [
            *("build", str(dag), "-A", "nodes.dag-0-0", "--no-download", "--json"),
            *("--repository", REPOSITORY, "--ref", "refs/heads/main"),
        ],
        farm.env(),
    )
    agent = start_github_agent(
        farm,
        endpoint,
        "--ephemeral",
        "--oidc",
        "github",
        "--audience",
        "bigtent",
        "--launch-id",
        LAUNCH_ID,
        "--max-builds",
        "1",
        # Lists arrive from workflow inputs as comma-separated strings.
        "--system",
        f" {system}, ",
        "--supported-feature",
        "big-parallel, ,benchmark",
    )
    assert agent.popen.wait(EXIT_TIMEOUT_SECS) == 0, farm.logs()
    assert build.popen.wait(EXIT_TIMEOUT_SECS) == 0, farm.logs()

    # The job's token was asked for once, for the audience, with the job's request token
    # (the upload reused it: five minutes are left).
    assert endpoint.requests == 1 and endpoint.audiences == ["bigtent"]
    assert endpoint.state.refused == 0

    [row] = _agents(farm)
    assert row["name"].startswith("gha-gh4242.1-"), row
    assert row["ephemeral"] is True and row["auth_kind"] == "oidc"
    assert row["launch_id"] == LAUNCH_ID
    assert row["oidc"]["repository"] == REPOSITORY
    assert row["systems"] == [system]
    assert row["supported_features"] == ["benchmark", "big-parallel"]
    with farm.api() as c:
        build_id = c.get("/api/v1/builds").json()["builds"][0]["id"]
        steps = c.get(f"/api/v1/builds/{build_id}/steps").json()["steps"]
    assert [(s["state"], s["agent_name"]) for s in steps] == [("succeeded", row["name"])]

    shown = farm.bigtent("agents", check=True, columns=250).stdout  # no cell folded
    assert LAUNCH_ID in shown and "oidc:acme/widgets" in shown
    agent_log = agent.log.read_text()
    assert "reached max_builds (1)" in agent_log
    everything = agent_log + farm.logs() + shown
    for secret in (*endpoint.issued, endpoint.request_token):
        assert secret not in everything


def test_without_id_token_permission_the_agent_exits_2_with_a_clear_message(
    farm_factory: Callable[..., Farm], issuer: LocalIssuer, tls: TlsFiles
) -> None:
    farm = farm_factory(runner_extra=oidc_runner_config(issuer, tls))
    work = farm.root / "noperm"
    env = farm.env()
    del env["BIGTENT_AGENT_TOKEN"]
    proc = farm._spawn(
        "agent-noperm",
        ["agent", "--work-dir", str(work), "--oidc", "github", "--audience", "bigtent"],
        env,
    )
    assert proc.popen.wait(60) == 2
    out = proc.log.read_text()
    assert out.startswith("Error: --oidc github needs ACTIONS_ID_TOKEN_REQUEST_URL"), out
    assert "permissions: id-token: write" in out and "Traceback" not in out
    assert _agents(farm) == []
