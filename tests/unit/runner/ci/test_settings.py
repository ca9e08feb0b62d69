"""``[[projects]]`` validation and the forge target a project reports to."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from bigtent.config import load_runner_config
from bigtent.errors import ConfigError
from bigtent.runner.ci.settings import ProjectSection
from bigtent.runner.forge.model import ForgeKind

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
