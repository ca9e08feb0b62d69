"""Tests for narinfo parsing, rendering and fingerprints."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bigtent.nix import base32
from bigtent.nix.narinfo import NarInfo, fingerprint, parse, render

Y = "/nix/store/5p45md1nk9r5a10pzyiqprjiisxniy23-y"
A = "draf2pm7skqzj8g3kv0bamg214p6sd70-a"
# `nix path-info --json` of Y: narHash sha256-LgTd/mNkZFHPTpWKz/26lHTcZmYwY9TnQphp4RQ2FtY=.
Y_NAR_HASH = base32.format_hash(
    "sha256", base32.parse_hash("sha256-LgTd/mNkZFHPTpWKz/26lHTcZmYwY9TnQphp4RQ2FtY=")
)

TEXT = f"""StorePath: {Y}
URL: nar/1abc.nar.zst
Compression: zstd
FileHash: sha256:{"0" * 52}
FileSize: 100
NarHash: {Y_NAR_HASH}
NarSize: 168
References: {A}
Deriver: mf4lhp3dh6hd4n8d91pnz56n9q463rqr-x.drv
Sig: b:xyz
Sig: a:abc
"""


def test_parse_and_render() -> None:
    info = parse(TEXT)
    assert info == NarInfo(
        store_path=Y,
        url="nar/1abc.nar.zst",
        compression="zstd",
        file_hash=f"sha256:{'0' * 52}",
        file_size=100,
        nar_hash=Y_NAR_HASH,
        nar_size=168,
        references=(A,),
        deriver="mf4lhp3dh6hd4n8d91pnz56n9q463rqr-x.drv",
        sigs=("a:abc", "b:xyz"),
        ca=None,
    )
    rendered = render(info)
    assert rendered.splitlines()[:9] == TEXT.splitlines()[:9]
    assert parse(rendered) == info


def test_parse_defaults_and_normalisation() -> None:
    digest = base32.parse_hash(Y_NAR_HASH)
    text = (
        f"StorePath: {Y}\nURL: u\nNarHash: sha256:{digest.hex()}\nNarSize: 1\n"
        f"References: {A} /nix/store/{A} {'0' * 32}-b\nDeriver: unknown-deriver\n"
        "System: x86_64-linux\nCA: text:sha256:abc\n"
    )
    info = parse(text)
    assert info.compression == "bzip2"
    assert info.nar_hash == Y_NAR_HASH
    assert info.references == (f"{'0' * 32}-b", A)
    assert info.deriver is None
    assert info.file_hash is None and info.file_size is None
    assert info.ca == "text:sha256:abc"
    assert "FileHash" not in render(info)
    assert render(info).endswith("CA: text:sha256:abc\n")


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (("StorePath: ", "StorePath: /tmp/x\nX: "), "StorePath"),
        (("StorePath: /nix/store/5p45", "Foo: /nix/store/5p45"), "StorePath"),
        (("URL: nar/1abc.nar.zst\n", ""), "URL"),
        (("NarHash: sha256:", "NarHash: md5:"), "NarHash"),
        (("NarHash: ", "Other: "), "NarHash"),
        (("NarSize: 168", "NarSize: -1"), "NarSize"),
        (("NarSize: 168", "NarSize: 0"), "NarSize"),
        (("NarSize: 168", "NarSize: \u0661"), "NarSize"),
        (("FileSize: 100", "FileSize: x"), "FileSize"),
        (("FileHash: sha256:0", "FileHash: sha256:e"), "FileHash"),
        ((f"References: {A}", "References: nonsense"), "References"),
        (("Deriver: mf4l", "Deriver: "), "Deriver"),
        (("Compression: zstd", "Compression: zstd\nCompression: xz"), "Compression"),
        (("Compression: zstd", "Compression zstd"), "line 3"),
    ],
)
def test_parse_rejects(change: tuple[str, str], key: str) -> None:
    text = TEXT.replace(*change, 1)
    assert text != TEXT
    with pytest.raises(ValueError, match=key):
        parse(text)


def test_fingerprint_matches_nix_form() -> None:
    expected = f"1;{Y};{Y_NAR_HASH};168;/nix/store/{A}".encode()
    assert fingerprint(Y, Y_NAR_HASH, 168, [A]) == expected
    assert parse(TEXT).fingerprint() == expected
    # Hash spellings are normalised, references sorted and deduplicated, full paths accepted.
    sri = "sha256-LgTd/mNkZFHPTpWKz/26lHTcZmYwY9TnQphp4RQ2FtY="
    b = f"/nix/store/{'0' * 32}-b"
    assert fingerprint(Y, sri, 168, [f"/nix/store/{A}", b, A]) == (
        f"1;{Y};{Y_NAR_HASH};168;{b},/nix/store/{A}".encode()
    )
    assert fingerprint(Y, Y_NAR_HASH, 1, []) == f"1;{Y};{Y_NAR_HASH};1;".encode()
    with pytest.raises(ValueError, match="size"):
        fingerprint(Y, Y_NAR_HASH, 0, [])


basenames = st.from_regex(r"[0-9a-df-np-sv-z]{32}-[a-z][a-z0-9.\-]{0,20}", fullmatch=True)


@given(
    st.builds(
        NarInfo,
        store_path=basenames.map(lambda b: f"/nix/store/{b}"),
        url=st.from_regex(r"nar/[a-z0-9]{1,20}\.nar(\.xz)?", fullmatch=True),
        compression=st.sampled_from(["none", "xz", "zstd"]),
        file_hash=st.none()
        | st.binary(min_size=32, max_size=32).map(lambda d: base32.format_hash("sha256", d)),
        file_size=st.none() | st.integers(min_value=0, max_value=2**50),
        nar_hash=st.binary(min_size=32, max_size=32).map(lambda d: base32.format_hash("sha256", d)),
        nar_size=st.integers(min_value=1, max_value=2**50),
        references=st.lists(basenames, unique=True).map(lambda r: tuple(sorted(r))),
        deriver=st.none() | basenames.map(lambda b: b + ".drv"),
        sigs=st.lists(
            st.from_regex(r"[a-z.\-]{1,10}:[A-Za-z0-9+/]{86}==", fullmatch=True), unique=True
        ).map(lambda s: tuple(sorted(s))),
        ca=st.none() | st.just("fixed:r:sha256:" + "1" * 52),
    )
)
def test_render_parse_roundtrip(info: NarInfo) -> None:
    assert parse(render(info)) == info


def test_fingerprint_changes_with_every_field() -> None:
    info = parse(TEXT)
    base = info.fingerprint()
    other_hash = base32.format_hash("sha256", hashlib.sha256(b"other").digest())
    for changed in [
        dataclasses.replace(info, nar_hash=other_hash),
        dataclasses.replace(info, nar_size=169),
        dataclasses.replace(info, references=()),
        dataclasses.replace(info, store_path=f"/nix/store/{A}"),
    ]:
        assert changed.fingerprint() != base
