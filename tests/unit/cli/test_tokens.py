"""``bigtent token create|list|revoke`` through the real entry point in CliRunner, against a
runner answered in-process."""

from __future__ import annotations

import json
import stat
import tomllib
from pathlib import Path

import httpx
import pytest

from bigtent.nix.keys import parse_public_key, parse_secret_key
from bigtent.runner.auth.tokens import token_digest
from tests.unit.cli.helpers import ADMIN_ENV, WIDE, RunnerStub, admin_only, parse_table, run_cli

SECRET = "bt_" + "s" * 43
CI = {
    "name": "ci",
    "role": "client",
    "trusted": True,
    "created_by": "root",
    "created_at": "2026-12-12T10:00:00+00:00",
    "revoked_at": None,
}
OLD = {**CI, "name": "old", "trusted": False, "revoked_at": "2026-12-13T10:00:00+00:00"}


run = run_cli


@pytest.fixture
def tokens_runner(runner_stub: RunnerStub) -> list[httpx.Request]:
    """The token endpoints of a runner that knows the admin token ``root``."""

    def handler(request: httpx.Request) -> httpx.Response:
        path, method = request.url.path, request.method
        if (method, path) == ("POST", "/api/v1/tokens"):
            body = json.loads(request.content)
            name = body.get("name", "client-abc123")
            if name == "taken":
                return httpx.Response(409, json={"error": "token name 'taken' is taken"})
            made = {**CI, "name": name, "role": body["role"], "trusted": body["trusted"]}
            return httpx.Response(201, json={**made, "token": SECRET})
        if (method, path) == ("GET", "/api/v1/tokens"):
            return httpx.Response(200, json={"tokens": [CI, OLD]})
        if (method, path) == ("DELETE", "/api/v1/tokens/ci"):
            return httpx.Response(200, json={**CI, "revoked_at": "2026-12-14T10:00:00+00:00"})
        if method == "DELETE":
            return httpx.Response(404, json={"error": "no stored token 'nobody'"})
        return httpx.Response(429, json={"error": "too many", "detail": {"retry_after_secs": 7}})

    return runner_stub.answer(admin_only(handler))


def test_create_offline_prints_a_snippet_with_trusted() -> None:
    result = run(["token", "create", "--role", "client", "--name", "ci", "--trusted"])
    assert result.exit_code == 0, result.output
    token = result.stdout.strip()
    snippet = tomllib.loads(result.stderr.split("runner.toml:\n", 1)[1])
    assert snippet["auth"]["tokens"] == [
        {"name": "ci", "role": "client", "sha256": token_digest(token), "trusted": True}
    ]


def test_create_offline_refuses_a_token_file_without_runner(tmp_path: Path) -> None:
    result = run(["token", "create", "--role", "client", "--token-file", str(tmp_path / "t")])
    assert result.exit_code == 2
    assert result.stderr == "Error: --token-file needs --runner\n"


def test_create_in_the_runner(tokens_runner: list[httpx.Request]) -> None:
    result = run(
        [
            "token",
            "create",
            "--role",
            "client",
            "--name",
            "ci",
            "--trusted",
            "--runner",
            "http://r",
        ],
        env=ADMIN_ENV,
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == SECRET + "\n"
    assert "stored it as 'ci' (role client, trusted)" in result.stderr
    assert "[[auth.tokens]]" not in result.stderr
    (request,) = tokens_runner
    assert str(request.url) == "http://r/api/v1/tokens"
    assert json.loads(request.content) == {"role": "client", "trusted": True, "name": "ci"}


def test_create_in_the_runner_json_and_default_name(
    tokens_runner: list[httpx.Request], tmp_path: Path
) -> None:
    token_file = tmp_path / "admin"
    token_file.write_text("root\n")
    result = run(
        [
            *("token", "create", "--role", "agent", "--runner", "http://r"),
            *("--token-file", str(token_file), "--json"),
        ]
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["token"] == SECRET and doc["role"] == "agent" and doc["name"] == "client-abc123"
    assert json.loads(tokens_runner[0].content) == {"role": "agent", "trusted": False}


@pytest.mark.parametrize(
    ("args", "env", "exit_code", "stderr"),
    [
        (["--name", "taken"], ADMIN_ENV, 1, "Error: token name 'taken' is taken\n"),
        ([], {"BIGTENT_TOKEN": "client"}, 3, "Error: token role client may not do this\n"),
    ],
)
def test_create_in_the_runner_errors(
    tokens_runner: list[httpx.Request],
    args: list[str],
    env: dict[str, str],
    exit_code: int,
    stderr: str,
) -> None:
    result = run(["token", "create", "--role", "client", "--runner", "http://r", *args], env=env)
    assert result.exit_code == exit_code
    assert result.stderr == stderr
    assert result.stdout == ""


def test_list_table_and_json(tokens_runner: list[httpx.Request]) -> None:
    result = run(["token", "list"], env={**ADMIN_ENV, **WIDE})
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in parse_table(result.stdout)}
    ci, old = rows["ci"], rows["old"]
    assert ci["role"] == "client" and ci["trusted"] == "yes" and ci["created by"] == "root"
    assert old["trusted"] == "no" and old["revoked"] != "-"
    result = run(["token", "list", "--json"], env=ADMIN_ENV)
    assert json.loads(result.stdout) == [CI, OLD]
    assert all(r.method == "GET" and r.url.path == "/api/v1/tokens" for r in tokens_runner)


def test_list_needs_an_admin_token(tokens_runner: list[httpx.Request]) -> None:
    result = run(["token", "list"], env={"BIGTENT_TOKEN": "client"})
    assert result.exit_code == 3
    assert result.stderr == "Error: token role client may not do this\n"


def test_revoke(tokens_runner: list[httpx.Request]) -> None:
    result = run(["token", "revoke", "ci", "--runner", "http://r:9"], env=ADMIN_ENV)
    assert result.exit_code == 0, result.output
    assert result.stdout == "revoked ci (role client) at 2026-12-14T10:00:00+00:00\n"
    assert (tokens_runner[0].method, str(tokens_runner[0].url)) == (
        "DELETE",
        "http://r:9/api/v1/tokens/ci",
    )
    doc = json.loads(run(["token", "revoke", "ci", "--json"], env=ADMIN_ENV).stdout)
    assert doc["revoked_at"] == "2026-12-14T10:00:00+00:00"


def test_revoke_unknown(tokens_runner: list[httpx.Request]) -> None:
    result = run(["token", "revoke", "nobody"], env=ADMIN_ENV)
    assert result.exit_code == 1
    assert result.stderr == "Error: no stored token 'nobody'\n"


def test_rate_limited_is_an_auth_error(runner_stub: RunnerStub) -> None:
    runner_stub.answer(
        lambda request: httpx.Response(
            429,
            headers={"Retry-After": "7"},
            json={"error": "too many failed attempts", "detail": {"retry_after_secs": 7}},
        )
    )
    result = run(["token", "list"])
    assert result.exit_code == 3
    assert result.stderr == "Error: too many failed attempts\n"


# ---- offline: keys and printed tokens ------------------------------------------------------


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
