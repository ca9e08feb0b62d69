"""A runner behind a private CA: an agent given only ``--ca-file`` substitutes a step's input
from the runner's ``https://`` cache with real Nix, which reads no CA from the environment."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Farm
from tests.integration.runner.oidc_issuer import TlsFiles

pytestmark = [pytest.mark.e2e, pytest.mark.nix]


def _steps(farm: Farm, build_id: int) -> dict[str, dict[str, Any]]:
    with farm.api() as c:
        resp = c.get(f"/api/v1/builds/{build_id}/steps")
    assert resp.status_code == 200, resp.text
    return {s["name"]: s for s in resp.json()["steps"]}


def test_an_agent_with_only_ca_file_substitutes_from_an_https_runner(
    farm_factory: Callable[..., Farm], tls: TlsFiles
) -> None:
    farm = farm_factory(tls=tls)
    assert farm.url.startswith("https://")
    salt = uuid.uuid4().hex
    # The bottom of the DAG is built (and cached) by a first agent, which then leaves.
    first = farm.start_agent("first", ca_flag=True)
    code, out = farm.build_json(str(farm.dag_file(salt, layers=1, width=1)), "-A", "nodes.dag-0-0")
    assert code == 0, out
    bottom = _steps(farm, out["build_id"])["dag-0-0"]
    assert bottom["agent_name"] == "first"
    first.stop()
    # A second agent with an empty store and the CA only as --ca-file (no NIX_SSL_CERT_FILE
    # or SSL_CERT_FILE in its environment) builds the top, whose input it must substitute.
    second = farm.start_agent("second", ca_flag=True)
    code, out = farm.build_json(str(farm.dag_file(salt, layers=1, width=1)), "-A", "top")
    assert code == 0, (out, farm.logs())
    steps = _steps(farm, out["build_id"])
    assert list(steps) == ["dag-top-0"], steps
    assert steps["dag-top-0"]["agent_name"] == "second"
    # At the first try: no attempt failed to substitute.
    assert "prepare_failure" not in second.log.read_text(), second.log.read_text()
    store = farm.root / "agents" / "second" / "root"
    for path in bottom["outputs"].values():
        assert (store / Path(path).relative_to("/")).exists(), path
    bundle = (farm.root / "agents" / "second" / "nix-ca-bundle.pem").read_text()
    assert tls.ca_file.read_text().strip() in bundle
