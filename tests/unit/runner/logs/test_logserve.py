"""Byte ranges of a step's log (RFC 9110 §14): which part a ``Range`` header asks for."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bigtent.errors import RangeNotSatisfiable
from bigtent.runner.logs.serve import ByteRange, bounded_decimal, parse_offset, parse_range


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


HUGE = "9" * 5000  # more digits than int() converts (sys.get_int_max_str_digits): ValueError


@pytest.mark.parametrize(
    ("header", "want"),
    [
        (f"bytes=0-{HUGE}", ByteRange(0, 10)),
        (f"bytes=-{HUGE}", ByteRange(0, 10)),
        (f"bytes=2-{'0' * 5000}3", ByteRange(2, 4)),  # leading zeros are not a large number
        (f"bytes={HUGE}-1", None),  # last before first: ignored
        ("bytes=٣-5", None),  # a Unicode digit: not a range
    ],
)
def test_ranges_with_huge_numbers(header: str, want: ByteRange | None) -> None:
    assert parse_range(header, 10) == want


@pytest.mark.parametrize("header", [f"bytes={HUGE}-", f"bytes={HUGE}-{HUGE}"])
def test_huge_starts_lie_past_the_end(header: str) -> None:
    with pytest.raises(RangeNotSatisfiable):
        parse_range(header, 10)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        (None, None),
        ("", None),
        (" 12 ", 12),
        ("0012", 12),
        (HUGE, 2**63 - 1),
        ("²", None),  # str.isdigit says yes, int() says no
        ("٣", None),  # int() would take it; an offset is ASCII
        ("-1", None),
        ("1e3", None),
    ],
)
def test_parse_offset(text: str | None, want: int | None) -> None:
    assert parse_offset(text) == want


@given(st.integers(0, 10**30))
def test_bounded_decimal_is_int_below_the_cap(n: int) -> None:
    assert bounded_decimal(str(n)) == min(n, 2**63 - 1)
