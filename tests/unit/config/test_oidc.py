"""``[[auth.oidc]]`` configuration: validation and its part in transport security."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bigtent.config import load_runner_config
from bigtent.errors import ConfigError

ISSUER = {"issuer": "https://token.actions.githubusercontent.com", "audiences": ["bigtent"]}


def load(tmp_path: Path, *issuers: dict[str, Any], **runner: Any) -> Any:
    return load_runner_config(
        None, runner={"state_dir": str(tmp_path), **runner}, auth={"oidc": list(issuers)}
    )


def test_defaults(tmp_path: Path) -> None:
    (rule,) = load(tmp_path, ISSUER).auth.oidc
    assert rule.refresh_interval_secs == 60
    assert rule.http_timeout_secs == 10
    assert rule.leeway_secs == 60
    assert rule.claims == "github"
    assert rule.repositories == []
    assert rule.jwks_url is None and rule.ca_file is None


def test_several_issuers(tmp_path: Path) -> None:
    gitlab = {"issuer": "https://gitlab.com", "audiences": ["bigtent"], "claims": "gitlab"}
    cfg = load(tmp_path, ISSUER, gitlab)
    assert [r.issuer for r in cfg.auth.oidc] == [ISSUER["issuer"], "https://gitlab.com"]


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"issuer": "http://token.actions.githubusercontent.com"}, "issuer"),
        ({"issuer": "token.actions.githubusercontent.com"}, "issuer"),
        ({"issuer": "https://"}, "issuer"),
        ({"issuer": "https://issuer.example?x=1"}, "issuer"),
        ({"jwks_url": "http://issuer.example/jwks"}, "jwks_url"),
        ({"audiences": []}, "audiences"),
        ({"audiences": [""]}, "audiences"),
        ({"subject_prefixes": [""]}, "subject_prefixes"),
        ({"repositories": ["acme/x", " "]}, "repositories"),
        ({"refresh_interval_secs": 0}, "refresh_interval_secs"),
        ({"claims": "bitbucket"}, "claims"),
        ({"repository": ["acme/x"]}, "repository"),  # a typo is an error, not ignored
    ],
)
def test_invalid(tmp_path: Path, change: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=rf"auth\.oidc\.0\.{key}"):
        load(tmp_path, ISSUER | change)


def test_oidc_without_tls_is_refused_off_loopback(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="TLS is not"):
        load(tmp_path, ISSUER, listen="127.0.0.1:1").check_transport_security()
    with pytest.raises(ConfigError, match="only honoured on a loopback"):
        load(tmp_path, ISSUER, listen="0.0.0.0:1", allow_plaintext=True).check_transport_security()
    load(tmp_path, ISSUER, listen="127.0.0.1:1", allow_plaintext=True).check_transport_security()


def test_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "runner.toml"
    path.write_text(
        """
[[auth.oidc]]
issuer = "https://token.actions.githubusercontent.com"
audiences = ["bigtent"]
repositories = ["acme/widgets"]
subject_prefixes = ["repo:acme/widgets:ref:refs/heads/"]
workflow_refs = []
refs = []
"""
    )
    (rule,) = load_runner_config(path).auth.oidc
    assert rule.repositories == ["acme/widgets"]
