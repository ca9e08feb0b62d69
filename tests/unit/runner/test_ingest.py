"""The pure parts of upload checking: declared headers and content addresses."""

from __future__ import annotations

import hashlib

import pytest

from bigtent.errors import BadRequest, PayloadTooLarge
from bigtent.nix import base32
from bigtent.runner.ingest import parse_declared

DIGEST = hashlib.sha256(b"nar").digest()
NIX32 = base32.format_hash("sha256", DIGEST)


@pytest.mark.parametrize(
    "spelling", [NIX32, "sha256:" + DIGEST.hex(), base32.encode(DIGEST), DIGEST.hex()]
)
def test_declared_hash_spellings(spelling: str) -> None:
    assert parse_declared(spelling, "120", 1000) == (DIGEST, 120)


@pytest.mark.parametrize(
    ("nar_hash", "nar_size", "says"),
    [
        (None, "1", "needs X-Nar-Hash"),
        (NIX32, None, "needs X-Nar-Hash"),
        ("", "1", "needs"),
        ("sha256:short", "1", "bad X-Nar-Hash"),
        ("md5:" + "0" * 32, "1", "bad X-Nar-Hash"),
        (NIX32, "-1", "bad X-Nar-Size"),
        (NIX32, "+1", "bad X-Nar-Size"),
        (NIX32, " 1", "bad X-Nar-Size"),
        (NIX32, "1.0", "bad X-Nar-Size"),
        (NIX32, "\u00b2", "bad X-Nar-Size"),  # str.isdigit() says yes, int() says no
        (NIX32, "\u0661", "bad X-Nar-Size"),  # Arabic-Indic one: int() would accept it
        (NIX32, "9" * 5000, "bad X-Nar-Size"),  # int() refuses more than 4300 digits
        (NIX32, "1" * 20, "bad X-Nar-Size"),
    ],
)
def test_bad_declarations(nar_hash: str | None, nar_size: str | None, says: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_declared(nar_hash, nar_size, 1000)
    assert type(caught.value) is BadRequest
    assert says in str(caught.value)


def test_declared_size_over_the_cap_is_too_large() -> None:
    assert parse_declared(NIX32, "1000", 1000)[1] == 1000
    with pytest.raises(PayloadTooLarge, match="max_nar_bytes 1000"):
        parse_declared(NIX32, "1001", 1000)
    with pytest.raises(PayloadTooLarge):
        parse_declared(NIX32, "9" * 19, 1000)
