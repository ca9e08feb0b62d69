"""``check_nar_size``: the one check of a NAR against ``cache.max_nar_bytes``."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bigtent.errors import PayloadTooLarge
from bigtent.runner.cache.narcheck import check_nar_size


@pytest.mark.parametrize(
    ("size", "declared", "refused"),
    [
        (0, True, None),
        (1000, True, None),
        (1001, True, "declared NAR size 1001 exceeds max_nar_bytes 1000"),
        (1000, False, None),
        (1001, False, "upload is larger than max_nar_bytes 1000"),
    ],
)
def test_check_nar_size(size: int, declared: bool, refused: str | None) -> None:
    if refused is None:
        check_nar_size(size, 1000, declared=declared)
        return
    with pytest.raises(PayloadTooLarge) as caught:
        check_nar_size(size, 1000, declared=declared)
    assert caught.value.message == refused
    assert caught.value.http_status == 413


@given(st.integers(0, 2**63), st.integers(1, 2**63))
def test_refused_exactly_above_the_bound(size: int, bound: int) -> None:
    try:
        check_nar_size(size, bound)
    except PayloadTooLarge:
        assert size > bound
    else:
        assert size <= bound
