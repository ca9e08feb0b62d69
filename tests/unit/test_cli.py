"""The command line: parsing, help, error rendering and exit codes; plus `bigtent up`'s pure parts.

Commands run through ``bigtent.cli.main`` (the real entry point) inside click's CliRunner, with
the runner answered by an httpx.MockTransport.
"""

from __future__ import annotations

import json
import os
import shlex
import stat
import sys
import tomllib
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import httpx
import pytest

from bigtent import cli as cli_module
from bigtent.agent.credentials import (
    CredentialSource,
    GithubActionsToken,
    StaticToken,
    TokenFile,
)
from bigtent.client.api import RunnerClient
from bigtent.config import AgentConfig, Role, load_agent_config, load_runner_config
from bigtent.errors import BigtentError
from bigtent.nix.keys import parse_public_key, parse_secret_key
from bigtent.runner.auth.tokens import token_digest
from bigtent.up import (
    Layout,
    UpSettings,
    host_sandbox_paths,
    key_name,
    prepare_state,
    render_agent_config,
    render_env,
    render_runner_config,
    restart_delay_secs,
)
from tests.unit.cli_helpers import WIDE, parse_table, run_cli


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith(("BIGTENT_", "NIX_")):
            monkeypatch.delenv(key)


run = run_cli


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, cmd in group.commands.items():
        yield (*prefix, name)
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*prefix, name))


ALL_COMMANDS = sorted(_commands(cli_module.cli))


def test_every_design_command_exists() -> None:
    names = {" ".join(c) for c in ALL_COMMANDS}
    assert names >= {
        "up",
        "runner",
        "agent",
        "build",
        "status",
        "agents",
        "builds",
        "log",
        "cancel",
        "bump",
        "restart",
        "agents drain",
        "token create",
        "keys generate",
        "db migrate",
        "db status",
    }


@pytest.mark.parametrize("command", [(), *ALL_COMMANDS], ids=lambda c: " ".join(c) or "bigtent")
def test_help(command: tuple[str, ...]) -> None:
    result = run([*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: bigtent" in result.stdout


def test_version() -> None:
    result = run(["--version"])
    assert result.exit_code == 0 and "0.1.0" in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["status", "--bogus"],
        ["build", "--priority", "high"],
        ["nope"],
        ["token", "create"],
        ["token", "create", "--role", "king"],
        ["up", "--agents", "-1"],
        ["log"],
    ],
)
def test_bad_arguments_are_clean_usage_errors(args: list[str]) -> None:
    result = run(args)
    assert result.exit_code == 2
    assert "Error:" in result.stderr
    assert "Traceback" not in result.output


def test_design_flags_are_present() -> None:
    def opts(name: str) -> set[str]:
        cmd = cli_module.cli.commands[name]
        return {o for p in cmd.params for o in getattr(p, "opts", [])}

    assert opts("agent") >= {
        "--config",
        "--runner-url",
        "--name",
        "--system",
        "--supported-feature",
        "--mandatory-feature",
        "--max-jobs",
        "--speed-factor",
        "--store",
        "--work-dir",
        "--token-file",
        "--sandbox-path",
        "--ca-file",
        "--ephemeral",
        "--max-builds",
        "--max-idle-secs",
        "--max-lifetime-secs",
        "--oidc",
        "--audience",
        "--launch-id",
        "--untrusted",
    }
    assert opts("build") >= {
        "-A",
        "--attr",
        "--drv",
        "--runner",
        "--token-file",
        "--priority",
        "--no-download",
        "--out-link",
        "--json",
        "--repository",
        "--ref",
        "--untrusted",
    }
    assert opts("up") >= {"--agents", "--state-dir", "--port", "--jobs", "--host-tools"}


# ---- client commands against a fake runner ---------------------------------------------------

BUILD: dict[str, Any] = {
    "id": 12,
    "state": "running",
    "priority": 10,
    "created_at": "2024-05-01T10:00:00Z",
    "roots": [
        {
            "drv_path": "/nix/store/aaaa-hello.drv",
            "outputs": {"out": "/nix/store/o-hello"},
            "step_id": 4,
            "state": "building",
        }
    ],
    "counts": {"total": 3, "succeeded": 1, "running": 1, "waiting": 1},
}
DONE = {"state": "succeeded"}
AGENT = {
    "machine_id": "m1",
    "name": "build-01",
    "systems": ["x86_64-linux"],
    "supported_features": ["kvm"],
    "mandatory_features": ["big"],
    "max_jobs": 4,
    "running": 1,
    "speed_factor": 2.0,
    "ephemeral": False,
    "auth_kind": "token",
    "connected": True,
}
STATUS = {
    "version": "0.1.0",
    "cache_url": "http://r/cache",
    "cache_public_key": "bt-1:abc",
    "steps": {"running": 1, "waiting": 2},
    "agents_connected": 1,
    "builds_active": 1,
}


@pytest.fixture
def fake_runner(monkeypatch: pytest.MonkeyPatch) -> list[httpx.Request]:
    """Route the CLI's RunnerClient to an in-process handler; returns the requests seen."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        routes: dict[str, Any] = {
            "/api/v1/status": STATUS,
            "/api/v1/agents": {"agents": [AGENT]},
            "/api/v1/builds": {"builds": [BUILD]},
            "/api/v1/builds/12/cancel": {**BUILD, "state": "cancelled"},
            "/api/v1/builds/12/bump": {**BUILD, "priority": 20},
            "/api/v1/builds/12/restart": {**BUILD, "state": "queued"},
            "/api/v1/agents/build-01/drain": {"drained": "build-01"},
        }
        if request.url.path == "/api/v1/steps/4/log":
            return httpx.Response(200, text="building\ndone\n")
        if request.url.path == "/api/v1/steps/4":
            return httpx.Response(200, json={"id": 4, "drv_path": "/nix/store/a-x.drv", **DONE})
        if request.url.path.startswith("/api/v1/builds/404"):
            return httpx.Response(404, json={"error": "no build 404"})
        if request.headers.get("authorization") == "Bearer wrong":
            return httpx.Response(401, json={"error": "invalid token"})
        return httpx.Response(200, json=routes[request.url.path])

    real = cli_module._make_client

    def make(runner_url: str, token_file: Path | None, ca_file: Path | None) -> RunnerClient:
        client = real(runner_url, token_file, ca_file)
        token = client._http.headers.get("authorization", "").removeprefix("Bearer ") or None
        return RunnerClient(
            runner_url,
            token=token,
            transport=httpx.MockTransport(handler),
            token_source=client.token_source,
        )

    monkeypatch.setattr(cli_module, "_make_client", make)
    return seen


def test_status_table_and_json(fake_runner: list[httpx.Request]) -> None:
    result = run(["status"], env={"BIGTENT_URL": "http://r:9", "BIGTENT_TOKEN": "t0k"})
    assert result.exit_code == 0, result.output
    assert "bt-1:abc" in result.stdout and "waiting 2" in result.stdout
    assert str(fake_runner[0].url).startswith("http://r:9/api/v1/status")
    assert fake_runner[0].headers["authorization"] == "Bearer t0k"
    result = run(["status", "--json"])
    assert json.loads(result.stdout)["cache_public_key"] == "bt-1:abc"


def test_token_file_wins_over_env(fake_runner: list[httpx.Request], tmp_path: Path) -> None:
    (tmp_path / "tok").write_text("from-file\n")
    result = run(["agents", "--token-file", str(tmp_path / "tok")], env={"BIGTENT_TOKEN": "env"})
    assert result.exit_code == 0, result.output
    assert fake_runner[0].headers["authorization"] == "Bearer from-file"
    assert "build-01" in result.stdout and "big!" in result.stdout


def test_unreadable_token_file_is_a_config_error(tmp_path: Path) -> None:
    result = run(["status", "--token-file", str(tmp_path / "none")])
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: cannot read token file")


def test_auth_error_exit_code(fake_runner: list[httpx.Request]) -> None:
    result = run(["builds", "--runner", "http://r:9"], env={"BIGTENT_TOKEN": "wrong"})
    assert result.exit_code == 3
    assert result.stderr == (
        "Error: the runner at http://r:9 refused the token from BIGTENT_TOKEN (invalid token): "
        "give a valid token in BIGTENT_TOKEN or with --token-file FILE\n"
    )


def test_token_file_help_does_not_claim_the_environment_as_its_default() -> None:
    text = " ".join(run(["status", "--help"]).stdout.split())
    assert "[default: $BIGTENT_TOKEN]" not in text
    assert "File holding the client token (without it: the token in BIGTENT_TOKEN" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["log", "abc"], "Error: step id must be a positive number (got 'abc')"),
        (["cancel", "x1"], "Error: build id must be a positive number (got 'x1')"),
        (
            ["build", "--priority", "5000", "--drv", "/nix/store/aaaa-hello.drv"],
            "Invalid value for '--priority': 5000 is not in the range -1000<=x<=1000",
        ),
        (["bump", "12", "--priority", "-1001"], "is not in the range -1000<=x<=1000"),
        (
            ["build", "--repository", "a b", "--drv", "/nix/store/aaaa-hello.drv"],
            "Error: --repository must have no whitespace or '*' (got 'a b')",
        ),
        (["status", "--ca-file", "/nonexistent/ca.pem"], "Error: cannot load CA file"),
        (["build", "-E", "1", "x.nix"], "Error: -E takes the place of a Nix file"),
        (["build", ".#a", "-A", "b"], "name a flake's attribute in the installable"),
        (["build", ".#a", "--argstr", "x", "1"], "not to a flake"),
    ],
)
def test_usage_errors_exit_2_before_anything_is_sent(
    fake_runner: list[httpx.Request], args: list[str], message: str
) -> None:
    result = run(args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert fake_runner == []


def test_builds_cancel_bump_log(fake_runner: list[httpx.Request]) -> None:
    result = run(["builds", "--limit", "5"])
    assert result.exit_code == 0 and "hello" in result.stdout and "1/3" in result.stdout
    assert run(["builds", "--json"]).stdout.count('"id": "12"') == 1
    result = run(["cancel", "12"])
    assert result.exit_code == 0 and "cancelled" in result.stdout
    result = run(["bump", "12", "--priority", "20"])
    assert "priority 20" in result.stdout
    assert json.loads(fake_runner[-1].content) == {"priority": 20}
    result = run(["log", "4"])
    assert result.stdout == "building\ndone\n"


EPHEMERAL_AGENT = {
    **AGENT,
    "machine_id": "m2",
    "name": "gha-x86-123.1-0a1b2c3d",
    "ephemeral": True,
    "connected": False,
    "running": 0,
    "max_jobs": 2,
    "last_seen": "2024-05-01T10:00:00+00:00",
    "backoff_until": "2024-05-01T10:05:00+00:00",
    "consecutive_failures": 2,
}


OIDC_IDENTITY = {
    "issuer": "https://token.actions.githubusercontent.com",
    "repository": "acme/widgets",
    "subject": "repo:acme/widgets:ref:refs/heads/main",
    "workflow_ref": "acme/widgets/.github/workflows/agents.yml@refs/heads/main",
    "ref": "refs/heads/main",
}
OIDC_AGENT = {
    **AGENT,
    "machine_id": "m3",
    "name": "gha-oidc-7.1-0c0ffee0",
    "ephemeral": True,
    "auth_kind": "oidc",
    "oidc": OIDC_IDENTITY,
}


def test_agents_auth_column_names_the_oidc_repository(monkeypatch: pytest.MonkeyPatch) -> None:
    routes = {"agents": [AGENT, OIDC_AGENT]}
    monkeypatch.setattr(
        cli_module, "_make_client", _fixed_client(cli_module._make_client, "/api/v1/agents", routes)
    )
    result = run(["agents"], env=WIDE)
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in parse_table(result.stdout)}
    oidc = rows["gha-oidc-7.1-0c0ffee0"]
    assert oidc["auth"] == "oidc:acme/widgets" and oidc["kind"] == "ephemeral"
    assert rows["build-01"]["auth"] == "token"

    data = json.loads(run(["agents", "--json"]).stdout)
    assert data[0]["auth_kind"] == "token" and data[0]["oidc"] is None
    assert data[1]["auth_kind"] == "oidc" and data[1]["oidc"] == OIDC_IDENTITY


def test_agents_shows_the_launch_id(monkeypatch: pytest.MonkeyPatch) -> None:
    launched = {**OIDC_AGENT, "launch_id": "gha-x86-00042"}
    routes = {"agents": [AGENT, launched]}
    monkeypatch.setattr(
        cli_module, "_make_client", _fixed_client(cli_module._make_client, "/api/v1/agents", routes)
    )
    result = run(["agents"], env=WIDE)
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in parse_table(result.stdout)}
    assert rows["gha-oidc-7.1-0c0ffee0"]["launch"] == "gha-x86-00042"
    assert rows["build-01"]["launch"] == "-"
    data = json.loads(run(["agents", "--json"]).stdout)
    assert [a["launch_id"] for a in data] == [None, "gha-x86-00042"]


def test_agents_table_shows_kind_auth_connection_jobs_and_backoff(
    fake_runner: list[httpx.Request], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(AGENT, "last_seen", "2024-05-01T11:00:00+00:00")
    routes = {"agents": [AGENT, EPHEMERAL_AGENT]}
    monkeypatch.setattr(
        cli_module, "_make_client", _fixed_client(cli_module._make_client, "/api/v1/agents", routes)
    )
    result = run(["agents"], env=WIDE)
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in parse_table(result.stdout)}
    persistent = rows["build-01"]
    assert persistent["kind"] == "persistent" and persistent["auth"] == "token"
    assert persistent["connected"] == "yes" and persistent["jobs"] == "1/4"
    assert persistent["last seen"] == "2024-05-01 11:00"  # long ago: the date, to the minute
    ephemeral = rows["gha-x86-123.1-0a1b2c3d"]
    assert ephemeral["kind"] == "ephemeral" and ephemeral["connected"] == "no"
    assert ephemeral["jobs"] == "0/2"
    assert ephemeral["backoff"] == "until 2024-05-01 10:05 (2 failures)"

    result = run(["agents", "--json"])
    data = json.loads(result.stdout)
    assert [a["name"] for a in data] == ["build-01", "gha-x86-123.1-0a1b2c3d"]
    assert data[1]["ephemeral"] is True and data[1]["backoff_until"].startswith("2024")
    assert data[0]["auth_kind"] == "token" and data[0]["backoff_until"] is None


def _fixed_client(real: Any, path: str, body: Any) -> Any:
    """A ``_make_client`` whose runner answers ``path`` with ``body``."""

    def make(runner_url: str, token_file: Path | None, ca_file: Path | None) -> RunnerClient:
        def handler(request: httpx.Request) -> httpx.Response:
            assert request.url.path == path
            return httpx.Response(200, json=body)

        return RunnerClient(runner_url, transport=httpx.MockTransport(handler))

    return make


def test_agents_drain(fake_runner: list[httpx.Request]) -> None:
    result = run(["agents", "drain", "build-01"], env={"BIGTENT_TOKEN": "admin"})
    assert result.exit_code == 0, result.output
    assert result.stdout == "agent build-01 is draining\n"
    request = fake_runner[-1]
    assert (request.method, request.url.path) == ("POST", "/api/v1/agents/build-01/drain")
    assert request.headers["authorization"] == "Bearer admin"
    result = run(["agents", "drain", "build-01", "--json"])
    assert json.loads(result.stdout) == {"drained": "build-01"}
    assert run(["agents", "drain"]).exit_code == 2  # NAME is required


def test_agents_drain_forbidden_for_a_client_token(monkeypatch: pytest.MonkeyPatch) -> None:
    def make(runner_url: str, token_file: Path | None, ca_file: Path | None) -> RunnerClient:
        def handler(request: httpx.Request) -> httpx.Response:
            return httpx.Response(403, json={"error": "token role client may not do this"})

        return RunnerClient(runner_url, transport=httpx.MockTransport(handler))

    monkeypatch.setattr(cli_module, "_make_client", make)
    result = run(["agents", "drain", "build-01"])
    assert result.exit_code == 3, result.output
    assert result.stderr == "Error: token role client may not do this\n"


def test_restart(fake_runner: list[httpx.Request]) -> None:
    result = run(["restart", "12"])
    assert result.exit_code == 0, result.output
    assert "build 12: queued" in result.stdout
    request = fake_runner[-1]
    assert (request.method, request.url.path) == ("POST", "/api/v1/builds/12/restart")
    result = run(["restart", "12", "--json"])
    assert json.loads(result.stdout)["state"] == "queued"
    result = run(["restart", "404"])
    assert result.exit_code == 1 and result.stderr == "Error: no build 404\n"


def test_not_found(fake_runner: list[httpx.Request]) -> None:
    result = run(["cancel", "404", "--json"])
    assert result.exit_code == 1 and result.stderr == "Error: no build 404\n"


def test_unreachable_runner_is_one_line_error() -> None:
    # A URL nobody can connect to (port 1 on loopback is closed).
    result = run(["status", "--runner", "http://127.0.0.1:1"])
    assert result.exit_code == 4
    assert result.stderr.startswith("Error: cannot reach runner at http://127.0.0.1:1")
    assert "Traceback" not in result.output


# ---- build -----------------------------------------------------------------------------------


def test_build_usage_errors() -> None:
    result = run(["build", "--drv", "/nix/store/abc-hello"])
    assert result.exit_code == 2 and "--drv needs a store derivation" in result.stderr
    result = run(["build", "x.nix", "--drv", "/nix/store/abc-x.drv"])
    assert result.exit_code == 2 and "one kind of target" in result.stderr


def _fake_build_flow(monkeypatch: pytest.MonkeyPatch, final: dict[str, Any]) -> None:
    import bigtent.client.build as build_module
    from bigtent.client.api import Build
    from bigtent.client.build import BuildResult

    async def fake_run_build(
        client: Any, store: Any, drvs: Any, options: Any, observer: Any, tracker: Any = None
    ) -> BuildResult:
        assert drvs == ["/nix/store/aaaa-hello.drv"] and options.download is False
        observer.on_phase("uploading")
        return BuildResult(Build.model_validate(final))

    monkeypatch.setattr(build_module, "run_build", fake_run_build)


def test_build_json_success(monkeypatch: pytest.MonkeyPatch) -> None:
    final = {**BUILD, "state": "succeeded", "roots": [{**BUILD["roots"][0], "state": "succeeded"}]}
    _fake_build_flow(monkeypatch, final)
    result = run(["build", "--drv", "/nix/store/aaaa-hello.drv", "--no-download", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["build_id"] == "12" and doc["succeeded"] is True
    assert doc["outputs"] == {"/nix/store/aaaa-hello.drv": {"out": "/nix/store/o-hello"}}


def test_build_failure_reports_step_and_log_tail(monkeypatch: pytest.MonkeyPatch) -> None:
    final = {
        **BUILD,
        "state": "failed",
        "roots": [{**BUILD["roots"][0], "state": "failed"}],
        "failed_steps": [
            {
                "id": 4,
                "drv_path": "/nix/store/aaaa-hello.drv",
                "state": "failed",
                "outcome": "build_failure",
                "error": "builder exited 1",
                "log_tail": "compiling\n[error] boom\n",
            }
        ],
    }
    _fake_build_flow(monkeypatch, final)
    result = run(["build", "--drv", "/nix/store/aaaa-hello.drv", "--no-download"])
    assert result.exit_code == 1
    assert "not built: /nix/store/aaaa-hello.drv (failed)" in result.stderr
    assert "failed step 4: /nix/store/aaaa-hello.drv: build_failure, builder exited 1" in (
        result.stderr
    )
    assert "[error] boom" in result.stderr  # log text is not taken as rich markup
    assert "Error: build 12 failed: 1 of 1 requested derivation(s) did not build" in result.stderr


# ---- keys and tokens -------------------------------------------------------------------------


def test_keys_generate(tmp_path: Path) -> None:
    result = run(["keys", "generate", "cache.example.org-1", "--out-dir", str(tmp_path / "k")])
    assert result.exit_code == 0, result.output
    sk = tmp_path / "k" / "cache.example.org-1.sk"
    pk = tmp_path / "k" / "cache.example.org-1.pk"
    assert stat.S_IMODE(sk.stat().st_mode) == 0o600
    secret = parse_secret_key(sk.read_text())
    assert secret.public_key() == parse_public_key(pk.read_text())
    assert result.stdout.strip() == pk.read_text().strip()
    again = run(["keys", "generate", "cache.example.org-1", "--out-dir", str(tmp_path / "k")])
    assert again.exit_code == 2 and "already exists" in again.stderr
    assert parse_secret_key(sk.read_text()) == secret


def test_keys_generate_bad_name(tmp_path: Path) -> None:
    result = run(["keys", "generate", "a:b", "--out-dir", str(tmp_path)])
    assert result.exit_code == 2 and result.stderr.startswith("Error: key name")


def test_token_create() -> None:
    result = run(["token", "create", "--role", "agent", "--name", "build-01"])
    assert result.exit_code == 0
    token = result.stdout.strip()
    snippet = tomllib.loads(result.stderr.split("runner.toml:\n", 1)[1])
    assert snippet["auth"]["tokens"] == [
        {"name": "build-01", "role": "agent", "sha256": token_digest(token)}
    ]
    doc = json.loads(run(["token", "create", "--role", "client", "--json"]).stdout)
    assert doc["role"] == "client" and doc["sha256"] == token_digest(doc["token"])


# ---- services ---------------------------------------------------------------------------------


def test_agent_overrides_only_given_flags() -> None:
    assert cli_module.agent_overrides(name=None, systems=(), ephemeral=False) == {}
    assert cli_module.agent_overrides(
        name="a",
        systems=("x86_64-linux", "i686-linux"),
        work_dir=Path("/w"),
        max_builds=1,
        ephemeral=False,
    ) == {
        "agent": {
            "name": "a",
            "systems": ["x86_64-linux", "i686-linux"],
            "work_dir": "/w",
            "ephemeral": {"max_builds": 1},
        }
    }
    assert cli_module.agent_overrides(ephemeral=True) == {"agent": {"ephemeral": {}}}


@pytest.fixture
def fake_run_agent(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    import bigtent.agent.session as session

    got: dict[str, Any] = {"code": 0}

    async def run_agent(cfg: AgentConfig, token: CredentialSource | None) -> int:
        got["cfg"], got["source"] = cfg, token
        if isinstance(token, StaticToken | TokenFile):  # the GitHub source would ask GitHub
            got["token"] = await token.credential(fresh=True)
        if got.get("interrupt"):
            raise KeyboardInterrupt
        return int(got["code"])

    monkeypatch.setattr(session, "run_agent", run_agent)
    return got


def test_agent_flags_override_file(fake_run_agent: dict[str, Any], tmp_path: Path) -> None:
    conf = tmp_path / "agent.toml"
    conf.write_text('[agent]\nname = "from-file"\nmax_jobs = 2\nstore = "local?root=/x"\n')
    (tmp_path / "tok").write_text("secret\n")
    fake_run_agent["code"] = 3
    result = run(
        [
            "agent",
            "--config",
            str(conf),
            "--name",
            "flag",
            "--system",
            "a",
            "--system",
            "b",
            "--sandbox-path",
            "/bin=/usr/bin",
            "--token-file",
            str(tmp_path / "tok"),
            "--max-builds",
            "2",
        ]
    )
    assert result.exit_code == 3, result.output
    section = fake_run_agent["cfg"].agent
    assert section.name == "flag" and section.max_jobs == 2 and section.store == "local?root=/x"
    assert section.systems == ["a", "b"] and section.sandbox_paths == ["/bin=/usr/bin"]
    assert section.ephemeral is not None and section.ephemeral.max_builds == 2
    assert fake_run_agent["token"] == "secret"


def test_agent_store_budget_flags(fake_run_agent: dict[str, Any], tmp_path: Path) -> None:
    conf = tmp_path / "agent.toml"
    conf.write_text("[agent]\nmin_free_bytes = 5\ngc_check_secs = 7\n")
    result = run(["agent", "--config", str(conf), "--min-free-bytes", "1000"])
    assert result.exit_code == 0, result.output
    section = fake_run_agent["cfg"].agent
    assert (section.min_free_bytes, section.target_free_bytes) == (1000, 0)
    assert section.gc_check_secs == 7
    result = run(["agent", "--min-free-bytes", "10", "--target-free-bytes", "30"])
    section = fake_run_agent["cfg"].agent
    assert (section.min_free_bytes, section.target_free_bytes) == (10, 30)
    result = run(["agent", "--min-free-bytes", "-1"])
    assert result.exit_code == 2 and "min-free-bytes" in result.output


def test_agent_token_from_env(fake_run_agent: dict[str, Any]) -> None:
    result = run(["agent", "--runner-url", "http://r:1"], env={"BIGTENT_AGENT_TOKEN": "envtok"})
    assert result.exit_code == 0
    assert fake_run_agent["token"] == "envtok"
    assert fake_run_agent["cfg"].agent.runner_url == "http://r:1"


def test_agent_lists_may_be_comma_separated(fake_run_agent: dict[str, Any]) -> None:
    result = run(
        [
            "agent",
            "--system",
            "x86_64-linux, i686-linux,",
            "--system",
            "aarch64-linux",
            "--supported-feature",
            "kvm,big-parallel",
            "--mandatory-feature",
            " ",
        ]
    )
    assert result.exit_code == 0, result.output
    section = fake_run_agent["cfg"].agent
    assert section.systems == ["x86_64-linux", "i686-linux", "aarch64-linux"]
    assert section.supported_features == ["kvm", "big-parallel"]
    assert section.mandatory_features == []


def test_agent_oidc_github_flags(fake_run_agent: dict[str, Any]) -> None:
    env = {
        "ACTIONS_ID_TOKEN_REQUEST_URL": "https://actions.example/t?api-version=2.0",
        "ACTIONS_ID_TOKEN_REQUEST_TOKEN": "request-token",
        "BIGTENT_LAUNCH_ID": "launch-7",
    }
    result = run(["agent", "--oidc", "github", "--audience", "bigtent"], env=env)
    assert result.exit_code == 0, result.output
    section = fake_run_agent["cfg"].agent
    assert section.oidc == "github" and section.audience == "bigtent"
    assert section.ephemeral is not None  # --oidc implies --ephemeral
    assert section.launch_id == "launch-7"
    assert isinstance(fake_run_agent["source"], GithubActionsToken)
    result = run(["agent", "--launch-id", "flag-wins"], env={"BIGTENT_LAUNCH_ID": "env"})
    assert fake_run_agent["cfg"].agent.launch_id == "flag-wins"


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (
            ["--oidc", "github", "--audience", "bigtent"],
            {},
            "ACTIONS_ID_TOKEN_REQUEST_URL and ACTIONS_ID_TOKEN_REQUEST_TOKEN",
        ),
        (
            ["--oidc", "github", "--audience", "bigtent"],
            {"ACTIONS_ID_TOKEN_REQUEST_URL": "https://a.example/t"},
            "needs ACTIONS_ID_TOKEN_REQUEST_TOKEN in the environment",
        ),
        (["--oidc", "github"], {}, "needs an audience"),
    ],
)
def test_agent_oidc_github_without_the_job_variables_is_a_clear_error(
    args: list[str], env: dict[str, str], message: str
) -> None:
    env = {"ACTIONS_ID_TOKEN_REQUEST_URL": "", "ACTIONS_ID_TOKEN_REQUEST_TOKEN": "", **env}
    result = run(["agent", *args], env=env)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("Error: ") and message in result.stderr
    if "environment" in message:
        assert "permissions: id-token: write" in result.stderr
    assert "Traceback" not in result.output


def test_agent_bad_config_is_clean(tmp_path: Path) -> None:
    conf = tmp_path / "agent.toml"
    conf.write_text("[agent]\nmax_jobs = 0\n")
    result = run(["agent", "--config", str(conf)])
    assert result.exit_code == 2 and result.stderr.startswith("Error: invalid configuration")
    result = run(["agent", "--config", str(tmp_path / "none.toml")])
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_keyboard_interrupt_exits_130(fake_run_agent: dict[str, Any]) -> None:
    fake_run_agent["interrupt"] = True
    result = run(["agent"])
    assert result.exit_code == 130
    assert "Traceback" not in result.output and "Error" not in result.output


def test_runner_loads_config_and_serves(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    served: list[Any] = []

    async def serve(cfg: Any) -> None:
        served.append(cfg)

    monkeypatch.setitem(sys.modules, "bigtent.runner.http.app", types.SimpleNamespace(serve=serve))
    conf = tmp_path / "runner.toml"
    conf.write_text(f'[runner]\nlisten = "127.0.0.1:9999"\nstate_dir = "{tmp_path}"\n')
    result = run(["runner", "--config", str(conf)])
    assert result.exit_code == 0, result.output
    assert served[0].runner.port == 9999


# ---- bigtent up: pure parts and state preparation ---------------------------------------------


def test_render_runner_config_loads(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "st ate")
    text = render_runner_config(layout, 8123)
    cfg = load_runner_config(_write(tmp_path / "r.toml", text))
    assert cfg.runner.listen == "127.0.0.1:8123"
    assert cfg.runner.allow_plaintext is True
    assert cfg.runner.state_dir == layout.root
    assert (
        cfg.database_url() == layout.database_url == f"sqlite+aiosqlite:///{layout.root}/bigtent.db"
    )
    assert cfg.signing_key_path() == layout.signing_key
    assert {(t.role, t.token_file) for t in cfg.auth.tokens} == {
        (r, layout.token_file(r)) for r in (Role.CLIENT, Role.AGENT, Role.ADMIN)
    }
    # The local client's builds are trusted (architecture §6): built by the local agents into the
    # main cache.
    assert {t.role for t in cfg.auth.tokens if t.trusted} == {Role.CLIENT}


def test_render_agent_config_loads(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    text = render_agent_config(layout, 2, "http://127.0.0.1:8123", 3, ["/bin=/usr/bin", "/usr"])
    cfg = load_agent_config(_write(tmp_path / "a.toml", text)).agent
    assert cfg.name == "local-2" and cfg.max_jobs == 3
    assert cfg.store == f"local?root={tmp_path}/agents/2/root"
    assert cfg.work_dir == tmp_path / "agents" / "2"
    assert cfg.token_file == layout.token_file(Role.AGENT)
    assert cfg.sandbox_paths == ["/bin=/usr/bin", "/usr"]
    assert "sandbox_paths" not in render_agent_config(layout, 1, "http://x:1", 1, [])


def test_render_env_is_shell_safe() -> None:
    text = render_env("http://127.0.0.1:8080", "bt_a'b", "bt_agent", "k-1:abc+/=")
    values = dict(
        shlex.split(line.removeprefix("export "))[0].split("=", 1)
        for line in text.splitlines()
        if line.startswith("export ")
    )
    assert values == {
        "BIGTENT_URL": "http://127.0.0.1:8080",
        "BIGTENT_TOKEN": "bt_a'b",
        "BIGTENT_AGENT_TOKEN": "bt_agent",
        "BIGTENT_CACHE_URL": "http://127.0.0.1:8080/cache",
        "BIGTENT_CACHE_PUBLIC_KEY": "k-1:abc+/=",
    }


def test_host_sandbox_paths_only_existing() -> None:
    present = {"/usr/bin", "/usr", "/usr/lib"}
    assert host_sandbox_paths(present.__contains__) == ["/bin=/usr/bin", "/usr", "/lib=/usr/lib"]
    assert host_sandbox_paths(lambda p: False) == []


@pytest.mark.parametrize(
    ("failures", "delay"), [(1, 1.0), (2, 2.0), (3, 4.0), (6, 30.0), (50, 30.0)]
)
def test_restart_delay(failures: int, delay: float) -> None:
    assert restart_delay_secs(failures) == delay


def test_key_name() -> None:
    assert key_name("box.example.org") == "bigtent-box-1"
    assert key_name("") == "bigtent-localhost-1"


def test_prepare_state_generates_once_then_reuses(tmp_path: Path) -> None:
    settings = UpSettings(state_dir=tmp_path / "st", agents=2, port=8111, jobs=3, host_tools=True)
    first = prepare_state(settings)
    layout = first.layout
    mode: Callable[[Path], int] = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(layout.signing_key) == 0o600
    for role in (Role.CLIENT, Role.AGENT, Role.ADMIN):
        assert mode(layout.token_file(role)) == 0o600
    assert mode(layout.tokens_dir) == 0o700
    assert layout.agent_config(2).exists() and not layout.agent_config(3).exists()
    key_text = layout.signing_key.read_text()
    second = prepare_state(UpSettings(state_dir=tmp_path / "st", agents=1, port=8222))
    assert second.tokens == first.tokens
    assert second.cache_public_key == first.cache_public_key
    assert layout.signing_key.read_text() == key_text
    assert "127.0.0.1:8222" in layout.runner_config.read_text()  # configs follow the flags
    assert load_runner_config(layout.runner_config).runner.port == 8222


def test_up_rejects_bad_flags() -> None:
    result = run(["up", "--port", "70000"])
    assert result.exit_code == 2 and "Error:" in result.stderr


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_bigtent_error_is_never_a_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    @cli_module.cli.command("explode-for-test")
    def explode() -> None:
        raise BigtentError("it broke (got 1)")

    try:
        result = run(["explode-for-test"])
    finally:
        del cli_module.cli.commands["explode-for-test"]
    assert result.exit_code == 1 and result.stderr == "Error: it broke (got 1)\n"


def test_builders_table_shows_usable_and_skipped_builders(monkeypatch: pytest.MonkeyPatch) -> None:
    body = {
        "builders": [
            {
                "machine_id": "ssh:1",
                "uri": "ssh://nix@b1.example.org",
                "usable": True,
                "systems": ["x86_64-linux"],
                "supported_features": ["kvm"],
                "mandatory_features": [],
                "max_jobs": 4,
                "running": 1,
                "speed_factor": 2.0,
                "consecutive_failures": 1,
                "backoff_until": "2024-05-01T10:05:00+00:00",
            },
            {
                "machine_id": "ssh:2",
                "uri": "ssh://nix@b2.example.org",
                "usable": False,
                "reason": "no pinned host_key",
            },
        ]
    }
    monkeypatch.setattr(
        cli_module, "_make_client", _fixed_client(cli_module._make_client, "/api/v1/builders", body)
    )
    result = run(["builders"], env=WIDE)
    assert result.exit_code == 0, result.output
    rows = {row["uri"]: row for row in parse_table(result.stdout)}
    b1 = rows["ssh://nix@b1.example.org"]
    assert b1["state"] == "usable" and b1["jobs"] == "1/4" and b1["features"] == "kvm"
    assert b1["backoff until"] == "2024-05-01 10:05"
    assert rows["ssh://nix@b2.example.org"]["state"] == "skipped: no pinned host_key"
    data = json.loads(run(["builders", "--json"]).stdout)
    assert [b["usable"] for b in data] == [True, False]


def test_failure_report_names_jobs_by_attribute_path(capsys: pytest.CaptureFixture[str]) -> None:
    from bigtent.client.api import Build

    build = Build.model_validate(
        {**BUILD, "state": "failed", "roots": [{**BUILD["roots"][0], "state": "failed"}]}
    )
    cli_module._report_failure(build, {"/nix/store/aaaa-hello.drv": ".#checks.x86_64-linux.hello"})
    assert (
        "  not built: .#checks.x86_64-linux.hello (/nix/store/aaaa-hello.drv) (failed)"
        in capsys.readouterr().err
    )
