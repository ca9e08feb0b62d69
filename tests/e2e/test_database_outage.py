"""PostgreSQL stopped for a few seconds during a real build (a runner process, a real agent,
``bigtent build``): the client shows "runner unavailable, retrying" and the build succeeds."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from tests.conftest import wait_until
from tests.databases import MakeDatabase, migrate_url
from tests.e2e.conftest import Farm
from tests.pgcluster import PgCluster, find_bin_dir

pytestmark = [pytest.mark.e2e, pytest.mark.nix, pytest.mark.database]

OUTAGE_SECS = 4.0


@pytest.fixture
def own_cluster() -> Iterator[PgCluster]:
    """A PostgreSQL cluster of this test's own: it is stopped while the test runs."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server installed")
    cluster = PgCluster(bin_dir)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def make_database(own_cluster: PgCluster) -> MakeDatabase:
    """The farm's database lives on ``own_cluster``."""

    def make(*, migrated: bool = True) -> str:
        url = own_cluster.create_database("farm")
        if migrated:
            migrate_url(url)
        return url

    return make


def test_build_rides_out_a_database_restart(
    farm_factory: Callable[..., Farm], own_cluster: PgCluster
) -> None:
    farm = farm_factory(agents=1)
    dag = farm.dag_file(layers=1, width=1, sleep=10)
    out, err = farm.root / "client.out", farm.root / "client.err"
    argv = [sys.executable, "-m", "bigtent", "build", "--json", "--no-download", str(dag)]
    with out.open("wb") as o, err.open("wb") as e:
        popen = subprocess.Popen(
            [*argv, "-A", "nodes.dag-0-0"], stdout=o, stderr=e, env=farm.env(), cwd=farm.root
        )
    try:

        def building() -> bool:
            with farm.api() as c:
                builds = c.get("/api/v1/builds").json()["builds"]
                if not builds:
                    return False
                steps = c.get(f"/api/v1/builds/{builds[0]['id']}/steps").json()["steps"]
            return any(s["state"] == "building" for s in steps)

        wait_until(building, timeout=60, interval=0.1, what="the step to build")
        own_cluster.halt()
        time.sleep(OUTAGE_SECS)  # the outage itself, not a synchronisation
        own_cluster.resume()
        code = popen.wait(120)
    finally:
        if popen.poll() is None:
            popen.kill()
            popen.wait(10)
    stderr = err.read_text()
    assert code == 0, stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["succeeded"] is True
    assert "runner unavailable, retrying" in stderr, stderr[-3000:]
