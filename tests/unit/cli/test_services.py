"""``bigtent agent`` (flags as config overrides, credentials), ``bigtent runner`` and
``bigtent up``'s flags: the services start with what the command line said."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest

from bigtent.agent.credentials import (
    CredentialSource,
    GithubActionsToken,
    StaticToken,
    TokenFile,
)
from bigtent.cli.services import agent_overrides
from bigtent.config import AgentConfig
from tests.unit.cli.helpers import run_cli

run = run_cli


def test_agent_overrides_only_given_flags() -> None:
    assert agent_overrides(name=None, systems=(), ephemeral=False) == {}
    assert agent_overrides(
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
    assert agent_overrides(ephemeral=True) == {"agent": {"ephemeral": {}}}


@pytest.fixture
def fake_run_agent(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    import bigtent.agent.main as agent_main

    got: dict[str, Any] = {"code": 0}

    async def run_agent(cfg: AgentConfig, token: CredentialSource | None) -> int:
        got["cfg"], got["source"] = cfg, token
        if isinstance(token, StaticToken | TokenFile):  # the GitHub source would ask GitHub
            got["token"] = await token.credential(fresh=True)
        if got.get("interrupt"):
            raise KeyboardInterrupt
        return int(got["code"])

    monkeypatch.setattr(agent_main, "run_agent", run_agent)
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


def test_up_rejects_bad_flags() -> None:
    result = run(["up", "--port", "70000"])
    assert result.exit_code == 2 and "Error:" in result.stderr
