"""Byte ranges of a step's log (RFC 9110 §14): which part a ``Range`` header asks for."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bigtent.errors import RangeNotSatisfiable
from bigtent.runner.logserve import ByteRange, parse_range


@pytest.mark.parametrize(
    ("header", "size", "want"),
    [
        (None, 10, None),
        ("bytes=0-", 10, ByteRange(0, 10)),
        ("bytes=2-4", 10, ByteRange(2, 5)),
        ("bytes=2-400", 10, ByteRange(2, 10)),
        ("bytes=-3", 10, ByteRange(7, 10)),
        ("bytes=-30", 10, ByteRange(0, 10)),
        ("bytes = 1 - 2", 10, ByteRange(1, 3)),
        ("bytes=5-2", 10, None),  # invalid: ignored, the whole log
        ("bytes=0-1,4-5", 10, None),  # several ranges: the whole log
        ("items=0-1", 10, None),
        ("bytes=-", 10, None),
        ("bytes=x-1", 10, None),
    ],
)
def test_parse_range(header: str | None, size: int, want: ByteRange | None) -> None:
    assert parse_range(header, size) == want


@pytest.mark.parametrize(
    ("header", "size"), [("bytes=10-", 10), ("bytes=11-20", 10), ("bytes=-0", 10), ("bytes=-5", 0)]
)
def test_unsatisfiable_ranges(header: str, size: int) -> None:
    with pytest.raises(RangeNotSatisfiable) as err:
        parse_range(header, size)
    assert err.value.http_status == 416
    assert err.value.size == size


@given(size=st.integers(1, 1000), a=st.integers(0, 1100), b=st.integers(0, 1100))
def test_a_satisfiable_range_lies_within_the_resource(size: int, a: int, b: int) -> None:
    try:
        r = parse_range(f"bytes={a}-{b}", size)
    except RangeNotSatisfiable:
        assert a >= size
        return
    if b < a:
        assert r is None
        return
    assert r is not None
    assert 0 <= r.start < r.end <= size
    assert r.start == a and r.end == min(size, b + 1)
