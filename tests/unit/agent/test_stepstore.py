"""The store a step builds in (``agent/stepstore.py``): Nix options, environment, CA bundle."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from bigtent.agent.executor import Executor
from bigtent.agent.stepstore import (
    CacheSettings,
    join_runner_url,
    nix_ca_bundle,
    nix_env,
    nix_options,
    system_ca_file,
    write_nix_ca_bundle,
)
from bigtent.config import AgentSection
from bigtent.errors import ConfigError


def test_nix_options_order_and_overrides(tmp_path: Path) -> None:
    section = AgentSection(
        work_dir=tmp_path,
        sandbox_paths=["/bin=/usr/bin", "/usr"],
        extra_nix_options={"cores": "2", "narinfo-cache-negative-ttl": "60"},
    )
    cache = CacheSettings(
        "http://r:1/cache", "r-1:KEY", (("https://up1", "up1:K1"), ("https://up2", "up2:K2"))
    )
    assert nix_options(section, cache) == {
        "substituters": "http://r:1/cache https://up1 https://up2",
        "trusted-public-keys": "r-1:KEY up1:K1 up2:K2",
        "narinfo-cache-negative-ttl": "60",
        "builders": "",
        "extra-sandbox-paths": "/bin=/usr/bin /usr",
        "cores": "2",
    }
    store = Executor(section, http=httpx.AsyncClient(), token=None).nix_store(cache)
    assert store.env == {"XDG_CACHE_HOME": str(tmp_path / "xdg-cache" / "slot-0")}


PEM_A = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
PEM_B = "-----BEGIN CERTIFICATE-----\nBBBB\n-----END CERTIFICATE-----"


def test_nix_env_names_the_ca_bundle_only_with_a_ca_file(tmp_path: Path) -> None:
    plain = AgentSection(work_dir=tmp_path)
    assert nix_env(plain, "slot-1") == {"XDG_CACHE_HOME": str(tmp_path / "xdg-cache" / "slot-1")}
    with_ca = AgentSection(work_dir=tmp_path, ca_file=tmp_path / "ca.pem")
    assert nix_env(with_ca, "slot-0") == {
        "XDG_CACHE_HOME": str(tmp_path / "xdg-cache" / "slot-0"),
        "NIX_SSL_CERT_FILE": str(tmp_path / "nix-ca-bundle.pem"),
    }
    # Nix ignores --option ssl-cert-file (2.8): the CA goes only through the environment.
    cache = CacheSettings("https://r/cache", "r-1:KEY", ())
    assert not any("ssl" in k for k in nix_options(with_ca, cache))


def test_nix_ca_bundle_puts_the_runner_ca_first_then_the_system_roots() -> None:
    assert nix_ca_bundle(PEM_A, PEM_B) == PEM_A + "\n" + PEM_B + "\n"
    assert nix_ca_bundle(PEM_A, None) == PEM_A
    assert nix_ca_bundle(PEM_A, "  \n") == PEM_A


def test_system_ca_file_is_what_nix_would_use() -> None:
    assert system_ca_file({"NIX_SSL_CERT_FILE": "/x.pem"}, lambda f: True) == "/x.pem"
    assert system_ca_file({"SSL_CERT_FILE": "/y.pem"}, lambda f: True) == (
        "/etc/ssl/certs/ca-certificates.crt"
    )
    nix_profile = "/nix/var/nix/profiles/default/etc/ssl/certs/ca-bundle.crt"
    assert system_ca_file({}, lambda f: f == nix_profile) == nix_profile
    assert system_ca_file({}, lambda f: False) is None


def test_write_nix_ca_bundle(tmp_path: Path) -> None:
    assert write_nix_ca_bundle(AgentSection(work_dir=tmp_path), {}) is None
    (tmp_path / "ca.pem").write_text(PEM_A)
    (tmp_path / "system.pem").write_text(PEM_B)
    work = tmp_path / "work"
    section = AgentSection(work_dir=work, ca_file=tmp_path / "ca.pem")
    path = write_nix_ca_bundle(section, {"NIX_SSL_CERT_FILE": str(tmp_path / "system.pem")})
    assert path == work / "nix-ca-bundle.pem"
    assert path.read_text() == nix_ca_bundle(PEM_A, PEM_B)
    assert [p.name for p in work.iterdir()] == ["nix-ca-bundle.pem"]
    # The executor writes it when it starts.
    path.unlink()
    Executor(section, http=httpx.AsyncClient(), token=None)
    assert path.exists()


@pytest.mark.parametrize(
    ("content", "why"), [(None, "cannot read"), ("not a certificate", "no PEM certificate")]
)
def test_write_nix_ca_bundle_refuses_a_bad_ca_file(
    tmp_path: Path, content: str | None, why: str
) -> None:
    if content is not None:
        (tmp_path / "ca.pem").write_text(content)
    section = AgentSection(work_dir=tmp_path, ca_file=tmp_path / "ca.pem")
    with pytest.raises(ConfigError, match=f"agent.ca_file: .*{why}"):
        write_nix_ca_bundle(section, {})


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("/api/v1/agent/upload/l/out", "http://r:1/api/v1/agent/upload/l/out"),
        ("api/v1/x", "http://r:1/api/v1/x"),
        ("https://other/x", "https://other/x"),
    ],
)
def test_join_runner_url(url: str, expected: str) -> None:
    assert join_runner_url("http://r:1/", url) == expected
