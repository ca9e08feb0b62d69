"""The body of ``POST /api/v1/paths/batch``: many small NARs of a client's closure in one
request (docs/api.md, "Batch uploads"). Encoding and bounded parsing, no I/O.

A body is a sequence of entries, each

- 4 bytes: the length ``H`` of the entry's header (unsigned, big-endian), 1 to
  ``MAX_HEADER_BYTES``;
- ``H`` bytes: the header, a UTF-8 JSON object ``{"path": basename, "nar_hash":
  "sha256:<nix32>", "nar_size": N, "references": [basenames]}`` (other fields are ignored);
- ``N`` bytes: the path's NAR, uncompressed.

Every size is declared before its bytes and checked against what is left of the body before
any of them is taken, so a lying size is refused, never read past. The parser takes a body
already bounded by the route (``BATCH_BODY_BYTES``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from bigtent.apilimits import MAX_REFERENCES
from bigtent.errors import BadRequest

CONTENT_TYPE = "application/x-bigtent-nar-batch"
LENGTH_BYTES = 4
"""The width of an entry's header length."""
MAX_HEADER_BYTES = 64 * 1024 + MAX_REFERENCES * 256
"""An entry's header: its references (at most ``MAX_REFERENCES`` basenames) and a little more."""
MAX_BATCH_PATHS = 1024
"""Entries of one batch body (the client sends at most ``upload.BATCH_PATHS``)."""


@dataclass(frozen=True, slots=True)
class BatchEntry:
    """One path of a batch, as the client declared it: nothing here is checked against the
    NAR yet (the runner's ingest does that, as for a single upload)."""

    path: str
    """The store path's basename (or full path) as sent."""
    nar_hash: str
    nar_size: int
    references: tuple[str, ...]
    nar: bytes


def entry_header(path: str, nar_hash: str, nar_size: int, references: list[str]) -> bytes:
    """The length-prefixed header of an entry; its NAR of ``nar_size`` bytes follows it."""
    header = json.dumps(
        {"path": path, "nar_hash": nar_hash, "nar_size": nar_size, "references": references},
        separators=(",", ":"),
    ).encode()
    if len(header) > MAX_HEADER_BYTES:
        raise ValueError(f"the batch header of {path} is {len(header)} bytes")
    return len(header).to_bytes(LENGTH_BYTES, "big") + header


def parse_batch(body: bytes, *, max_paths: int = MAX_BATCH_PATHS) -> list[BatchEntry]:
    """The entries of a batch body, in order; ``BadRequest`` naming the entry (its index, and
    its path once known) for a truncated body, a lying or overlong size, a malformed header
    or more than ``max_paths`` entries. A path sent twice is the ingest's to refuse
    (``closureingest.ingest_client_batch``): only there are names full store paths."""
    entries: list[BatchEntry] = []
    at = 0
    while at < len(body):
        index = len(entries)
        if index >= max_paths:
            raise BadRequest(f"batch upload: more than {max_paths} paths in one request")
        if len(body) - at < LENGTH_BYTES:
            raise BadRequest(f"batch upload: entry {index} is truncated in its header length")
        size = int.from_bytes(body[at : at + LENGTH_BYTES], "big")
        at += LENGTH_BYTES
        if not 0 < size <= MAX_HEADER_BYTES:
            raise BadRequest(
                f"batch upload: entry {index} declares a header of {size} bytes "
                f"(1 to {MAX_HEADER_BYTES})"
            )
        if len(body) - at < size:
            raise BadRequest(f"batch upload: entry {index} is truncated in its header")
        header = _header(body[at : at + size], index)
        at += size
        path, nar_size = header.path, header.nar_size
        if nar_size > len(body) - at:
            raise BadRequest(
                f"batch upload: {path} declares a NAR of {nar_size} bytes but only "
                f"{len(body) - at} are left in the body"
            )
        entries.append(
            BatchEntry(path, header.nar_hash, nar_size, header.references, body[at : at + nar_size])
        )
        at += nar_size
    return entries


@dataclass(frozen=True, slots=True)
class _Header:
    path: str
    nar_hash: str
    nar_size: int
    references: tuple[str, ...]


def _header(raw: bytes, index: int) -> _Header:
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest(f"batch upload: entry {index} has a malformed header: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest(f"batch upload: entry {index}'s header is not a JSON object")
    path = data.get("path")
    if not isinstance(path, str) or not path:
        raise BadRequest(f"batch upload: entry {index}'s header has no path")
    where = f"batch upload: {path[:200]}"
    nar_hash = data.get("nar_hash")
    nar_size = data.get("nar_size")
    references = data.get("references", [])
    if not isinstance(nar_hash, str):
        raise BadRequest(f"{where}: the header has no nar_hash")
    # bool is an int to Python, not a size.
    if not isinstance(nar_size, int) or isinstance(nar_size, bool) or nar_size < 0:
        raise BadRequest(f"{where}: nar_size must be the NAR's size in bytes")
    if not isinstance(references, list) or not all(isinstance(r, str) for r in references):
        raise BadRequest(f"{where}: references must be a list of store paths")
    if len(references) > MAX_REFERENCES:
        raise BadRequest(f"{where}: more than {MAX_REFERENCES} references")
    return _Header(path, nar_hash, nar_size, tuple(references))
