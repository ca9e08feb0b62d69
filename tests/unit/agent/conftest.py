"""Shared fixtures for the agent's unit tests."""

from __future__ import annotations

import os

import pytest

from bigtent.agent import upload
from bigtent.backoff import Backoff

_PREFIXES = ("BIGTENT_", "NIX_")
_PROXIES = {"http_proxy", "https_proxy", "all_proxy", "no_proxy", "ws_proxy", "wss_proxy"}


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's shell (tokens, Nix settings, proxies) must not leak into a test."""
    for key in list(os.environ):
        if key.startswith(_PREFIXES) or key.lower() in _PROXIES:
            monkeypatch.delenv(key)


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Upload retries 10 ms apart, doubling up to 80 ms."""
    monkeypatch.setattr(upload, "UPLOAD_BACKOFF", Backoff(0.01, 0.08, jitter_low=0.5))
