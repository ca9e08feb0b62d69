"""The agent's WebSocket address (``agent/connection.py``); the connector itself is exercised by
the session tests against a real websockets server."""

from __future__ import annotations

import pytest

from bigtent.agent.connection import agent_ws_url
from bigtent.errors import ConfigError


@pytest.mark.parametrize(
    ("runner_url", "ws_url"),
    [
        ("http://127.0.0.1:8080", "ws://127.0.0.1:8080/api/v1/agent/ws"),
        ("https://ci.example.org:8443/", "wss://ci.example.org:8443/api/v1/agent/ws"),
        ("https://ci.example.org/bigtent", "wss://ci.example.org/bigtent/api/v1/agent/ws"),
        ("http://[::1]:8080", "ws://[::1]:8080/api/v1/agent/ws"),
    ],
)
def test_agent_ws_url(runner_url: str, ws_url: str) -> None:
    assert agent_ws_url(runner_url) == ws_url


@pytest.mark.parametrize("bad", ["ftp://x", "127.0.0.1:8080", "http://"])
def test_agent_ws_url_rejects(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"agent\.runner_url"):
        agent_ws_url(bad)
