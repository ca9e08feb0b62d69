"""Tests for cache keys and signatures, with a key pair and signatures made by Nix 2.8."""

from __future__ import annotations

import base64
import dataclasses
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bigtent.nix import base32
from bigtent.nix.keys import (
    PublicKey,
    generate_key,
    load_secret_key,
    parse_public_key,
    parse_secret_key,
    sign_narinfo,
    verify_narinfo,
)
from bigtent.nix.narinfo import NarInfo, fingerprint

# nix-store --generate-binary-cache-key test.example-1 sk pk
NIX_SK = (
    "test.example-1:pZUX7rLkTAp+9Tn3qHleDxZWP6KWa7O+I1JhOI3BbI3V3zRG72GpNLcMNcWuk6ZHqkGEpNmVxoPTE3kf"
    "kPqbLg=="
)
NIX_PK = "test.example-1:1d80Ru9hqTS3DDXFrpOmR6pBhKTZlcaD0xN5H5D6my4="

# `nix store sign --key-file sk` on two paths, then `nix path-info --json --sigs`.
X = "/nix/store/4g4g9i669dl63abpww0djbl2jxl6bwiz-x"
X_FINGERPRINT = fingerprint(X, "sha256-CkMIecJm+LV/QJKg+TXPP6zUi7zN5XYNR0jKQFFx6Wk=", 120, [])
X_SIG = (
    "test.example-1:TEWqed7WWDuY8bJrxUppvJdk3Y3fGVa15Dishb0tZOAidtDlG3+R4hZWIWsGyZVumDcuJIvPm1nE7ytbfp"
    "CeDw=="
)
Y = "/nix/store/5p45md1nk9r5a10pzyiqprjiisxniy23-y"
Y_INFO = NarInfo(
    store_path=Y,
    url="nar/y.nar",
    compression="none",
    file_hash=None,
    file_size=None,
    nar_hash=base32.format_hash(
        "sha256", base32.parse_hash("sha256-LgTd/mNkZFHPTpWKz/26lHTcZmYwY9TnQphp4RQ2FtY=")
    ),
    nar_size=168,
    references=("draf2pm7skqzj8g3kv0bamg214p6sd70-a",),
    deriver=None,
    sigs=(),
)
Y_SIG = (
    "test.example-1:C+UdpATGQ3yQTooDTzKBWqWmWRTN0iaw63XqE0G/T1dwPFUL+jFHPgDiVRnMrr2TWeB5ugV1IWf9/KHVl"
    "SxxBg=="
)


def test_parse_nix_keys() -> None:
    secret = parse_secret_key(NIX_SK + "\n")
    public = parse_public_key(NIX_PK)
    assert secret.name == public.name == "test.example-1"
    assert secret.public_key() == public
    assert secret.to_text() == NIX_SK
    assert public.to_text() == NIX_PK
    assert secret.seed.hex() not in repr(secret)  # never leak the seed into logs


def test_signatures_match_nix() -> None:
    secret = parse_secret_key(NIX_SK)
    public = parse_public_key(NIX_PK)
    # Ed25519 is deterministic, so our signature is byte-identical to Nix's.
    assert secret.sign(X_FINGERPRINT) == X_SIG
    assert public.verify(X_FINGERPRINT, X_SIG)
    signed = sign_narinfo(Y_INFO, secret)
    assert signed.sigs == (Y_SIG,)
    assert verify_narinfo(signed, [public])


def test_a_key_keeps_signing_as_nix_and_equals_one_parsed_again() -> None:
    secret = parse_secret_key(NIX_SK)
    # The key object is built once and reused: every signature stays Nix's.
    assert [secret.sign(X_FINGERPRINT) for _ in range(3)] == [X_SIG] * 3
    assert sign_narinfo(Y_INFO, secret).sigs == (Y_SIG,)
    again = parse_secret_key(NIX_SK)
    assert again == secret and hash(again) == hash(secret)
    assert dataclasses.replace(secret, name="other").sign(X_FINGERPRINT).endswith(X_SIG[15:])


def test_sign_narinfo_adds_once() -> None:
    secret = parse_secret_key(NIX_SK)
    other = generate_key("other-1")
    signed = sign_narinfo(sign_narinfo(sign_narinfo(Y_INFO, secret), other), secret)
    assert len(signed.sigs) == 2
    assert list(signed.sigs) == sorted(signed.sigs)
    assert Y_INFO.sigs == ()  # the original is unchanged
    assert verify_narinfo(signed, [other.public_key()])
    assert not verify_narinfo(Y_INFO, [other.public_key()])


@pytest.mark.parametrize(
    "sig",
    [
        X_SIG.replace("test.example-1", "test.example-2"),
        X_SIG[:-4] + "AAA=",
        X_SIG.split(":")[1],
        "test.example-1:",
        "test.example-1:!!!",
        "test.example-1:" + base64.b64encode(b"short").decode(),
        "test.example-1:" + base64.b64encode(bytes(64)).decode(),
        "",
        ":",
    ],
)
def test_verify_rejects_bad_signatures(sig: str) -> None:
    assert not parse_public_key(NIX_PK).verify(X_FINGERPRINT, sig)


def test_verify_never_raises_for_bad_key_bytes() -> None:
    assert not PublicKey("test.example-1", b"short").verify(X_FINGERPRINT, X_SIG)


def test_tampered_narinfo_fails() -> None:
    signed = sign_narinfo(Y_INFO, parse_secret_key(NIX_SK))
    public = parse_public_key(NIX_PK)
    for tampered in [
        dataclasses.replace(signed, nar_size=169),
        dataclasses.replace(signed, references=()),
        dataclasses.replace(signed, nar_hash=base32.format_hash("sha256", bytes(32))),
    ]:
        assert not verify_narinfo(tampered, [public])
    # Fields outside the fingerprint (URL, compression) are not covered, as in Nix.
    assert verify_narinfo(dataclasses.replace(signed, url="nar/other.nar"), [public])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("no-colon", "missing key name"),
        (":" + NIX_SK.split(":")[1], "missing key name"),
        ("k:***", "base64"),
        ("k:" + base64.b64encode(bytes(32)).decode(), "64 bytes"),
        (NIX_SK[:-8] + "AAAAAA==", "public half"),
    ],
)
def test_parse_secret_key_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_secret_key(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [("k", "missing key name"), ("k:" + base64.b64encode(bytes(64)).decode(), "32 bytes")],
)
def test_parse_public_key_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_public_key(text)


def test_load_secret_key(tmp_path: Path) -> None:
    path = tmp_path / "sk"
    path.write_text(NIX_SK)
    assert load_secret_key(path) == parse_secret_key(NIX_SK)
    path.write_text("k:" + base64.b64encode(bytes(64)).decode())
    with pytest.raises(ValueError, match=str(path)):
        load_secret_key(path)


def test_generate_key_rejects_bad_names() -> None:
    for name in ["", "a:b"]:
        with pytest.raises(ValueError):
            generate_key(name)


@settings(max_examples=30)
@given(st.from_regex(r"[a-z][a-z0-9.\-]{0,20}", fullmatch=True), st.binary(max_size=200))
def test_sign_verify_roundtrip(name: str, message: bytes) -> None:
    secret = generate_key(name)
    assert parse_secret_key(secret.to_text()) == secret
    public = parse_public_key(secret.public_key().to_text())
    sig = secret.sign(message)
    assert public.verify(message, sig)
    assert not public.verify(message + b"x", sig)
    assert not generate_key(name).public_key().verify(message, sig)
