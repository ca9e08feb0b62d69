"""``[[projects]]`` validation and the forge target a project reports to."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from bigtent.config import load_runner_config
from bigtent.config.ci import (
    ProjectSection,
    api_project_problem,
    redact_url_credentials,
)
from bigtent.config.forge import ForgeKind
from bigtent.errors import ConfigError

BASE = {"name": "widgets", "url": "https://example.test/acme/widgets.git"}


def project(**kw: Any) -> ProjectSection:
    return ProjectSection.model_validate({**BASE, **kw})


@pytest.mark.parametrize(
    "bad",
    [
        {"name": "a/b"},
        {"name": "-x"},
        {"url": "/srv/git/widgets"},
        {"url": "https://user:secret@example.test/x.git"},
        {"url": "https://ghp_0123456789abcdef@github.com/acme/widgets"},
        {"url": "http://token@example.test/x.git"},
        {"branches": ["refs/heads/main"]},
        {"file": "../outside.nix"},
        {"file": "/etc/x.nix"},
        {"attr": "a b"},
        {"flake_attrs": ["checks.x"]},
        {"repository": "no-slash"},
        {"forge": "github", "repository": "acme/widgets"},
        {"forge": "forgejo", "repository": "acme/widgets", "forge_token_file": "/t"},
        {"forge": "github"},
    ],
)
def test_invalid_projects_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        project(**bad)


def test_github_target_defaults_to_the_public_api() -> None:
    p = project(
        forge="github", repository="acme/widgets", github_app_id=7, github_app_key_file="/k.pem"
    )
    target = p.target()
    assert target is not None
    assert target.kind is ForgeKind.GITHUB and target.api_url == "https://api.github.com"
    assert (target.app_id, target.app_key_file) == (7, "/k.pem")


def test_forgejo_target_and_no_forge() -> None:
    p = project(
        forge="gitea",
        repository="acme/widgets",
        forge_api_url="https://git.example.test/api/v1/",
        forge_token_file="/t",
    )
    target = p.target()
    assert target is not None and target.kind is ForgeKind.GITEA
    assert target.api_url == "https://git.example.test/api/v1" and target.token_file == "/t"
    assert project().target() is None


def test_webhook_secret_is_read_from_its_file(tmp_path: Path) -> None:
    secret = tmp_path / "s"
    secret.write_text("abc\n")
    assert project(webhook_secret_file=str(secret)).webhook_secret() == b"abc"
    assert project().webhook_secret() is None
    secret.write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        project(webhook_secret_file=str(secret)).webhook_secret()


def test_runner_config_takes_projects_and_evaluation(tmp_path: Path) -> None:
    cfg = tmp_path / "runner.toml"
    cfg.write_text(
        '[evaluation]\nmax_memory_mib = 512\n[[projects]]\nname = "w"\n'
        'url = "file:///srv/git/w"\nevaluate = "file"\nfile = "ci.nix"\n'
    )
    config = load_runner_config(cfg)
    assert config.evaluation.max_memory_mib == 512
    assert [p.name for p in config.projects] == ["w"]
    assert config.projects[0].flake_attrs == ["checks", "hydraJobs"]


def test_ssh_urls_keep_their_user() -> None:
    assert project(url="ssh://git@example.test/acme/widgets.git").url.startswith("ssh://git@")


def test_credentials_in_urls_are_redacted_from_git_messages() -> None:
    text = "fatal: unable to access 'https://ghp_secret@github.com/o/r/': 403\n" + (
        "fatal: could not read from http://u:p@h.test/x and ssh://git@h.test/y"
    )
    redacted = redact_url_credentials(text)
    assert "ghp_secret" not in redacted and "u:p" not in redacted
    assert "https://***@github.com/o/r/" in redacted and "http://***@h.test/x" in redacted


FORGEJO = {
    "forge": "forgejo",
    "repository": "acme/widgets",
    "forge_api_url": "https://git.example.test/api/v1",
}


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({**FORGEJO, "forge_token_file": "/var/lib/bigtent/cache.sk"}, "forge_token_file"),
        ({**FORGEJO, "forge_token_file": "/secrets/api/../../etc/shadow"}, "forge_token_file"),
        ({**FORGEJO, "forge_token_file": "/secrets/api"}, "forge_token_file"),
        ({**FORGEJO, "forge_token_file": "/secrets/apix/t"}, "forge_token_file"),
        ({"webhook_secret_file": "relative/secret"}, "webhook_secret_file"),
        ({"forge_ca_file": "/etc/ssl/private/key.pem"}, "forge_ca_file"),
        ({"url": "file:///srv/git/private"}, "file://"),
        (
            {**FORGEJO, "forge_token_file": "/secrets/api/t", "forge_api_url": "http://evil/api"},
            "https",
        ),
    ],
)
def test_api_projects_are_confined(settings: dict[str, Any], problem: str) -> None:
    found = api_project_problem(project(**settings), Path("/secrets/api"))
    assert found is not None and problem in found


def test_api_projects_without_a_secrets_dir_have_no_secret_files() -> None:
    p = project(**FORGEJO, forge_token_file="/secrets/api/t")
    assert api_project_problem(p, Path("/secrets/api")) is None
    found = api_project_problem(p, None)
    assert found is not None and "api_secrets_dir" in found
    assert api_project_problem(project(), None) is None


def test_api_projects_may_use_http_to_loopback_only() -> None:
    for url in ("http://127.0.0.1:3000/api/v1", "http://[::1]/api/v1", "http://localhost/api"):
        p = project(**{**FORGEJO, "forge_api_url": url}, forge_token_file="/secrets/api/t")
        assert api_project_problem(p, Path("/secrets/api")) is None, url


def test_clients_see_no_secret_file_paths() -> None:
    p = project(**FORGEJO, forge_token_file="/secrets/api/t", webhook_secret_file="/s/h")
    shown = p.public_json()
    assert shown["forge_token_file"] == shown["webhook_secret_file"] == "(set)"
    assert shown["forge_ca_file"] is None and shown["url"] == p.url
