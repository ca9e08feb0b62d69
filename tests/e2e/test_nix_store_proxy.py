"""Plain ``nix-build --store unix://…`` building on the farm through ``bigtent nix-proxy``.

Real runner and agents (the e2e ``Farm``), a real Nix 2.8 client with ``max-jobs = 0`` behind
the proxy (it cannot build anything itself): the whole DAG goes to the farm as one build, the
outputs come back into the client's chroot store signed by the runner's key.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import current_system
from tests.e2e.conftest import Farm, free_port
from tests.e2e.test_nix_hook import farm_steps, store_query, token_file
from tests.nixproxy import nix_via, running_proxy

pytestmark = [pytest.mark.e2e, pytest.mark.nix]


def farm_builds(farm: Farm) -> list[dict[str, object]]:
    with farm.api() as c:
        builds: list[dict[str, object]] = c.get("/api/v1/builds", params={"limit": 500}).json()[
            "builds"
        ]
    return builds


def test_nix_build_sends_the_whole_dag_as_one_build(
    farm_factory: Callable[..., Farm], tmp_path: Path
) -> None:
    farm = farm_factory(agents=2)
    store = tmp_path / "client"
    env = farm.env()
    dag = farm.dag_file(layers=5, width=6, fanIn=2)
    extra = ("--token-file", str(token_file(farm)), "--public-key", farm.public_key)
    with running_proxy(farm.url, store, env, *extra) as proxy:
        drv = nix_via(proxy, env, str(dag), "-A", "top", tool="nix-instantiate")
        assert drv.returncode == 0, drv.stderr
        drvs = {
            p
            for p in store_query(store, "--query", "--requisites", drv.stdout.strip()).split()
            if p.endswith(".drv")
        }
        assert len(drvs) == 31  # 30 nodes and the top

        started = time.monotonic()
        first = nix_via(proxy, env, str(dag), "-A", "top", "--no-out-link")
        took = time.monotonic() - started
        assert first.returncode == 0, first.stderr[-4000:] + farm.logs()
        out = first.stdout.strip().splitlines()[-1]
        assert (store / out.lstrip("/")).read_text().startswith("top-0 ")
        # One build on the farm for the whole DAG; every derivation built by an agent.
        assert len(farm_builds(farm)) == 1
        built = {s["drv_path"]: s for s in farm_steps(farm) if s["state"] == "succeeded"}
        assert set(built) == drvs
        assert all(s["agent_name"] in ("a0", "a1") for s in built.values())
        # The outputs are in the local store, signed by the runner's key, and Nix agrees.
        verify = subprocess.run(
            ["nix", "--extra-experimental-features", "nix-command", "store", "verify",
             "--store", f"local?root={store}", "--recursive", "--sigs-needed", "1",
             "--option", "trusted-public-keys", farm.public_key, out],
            capture_output=True, text=True,
        )  # fmt: skip
        assert verify.returncode == 0, verify.stderr
        print(f"nix-build of 31 derivations through the store proxy: {took:.1f} s")

        # A second run builds nothing, and asks the farm nothing.
        again = nix_via(proxy, env, str(dag), "-A", "top", "--no-out-link")
        assert again.returncode == 0, again.stderr
        assert again.stdout.strip().splitlines()[-1] == out
        assert "bigtent: build" not in again.stderr
        assert len(farm_builds(farm)) == 1

        # nix build with a result link (a GC root through the proxy).
        link = tmp_path / "result"
        linked = nix_via(proxy, env, "build", "-f", str(dag), "top", "-o", str(link), tool="nix")
        assert linked.returncode == 0, linked.stderr
        assert str(link.readlink()) == out


def test_a_failure_fails_nix_with_its_log(
    farm_factory: Callable[..., Farm], tmp_path: Path
) -> None:
    farm = farm_factory(agents=1)
    store = tmp_path / "client"
    env = farm.env()
    dag = farm.dag_file(layers=2, width=2, fanIn=1, failing=["1-1"])
    with running_proxy(farm.url, store, env, "--token-file", str(token_file(farm))) as proxy:
        ok = nix_via(proxy, env, "build", "-f", str(dag), "nodes.dag-1-0", "--no-link", tool="nix")
        assert ok.returncode == 0, ok.stderr
        assert "building node 1-0" in ok.stderr

        bad = nix_via(proxy, env, str(dag), "-A", "nodes.dag-1-1", "--no-out-link")
        assert bad.returncode != 0, bad.stderr
        assert "node 1-1 fails on purpose" in bad.stderr
        assert "dag-1-1.drv failed on the farm" in bad.stderr
        assert not any(p.name.endswith("-dag-1-1") for p in (store / "nix/store").iterdir())


def test_a_refused_token_and_no_runner_fail_fast(
    farm_factory: Callable[..., Farm], tmp_path: Path
) -> None:
    farm = farm_factory(agents=0)
    env = farm.env()
    dag = farm.dag_file(layers=1, width=1)
    refused = ("--token-file", str(token_file(farm, "not-a-token")))
    with running_proxy(farm.url, tmp_path / "s1", env, *refused) as proxy:
        started = time.monotonic()
        bad = nix_via(proxy, env, str(dag), "-A", "top", "--no-out-link", timeout=60)
        assert bad.returncode != 0
        assert time.monotonic() - started < 15
        assert "401" in bad.stderr or "token" in bad.stderr.lower(), bad.stderr
    nowhere = f"http://127.0.0.1:{free_port()}"
    with running_proxy(nowhere, tmp_path / "s2", env, *refused) as proxy:
        started = time.monotonic()
        down = nix_via(proxy, env, str(dag), "-A", "top", "--no-out-link", timeout=60)
        assert down.returncode != 0
        assert time.monotonic() - started < 15
        assert "cannot reach runner" in down.stderr, down.stderr


def test_nix_flake_check_builds_on_the_farm(
    farm_factory: Callable[..., Farm], tmp_path: Path
) -> None:
    farm = farm_factory(agents=1)
    store = tmp_path / "client"
    env = farm.env()
    flake = tmp_path / "flake"
    flake.mkdir()
    system = current_system()
    (flake / "flake.nix").write_text(
        """{
  outputs = { self }: let
    mk = name: derivation {
      inherit name; system = "SYSTEM"; builder = "/bin/sh"; PATH = "/usr/bin:/bin";
      salt = "SALT"; args = [ "-c" "echo building ${name}; echo ${name} > $out" ];
    };
  in {
    packages.SYSTEM.default = mk "flake-pkg";
    checks.SYSTEM.c1 = mk "flake-check-1";
  };
}
""".replace("SYSTEM", system).replace("SALT", uuid.uuid4().hex)
    )
    with running_proxy(farm.url, store, env, "--token-file", str(token_file(farm))) as proxy:
        check = nix_via(proxy, env, "flake", "check", f"path:{flake}", "-L", tool="nix")
        assert check.returncode == 0, check.stderr
        assert "building flake-check-1" in check.stderr
        built = nix_via(proxy, env, "build", f"path:{flake}", "--no-link", "--json", tool="nix")
        assert built.returncode == 0, built.stderr
        out = json.loads(built.stdout)[0]["outputs"]["out"]
        assert (store / out.lstrip("/")).read_text() == "flake-pkg\n"
    assert len(farm_builds(farm)) == 2
