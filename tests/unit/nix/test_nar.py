"""Tests for NAR dumping, strict validation, restore and reference scanning."""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bigtent.nix import base32
from bigtent.nix.nar import (
    FIND_EACH_MAX,
    NAR_MAGIC,
    NarError,
    NarValidator,
    ReferenceScanner,
    dump_path,
    restore,
    validate,
)
from tests import nar_trees
from tests.nar_trees import Tree, write_tree

# ----------------------------------------------------------------------------- helpers

trees = nar_trees.trees(max_file_bytes=200)


def tree_nar(tree: Tree) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        write_tree(root, tree)
        return b"".join(dump_path(root, chunk_size=64))


def s(data: bytes) -> bytes:
    """One NAR string."""
    return struct.pack("<Q", len(data)) + data + b"\0" * (-len(data) % 8)


def nar(*tokens: bytes) -> bytes:
    return b"".join(s(t) for t in tokens)


def regular(contents: bytes, executable: bool = False) -> list[bytes]:
    exe = [b"executable", b""] if executable else []
    return [b"(", b"type", b"regular", *exe, b"contents", contents, b")"]


def entry(name: bytes, node: list[bytes]) -> list[bytes]:
    return [b"entry", b"(", b"name", name, b"node", *node, b")"]


def directory(*entries: list[bytes]) -> list[bytes]:
    return [b"(", b"type", b"directory", *(t for e in entries for t in e), b")"]


def split_at(data: bytes, cuts: list[int]) -> Iterator[bytes]:
    last = 0
    for cut in sorted({c % (len(data) + 1) for c in cuts}):
        yield data[last:cut]
        last = cut
    yield data[last:]


def feed_all(data: bytes, cuts: list[int] | None = None) -> NarValidator:
    validator = NarValidator()
    for chunk in split_at(data, cuts or []):
        validator.feed(chunk)
    validator.finish()
    return validator


# ----------------------------------------------------------------------------- dump


def test_dump_known_file(tmp_path: Path) -> None:
    file = tmp_path / "f"
    file.write_bytes(b"hello")
    expected = nar(NAR_MAGIC, *regular(b"hello"))
    assert b"".join(dump_path(file)) == expected
    file.chmod(0o744)
    assert b"".join(dump_path(file)) == nar(NAR_MAGIC, *regular(b"hello", executable=True))
    file.chmod(0o654)  # Nix looks only at the owner's execute bit
    assert b"".join(dump_path(file)) == expected


def test_dump_directory_sorted_by_bytes(tmp_path: Path) -> None:
    root = tmp_path / "d"
    root.mkdir()
    for name in ["b", "B", "a", "ä"]:
        (root / name).write_bytes(b"")
    (root / "l").symlink_to("a")
    expected = nar(
        NAR_MAGIC,
        *directory(
            entry(b"B", regular(b"")),
            entry(b"a", regular(b"")),
            entry(b"b", regular(b"")),
            entry(b"l", [b"(", b"type", b"symlink", b"target", b"a", b")"]),
            entry("ä".encode(), regular(b"")),
        ),
    )
    assert b"".join(dump_path(root)) == expected


def test_dump_streams_large_files_in_bounded_chunks(tmp_path: Path) -> None:
    file = tmp_path / "big"
    file.write_bytes(os.urandom(100_000))
    chunks = list(dump_path(file, chunk_size=4096))
    assert max(len(c) for c in chunks) < 2 * 4096
    assert b"".join(chunks) == nar(NAR_MAGIC, *regular(file.read_bytes()))


def test_dump_rejects_unsupported_type(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="unsupported type"):
        b"".join(dump_path(fifo))


# ----------------------------------------------------------------------------- validate


def test_validator_measures_size_and_hash() -> None:
    data = nar(NAR_MAGIC, *regular(b"x" * 1000))
    validator = feed_all(data, [1, 17, 500])
    assert validator.nar_size == len(data)
    assert validator.sha256() == hashlib.sha256(data).digest()
    assert validate([data]).nar_size == len(data)


VALID = [
    nar(NAR_MAGIC, *regular(b"")),
    nar(NAR_MAGIC, *regular(b"abc", executable=True)),
    nar(NAR_MAGIC, b"(", b"type", b"symlink", b"target", b"../x", b")"),
    nar(NAR_MAGIC, *directory()),
    nar(
        NAR_MAGIC,
        *directory(entry(b"a", directory(entry(b"b", regular(b"1")))), entry(b"c", regular(b""))),
    ),
]


@pytest.mark.parametrize("data", VALID)
def test_validator_accepts(data: bytes) -> None:
    feed_all(data)
    feed_all(data, list(range(len(data))))  # one byte at a time


def _hostile_depth(depth: int) -> bytes:
    tokens: list[bytes] = [NAR_MAGIC]
    for _ in range(depth):
        tokens += [b"(", b"type", b"directory", b"entry", b"(", b"name", b"d", b"node"]
    tokens += regular(b"")
    for _ in range(depth):
        tokens += [b")", b")"]
    return nar(*tokens)


def test_validator_handles_deep_nesting_without_recursion() -> None:
    feed_all(_hostile_depth(5000))


_GOOD_A = nar(NAR_MAGIC, *regular(b"a"))

BAD = {
    "bad magic": nar(b"nix-archive-2", *regular(b"")),
    "bad open": nar(NAR_MAGIC, b"[", b"type", b"regular", b"contents", b"", b")"),
    "bad type": nar(NAR_MAGIC, b"(", b"type", b"fifo", b")"),
    "missing contents": nar(NAR_MAGIC, b"(", b"type", b"regular", b")"),
    "executable after contents": nar(
        NAR_MAGIC, b"(", b"type", b"regular", b"contents", b"", b"executable", b"", b")"
    ),
    "executable with value": nar(
        NAR_MAGIC, b"(", b"type", b"regular", b"executable", b"1", b"contents", b"", b")"
    ),
    "unsorted": nar(NAR_MAGIC, *directory(entry(b"b", regular(b"")), entry(b"a", regular(b"")))),
    "duplicate": nar(NAR_MAGIC, *directory(entry(b"a", regular(b"")), entry(b"a", regular(b"")))),
    "slash": nar(NAR_MAGIC, *directory(entry(b"a/b", regular(b"")))),
    "dot": nar(NAR_MAGIC, *directory(entry(b".", regular(b"")))),
    "dotdot": nar(NAR_MAGIC, *directory(entry(b"..", regular(b"")))),
    "nul": nar(NAR_MAGIC, *directory(entry(b"a\0", regular(b"")))),
    "empty name": nar(NAR_MAGIC, *directory(entry(b"", regular(b"")))),
    "long name": nar(NAR_MAGIC, *directory(entry(b"a" * 256, regular(b"")))),
    "empty target": nar(NAR_MAGIC, b"(", b"type", b"symlink", b"target", b"", b")"),
    "long target": nar(NAR_MAGIC, b"(", b"type", b"symlink", b"target", b"a" * 5000, b")"),
    "huge length": s(NAR_MAGIC) + struct.pack("<Q", 2**63) + b"(" * 64,
    "bad padding": s(NAR_MAGIC)[:-1] + b"\x01" + nar(*regular(b"")),
    "bad content padding": _GOOD_A[:-17] + b"\x01" + _GOOD_A[-16:],
    "trailing garbage": nar(NAR_MAGIC, *regular(b"")) + b"\0",
    "two nars": nar(NAR_MAGIC, *regular(b"")) * 2,
    "unclosed entry": nar(
        NAR_MAGIC,
        b"(",
        b"type",
        b"directory",
        b"entry",
        b"(",
        b"name",
        b"a",
        b"node",
        *regular(b""),
        b")",
    ),
    "missing node": nar(
        NAR_MAGIC, b"(", b"type", b"directory", b"entry", b"(", b"name", b"a", b")", b")"
    ),
    "truncated": nar(NAR_MAGIC, *regular(b"abc"))[:-1],
    "empty": b"",
}


@pytest.mark.parametrize("data", BAD.values(), ids=BAD.keys())
def test_validator_rejects(data: bytes) -> None:
    with pytest.raises(NarError):
        feed_all(data)
    with pytest.raises(NarError):
        feed_all(data, list(range(len(data))))


@pytest.mark.parametrize("name", ["bad padding", "bad content padding"])
def test_validator_checks_padding(name: str) -> None:
    with pytest.raises(NarError, match="padding"):
        feed_all(BAD[name])


def test_validator_stays_failed() -> None:
    validator = NarValidator()
    with pytest.raises(NarError):
        validator.feed(BAD["bad magic"])
    with pytest.raises(NarError, match="already rejected"):
        validator.feed(b"")
    with pytest.raises(NarError, match="already rejected"):
        validator.finish()


def test_validator_buffers_little_for_large_contents() -> None:
    validator = NarValidator()
    validator.feed(
        s(NAR_MAGIC) + nar(b"(", b"type", b"regular", b"contents") + struct.pack("<Q", 10**9)
    )
    for _ in range(100):
        validator.feed(b"\0" * 65536)
        assert len(validator._buf) == 0


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(trees, st.lists(st.integers(min_value=0), max_size=20))
def test_validator_accepts_every_dump(tree: Tree, cuts: list[int]) -> None:
    data = tree_nar(tree)
    validator = feed_all(data, cuts)
    assert validator.nar_size == len(data)


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(trees, st.data())
def test_validator_rejects_truncated_and_extended(tree: Tree, data: st.DataObject) -> None:
    good = tree_nar(tree)
    cut = data.draw(st.integers(min_value=0, max_value=len(good) - 1))
    with pytest.raises(NarError):
        feed_all(good[:cut])
    extra = data.draw(st.binary(min_size=1, max_size=16))
    with pytest.raises(NarError):
        feed_all(good + extra)


@settings(max_examples=80, suppress_health_check=[HealthCheck.too_slow])
@given(trees, st.data())
def test_mutated_nar_is_rejected_or_still_canonical(tree: Tree, data: st.DataObject) -> None:
    """A NAR the validator accepts must be exactly what dumping its restored tree gives, so a
    corrupted byte either fails validation or yields another canonical NAR (e.g. in contents)."""
    good = tree_nar(tree)
    pos = data.draw(st.integers(min_value=0, max_value=len(good) - 1))
    flip = data.draw(st.integers(min_value=1, max_value=255))
    bad = good[:pos] + bytes([good[pos] ^ flip]) + good[pos + 1 :]
    try:
        feed_all(bad)
    except NarError:
        return
    with tempfile.TemporaryDirectory() as tmp:
        dest = Path(tmp) / "out"
        restore([bad], dest)
        assert b"".join(dump_path(dest)) == bad


# ----------------------------------------------------------------------------- restore


@settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(trees, st.lists(st.integers(min_value=0), max_size=10))
def test_restore_roundtrip(tree: Tree, cuts: list[int]) -> None:
    data = tree_nar(tree)
    with tempfile.TemporaryDirectory() as tmp:
        dest = Path(tmp) / "out"
        restore(split_at(data, cuts), dest)
        assert b"".join(dump_path(dest)) == data


def test_restore_modes(tmp_path: Path) -> None:
    data = nar(
        NAR_MAGIC,
        *directory(entry(b"x", regular(b"#!", executable=True)), entry(b"y", regular(b""))),
    )
    restore([data], tmp_path / "out")
    assert os.access(tmp_path / "out" / "x", os.X_OK)
    assert not (tmp_path / "out" / "y").stat().st_mode & 0o111


def test_restore_refuses_existing_destination(tmp_path: Path) -> None:
    with pytest.raises(FileExistsError):
        restore([nar(NAR_MAGIC, *regular(b""))], tmp_path)


@pytest.mark.parametrize("name", ["unsorted", "dotdot", "truncated", "slash"])
def test_restore_cleans_up_on_error(tmp_path: Path, name: str) -> None:
    dest = tmp_path / "out"
    with pytest.raises(NarError):
        restore([BAD[name]], dest)
    assert not dest.exists()
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- references

hash_parts = st.from_regex(r"[0-9a-df-np-sv-z]{32}", fullmatch=True)
noise = st.lists(
    st.one_of(
        st.sampled_from([b"/", b"-", b"\0", b"e", b" ", b"\n"]),
        st.binary(max_size=3),
        st.text("0123456789abcdfghijklmnpqrsvwxyz", max_size=40).map(str.encode),
    ),
    max_size=12,
).map(b"".join)


def _scan(hashes: list[str], data: bytes, cuts: list[int]) -> set[str]:
    scanner = ReferenceScanner(hashes)
    for chunk in split_at(data, cuts):
        scanner.feed(chunk)
    return scanner.found


def test_scanner_table() -> None:
    h1, h2 = "2k1m3w21csh3an1jbwlhglh9ixc9mi3a", "mf4lhp3dh6hd4n8d91pnz56n9q463rqr"
    data = f"PATH=/nix/store/{h1}-bash/bin".encode()
    assert _scan([h1, h2], data, []) == {h1}
    assert _scan([h1, h2], data, [20, 30]) == {h1}  # split inside the hash
    assert _scan([h1, h2], data, list(range(len(data)))) == {h1}
    assert _scan([h1], b"0" + h1.encode() + b"a", []) == {h1}  # inside a longer run
    assert _scan([h1], h1[:31].encode() + b"e" + h1[31:].encode(), []) == set()
    assert _scan([], data, []) == set()
    with pytest.raises(ValueError):
        ReferenceScanner(["tooshort"])
    with pytest.raises(ValueError):
        ReferenceScanner(["e" * 32])
    for bad in ("0" * 31 + "e", "0" * 31 + "\u00e9"[:1], "0" * 31 + "A", "0" * 33):
        with pytest.raises(ValueError, match="not a store path hash part"):
            ReferenceScanner([h1, bad])


@settings(max_examples=300)
@given(
    # Up to FIND_EACH_MAX + 4 candidates: the scanner searches for each directly (a few
    # left) or maps the runs (many left), switching as they are found.
    st.lists(hash_parts, min_size=1, max_size=FIND_EACH_MAX + 4, unique=True),
    st.lists(st.tuples(noise, st.integers(min_value=0, max_value=15)), max_size=12),
    st.lists(st.integers(min_value=0), max_size=10),
)
def test_scanner_matches_substring_oracle(
    hashes: list[str], parts: list[tuple[bytes, int]], cuts: list[int]
) -> None:
    # Present hashes are interleaved with noise that can extend their nix32 runs; the last
    # candidate is never inserted, so it can only be found if the noise happens to spell it.
    data = b"".join(
        junk + (hashes[i % len(hashes)].encode() if i < len(hashes) - 1 else b"")
        for junk, i in parts
    )
    expected = {h for h in hashes if h.encode() in data}
    assert _scan(hashes, data, cuts) == expected


def test_scanner_switches_to_direct_search_as_hashes_are_found() -> None:
    many = [base32.encode(hashlib.sha1(str(i).encode()).digest()) for i in range(12)]
    scanner = ReferenceScanner(many)
    # Five found by mapping runs: seven left, each searched for directly from then on,
    # one of them split across chunks.
    scanner.feed(" ".join(many[:5]).encode() + b" " + many[5][:10].encode())
    scanner.feed(many[5][10:].encode() + b"/" + many[6].encode())
    assert scanner.found == set(many[:7])
    scanner.feed(many[6].encode() + b"e" + "".join(many[7:]).encode())
    assert scanner.found == set(many)


def test_scanner_is_linear_on_long_runs() -> None:
    h = base32.encode(hashlib.sha1(b"x").digest())
    scanner = ReferenceScanner([h])
    for _ in range(20):
        scanner.feed(b"a" * 50_000)
    scanner.feed(h.encode())
    assert scanner.found == {h}
