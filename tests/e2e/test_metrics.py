"""End to end: ``/metrics`` of a real runner read while real agents build a DAG, and after.

The dispatch-latency histogram counts every assignment, the finished-steps counter every
attempt, the queue depth returns to zero when the build ends, and a bad token is counted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import current_system, wait_until
from tests.e2e.conftest import Farm
from tests.unit.runner.test_metrics_docs import DASHBOARD, dashboard_metric_names, exposed_names

pytestmark = [pytest.mark.e2e, pytest.mark.nix]

LAYERS, WIDTH = 3, 3
N_STEPS = LAYERS * WIDTH + 1
ACTIVE = ("waiting", "runnable", "assigned", "building")


class Scrape:
    """One read of ``/metrics``, parsed with prometheus-client's own parser."""

    def __init__(self, farm: Farm) -> None:
        resp = httpx.get(f"{farm.url}/metrics", timeout=10)
        assert resp.status_code == 200, resp.text
        self.text = resp.text
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(resp.text):
            for s in family.samples:
                self.samples[s.name, frozenset(s.labels.items())] = s.value

    def get(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def total(self, name: str, **labels: str) -> float:
        """The sum over every series of ``name`` whose labels include ``labels``."""
        want = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and want <= ls)

    def depth(self, system: str) -> dict[str, float]:
        return {s: self.get("bigtent_queue_depth", system=system, state=s) for s in ACTIVE}

    def phase_count(self, system: str, phase: str) -> float:
        return self.get("bigtent_step_phase_seconds_count", system=system, phase=phase)


def _api(farm: Farm, path: str) -> Any:
    with farm.api() as c:
        return c.get(path).json()


def test_metrics_while_a_dag_builds_and_after(farm_factory: Callable[..., Farm]) -> None:
    farm = farm_factory(agents=2)
    system = current_system()
    before = Scrape(farm)
    assert before.get("bigtent_agents_connected", lifetime="persistent", auth_kind="token") == 2
    assert before.get("bigtent_agents_connected", lifetime="ephemeral", auth_kind="token") == 0

    # fanIn 1: three chains of three steps, then `top`; each builder sleeps 1 s, so the
    # upper layers wait while the lower ones build.
    dag = farm.dag_file(layers=LAYERS, width=WIDTH, fanIn=1, sleep=1)
    build = farm._spawn("build", ["build", str(dag), "-A", "top", "--no-download"], farm.env())

    during: list[Scrape] = []

    def building_while_work_waits() -> bool:
        if build.popen.poll() is not None:
            raise AssertionError("the build ended before /metrics saw it run:\n" + farm.logs())
        scrape = Scrape(farm)
        depth = scrape.depth(system)
        if depth["building"] + depth["assigned"] >= 1 and depth["waiting"] >= 1:
            during.append(scrape)
            return True
        return False

    wait_until(building_while_work_waits, timeout=120, interval=0.1, what="steps building")
    [mid] = during
    assert sum(mid.depth(system).values()) <= N_STEPS
    assert 1 <= mid.phase_count(system, "dispatch") < N_STEPS
    assert mid.get("bigtent_steps_finished_total", system=system, outcome="success") < N_STEPS

    assert build.popen.wait(timeout=240) == 0, farm.logs()
    [latest] = _api(farm, "/api/v1/builds")["builds"]
    assert latest["state"] == "succeeded"
    steps = _api(farm, f"/api/v1/builds/{latest['id']}/steps")["steps"]
    assert len(steps) == N_STEPS
    retries = sum(int(s["attempts"]) for s in steps)

    # The build is over: nothing of it is queued any more, and the series stay, at zero.
    wait_until(
        lambda: set(Scrape(farm).depth(system).values()) == {0.0},
        timeout=10,
        what="queue depth back to zero",
    )
    after = Scrape(farm)
    for state in ACTIVE:  # the series stay after the build, at zero
        assert ("bigtent_queue_depth", frozenset({("system", system), ("state", state)})) in (
            after.samples
        )
    # Every assignment was observed once (no retries on a healthy farm: N_STEPS).
    assert after.phase_count(system, "dispatch") == N_STEPS + retries
    assert after.phase_count(system, "accept") == N_STEPS + retries
    assert after.phase_count(system, "queued") == N_STEPS
    assert after.get("bigtent_steps_finished_total", system=system, outcome="success") == N_STEPS
    assert after.total("bigtent_steps_finished_total", system=system) == N_STEPS + retries
    # The agents timed each successful build and upload; the sleep 1 shows in the build phase.
    assert after.phase_count(system, "build") >= N_STEPS
    assert after.phase_count(system, "upload") >= N_STEPS
    build_secs = after.get("bigtent_step_phase_seconds_sum", system=system, phase="build")
    assert build_secs >= N_STEPS * 1.0
    one_sec = after.get("bigtent_step_phase_seconds_bucket", system=system, phase="build", le="1.0")
    assert one_sec == 0, "every build slept 1 s"
    # Outputs were uploaded and verified once each; the client uploaded the .drv files.
    assert after.get("bigtent_uploads_verified_total", kind="output") == N_STEPS
    assert after.get("bigtent_upload_nar_bytes_total", kind="output") > 0
    assert after.get("bigtent_uploads_verified_total", kind="source") >= N_STEPS
    assert after.total("bigtent_upload_failures_total") == 0
    assert after.total("bigtent_auth_failures_total") == 0

    # Each narinfo asked for is counted once, as a hit or a miss. (Agents get a step's .drv
    # with its assignment: only inputs built by the other agent were asked for so far.)
    drv_hash = steps[0]["drv_path"].removeprefix("/nix/store/")[:32]
    with farm.api() as c:
        assert c.get(f"/cache/{drv_hash}.narinfo").status_code == 200
        assert c.get(f"/cache/{'0' * 32}.narinfo").status_code == 404
    looked = Scrape(farm)
    for result in ("hit", "miss"):
        counted = looked.get("bigtent_cache_narinfo_requests_total", result=result)
        assert counted == after.get("bigtent_cache_narinfo_requests_total", result=result) + 1

    # A bad token is refused and counted, once, with its reason.
    with farm.api("bt_not-a-token") as c:
        assert c.get("/api/v1/status").status_code == 401
    refused = Scrape(farm)
    assert refused.get("bigtent_auth_failures_total", reason="invalid_token") == 1
    assert refused.total("bigtent_auth_failures_total") == 1

    # The sample dashboard queries only metrics this runner exposes.
    missing = dashboard_metric_names(DASHBOARD.read_text()) - exposed_names(refused.text)
    assert not missing, missing
