"""Several runners on one PostgreSQL database never collect the cache at once."""

from __future__ import annotations

import pytest

from bigtent.config import Role
from bigtent.errors import Conflict
from tests.databases import MakeDatabase, needs_postgresql
from tests.integration.runner.conftest import MakeRunner

pytestmark = [pytest.mark.postgres, needs_postgresql]

RETENTION = {"enabled": False, "max_idle_days": 30, "grace_secs": 0}


async def test_only_one_runner_collects_at_a_time(
    make_runner: MakeRunner, make_database: MakeDatabase
) -> None:
    url = make_database()
    first = await make_runner(database={"url": url}, cache={"retention": RETENTION})
    second = await make_runner(database={"url": url}, cache={"retention": RETENTION})
    assert first.comps.collector is not None and second.comps.collector is not None
    refused: list[int] = []

    async def meanwhile(phase: str) -> None:
        if phase == "marked":
            resp = await second.client(Role.ADMIN).post("/api/v1/gc", json={})
            refused.append(resp.status_code)
            with pytest.raises(Conflict):
                await second.comps.collector.collect(dry_run=True)  # type: ignore[union-attr]

    first.comps.collector.on_phase = meanwhile
    await first.comps.collector.collect()
    assert refused == [409]
    # Once the first is done, the lock is free again.
    report = await second.comps.collector.collect()
    assert report.paths_deleted == 0
