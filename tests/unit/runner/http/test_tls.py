"""Which names a client certificate carries, and when one of them names an agent (mTLS
pinning, architecture §6): pure functions over ``getpeercert()`` dicts."""

from __future__ import annotations

from typing import Any

import pytest

from bigtent.runner.http.tls import certificate_names, name_is_pinned, peer_cert


def cert(cn: str | None = None, dns: tuple[str, ...] = (), ips: tuple[str, ...] = ()) -> Any:
    out: dict[str, Any] = {"subject": ((("organizationName", "acme"),),)}
    if cn is not None:
        out["subject"] += ((("commonName", cn),),)
    sans = [("DNS", d) for d in dns] + [("IP Address", i) for i in ips]
    if sans:
        out["subjectAltName"] = tuple(sans)
    return out


def test_dns_names_win_over_the_common_name() -> None:
    assert certificate_names(cert("build-01")) == ("build-01",)
    assert certificate_names(cert("ignored", dns=("build-01", "b1"))) == ("build-01", "b1")
    # An IP SAN is no DNS name: the CN counts again.
    assert certificate_names(cert("build-01", ips=("10.0.0.1",))) == ("build-01",)
    assert certificate_names(None) == ()
    assert certificate_names({}) == ()


@pytest.mark.parametrize(
    ("certificate", "name", "ephemeral", "pinned"),
    [
        (cert("build-01"), "build-01", False, True),
        (cert("build-01"), "build-02", False, False),
        (cert("build-01"), "Build-01", False, False),
        (cert("build-01"), "build-01x", False, False),
        (cert("CN-only", dns=("build-01",)), "CN-only", False, False),
        (cert(dns=("a", "build-01")), "build-01", False, True),
        # An ephemeral agent's name is its base plus a generated suffix.
        (cert("gha"), "gha-1a2b3c4d", True, True),
        (cert("gha"), "gha-1a2b3c4d", False, False),
        (cert("gha"), "ghax-1a2b3c4d", True, False),
        (cert(""), "-x", True, False),
        (None, "build-01", False, False),
        (cert(), "build-01", False, False),
    ],
)
def test_name_is_pinned(certificate: Any, name: str, ephemeral: bool, pinned: bool) -> None:
    assert name_is_pinned(certificate, name, ephemeral) is pinned


def test_peer_cert_reads_the_tls_extension() -> None:
    c = cert("build-01")
    assert peer_cert({"extensions": {"tls": {"bigtent.peer_cert": c}}}) == c
    assert peer_cert({"extensions": {"tls": {"bigtent.peer_cert": {}}}}) is None
    assert peer_cert({"extensions": {}}) is None
    assert peer_cert({}) is None
