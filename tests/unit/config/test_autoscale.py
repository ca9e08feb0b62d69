"""``[[autoscale.github]]`` pools: each key's validation, and the start-up checks against the
``[[auth.oidc]]`` issuers and the dispatch token (docs/autoscaling.md)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from bigtent import __version__
from bigtent.config import RunnerConfig, load_runner_config
from bigtent.config.autoscale import load_token
from bigtent.errors import ConfigError
from bigtent.runner.autoscale.service import build_workflows

GITHUB = "https://token.actions.githubusercontent.com"
WORKFLOW_REF = "acme/bigtent-agents/.github/workflows/bigtent-agent.yml@refs/heads/main"
ISSUER: dict[str, Any] = {
    "issuer": GITHUB,
    "audiences": ["bigtent"],
    "repositories": ["acme/bigtent-agents"],
    "workflow_refs": [WORKFLOW_REF],
}
POOL: dict[str, Any] = {
    "name": "gha-x86_64-linux",
    "systems": ["x86_64-linux"],
    "allowed_build_repositories": ["acme/widgets"],
    "workflow_repository": "acme/bigtent-agents",
    "token": "ghp_secret",
    "runner_url": "https://ci.example.org:8443",
    "audience": "bigtent",
}


def load(tmp_path: Path, *pools: dict[str, Any], issuers: Any = (ISSUER,)) -> RunnerConfig:
    return load_runner_config(
        None,
        runner={"state_dir": str(tmp_path)},
        auth={"oidc": list(issuers)},
        autoscale={"github": list(pools)},
    )


def test_defaults(tmp_path: Path) -> None:
    cfg = load(tmp_path, POOL)
    cfg.check_autoscale()
    (pool,) = cfg.autoscale.github
    assert (pool.max_jobs, pool.max_inflight) == (1, 4)
    assert (pool.launch_ttl_secs, pool.cooldown_secs, pool.poll_interval_secs) == (900, 30, 10)
    assert (pool.workflow, pool.ref) == ("bigtent-agent.yml", "main")
    assert pool.api_url == "https://api.github.com"
    assert pool.bigtent_version == __version__
    assert pool.workflow_label == "acme/bigtent-agents/bigtent-agent.yml@main"
    assert cfg.autoscale.min_tick_interval_secs == 1.0
    # The token never shows in a dump or a repr.
    assert "ghp_secret" not in repr(pool) and "ghp_secret" not in str(pool.model_dump())


def test_the_design_example_loads(tmp_path: Path) -> None:
    """architecture §7's pool, verbatim, next to an issuer that admits it."""
    (tmp_path / "tok").write_text("ghp_x\n")
    text = f"""
[[auth.oidc]]
issuer = "{GITHUB}"
audiences = ["bigtent"]
repositories = ["acme/bigtent-agents"]
subject_prefixes = ["repo:acme/bigtent-agents:ref:refs/heads/"]

[[autoscale.github]]
name = "gha-x86_64-linux"
systems = ["x86_64-linux"]
max_jobs = 2
allowed_build_repositories = ["acme/widgets"]
max_inflight = 4
launch_ttl_secs = 900
cooldown_secs = 30
poll_interval_secs = 10
workflow_repository = "acme/bigtent-agents"
workflow = "bigtent-agent.yml"
ref = "main"
token_file = "{tmp_path / "tok"}"
runner_url = "https://ci.example.org:8443"
audience = "bigtent"
bigtent_version = "0.1.0"
api_url = "https://api.github.com"
"""
    data = tomllib.loads(text)
    cfg = load_runner_config(None, runner={"state_dir": str(tmp_path)}, **data)
    cfg.check_autoscale()
    assert load_token(0, cfg.autoscale.github[0]) == "ghp_x"


@pytest.mark.parametrize(
    ("change", "key", "text"),
    [
        ({"runner_url": "http://ci.example.org:8080"}, "runner_url", "https://"),
        ({"runner_url": "ci.example.org"}, "runner_url", "https://"),
        ({"runner_url": "https://u:p@ci.example.org"}, "runner_url", "credentials"),
        ({"api_url": "http://github.example/api/v3"}, "api_url", "https://"),
        ({"name": "has space"}, "name", "letters"),
        ({"name": "a/b"}, "name", "letters"),
        ({"name": ""}, "name", "letters"),
        ({"systems": []}, "systems", ""),
        ({"systems": ["x86_64-linux,i686-linux"]}, "systems", "commas"),
        ({"supported_features": ["kvm big"]}, "supported_features", "whitespace"),
        ({"allowed_build_repositories": []}, "allowed_build_repositories", ""),
        ({"allowed_build_repositories": ["widgets"]}, "allowed_build_repositories", "owner/repo"),
        ({"workflow_repository": "acme"}, "workflow_repository", "owner/repo"),
        ({"workflow": ".github/workflows/x.yml"}, "workflow", "file name"),
        ({"ref": "has space"}, "ref", "branch"),
        ({"max_jobs": 0}, "max_jobs", ""),
        ({"max_inflight": 0}, "max_inflight", ""),
        ({"launch_ttl_secs": 0}, "launch_ttl_secs", ""),
        ({"cooldown_secs": -1}, "cooldown_secs", ""),
        ({"poll_interval_secs": 0}, "poll_interval_secs", ""),
        ({"audience": ""}, "audience", ""),
        ({"bigtent_version": "1.0 beta"}, "bigtent_version", "version"),
        ({"max_inflght": 3}, "max_inflght", ""),  # a typo is an error, not ignored
    ],
)
def test_invalid_keys(tmp_path: Path, change: dict[str, Any], key: str, text: str) -> None:
    with pytest.raises(ConfigError, match=rf"autoscale\.github\.0\.{key}") as err:
        load(tmp_path, POOL | change)
    assert text in err.value.message


def test_exactly_one_token_source(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="exactly one of token or token_file"):
        load(tmp_path, {k: v for k, v in POOL.items() if k != "token"})
    with pytest.raises(ConfigError, match="exactly one of token or token_file"):
        load(tmp_path, POOL | {"token_file": str(tmp_path / "t")})


def _check(tmp_path: Path, *pools: dict[str, Any], issuers: Any = (ISSUER,)) -> str:
    cfg = load(tmp_path, *pools, issuers=issuers)
    with pytest.raises(ConfigError) as err:
        cfg.check_autoscale()
    return err.value.message


def test_the_audience_must_be_an_issuers_audience(tmp_path: Path) -> None:
    message = _check(tmp_path, POOL | {"audience": "other"})
    assert message.startswith("config key autoscale.github.0.audience: 'other' is not an")
    assert "(configured: bigtent)" in message
    assert "no issuers" in _check(tmp_path, POOL, issuers=())


def test_the_workflow_repository_must_be_allowed_by_that_issuer(tmp_path: Path) -> None:
    message = _check(tmp_path, POOL | {"workflow_repository": "acme/elsewhere"})
    assert message.startswith("config key autoscale.github.0.workflow_repository:")
    assert "'acme/elsewhere' is not in the repositories" in message and GITHUB in message


def test_the_issuer_must_restrict_the_workflow(tmp_path: Path) -> None:
    bare = {k: v for k, v in ISSUER.items() if k != "workflow_refs"}
    message = _check(tmp_path, POOL, issuers=(bare,))
    assert "must restrict subjects, subject_prefixes or workflow_refs" in message
    assert WORKFLOW_REF in message  # the suggestion names the pool's own workflow
    # A subject restriction suffices.
    load(tmp_path, POOL, issuers=(bare | {"subjects": ["repo:acme/bigtent-agents:x"]},))
    # workflow_refs naming only other repositories' workflows would refuse the agents.
    other = bare | {"workflow_refs": ["acme/widgets/.github/workflows/x.yml@refs/heads/main"]}
    assert "name no workflow of acme/bigtent-agents" in _check(tmp_path, POOL, issuers=(other,))


def test_another_issuer_with_the_audience_may_admit_the_pool(tmp_path: Path) -> None:
    wrong = ISSUER | {"issuer": "https://gitlab.example", "repositories": ["x/y"]}
    load(tmp_path, POOL, issuers=(wrong, ISSUER)).check_autoscale()


def test_pool_names_are_unique(tmp_path: Path) -> None:
    message = _check(tmp_path, POOL, POOL)
    assert message.startswith("config key autoscale.github.1.name: pool 'gha-x86_64-linux'")


def test_no_pools_no_checks(tmp_path: Path) -> None:
    load(tmp_path, issuers=()).check_autoscale()


def test_the_token_must_load(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    base = {k: v for k, v in POOL.items() if k != "token"} | {"token_file": str(token_file)}
    cfg = load(tmp_path, base)
    with pytest.raises(ConfigError, match=r"cannot read autoscale\.github\.0\.token_file "):
        build_workflows(cfg.autoscale)
    token_file.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        build_workflows(cfg.autoscale)
    token_file.write_text("two tokens\n")
    with pytest.raises(ConfigError, match="one token"):
        build_workflows(cfg.autoscale)
    token_file.write_text("ghp_fine\n")
    assert load_token(0, cfg.autoscale.github[0]) == "ghp_fine"
    with pytest.raises(ConfigError, match=r"autoscale\.github\.0\.token: is empty"):
        load_token(0, load(tmp_path, POOL | {"token": " "}).autoscale.github[0])


def test_a_bad_api_ca_file_is_a_config_error(tmp_path: Path) -> None:
    cfg = load(tmp_path, POOL | {"api_ca_file": str(tmp_path / "missing.pem")})
    with pytest.raises(ConfigError, match="api_ca_file of pool 'gha-x86_64-linux'"):
        build_workflows(cfg.autoscale)
