"""``parse_error_body``: the one reading of the runner's ``{"error": ..., "detail": ...}``
answers, which the CLI's client, the agent's uploads and its refused connections all use."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bigtent.errors import ErrorBody, parse_error_body


@pytest.mark.parametrize(
    ("body", "error", "detail", "message"),
    [
        (b'{"error": "no build 4"}', "no build 4", None, "no build 4"),
        (
            b'{"error": "too many", "detail": {"retry_after_secs": 7}}',
            "too many",
            {"retry_after_secs": 7},
            "too many",
        ),
        (b'{"detail": "Not Found"}', None, "Not Found", "Not Found"),  # FastAPI's own
        (
            b'{"detail": [{"loc": ["body"], "msg": "x"}]}',
            None,
            [{"loc": ["body"], "msg": "x"}],
            None,
        ),
        (b'{"error": 3}', None, None, None),  # not the runner's: no message
        (b'["error"]', None, None, None),
        (b"<html>bad gateway</html>", None, None, None),
        (b"", None, None, None),
        (None, None, None, None),
        (b"\xff\xfe{", None, None, None),
    ],
)
def test_parse_error_body(
    body: bytes | None, error: str | None, detail: Any, message: str | None
) -> None:
    answer = parse_error_body(body)
    assert (answer.error, answer.detail, answer.message) == (error, detail, message)
    assert answer.text == (body or b"").decode(errors="replace")


@given(st.text(), st.none() | st.integers() | st.text() | st.dictionaries(st.text(), st.integers()))
def test_the_runners_body_reads_back(message: str, detail: Any) -> None:
    body = json.dumps({"error": message, "detail": detail}).encode()
    assert parse_error_body(body) == ErrorBody(error=message, detail=detail, text=body.decode())


@given(st.binary(max_size=200))
def test_any_body_reads_without_raising(body: bytes) -> None:
    answer = parse_error_body(body)
    assert answer.message is None or isinstance(answer.message, str)
