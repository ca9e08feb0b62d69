"""The pure parts of upload checking: declared headers and content addresses."""

from __future__ import annotations

import hashlib

import pytest

from bigtent.errors import BadRequest, PayloadTooLarge
from bigtent.nix import base32
from bigtent.runner.cache.closureingest import ClientPath, closure_batches
from bigtent.runner.cache.ingest import parse_declared

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


def _sized(*sizes: int) -> list[ClientPath]:
    return [
        ClientPath(f"/nix/store/{'a' * 32}-p{i}", b"", size, frozenset(), lambda: [])
        for i, size in enumerate(sizes)
    ]


def test_closure_batches_by_paths_and_bytes_in_order() -> None:
    def cut(paths: list[ClientPath], max_paths: int, max_bytes: int) -> list[list[int]]:
        return [[p.nar_size for p in b] for b in closure_batches(paths, max_paths, max_bytes)]

    assert cut(_sized(), 2, 100) == []
    assert cut(_sized(1, 2, 3, 4, 5), 2, 100) == [[1, 2], [3, 4], [5]]
    # By declared bytes: a batch ends before the path that would pass the bound.
    assert cut(_sized(40, 40, 40, 10, 90), 10, 100) == [[40, 40], [40, 10], [90]]
    # A path larger than the bound alone is a batch of its own, never skipped.
    assert cut(_sized(5, 500, 5), 10, 100) == [[5], [500], [5]]
    assert cut(_sized(500), 10, 100) == [[500]]
