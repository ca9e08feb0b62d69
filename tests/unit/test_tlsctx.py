from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from bigtent.errors import ConfigError
from bigtent.tlsctx import ca_context, httpx_verify, httpx_verify_for
from tests.integration.runner.oidc_issuer import make_tls

# The start of a certificate, cut short: PEM armour around DER that does not parse.
CUT_PEM = """-----BEGIN CERTIFICATE-----
MIIBjzCCATWgAwIBAgIUE3e8gzPD7jVsKwbqbqV2PAGt3XcwCgYIKoZIzj0EAwIw
GjEYMBYGA1UEAwwPYmlndGVudC10ZXN0LWNhMB4XDTI0MDEwMTAwMDAwMFoXDTM0
MDEwMTAwMDAwMFowGjEYMBYGA1UEAwwPYmlndGVudC10ZXN0LWNhMFkwEwYHKoZI
zj0CAQYIKoZIzj0DAQcDQgAE
-----END CERTIFICATE-----
"""


def write_ca(tmp_path: Path) -> Path:
    return make_tls(tmp_path).ca_file


def test_a_ca_file_is_the_only_trust_anchor(tmp_path: Path) -> None:
    ctx = ca_context(write_ca(tmp_path), "agent.ca_file")
    assert ctx.verify_mode is ssl.CERT_REQUIRED and ctx.check_hostname
    (only,) = ctx.get_ca_certs()
    assert (("commonName", "bigtent test CA"),) in only["subject"]


def test_without_a_ca_file_the_system_roots_apply() -> None:
    ctx = ca_context(None, "agent.ca_file")
    assert ctx.verify_mode is ssl.CERT_REQUIRED and ctx.check_hostname
    assert httpx_verify(None, "CA file") is True


def test_httpx_verify_with_a_ca_file_is_its_context(tmp_path: Path) -> None:
    verify = httpx_verify(write_ca(tmp_path), "CA file")
    assert isinstance(verify, ssl.SSLContext) and len(verify.get_ca_certs()) == 1


@pytest.mark.parametrize(
    ("content", "why"),
    [(None, "No such file"), ("not a certificate", ""), (CUT_PEM, "")],
)
def test_a_file_that_cannot_be_loaded_names_what_it_is_for(
    tmp_path: Path, content: str | None, why: str
) -> None:
    path = tmp_path / "ca.pem"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=f"^cannot load CA file {path}: .*{why}") as info:
        httpx_verify(path, "CA file")
    assert info.value.exit_code == 2


def test_a_plain_http_client_trusts_no_ca() -> None:
    """Every URL plain http: a context that loads no roots yet verifies (a TLS connection
    would fail, never go unchecked)."""
    urls = ["http://a:8080", "http://b"]
    context = httpx_verify_for(urls, None, "CA file", {"HTTP_PROXY": "http://p"})
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.get_ca_certs() == []


@pytest.mark.parametrize(
    ("urls", "environ"),
    [
        (["http://a", "https://b"], {}),
        (["https://a"], {}),
        (["http://a"], {"https_proxy": "https://proxy:3128"}),
        (["http://a"], {"ALL_PROXY": " HTTPS://proxy"}),
        ([], {}),
    ],
)
def test_any_tls_keeps_the_usual_verification(urls: list[str], environ: dict[str, str]) -> None:
    assert httpx_verify_for(urls, None, "CA file", environ) is True


@pytest.mark.parametrize("urls", [["http://a"], ["https://a"]])
def test_a_ca_file_is_trusted_whatever_the_urls(tmp_path: Path, urls: list[str]) -> None:
    verify = httpx_verify_for(urls, write_ca(tmp_path), "CA file", {})
    assert isinstance(verify, ssl.SSLContext) and len(verify.get_ca_certs()) == 1
    with pytest.raises(ConfigError, match=r"^cannot load CA file /nonexistent/ca\.pem"):
        httpx_verify_for(urls, "/nonexistent/ca.pem", "CA file", {})
