"""A runner killed (SIGKILL) while it admits a large build: the build it left half-admitted
says what happened (an interrupted admission by the runner, not a cancel by anyone), and the
client's retry of the submission, with the same submission key, replaces it with a new build
once the runner is back. Real runner processes, the real client, real Nix."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import wait_until
from tests.databases import TEST_DB
from tests.e2e.conftest import Farm

pytestmark = [
    pytest.mark.nix,
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(
        TEST_DB != "sqlite",
        reason="staged admission is for a runner alone with SQLite; on PostgreSQL a build is "
        "admitted in one transaction and a kill leaves nothing half-admitted",
    ),
]

LAYERS, WIDTH = 40, 100
"""4,001 derivations: their admission takes long enough to be caught in the middle."""


def _half_admitted(db: str) -> int | None:
    """A build whose steps are being written but whose roots are not (yet)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        row = conn.execute(
            "SELECT b.id FROM builds b WHERE NOT EXISTS "
            "(SELECT 1 FROM build_roots r WHERE r.build_id = b.id) "
            "AND EXISTS (SELECT 1 FROM build_steps s WHERE s.build_id = b.id)"
        ).fetchone()
    return int(row[0]) if row else None


def test_a_runner_killed_while_admitting_a_build_says_so_and_the_retry_replaces_it(
    farm_factory: Callable[..., Farm],
) -> None:
    farm = farm_factory()
    db = farm.database_url.removeprefix("sqlite+aiosqlite:///")
    dag = farm.dag_file(layers=LAYERS, width=WIDTH, fanIn=2)
    out, err = farm.root / "client.out", farm.root / "client.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        client = subprocess.Popen(
            [sys.executable, "-m", "bigtent", "-v", "build", "--json", str(dag), "-A", "top"],
            stdout=stdout,
            stderr=stderr,
            env=farm.env(),
            cwd=farm.root,
        )
    try:
        seen: list[int] = []

        def caught() -> bool:
            assert client.poll() is None, err.read_text()[-3000:]
            found = _half_admitted(db)
            if found is not None:
                seen.append(found)
            return found is not None

        wait_until(caught, timeout=240, interval=0.01, what="the build's admission to start")
        assert farm.runner is not None
        farm.runner.popen.send_signal(signal.SIGKILL)
        farm.runner.popen.wait(timeout=30)
        old = seen[0]
        # The kill landed in the middle: the build has steps and no roots.
        assert _half_admitted(db) == old

        farm.start_runner()
        with farm.api() as api:

            def builds() -> list[dict[str, Any]]:
                listed: list[dict[str, Any]] = api.get("/api/v1/builds").json()["builds"]
                return listed

            wait_until(
                lambda: any(b["id"] != old and b["roots"] for b in builds()),
                timeout=120,
                what="the client's retry to create the build again",
            )
            (new,) = [b for b in builds() if b["id"] != old]
            assert new["created_by"] == "client" and new["state"] in ("queued", "running")
            assert [r["drv_path"].endswith("-dag-top-0.drv") for r in new["roots"]] == [True]
            gone = api.get(f"/api/v1/builds/{old}").json()
            assert gone["state"] == "cancelled" and gone["roots"] == []
            assert [(e["kind"], e["actor"]) for e in gone["events"]] == [
                ("admission_interrupted", "runner"),
                ("replaced", "client"),
            ]
            assert "nobody cancelled it" in gone["events"][0]["detail"]
            assert gone["events"][1]["detail"] == f"submitted again as build {new['id']}"
            assert api.get(f"/api/v1/builds/{new['id']}").json()["events"] == []
            page = api.get(f"/builds/{old}").text
            assert "admission interrupted" in page and f"build {new['id']}" in page
        assert client.poll() is None  # still following its (new) build
    finally:
        client.kill()
        client.wait(timeout=30)
    log = err.read_text()
    assert "runner unavailable, retrying" in log
    assert "Traceback" not in log
    assert farm.runner is not None
    assert f"build {old} was cut short while being admitted" in farm.runner.log.read_text()
