"""Tests for store path parsing and content-addressed path computation (vectors from Nix 2.8)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bigtent.nix import nar
from bigtent.nix.store_path import (
    STORE_DIR,
    StorePath,
    check_name,
    make_fixed_output_path,
    make_source_path,
    make_store_path,
    make_text_path,
)

HASH = "2k1m3w21csh3an1jbwlhglh9ixc9mi3a"


def test_parse_full_path() -> None:
    path = StorePath.parse(f"/nix/store/{HASH}-hello-2.12.1")
    assert path == StorePath(HASH, "hello-2.12.1")
    assert path.basename == f"{HASH}-hello-2.12.1"
    assert path.path == str(path) == f"{STORE_DIR}/{HASH}-hello-2.12.1"
    assert StorePath.parse_basename(path.basename) == path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f"/nix/store/{HASH}", "expected"),
        (f"/nix/store/{HASH}-", "expected"),
        (f"/tmp/{HASH}-x", "not in /nix/store"),
        (f"/nix/store/{HASH}-x/bin", "character"),
        (f"/nix/store/{HASH[:-1]}e-x", "hash part"),
        (f"/nix/store/{HASH[:-1]}-x", "expected"),
        (f"/nix/store/{HASH}-.hidden", "start with"),
        (f"/nix/store/{HASH}-a b", "character"),
        (f"/nix/store/{HASH}-{'a' * 212}", "longer than"),
        (f"/nix/store//{HASH}-x", "expected"),
    ],
)
def test_parse_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StorePath.parse(text)


def test_parse_remembers_paths_not_refusals() -> None:
    text = f"/nix/store/{HASH}-remembered"
    first = StorePath.parse(text)
    assert StorePath.parse(text) is first  # the remembered value
    bad = f"/nix/store/{HASH}-a b"
    for _ in range(2):  # a refusal is not remembered as anything: it raises each time
        with pytest.raises(ValueError, match="character"):
            StorePath.parse(bad)


def test_name_rules() -> None:
    check_name("a" * 211)
    check_name("A-Za-z0-9+-._?=")
    for bad in ["", ".x", "a/b", "ä", "a:b", "a" * 212]:
        with pytest.raises(ValueError):
            check_name(bad)


@given(
    st.from_regex(r"[0-9a-df-np-sv-z]{32}", fullmatch=True),
    st.from_regex(r"[A-Za-z0-9+\-_?=][A-Za-z0-9+\-._?=]{0,40}", fullmatch=True),
)
def test_parse_roundtrip(hash_part: str, name: str) -> None:
    path = StorePath(hash_part, name)
    assert StorePath.parse(path.path) == path
    assert StorePath.parse_basename(path.basename) == path


def test_ordering_is_by_basename() -> None:
    paths = [
        StorePath.parse_basename(f"{h * 32}-{n}") for h, n in [("1", "b"), ("0", "z"), ("1", "a")]
    ]
    assert sorted(paths) == sorted(paths, key=lambda p: p.basename)


def test_text_paths_match_nix() -> None:
    # nix-instantiate --eval -E 'builtins.toFile "x" "hello"' and friends.
    assert make_text_path("x", hashlib.sha256(b"hello").digest(), []) == (
        "/nix/store/4g4g9i669dl63abpww0djbl2jxl6bwiz-x"
    )
    a = "/nix/store/draf2pm7skqzj8g3kv0bamg214p6sd70-a"
    assert make_text_path("a", hashlib.sha256(b"A").digest(), []) == a
    content = f"refs {a}".encode()
    expected = "/nix/store/5p45md1nk9r5a10pzyiqprjiisxniy23-y"
    assert make_text_path("y", hashlib.sha256(content).digest(), [a]) == expected
    # References may also be given as basenames.
    assert make_text_path("y", hashlib.sha256(content).digest(), [a[11:]]) == expected


def test_fixed_output_paths_match_nix(tmp_path: Path) -> None:
    # nix-store --add-fixed [--recursive] ALGO of a file containing "hello".
    data = b"hello"
    assert make_fixed_output_path("hf", "flat", "sha256", hashlib.sha256(data).digest()) == (
        "/nix/store/bs5y300y0fl0z4753g1lmzv33iwhgyz9-hf"
    )
    assert make_fixed_output_path("hf", "flat", "sha1", hashlib.sha1(data).digest()) == (
        "/nix/store/65c4rwfbqn4cxbbdzgp3p2gd5pq9rll1-hf"
    )
    file = tmp_path / "hf"
    file.write_bytes(data)
    nar_bytes = b"".join(nar.dump_path(file))
    digest = hashlib.sha1(nar_bytes).digest()
    assert make_fixed_output_path("hf", "recursive", "sha1", digest) == (
        "/nix/store/yj0qy7vdllj2cls6y522imjmcp4v7ga7-hf"
    )
    nar_sha256 = hashlib.sha256(nar_bytes).digest()
    assert make_fixed_output_path("hf", "recursive", "sha256", nar_sha256) == make_source_path(
        "hf", nar_sha256
    )


def test_fixed_output_rejects() -> None:
    digest = hashlib.sha256(b"").digest()
    with pytest.raises(ValueError, match="references"):
        make_fixed_output_path("x", "flat", "sha256", digest, [f"/nix/store/{HASH}-y"])
    with pytest.raises(ValueError, match="digest"):
        make_fixed_output_path("x", "flat", "sha1", digest)
    with pytest.raises(ValueError, match="method"):
        make_fixed_output_path("x", "weird", "sha256", digest)  # type: ignore[arg-type]


def test_source_path_type_string() -> None:
    digest = hashlib.sha256(b"nar").digest()
    ref_b = f"/nix/store/{'b' * 32}-b"
    ref_a = f"/nix/store/{'a' * 32}-a"
    expected = make_store_path(f"source:{ref_a}:{ref_b}:self", digest, "n")
    assert make_source_path("n", digest, [ref_b, ref_a], self_reference=True) == expected
    assert make_source_path("n", digest) == make_store_path("source", digest, "n")


def test_make_store_path_validates() -> None:
    with pytest.raises(ValueError):
        make_store_path("source", b"short", "x")
    with pytest.raises(ValueError):
        make_store_path("source", bytes(32), ".x")
    with pytest.raises(ValueError):
        make_text_path("x", bytes(32), ["not-a-path"])
