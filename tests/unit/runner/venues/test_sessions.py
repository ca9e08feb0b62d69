"""Reading the bearer credential of a request or WebSocket upgrade."""

from __future__ import annotations

import pytest

from bigtent.runner.venues.sessions import bearer_token


@pytest.mark.parametrize(
    ("header", "token"),
    [
        (None, None),
        ("", None),
        ("Bearer bt_abc", "bt_abc"),
        ("bearer bt_abc", "bt_abc"),
        ("BEARER   bt_abc  ", "bt_abc"),
        ("Bearer", None),
        ("Bearer    ", None),
        ("Basic dXNlcjpwYXNz", None),
        ("bt_abc", None),
    ],
)
def test_bearer_token(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token
