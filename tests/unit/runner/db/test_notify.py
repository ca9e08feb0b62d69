"""Change notices between runners: payloads within PostgreSQL's limit, read back exactly."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bigtent.runner.db.notify import MAX_PAYLOAD_BYTES, Change, decode, encode

ids = st.frozensets(st.integers(min_value=1, max_value=2**53), max_size=3000)


@given(steps=ids, builds=ids, tokens=st.booleans(), limit=st.integers(100, MAX_PAYLOAD_BYTES))
def test_payloads_fit_and_add_up_to_the_change(
    steps: frozenset[int], builds: frozenset[int], tokens: bool, limit: int
) -> None:
    change = Change("runner-abc", steps, builds, tokens)
    payloads = encode(change, limit)
    assert all(len(p.encode()) <= limit for p in payloads)
    back = [decode(p) for p in payloads]
    assert all(b is not None and b.origin == "runner-abc" and b.tokens == tokens for b in back)
    assert frozenset().union(*(b.steps for b in back if b)) == steps
    assert frozenset().union(*(b.builds for b in back if b)) == builds


def test_a_small_change_is_one_payload() -> None:
    [payload] = encode(Change("r1", frozenset({3, 1}), frozenset({7})))
    assert json.loads(payload) == {"o": "r1", "s": [1, 3], "b": [7]}
    assert decode(payload) == Change("r1", frozenset({1, 3}), frozenset({7}))


def test_a_token_change_alone_is_announced() -> None:
    [payload] = encode(Change("r1", tokens=True))
    assert decode(payload) == Change("r1", tokens=True)


@pytest.mark.parametrize(
    "payload",
    [
        "",
        "not json",
        "[]",
        '{"s": [1]}',
        '{"o": 1}',
        '{"o": "r", "s": ["1"]}',
        '{"o": "r", "s": [true]}',
        '{"o": "r", "b": [1.5]}',
        '{"o": "r", "s": 5}',
    ],
)
def test_foreign_payloads_are_ignored(payload: str) -> None:
    assert decode(payload) is None
