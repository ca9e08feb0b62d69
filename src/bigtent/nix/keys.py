"""Ed25519 binary cache keys in Nix's `name:base64` text format, and narinfo signatures."""

from __future__ import annotations

import base64
import binascii
import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from bigtent.nix.narinfo import NarInfo

_KEY_BYTES = 32
_SIG_BYTES = 64


def _split(text: str, what: str) -> tuple[str, bytes]:
    """Split `name:base64` as Nix's Key constructor does: at the first colon, name non-empty."""
    name, sep, payload = text.strip().partition(":")
    if not sep or not name:
        raise ValueError(f"{what} is not of the form name:base64 (missing key name)")
    try:
        raw = base64.b64decode(payload, validate=True)
    except binascii.Error:
        raise ValueError(f"{what} {name!r} is not valid base64") from None
    return name, raw


def _public_bytes(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


@dataclass(frozen=True, slots=True)
class PublicKey:
    """A trusted cache key; signatures are matched to it by `name`, as in trusted-public-keys."""

    name: str
    key: bytes

    def to_text(self) -> str:
        return f"{self.name}:{base64.b64encode(self.key).decode()}"

    def verify(self, fingerprint: bytes, sig_text: str) -> bool:
        """True only if `sig_text` is `<our name>:base64(64-byte signature)` valid over
        `fingerprint`; any malformed input is simply not a valid signature."""
        name, sep, payload = sig_text.partition(":")
        if not sep or name != self.name:
            return False
        try:
            sig = base64.b64decode(payload, validate=True)
            if len(sig) != _SIG_BYTES:
                return False
            Ed25519PublicKey.from_public_bytes(self.key).verify(sig, fingerprint)
        except (binascii.Error, ValueError, InvalidSignature):
            return False
        return True


@dataclass(frozen=True, slots=True)
class SecretKey:
    """A signing key: Nix stores libsodium's 64-byte secret (seed then public key); we keep the
    32-byte seed and derive the rest."""

    name: str
    seed: bytes = dataclasses.field(repr=False)
    _key: Ed25519PrivateKey = dataclasses.field(init=False, repr=False, compare=False)
    """The key object, built once: rebuilding it from the seed cost more than signing."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "_key", Ed25519PrivateKey.from_private_bytes(self.seed))

    def _private(self) -> Ed25519PrivateKey:
        return self._key

    def public_key(self) -> PublicKey:
        return PublicKey(self.name, _public_bytes(self._private().public_key()))

    def to_text(self) -> str:
        """The secret key file content `nix-store --generate-binary-cache-key` writes."""
        raw = self.seed + self.public_key().key
        return f"{self.name}:{base64.b64encode(raw).decode()}"

    def sign(self, fingerprint: bytes) -> str:
        """Detached signature in narinfo `Sig` form: `name:base64(signature)`."""
        sig = self._private().sign(fingerprint)
        return f"{self.name}:{base64.b64encode(sig).decode()}"


def generate_key(name: str) -> SecretKey:
    if not name or ":" in name:
        raise ValueError(f"key name must be non-empty and contain no ':' (got {name!r})")
    raw = Ed25519PrivateKey.generate().private_bytes_raw()
    return SecretKey(name, raw)


def parse_secret_key(text: str) -> SecretKey:
    """Parse `name:base64(seed32‖pub32)`; the public half must match the seed, so a corrupted
    file is caught here rather than producing signatures nobody can verify."""
    name, raw = _split(text, "secret key")
    if len(raw) != 2 * _KEY_BYTES:
        raise ValueError(f"secret key {name!r} must be {2 * _KEY_BYTES} bytes (got {len(raw)})")
    key = SecretKey(name, raw[:_KEY_BYTES])
    if key.public_key().key != raw[_KEY_BYTES:]:
        raise ValueError(f"secret key {name!r} is corrupt: its public half does not match")
    return key


def parse_public_key(text: str) -> PublicKey:
    name, raw = _split(text, "public key")
    if len(raw) != _KEY_BYTES:
        raise ValueError(f"public key {name!r} must be {_KEY_BYTES} bytes (got {len(raw)})")
    return PublicKey(name, raw)


def load_secret_key(path: Path) -> SecretKey:
    """Read a secret key file; the error names the file but never echoes its content."""
    try:
        return parse_secret_key(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def sign_narinfo(info: NarInfo, key: SecretKey) -> NarInfo:
    """Return a copy of `info` with `key`'s signature added (sigs stay sorted and unique)."""
    sig = key.sign(info.fingerprint())
    return dataclasses.replace(info, sigs=tuple(sorted({*info.sigs, sig})))


def verify_narinfo(info: NarInfo, keys: Iterable[PublicKey]) -> bool:
    """True if any signature on `info` verifies with any of `keys` (Nix's checkSigs rule)."""
    fingerprint = info.fingerprint()
    return any(key.verify(fingerprint, sig) for key in keys for sig in info.sigs)
