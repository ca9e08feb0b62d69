"""Nix's base-32 encoding and the `algo:digest` hash strings built on it."""

from __future__ import annotations

import base64
import binascii

ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
"""Nix's 32 digits: no e, o, u or t, so encoded hashes cannot spell words."""

_DIGIT_VALUES = {c: i for i, c in enumerate(ALPHABET)}
_PAIRS = [a + b for a in ALPHABET for b in ALPHABET]
"""Two digits for each 10-bit value: ``encode`` writes two digits a step."""

HASH_SIZES: dict[str, int] = {"md5": 16, "sha1": 20, "sha256": 32, "sha512": 64}
"""Digest size in bytes of every hash algorithm Nix knows."""


def encoded_length(n_bytes: int) -> int:
    """Number of nix-base32 digits for `n_bytes` bytes: ceil(8n/5), and 0 for no bytes."""
    if n_bytes < 0:
        raise ValueError(f"byte count must not be negative (got {n_bytes})")
    return (n_bytes * 8 + 4) // 5


def encode(data: bytes) -> str:
    """Encode as Nix does: the bytes are one little-endian number written most significant digit
    first, which is why nix32 is not RFC 4648 base32 read in any order."""
    value = int.from_bytes(data, "little")
    length = encoded_length(len(data))
    # An odd count of digits starts with the top one alone; the rest go two at a time.
    head = ALPHABET[(value >> (5 * (length - 1))) & 0x1F] if length % 2 else ""
    pairs = _PAIRS
    return head + "".join(
        [pairs[(value >> (10 * n)) & 0x3FF] for n in range(length // 2 - 1, -1, -1)]
    )


def decode(text: str) -> bytes:
    """Invert `encode`; the length of `text` fixes the byte count, and digits that would set bits
    beyond it are rejected (as Nix does) so every byte string has exactly one encoding."""
    n_bytes = len(text) * 5 // 8
    if encoded_length(n_bytes) != len(text):
        raise ValueError(f"invalid nix-base32 length {len(text)}: {text!r}")
    value = 0
    for c in text:
        digit = _DIGIT_VALUES.get(c)
        if digit is None:
            raise ValueError(f"invalid nix-base32 character {c!r} in {text!r}")
        value = (value << 5) | digit
    if value >> (8 * n_bytes):
        raise ValueError(f"nix-base32 string {text!r} has bits set beyond {n_bytes} bytes")
    return value.to_bytes(n_bytes, "little")


def _digest_size(algo: str) -> int:
    size = HASH_SIZES.get(algo)
    if size is None:
        raise ValueError(f"unknown hash algorithm {algo!r} (expected one of {sorted(HASH_SIZES)})")
    return size


def format_hash(algo: str, digest: bytes) -> str:
    """Render `<algo>:<nix32>`, the form Nix writes in narinfo files and fingerprints."""
    size = _digest_size(algo)
    if len(digest) != size:
        raise ValueError(f"{algo} digest must be {size} bytes (got {len(digest)})")
    return f"{algo}:{encode(digest)}"


def _decode_digest(text: str, size: int, *, allow_base64: bool, original: str) -> bytes:
    if len(text) == 2 * size:
        try:
            return bytes.fromhex(text)
        except ValueError:
            raise ValueError(f"invalid hex digest in hash {original!r}") from None
    if len(text) == encoded_length(size):
        return decode(text)
    if allow_base64 and len(text) == 4 * ((size + 2) // 3):
        try:
            digest = base64.b64decode(text, validate=True)
        except binascii.Error:
            raise ValueError(f"invalid base64 digest in hash {original!r}") from None
        if len(digest) == size:
            return digest
    raise ValueError(f"hash {original!r} has the wrong length for a {size}-byte digest")


def parse_hash(text: str, algo: str = "sha256") -> bytes:
    """Parse any hash spelling Nix accepts for `algo` and return the raw digest.

    Accepted: `algo:<nix32|hex|base64>`, SRI `algo-<base64>`, and a bare nix32 or hex digest.
    The encoding is told apart by length, which is unambiguous for every supported algorithm.
    """
    size = _digest_size(algo)
    prefix, sep, rest = text.partition(":")
    if sep:
        if prefix != algo:
            raise ValueError(f"hash {text!r} is not a {algo} hash")
        return _decode_digest(rest, size, allow_base64=True, original=text)
    prefix, sep, rest = text.partition("-")
    if sep and prefix in HASH_SIZES:
        if prefix != algo:
            raise ValueError(f"hash {text!r} is not a {algo} hash")
        if len(rest) != 4 * ((size + 2) // 3):
            raise ValueError(f"SRI hash {text!r} has the wrong length for {algo}")
        return _decode_digest(rest, size, allow_base64=True, original=text)
    return _decode_digest(text, size, allow_base64=False, original=text)


def compress_hash(digest: bytes, size: int) -> bytes:
    """Fold `digest` to `size` bytes by XOR-ing byte i into position i mod size, as Nix's
    compressHash does to turn a sha256 into the 160-bit store path hash."""
    if size <= 0:
        raise ValueError(f"compressed size must be positive (got {size})")
    out = bytearray(size)
    for i, byte in enumerate(digest):
        out[i % size] ^= byte
    return bytes(out)
