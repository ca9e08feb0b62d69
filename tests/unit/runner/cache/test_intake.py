"""``StoredFile``: the file a NAR is stored as, written while the NAR is received."""

from __future__ import annotations

import hashlib
import io
import random

import pytest

from bigtent.nix import base32
from bigtent.nix.compression import EXTENSIONS, Compression, decompress_all
from bigtent.runner.cache.intake import StoredFile

REFS = frozenset({"0c2kb5l5lrafkvr8nfbq4ps3zb6z2qkb"})


@pytest.mark.parametrize("compression", list(Compression))
@pytest.mark.parametrize("chunks", [[], [b""], [b"x"], [b"ab" * 5000, b"", b"c" * 70_000]])
def test_the_stored_file_is_the_nar_compressed_and_named_by_its_hash(
    compression: Compression, chunks: list[bytes]
) -> None:
    nar = b"".join(chunks) + random.Random(len(chunks)).randbytes(3000)
    out = io.BytesIO()
    stored = StoredFile(out, compression, 3)
    for chunk in [*chunks, nar[len(b"".join(chunks)) :]]:
        stored.write(chunk)
    stored.flush()
    nar_hash = hashlib.sha256(nar).digest()
    got = stored.ingested(nar_hash, len(nar), REFS)
    data = out.getvalue()
    assert decompress_all(data, compression, len(nar)) == nar
    assert (got.file_size, got.file_hash) == (len(data), hashlib.sha256(data).digest())
    if compression is Compression.NONE:
        assert data == nar and got.file_hash == nar_hash  # one hash, not a second pass
    assert got.file_name == f"nar/{base32.encode(got.file_hash)}.nar{EXTENSIONS[compression]}"
    assert (got.nar_hash, got.nar_size, got.references, got.compression) == (
        nar_hash,
        len(nar),
        REFS,
        compression,
    )
