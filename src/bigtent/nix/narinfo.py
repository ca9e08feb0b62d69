"""The narinfo file format of binary caches and the fingerprint that cache signatures cover."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from bigtent.nix import base32
from bigtent.nix.store_path import StorePath


@dataclass(frozen=True, slots=True)
class NarInfo:
    """One narinfo: hashes are normalised to `sha256:<nix32>`, references and the deriver are
    basenames, references and sigs are sorted and unique (Nix keeps both in sets)."""

    store_path: str
    url: str
    compression: str
    file_hash: str | None
    file_size: int | None
    nar_hash: str
    nar_size: int
    references: tuple[str, ...]
    deriver: str | None
    sigs: tuple[str, ...]
    ca: str | None = None

    def fingerprint(self) -> bytes:
        return fingerprint(self.store_path, self.nar_hash, self.nar_size, self.references)


def _normalise_hash(key: str, value: str) -> str:
    try:
        return base32.format_hash("sha256", base32.parse_hash(value, "sha256"))
    except ValueError as exc:
        raise ValueError(f"narinfo {key}: invalid hash {value!r}: {exc}") from None


def _parse_size(key: str, value: str) -> int:
    if not value.isdigit() or not value.isascii():
        raise ValueError(f"narinfo {key}: expected a non-negative integer, got {value!r}")
    return int(value)


def _basename(key: str, value: str) -> str:
    try:
        if value.startswith("/"):
            return StorePath.parse(value).basename
        return StorePath.parse_basename(value).basename
    except ValueError as exc:
        raise ValueError(f"narinfo {key}: {exc}") from None


_REQUIRED = ("StorePath", "URL", "NarHash", "NarSize")


def parse(text: str) -> NarInfo:
    """Parse a narinfo as Nix's NarInfo constructor does, but strictly: duplicate keys and lines
    without `: ` are errors, unknown keys (System, ...) are ignored, Compression defaults to
    bzip2 and a Deriver of `unknown-deriver` means none."""
    fields: dict[str, str] = {}
    sigs: set[str] = set()
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        key, sep, value = line.partition(": ")
        if not sep:
            raise ValueError(f"narinfo line {lineno} is not `Key: value`: {line!r}")
        if key == "Sig":
            sigs.add(value)
        elif key in fields:
            raise ValueError(f"narinfo {key}: duplicate key")
        else:
            fields[key] = value
    for key in _REQUIRED:
        if key not in fields:
            raise ValueError(f"narinfo {key}: missing")
    try:
        store_path = StorePath.parse(fields["StorePath"]).path
    except ValueError as exc:
        raise ValueError(f"narinfo StorePath: {exc}") from None
    if not fields["URL"]:
        raise ValueError("narinfo URL: must not be empty")
    nar_size = _parse_size("NarSize", fields["NarSize"])
    if nar_size == 0:
        raise ValueError("narinfo NarSize: must be positive")
    file_hash = fields.get("FileHash")
    file_size = fields.get("FileSize")
    deriver = fields.get("Deriver")
    if deriver == "unknown-deriver":
        deriver = None
    return NarInfo(
        store_path=store_path,
        url=fields["URL"],
        compression=fields.get("Compression") or "bzip2",
        file_hash=None if file_hash is None else _normalise_hash("FileHash", file_hash),
        file_size=None if file_size is None else _parse_size("FileSize", file_size),
        nar_hash=_normalise_hash("NarHash", fields["NarHash"]),
        nar_size=nar_size,
        references=tuple(
            sorted({_basename("References", ref) for ref in fields.get("References", "").split()})
        ),
        deriver=None if deriver is None else _basename("Deriver", deriver),
        sigs=tuple(sorted(sigs)),
        ca=fields.get("CA") or None,
    )


def render(info: NarInfo) -> str:
    """Write the fields in the order Nix's NarInfo::to_string does; absent optional fields are
    left out."""
    lines = [
        f"StorePath: {info.store_path}",
        f"URL: {info.url}",
        f"Compression: {info.compression}",
    ]
    if info.file_hash is not None:
        lines.append(f"FileHash: {info.file_hash}")
    if info.file_size is not None:
        lines.append(f"FileSize: {info.file_size}")
    lines += [
        f"NarHash: {info.nar_hash}",
        f"NarSize: {info.nar_size}",
        f"References: {' '.join(info.references)}",
    ]
    if info.deriver is not None:
        lines.append(f"Deriver: {info.deriver}")
    lines += [f"Sig: {sig}" for sig in info.sigs]
    if info.ca is not None:
        lines.append(f"CA: {info.ca}")
    return "\n".join(lines) + "\n"


def fingerprint(store_path: str, nar_hash: str, nar_size: int, references: Iterable[str]) -> bytes:
    """The bytes a cache signature covers (ValidPathInfo::fingerprint):
    `1;<path>;sha256:<nix32>;<size>;<sorted full reference paths joined by commas>`.

    The hash is normalised first so a hex or SRI spelling signs the same bytes; Nix refuses to
    fingerprint a path of unknown (zero) size, and so do we.
    """
    path = StorePath.parse(store_path).path
    if nar_size <= 0:
        raise ValueError(f"cannot fingerprint {path}: NAR size must be positive (got {nar_size})")
    normalised = base32.format_hash("sha256", base32.parse_hash(nar_hash, "sha256"))
    refs = sorted(
        {
            StorePath.parse(ref).path if ref.startswith("/") else StorePath.parse_basename(ref).path
            for ref in references
        }
    )
    return f"1;{path};{normalised};{nar_size};{','.join(refs)}".encode()
