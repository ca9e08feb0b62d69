"""Fixtures of the CLI tests: a clean environment (no ``BIGTENT_*`` or ``NIX_*`` variables of
the machine running them) and ``runner_stub``, the runner the commands talk to in-process."""

from __future__ import annotations

import os

import pytest

from tests.unit.cli.helpers import RunnerStub


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith(("BIGTENT_", "NIX_")):
            monkeypatch.delenv(key)


@pytest.fixture
def runner_stub(monkeypatch: pytest.MonkeyPatch) -> RunnerStub:
    """Every ``RunnerClient`` the CLI makes talks to this stub (set its answer first)."""
    return RunnerStub(monkeypatch)
