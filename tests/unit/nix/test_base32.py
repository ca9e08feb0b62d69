"""Tests for nix-base32 and hash strings, against vectors printed by nix-hash --to-base32."""

from __future__ import annotations

import base64
import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bigtent.nix import base32

EMPTY_SHA256 = hashlib.sha256(b"").digest()
EMPTY_SHA256_NIX32 = "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"


@pytest.mark.parametrize(
    ("digest", "expected"),
    [
        (EMPTY_SHA256, EMPTY_SHA256_NIX32),
        (hashlib.sha256(b"abc").digest(), "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s"),
        (hashlib.sha1(b"abc").digest(), "kpcd173cq987hw957sx6m0868wv3x6d9"),
        (hashlib.md5(b"abc").digest(), "3jgzhjhz9zjvbb0kyj7jc500ch"),
        (b"", ""),
        (b"\x00", "00"),
        (b"\xff", "7z"),
    ],
)
def test_encode_matches_nix(digest: bytes, expected: str) -> None:
    assert base32.encode(digest) == expected
    assert base32.decode(expected) == digest


@pytest.mark.parametrize(("n_bytes", "length"), [(0, 0), (1, 2), (16, 26), (20, 32), (32, 52)])
def test_encoded_length(n_bytes: int, length: int) -> None:
    assert base32.encoded_length(n_bytes) == length


@given(st.binary(max_size=80))
def test_roundtrip(data: bytes) -> None:
    text = base32.encode(data)
    assert len(text) == base32.encoded_length(len(data))
    assert set(text) <= set(base32.ALPHABET)
    assert base32.decode(text) == data


@given(st.binary(max_size=80))
def test_encode_is_the_number_digit_by_digit(data: bytes) -> None:
    # Nix's definition, one digit at a time from the most significant (``encode`` goes two
    # at a time): odd and even digit counts alike.
    value = int.from_bytes(data, "little")
    digits = base32.encoded_length(len(data))
    expected = "".join(base32.ALPHABET[(value >> (5 * n)) & 31] for n in reversed(range(digits)))
    assert base32.encode(data) == expected


@pytest.mark.parametrize(
    "text",
    [
        "e" * 52,  # e is not a nix32 digit
        "0" * 51 + "u",
        "0" * 3,  # no byte count encodes to 3 digits
        "8" + "0" * 51,  # sets bits beyond 32 bytes
        "zz",
    ],
)
def test_decode_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        base32.decode(text)


def test_format_hash() -> None:
    assert base32.format_hash("sha256", EMPTY_SHA256) == f"sha256:{EMPTY_SHA256_NIX32}"
    with pytest.raises(ValueError, match="32 bytes"):
        base32.format_hash("sha256", b"\0" * 20)
    with pytest.raises(ValueError, match="unknown hash algorithm"):
        base32.format_hash("sha3", EMPTY_SHA256)


@pytest.mark.parametrize(
    "text",
    [
        f"sha256:{EMPTY_SHA256_NIX32}",
        f"sha256:{EMPTY_SHA256.hex()}",
        f"sha256:{base64.b64encode(EMPTY_SHA256).decode()}",
        f"sha256-{base64.b64encode(EMPTY_SHA256).decode()}",
        EMPTY_SHA256_NIX32,
        EMPTY_SHA256.hex(),
    ],
)
def test_parse_hash_spellings(text: str) -> None:
    assert base32.parse_hash(text) == EMPTY_SHA256


@pytest.mark.parametrize(
    "text",
    [
        f"sha1:{EMPTY_SHA256_NIX32}",  # wrong algorithm
        f"sha512-{base64.b64encode(EMPTY_SHA256).decode()}",
        f"sha256:{EMPTY_SHA256_NIX32[:-1]}",  # wrong length
        f"sha256-{EMPTY_SHA256.hex()}",  # SRI is base64 only
        f"sha256:{'g' * 64}",  # bad hex
        f"sha256:{'!' * 43}=",  # bad base64
        base64.b64encode(EMPTY_SHA256).decode(),  # bare base64 is not accepted
        "",
    ],
)
def test_parse_hash_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        base32.parse_hash(text)


def test_parse_hash_other_algorithm() -> None:
    digest = hashlib.sha1(b"abc").digest()
    assert base32.parse_hash("sha1:kpcd173cq987hw957sx6m0868wv3x6d9", "sha1") == digest
    assert base32.parse_hash(digest.hex(), "sha1") == digest


@given(st.sampled_from(sorted(base32.HASH_SIZES)), st.data())
def test_format_parse_roundtrip(algo: str, data: st.DataObject) -> None:
    digest = data.draw(
        st.binary(min_size=base32.HASH_SIZES[algo], max_size=base32.HASH_SIZES[algo])
    )
    assert base32.parse_hash(base32.format_hash(algo, digest), algo) == digest
    assert base32.parse_hash(f"{algo}-{base64.b64encode(digest).decode()}", algo) == digest


def test_compress_hash() -> None:
    assert base32.compress_hash(bytes([1, 2, 3, 4, 5]), 2) == bytes([1 ^ 3 ^ 5, 2 ^ 4])
    assert base32.compress_hash(b"ab", 4) == b"ab\0\0"
    with pytest.raises(ValueError):
        base32.compress_hash(b"ab", 0)


@given(st.binary(max_size=64), st.integers(min_value=1, max_value=40))
def test_compress_hash_xor_property(data: bytes, size: int) -> None:
    folded = base32.compress_hash(data, size)
    assert len(folded) == size
    acc = 0
    for b in data:
        acc ^= b
    total = 0
    for b in folded:
        total ^= b
    assert total == acc
