"""The one check of a NAR (architecture §6: uploads), whichever way it comes in: its size
against ``cache.max_nar_bytes`` before any of it is read (``check_nar_size``), then its bytes
(``NarCheck``: never longer than declared, well-formed, the declared hash and length, the
references found by scanning). Pure: no storage, database or network."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from bigtent.errors import BadRequest, NarMismatch, PayloadTooLarge
from bigtent.nix import base32
from bigtent.nix.compression import EXTENSIONS, Compression
from bigtent.nix.nar import NarError, NarSink, NarValidator, ReferenceScanner


def check_nar_size(size: int, max_nar_bytes: int, *, declared: bool = True) -> None:
    """Refuse (413) a NAR larger than ``cache.max_nar_bytes``: the one place the bound is
    checked. ``size`` is a declared NAR size (client and agent uploads, presigned
    declarations, the runner's own store: before any of the body is read), or with
    ``declared=False`` the bytes of a body read so far (one drained unread)."""
    if size > max_nar_bytes:
        what = f"declared NAR size {size} exceeds" if declared else "upload is larger than"
        raise PayloadTooLarge(f"{what} max_nar_bytes {max_nar_bytes}")


def declared_hash(text: str, what: str) -> bytes:
    """A declared sha256 (a NAR's or a file's, in any form Nix writes) as bytes, else a
    BadRequest (400) ``f"{what} {text!r}: why"``: the one place an upload's declared hash is
    read (headers, presigned declarations, batch entries)."""
    try:
        return base32.parse_hash(text, "sha256")
    except ValueError as exc:
        raise BadRequest(f"{what} {text[:100]!r}: {exc}") from exc


def nar_file_name(file_hash: bytes, compression: Compression) -> str:
    """The storage name (and narinfo ``URL``) of a NAR file: content-addressed by the file."""
    return f"nar/{base32.encode(file_hash)}.nar{EXTENSIONS[compression]}"


class NarCheck:
    """The one verification of a NAR's bytes, whichever way they arrive (architecture §6: uploads):
    never longer than declared (checked per chunk, before any work), well-formed, the declared
    hash and length; the hash parts of ``candidates`` found in it are its references."""

    def __init__(
        self,
        declared_size: int,
        declared_hash: bytes,
        candidates: Iterable[str] = (),
        sink: NarSink | None = None,
    ) -> None:
        self.declared_size = declared_size
        self.declared_hash = declared_hash
        self.size = 0
        self._validator = NarValidator(sink) if sink is not None else NarValidator()
        self._scanner = ReferenceScanner(candidates)

    def count(self, chunk: bytes) -> None:
        """Account for ``chunk``; PayloadTooLarge past the declared size (a hard stop)."""
        self.size += len(chunk)
        if self.size > self.declared_size:
            raise PayloadTooLarge(
                f"NAR is longer than its declared size of {self.declared_size} bytes"
            )

    def feed(self, chunk: bytes) -> None:
        try:
            self._validator.feed(chunk)
        except NarError as exc:
            raise NarMismatch(f"malformed NAR: {exc}") from exc
        self._scanner.feed(chunk)

    def finish(self) -> tuple[bytes, frozenset[str]]:
        """The NAR's sha256 and the references found, once it is complete and as declared."""
        if self.size != self.declared_size:
            raise NarMismatch(
                f"NAR is {self.size} bytes, shorter than its declared {self.declared_size}"
            )
        nar_sha = self._validator.sha256()
        if nar_sha != self.declared_hash:
            raise NarMismatch(
                "NAR hash mismatch: declared "
                f"{base32.format_hash('sha256', self.declared_hash)}, got "
                f"{base32.format_hash('sha256', nar_sha)}"
            )
        try:
            self._validator.finish()
        except NarError as exc:
            raise NarMismatch(f"malformed NAR: {exc}") from exc
        return nar_sha, frozenset(self._scanner.found)


@dataclass(frozen=True, slots=True)
class Ingested:
    """What ingest learned about a NAR, before it is recorded."""

    nar_hash: bytes
    nar_size: int
    file_name: str
    file_hash: bytes
    file_size: int
    references: frozenset[str]
    """Hash parts found by the reference scan (a subset of the candidates)."""
    compression: Compression
