"""What an agent may declare for a presigned upload (pure): the runner signs for no more."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from bigtent.errors import BadRequest, PayloadTooLarge
from bigtent.nix import base32
from bigtent.nix.compression import Compression, compressed_size_bound
from bigtent.protocol import UploadDeclaration
from bigtent.runner.cache.presigned import check_declaration

NAR = hashlib.sha256(b"nar").digest()
FILE = hashlib.sha256(b"file").digest()
GOOD: dict[str, Any] = {
    "nar_hash": base32.format_hash("sha256", NAR),
    "nar_size": 1000,
    "compression": "zstd",
    "file_hash": base32.format_hash("sha256", FILE),
    "file_size": 400,
}


def _check(**overrides: Any) -> Any:
    return check_declaration(
        UploadDeclaration(**{**GOOD, **overrides}),
        max_nar_bytes=10_000,
        compression=Compression.ZSTD,
    )


def test_a_good_declaration() -> None:
    d = _check()
    assert (d.nar_hash, d.nar_size, d.file_hash, d.file_size) == (NAR, 1000, FILE, 400)
    assert d.compression is Compression.ZSTD
    # The largest file a NAR may honestly compress to is fine; one byte more is not.
    bound = compressed_size_bound(1000, Compression.ZSTD)
    assert _check(file_size=bound).file_size == bound


@pytest.mark.parametrize(
    ("overrides", "error", "says"),
    [
        ({"nar_hash": "sha256:abc"}, BadRequest, "bad nar_hash"),
        ({"file_hash": "md5:" + "0" * 32}, BadRequest, "bad file_hash"),
        ({"nar_size": 10_001}, PayloadTooLarge, "max_nar_bytes"),
        ({"compression": "xz"}, BadRequest, "stores zstd"),
        ({"compression": "bzip2"}, BadRequest, "stores zstd"),
        (
            {"file_size": compressed_size_bound(1000, Compression.ZSTD) + 1},
            PayloadTooLarge,
            "at most",
        ),
    ],
)
def test_refused_declarations(overrides: dict[str, Any], error: type[Exception], says: str) -> None:
    with pytest.raises(error, match=says):
        _check(**overrides)


def test_uncompressed_files_are_exactly_the_nar() -> None:
    d = check_declaration(
        UploadDeclaration(**{**GOOD, "compression": "none", "file_size": 1000}),
        max_nar_bytes=10_000,
        compression=Compression.NONE,
    )
    assert d.file_size == 1000
    for size in (999, 1001):
        with pytest.raises(BadRequest, match="the NAR itself"):
            check_declaration(
                UploadDeclaration(**{**GOOD, "compression": "none", "file_size": size}),
                max_nar_bytes=10_000,
                compression=Compression.NONE,
            )
