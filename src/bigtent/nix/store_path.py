"""Store path values and Nix's rules for computing content-addressed store paths."""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from bigtent.nix import base32

STORE_DIR = "/nix/store"
"""The only store directory bigtent supports: paths and their hashes depend on it."""

HASH_PART_LEN = 32
"""Length of the nix32 hash part of a store path (160 bits)."""

MAX_NAME_LEN = 211
"""Longest name Nix allows, so a basename fits in 255 bytes with the hash and dash."""

PARSED_PATHS = 8192
"""Store paths whose parse is remembered (``StorePath.parse``): the runner parses the same
paths again and again (an output's reference candidates, its inputs' closures, the
references it signs), about 3 us each; a remembered one costs a dictionary lookup. At most
this many, each at most 255 characters and its ``StorePath``: about 4 MB."""

_HASH_PART_RE = re.compile(r"[0-9a-df-np-sv-z]{32}")
_NAME_RE = re.compile(r"[A-Za-z0-9+\-._?=]+")


def _check_hash_part(hash_part: str, original: str) -> None:
    if not _HASH_PART_RE.fullmatch(hash_part):
        raise ValueError(
            f"invalid store path {original!r}: hash part must be {HASH_PART_LEN} nix-base32 "
            f"characters (got {hash_part!r})"
        )


def check_name(name: str) -> None:
    """Apply Nix's store path name rules (checkName), raising ValueError naming the rule."""
    if not name:
        raise ValueError("store path name must not be empty")
    if len(name) > MAX_NAME_LEN:
        raise ValueError(f"store path name {name!r} is longer than {MAX_NAME_LEN} characters")
    if name.startswith("."):
        raise ValueError(f"store path name {name!r} must not start with '.'")
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"store path name {name!r} contains a character outside A-Za-z0-9+-._?=")


@dataclass(frozen=True, slots=True, order=True)
class StorePath:
    """A validated `/nix/store/<hash>-<name>`; ordering matches Nix's (by basename)."""

    hash_part: str
    name: str

    @classmethod
    def parse(cls, text: str) -> StorePath:
        """Parse a full store path; only paths directly in STORE_DIR are store paths.

        The last ``PARSED_PATHS`` paths parsed are remembered (a ``StorePath`` never changes;
        a text that is not a store path raises every time)."""
        return _parse_path(text)

    @classmethod
    def parse_basename(cls, basename: str, *, original: str | None = None) -> StorePath:
        """Parse `<hash>-<name>` as found in narinfo References and Deriver fields."""
        shown = basename if original is None else original
        if len(basename) < HASH_PART_LEN + 2 or basename[HASH_PART_LEN] != "-":
            raise ValueError(f"invalid store path {shown!r}: expected <32-char hash>-<name>")
        hash_part, name = basename[:HASH_PART_LEN], basename[HASH_PART_LEN + 1 :]
        _check_hash_part(hash_part, shown)
        try:
            check_name(name)
        except ValueError as exc:
            raise ValueError(f"invalid store path {shown!r}: {exc}") from None
        return cls(hash_part, name)

    @property
    def basename(self) -> str:
        return f"{self.hash_part}-{self.name}"

    @property
    def path(self) -> str:
        return f"{STORE_DIR}/{self.basename}"

    def __str__(self) -> str:
        return self.path


@functools.lru_cache(maxsize=PARSED_PATHS)
def _parse_path(text: str) -> StorePath:
    """``StorePath.parse``, remembered."""
    prefix = STORE_DIR + "/"
    if not text.startswith(prefix):
        raise ValueError(f"invalid store path {text!r}: not in {STORE_DIR}")
    return StorePath.parse_basename(text[len(prefix) :], original=text)


def _full_path(ref: str) -> str:
    """Accept a reference as a full path or a basename and return the validated full path."""
    if ref.startswith("/"):
        return StorePath.parse(ref).path
    return StorePath.parse_basename(ref).path


def _make_type(kind: str, references: Iterable[str], self_reference: bool = False) -> str:
    parts = [kind, *sorted({_full_path(ref) for ref in references})]
    if self_reference:
        parts.append("self")
    return ":".join(parts)


def make_store_path(type_: str, inner_sha256: bytes, name: str) -> str:
    """Nix's makeStorePath: the hash part is the nix32 of the 20-byte XOR fold of
    sha256("<type>:sha256:<hex inner>:/nix/store:<name>")."""
    check_name(name)
    if len(inner_sha256) != 32:
        raise ValueError(f"inner hash must be a 32-byte sha256 digest (got {len(inner_sha256)})")
    fingerprint = f"{type_}:sha256:{inner_sha256.hex()}:{STORE_DIR}:{name}"
    digest = hashlib.sha256(fingerprint.encode()).digest()
    hash_part = base32.encode(base32.compress_hash(digest, 20))
    return f"{STORE_DIR}/{hash_part}-{name}"


def make_text_path(name: str, content_sha256: bytes, references: Iterable[str]) -> str:
    """Path of a text file added to the store (builtins.toFile, .drv files); references may be
    full paths or basenames."""
    return make_store_path(_make_type("text", references), content_sha256, name)


def make_source_path(
    name: str, nar_sha256: bytes, references: Iterable[str] = (), self_reference: bool = False
) -> str:
    """Path of a tree added by recursive sha256 (`nix-store --add`, path literals)."""
    return make_store_path(_make_type("source", references, self_reference), nar_sha256, name)


def make_fixed_output_path(
    name: str,
    method: Literal["flat", "recursive"],
    algo: str,
    digest: bytes,
    references: Iterable[str] = (),
) -> str:
    """Path of a fixed-output derivation's output or a content-addressed import.

    Recursive sha256 is the same as a source path; everything else goes through an extra
    "fixed:out:" hash and may not have references (Nix asserts the same).
    """
    expected = base32.HASH_SIZES.get(algo)
    if expected is None or len(digest) != expected:
        raise ValueError(f"invalid {algo} digest of {len(digest)} bytes for {name!r}")
    if method not in ("flat", "recursive"):
        raise ValueError(f"unknown ingestion method {method!r} (expected flat or recursive)")
    if method == "recursive" and algo == "sha256":
        return make_source_path(name, digest, references)
    refs = list(references)
    if refs:
        raise ValueError(f"fixed-output path {name!r} ({method} {algo}) cannot have references")
    prefix = "r:" if method == "recursive" else ""
    inner = hashlib.sha256(f"fixed:out:{prefix}{algo}:{digest.hex()}:".encode()).digest()
    return make_store_path("output:out", inner, name)
