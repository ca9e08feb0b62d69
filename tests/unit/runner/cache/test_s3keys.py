"""Object keys in the bucket never leave the prefix, whatever the input (pure)."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bigtent.config.cache import normalize_prefix
from bigtent.nix import base32
from bigtent.nix.compression import Compression
from bigtent.runner.cache.s3 import IncomingObject, expired_incoming
from bigtent.runner.cache.s3keys import (
    LEASE_ID,
    NAR_NAME,
    incoming_key,
    incoming_prefix,
    nar_key,
    verifying_key,
)
from bigtent.runner.scheduler.leases import new_lease_id

HASH = bytes(range(32))
NAME = f"nar/{base32.encode(HASH)}.nar.zst"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("", ""),
        ("  ", ""),
        ("cache", "cache/"),
        ("cache/", "cache/"),
        ("a/b/c", "a/b/c/"),
        ("team-1/nix.cache", "team-1/nix.cache/"),
    ],
)
def test_normalize_prefix(given: str, expected: str) -> None:
    assert normalize_prefix(given) == expected


@pytest.mark.parametrize(
    "bad", ["/abs", "a//b", "a/../b", "..", "./x", "a/./b", "sp ace", "a\\b", "ü", "a?b", "%2e%2e"]
)
def test_bad_prefixes_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        normalize_prefix(bad)


def test_nar_key() -> None:
    assert nar_key("p/", NAME) == "p/" + NAME
    for ext in ("", ".xz"):
        name = f"nar/{base32.encode(HASH)}.nar{ext}"
        assert nar_key("", name) == name


@pytest.mark.parametrize(
    "bad",
    [
        "nar/../incoming/x",
        "incoming/abc/def.nar",
        f"nar/{base32.encode(HASH)}.nar.gz",
        f"nar/{base32.encode(HASH)[:-1]}e.nar",  # 'e' is not a nix-base32 digit
        f"nar/{base32.encode(HASH)}.nar.zst/../../x",
        f"/nar/{base32.encode(HASH)}.nar",
        f"nar/{base32.encode(HASH)}.nar\n",
        "nar/" + "0" * 53 + ".nar",
    ],
)
def test_only_nar_file_names_make_keys(bad: str) -> None:
    with pytest.raises(ValueError):
        nar_key("p/", bad)


def test_incoming_key() -> None:
    lease = new_lease_id()
    key = incoming_key("p/", lease, HASH, Compression.XZ)
    assert key == f"p/incoming/{lease}/{base32.encode(HASH)}.nar.xz"
    assert key.startswith(incoming_prefix("p/"))
    assert incoming_key("", lease, HASH, Compression.NONE).endswith(".nar")


def test_verifying_key_is_next_to_the_upload_under_another_name() -> None:
    lease = new_lease_id()
    upload = incoming_key("p/", lease, HASH, Compression.ZSTD)
    nonce = os.urandom(16).hex()
    key = verifying_key(upload, nonce)
    assert key == f"p/incoming/{lease}/verifying-{nonce}-{base32.encode(HASH)}.nar.zst"
    assert key.startswith(incoming_prefix("p/")) and key != upload
    # No agent input reaches it: an upload's name is a hash, never "verifying-...".
    assert not key.rpartition("/")[2].startswith(base32.encode(HASH))
    for bad in ("", "../x", "ABCDEF0123456789", "0" * 15, "0" * 65):
        with pytest.raises(ValueError):
            verifying_key(upload, bad)


@pytest.mark.parametrize(
    "lease", ["../../nar", "a/b" * 8, "x" * 15, "x" * 129, "lease id with spaces", "ü" * 20, ""]
)
def test_incoming_key_refuses_anything_but_a_lease_id(lease: str) -> None:
    with pytest.raises(ValueError):
        incoming_key("p/", lease, HASH, Compression.ZSTD)
    with pytest.raises(ValueError):
        incoming_key("p/", new_lease_id(), HASH[:31], Compression.ZSTD)


def test_issued_lease_ids_are_valid_in_keys() -> None:
    for _ in range(200):
        assert LEASE_ID.fullmatch(new_lease_id())


def _inside(prefix: str, key: str) -> bool:
    rest = key[len(prefix) :]
    return key.startswith(prefix) and all(seg not in ("", ".", "..") for seg in rest.split("/"))


@given(prefix=st.text(max_size=40), name=st.text(max_size=80))
def test_nar_keys_stay_inside_the_prefix(prefix: str, name: str) -> None:
    try:
        clean = normalize_prefix(prefix)
        key = nar_key(clean, name)
    except ValueError:
        return
    assert _inside(clean, key)
    assert NAR_NAME.fullmatch(key[len(clean) :])
    assert clean == "" or all(seg not in (".", "..", "") for seg in clean[:-1].split("/"))


@given(
    prefix=st.sampled_from(["", "a/", "x/y/"]),
    lease=st.text(max_size=140) | st.text(alphabet="abc-_/.", max_size=40),
    nar_hash=st.binary(min_size=30, max_size=34),
    compression=st.sampled_from(list(Compression)),
)
def test_incoming_keys_stay_inside_incoming(
    prefix: str, lease: str, nar_hash: bytes, compression: Compression
) -> None:
    try:
        key = incoming_key(prefix, lease, nar_hash, compression)
    except ValueError:
        return
    assert _inside(incoming_prefix(prefix), key)
    assert key.count("/") == prefix.count("/") + 2


def test_expired_incoming() -> None:
    objects = [IncomingObject("incoming/a/1", 1000.0), IncomingObject("incoming/b/2", 1990.0)]
    assert expired_incoming(objects, 2000.0, 100.0) == ["incoming/a/1"]
    assert expired_incoming(objects, 2000.0, 5000.0) == []
    assert expired_incoming([], 0.0, 1.0) == []


def test_random_names_are_refused() -> None:
    for _ in range(100):
        with pytest.raises(ValueError):
            nar_key("", "nar/" + os.urandom(20).hex() + ".nar")
