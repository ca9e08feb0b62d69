"""A database outage under a running runner (a real PostgreSQL stopped and started again):
every route and narinfo lookup answers 503 with the cause and ``Retry-After``, never a bare
500; the client rides it out with a visible "runner unavailable, retrying" line; a client
given several runner URLs passes over one that cannot answer."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from bigtent.client.api import RunnerClient
from bigtent.client.observer import SilentObserver
from bigtent.client.outage import riding_out
from bigtent.config import Role
from tests.databases import migrate_url
from tests.integration.runner.conftest import Drvs, MakeRunner, Nix, eventually, upload_closure
from tests.pgcluster import PgCluster, find_bin_dir

pytestmark = pytest.mark.nix


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


class _Phases(SilentObserver):
    def __init__(self) -> None:
        self.phases: list[str] = []

    def on_phase(self, message: str) -> None:
        self.phases.append(message)


async def test_database_outage_answers_503_and_the_client_rides_it_out(
    make_runner: MakeRunner, own_cluster: PgCluster, nix: Nix, drvs: Drvs
) -> None:
    url = own_cluster.create_database("outage")
    migrate_url(url)
    runner = await make_runner(serve=True, database={"url": url})
    await upload_closure(runner, nix, drvs.closure)
    client = runner.client(Role.CLIENT)
    assert (await client.get("/api/v1/builds")).status_code == 200

    await asyncio.to_thread(own_cluster.halt)
    try:
        for resp in (
            await client.get("/api/v1/builds"),
            await client.post("/api/v1/paths/missing", json={"paths": [drvs.top + "x"]}),
            await runner.client(None).get("/cache/" + "0" * 32 + ".narinfo"),
        ):
            assert resp.status_code == 503, resp.text
            assert resp.headers["Retry-After"] == "2"
            assert "the database is unavailable" in resp.json()["error"], resp.text

        assert runner.url is not None
        observer = _Phases()
        async with RunnerClient(runner.url, token=runner.tokens[Role.CLIENT]) as rc:
            riding = asyncio.create_task(riding_out(rc.fetch_builds, observer, grace_secs=60))
            await eventually(lambda: bool(observer.phases))
            assert not riding.done()
            await asyncio.to_thread(own_cluster.resume)
            builds = await asyncio.wait_for(riding, 60)
        assert builds == []
        assert observer.phases[0].startswith("runner unavailable, retrying: ")
        assert "the database is unavailable" in observer.phases[0]
    finally:
        if not own_cluster.data.joinpath("postmaster.pid").exists():
            await asyncio.to_thread(own_cluster.resume)
    assert (await client.get("/api/v1/builds")).status_code == 200


async def test_client_given_several_runners_passes_over_one_that_cannot_answer(
    make_runner: MakeRunner,
) -> None:
    runner = await make_runner(serve=True)
    assert runner.url is not None
    dead = "http://127.0.0.1:9"  # discard: nothing listens
    async with RunnerClient(f"{dead},{runner.url}", token=runner.tokens[Role.CLIENT]) as rc:
        assert rc.base_urls == [dead, runner.url]
        status = await rc.fetch_status()
        assert status.version
        assert rc.base_url == runner.url
