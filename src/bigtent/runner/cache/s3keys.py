"""Object keys in the S3 bucket, derived only from values the runner checked (pure).

Every key starts with the configured prefix and has one of two shapes:

- ``<prefix>nar/<nix32 file hash>.nar[.zst|.xz]``: a published NAR file (content-addressed,
  named as its narinfo's ``URL``);
- ``<prefix>incoming/<lease id>/<nix32 NAR hash>.nar[.zst|.xz]``: an agent's presigned upload
  waiting to be verified.

No part of a key is text an agent chose: the lease id is one the runner issued (and checked to
be current before a key is made), the hash is 32 bytes rendered in nix-base32, the extension
comes from the runner's own compression setting. Anything else is a ``ValueError``, so a key
can never leave the prefix (no ``..``, no ``/`` where none belongs). The prefix itself is
checked where it is configured (``bigtent.config.cache.normalize_prefix``).
"""

from __future__ import annotations

import re

from bigtent.nix import base32
from bigtent.nix.compression import EXTENSIONS, Compression

NAR_NAME = re.compile(r"^nar/[0-9a-df-np-sv-z]{52}\.nar(\.zst|\.xz)?$")
"""A published NAR's storage name (its narinfo ``URL``): nix-base32 sha256, known suffix."""
LEASE_ID = re.compile(r"^[A-Za-z0-9_-]{16,128}$")
"""Lease ids are ``secrets.token_urlsafe``: URL-safe base64, nothing else."""


def nar_key(prefix: str, name: str) -> str:
    """The key of published NAR ``name`` (``nar/<hash>.nar.zst``); ValueError for any other
    name, so a request for ``nar/../incoming/...`` or a foreign key is never signed."""
    if not NAR_NAME.fullmatch(name):
        raise ValueError(f"not a NAR file name: {name[:120]!r}")
    return prefix + name


def incoming_key(prefix: str, lease_id: str, nar_hash: bytes, compression: Compression) -> str:
    """Where an agent's presigned upload for a NAR of ``nar_hash`` under ``lease_id`` goes."""
    if not LEASE_ID.fullmatch(lease_id):
        raise ValueError("not a lease id")
    if len(nar_hash) != 32:
        raise ValueError("a NAR hash is 32 bytes of sha256")
    return f"{prefix}incoming/{lease_id}/{base32.encode(nar_hash)}.nar{EXTENSIONS[compression]}"


def verifying_key(incoming: str, nonce: str) -> str:
    """Where the runner keeps its own copy of upload ``incoming`` while it verifies it: next
    to it (so the sweeper deletes what a stopped runner left), under a name no presigned URL
    was ever signed for, so no agent can write it."""
    if not re.fullmatch(r"[0-9a-f]{16,64}", nonce):
        raise ValueError("a nonce is 16 to 64 lowercase hex digits")
    head, _, name = incoming.rpartition("/")
    return f"{head}/verifying-{nonce}-{name}"


def incoming_prefix(prefix: str) -> str:
    """Where every presigned upload lives (what the sweeper lists)."""
    return prefix + "incoming/"
