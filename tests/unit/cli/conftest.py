"""Fixtures of the CLI tests: a clean environment (no ``BIGTENT_*`` or ``NIX_*`` variables of
the machine running them); ``runner_stub``, the runner the commands talk to in-process; and
``fake_runner``, that runner answering the read and build routes with the samples."""

from __future__ import annotations

import os
from typing import Any

import httpx
import pytest

from tests.unit.cli.helpers import RunnerStub
from tests.unit.cli.samples import AGENT, BUILD, DONE, STATUS


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith(("BIGTENT_", "NIX_")):
            monkeypatch.delenv(key)


@pytest.fixture
def runner_stub(monkeypatch: pytest.MonkeyPatch) -> RunnerStub:
    """Every ``RunnerClient`` the CLI makes talks to this stub (set its answer first)."""
    return RunnerStub(monkeypatch)


@pytest.fixture
def fake_runner(runner_stub: RunnerStub) -> list[httpx.Request]:
    """The runner's read and build routes; returns the requests seen."""

    def handler(request: httpx.Request) -> httpx.Response:
        routes: dict[str, Any] = {
            "/api/v1/status": STATUS,
            "/api/v1/agents": {"agents": [AGENT]},
            "/api/v1/builds": {"builds": [BUILD]},
            "/api/v1/builds/12/cancel": {**BUILD, "state": "cancelled"},
            "/api/v1/builds/12/bump": {**BUILD, "priority": 20},
            "/api/v1/builds/12/restart": {**BUILD, "state": "queued"},
            "/api/v1/agents/build-01/drain": {"drained": "build-01"},
        }
        if request.url.path == "/api/v1/steps/4/log":
            return httpx.Response(200, text="building\ndone\n")
        if request.url.path == "/api/v1/steps/4":
            return httpx.Response(200, json={"id": 4, "drv_path": "/nix/store/a-x.drv", **DONE})
        if request.url.path.startswith("/api/v1/builds/404"):
            return httpx.Response(404, json={"error": "no build 404"})
        if request.headers.get("authorization") == "Bearer wrong":
            return httpx.Response(401, json={"error": "invalid token"})
        return httpx.Response(200, json=routes[request.url.path])

    return runner_stub.answer(handler)
