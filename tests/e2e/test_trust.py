"""End to end, real Nix (DESIGN §6): an untrusted build runs only on an untrusted agent while a
trusted one idles, its outputs are served by the untrusted cache and not by the main one, and
`bigtent build` fetches them with a real Nix trusting the untrusted key; a later trusted build
of the same derivations builds them again on the trusted agent, into the main cache."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from bigtent.nix.store_path import StorePath
from tests.e2e.conftest import Farm

pytestmark = [pytest.mark.e2e, pytest.mark.nix]


def _steps(farm: Farm, build_id: int) -> list[dict[str, Any]]:
    with farm.api() as c:
        steps: list[dict[str, Any]] = c.get(f"/api/v1/builds/{build_id}/steps").json()["steps"]
    return steps


def _narinfo_status(farm: Farm, prefix: str, path: str) -> int:
    hash_part = StorePath.parse(path).hash_part
    return httpx.get(f"{farm.url}{prefix}/{hash_part}.narinfo", timeout=10).status_code


def test_untrusted_builds_stay_on_untrusted_agents_and_out_of_the_main_cache(
    farm_factory: Callable[..., Farm],
) -> None:
    farm = farm_factory()
    farm.start_agent("trusted", max_jobs=2)
    farm.start_agent("untrusted", max_jobs=2, extra_args=["--untrusted"])
    dag = farm.dag_file(layers=2, width=2, fanIn=2)

    # A pull request ref makes even the trusted client's build untrusted.
    code, out = farm.build_json(
        str(dag), "-A", "top", "--repository", "acme/widgets", "--ref", "refs/pull/7/merge"
    )
    assert code == 0, out
    assert (out["trusted"], out["repository"], out["ref"]) == (
        False,
        "acme/widgets",
        "refs/pull/7/merge",
    )
    steps = _steps(farm, out["build_id"])
    assert len(steps) == 5
    assert {s["agent_name"] for s in steps} == {"untrusted"}  # the trusted agent idled
    assert {s["trusted"] for s in steps} == {False}
    outputs = [p for s in steps for p in s["outputs"].values()]
    for path in outputs:
        assert _narinfo_status(farm, "/cache", path) == 404, path
        assert _narinfo_status(farm, "/cache/untrusted", path) == 200, path
    # `bigtent build` fetched the result through Nix from the untrusted cache, under its key.
    result = farm.root / "result"
    assert result.is_symlink() and result.read_text().startswith("top-0 ")

    # The same derivations, trusted: built again, on the trusted agent, into the main cache.
    (result).unlink()
    code, again = farm.build_json(str(dag), "-A", "top", "--repository", "acme/widgets")
    assert code == 0, again
    assert again["trusted"] is True
    trusted_steps = _steps(farm, again["build_id"])
    assert {s["drv_path"] for s in trusted_steps} == {s["drv_path"] for s in steps}
    assert {s["agent_name"] for s in trusted_steps} == {"trusted"}
    assert {s["trusted"] for s in trusted_steps} == {True}
    for path in outputs:
        assert _narinfo_status(farm, "/cache", path) == 200, path
    assert result.is_symlink()

    # An untrusted client token: untrusted whatever it asks; `builds` shows the trust.
    with farm.api() as c:
        resp = c.post("/api/v1/tokens", json={"role": "client", "name": "pr-bot"})
    assert resp.status_code == 201, resp.text
    code, third = farm.build_json(
        str(dag), "-A", "top", "--no-download", token=resp.json()["token"]
    )
    assert code == 0, third
    assert third["trusted"] is False
    assert _steps(farm, third["build_id"]) == []  # all built already
    listing = json.loads(farm.bigtent("builds", "--json", check=True).stdout)
    trust = {b["id"]: (b["trusted"], b["ref"]) for b in listing}
    assert trust[out["build_id"]] == (False, "refs/pull/7/merge")
    assert trust[again["build_id"]] == (True, None)
