"""The command line as a whole: every command exists and has help, bad arguments are usage
errors (exit 2) before anything is sent, the client options (token file, BIGTENT_TOKEN, CA) and
how failures are rendered (one ``Error:`` line, the error's exit code, never a traceback).

Commands run through ``bigtent.cli.main`` (the real entry point) inside click's CliRunner, with
the runner answered in-process (``fake_runner``, ``runner_stub``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import click
import httpx
import pytest

from bigtent.cli import cli
from bigtent.errors import BigtentError
from tests.unit.cli.helpers import RunnerStub, run_cli
from tests.unit.cli.samples import STATUS

run = run_cli


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        assert cmd is not None
        yield (*prefix, name)
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*prefix, name))


ALL_COMMANDS = sorted(_commands(cli))


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
        cmd = cli.get_command(click.Context(cli), name)
        assert cmd is not None
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


def test_status_table_and_json(fake_runner: list[httpx.Request]) -> None:
    result = run(["status"], env={"BIGTENT_URL": "http://r:9", "BIGTENT_TOKEN": "t0k"})
    assert result.exit_code == 0, result.output
    assert "bt-1:abc" in result.stdout and "waiting 2" in result.stdout
    assert str(fake_runner[0].url).startswith("http://r:9/api/v1/status")
    assert fake_runner[0].headers["authorization"] == "Bearer t0k"
    result = run(["status", "--json"])
    assert json.loads(result.stdout)["cache_public_key"] == "bt-1:abc"


def test_status_while_the_database_does_not_answer(runner_stub: RunnerStub) -> None:
    # The runner answers null step counts (and an unhealthy scheduler) in an outage.
    outage = {
        **STATUS,
        "steps": None,
        "cache_paths": None,
        "scheduler": {"healthy": False, "problem": "database unreachable"},
    }
    runner_stub.answer_json("/api/v1/status", outage)
    result = run(["status"])
    assert result.exit_code == 0, result.output
    assert "unknown" in result.stdout
    doc = json.loads(run(["status", "--json"]).stdout)
    assert doc["steps"] is None and "scheduler" not in doc


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


def test_unreachable_runner_is_one_line_error() -> None:
    # A URL nobody can connect to (port 1 on loopback is closed).
    result = run(["status", "--runner", "http://127.0.0.1:1"])
    assert result.exit_code == 4
    assert result.stderr.startswith("Error: cannot reach runner at http://127.0.0.1:1")
    assert "Traceback" not in result.output


def test_bigtent_error_is_never_a_traceback() -> None:
    @cli.command("explode-for-test")
    def explode() -> None:
        raise BigtentError("it broke (got 1)")

    try:
        result = run(["explode-for-test"])
    finally:
        del cli.commands["explode-for-test"]
    assert result.exit_code == 1 and result.stderr == "Error: it broke (got 1)\n"
