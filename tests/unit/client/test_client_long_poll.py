"""``follow_build`` waits at the runner for the build's state to change
(``GET /builds/{id}?wait=&seen=STATE``); an older runner, which ignores the parameters and
answers at once, is followed as before: a pause between looks."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from bigtent.apilimits import BUILD_WAIT_MAX_SECS
from bigtent.apimodels import (
    WAITED_HEADER,
    Build,
    progress_seen,
    progress_token,
    seen_counts_steps,
)
from bigtent.client.follow import follow_build, look_wait_secs
from bigtent.client.observer import SilentObserver
from tests.unit.client.test_client_build import FakeRunner, _client, _wire_build


def test_the_progress_token_is_the_state_and_the_counts() -> None:
    build = Build.model_validate(_wire_build("running", running=1, succeeded=2))
    token = build.progress_token()
    assert token == "running.3.0.0.1.2.0.0"
    assert token == progress_token("running", build.counts.model_dump())
    assert progress_seen(token, token) and progress_seen(token, "running")
    assert not progress_seen(token, "running.3.0.0.0.3.0.0")
    assert not progress_seen(token, "queued")


def test_a_seen_token_with_counts_makes_a_steps_change_news() -> None:
    # The runner's wait watches the steps too exactly when progress_seen compares the counts.
    token = progress_token("running", {"running": 1})
    assert seen_counts_steps(token)
    assert not seen_counts_steps("running")
    moved = progress_token("running", {"running": 1, "succeeded": 1})
    assert not progress_seen(moved, token)  # a step's change, seen with the counts
    assert progress_seen(moved, "running")  # but not by a state alone


@pytest.mark.parametrize(
    ("interval", "wait"), [(0.3, 0.3), (0.0, 0.0), (-1.0, 0.0), (60.0, BUILD_WAIT_MAX_SECS)]
)
def test_a_look_waits_the_interval_within_the_runners_bound(interval: float, wait: float) -> None:
    assert look_wait_secs(interval) == wait


class RecordingRunner(FakeRunner):
    """Records the build looks' queries; ``waits``: answers as a runner that waited."""

    def __init__(self, builds: list[dict[str, Any]], *, waits: bool) -> None:
        super().__init__([], [], builds)
        self.waits = waits
        self.looks: list[dict[str, str]] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        response = await super().__call__(request)
        if request.url.path == "/api/v1/builds/5":
            self.looks.append(dict(request.url.params))
            if self.waits and "wait" in request.url.params:
                response.headers[WAITED_HEADER] = request.url.params["wait"]
        return response


BUILDS = [
    _wire_build("queued"),
    _wire_build("running", waiting=1, runnable=1, running=1),
    _wire_build("running", running=1, succeeded=2),
    _wire_build("succeeded", succeeded=3),
]


@pytest.mark.parametrize("waits", [True, False])
async def test_each_look_after_the_first_waits_for_the_state(waits: bool) -> None:
    """A runner that waits: no pause between looks. An older one (it answers at once, and
    says nothing of a wait): a pause after each look, as before."""
    runner = RecordingRunner(list(BUILDS), waits=waits)
    pauses: list[float] = []

    async def pause(secs: float) -> None:
        pauses.append(secs)

    async with _client(runner) as client:
        final = await follow_build(client, 5, SilentObserver(), interval_secs=0.3, pause=pause)
    assert final.state.value == "succeeded"
    state = [{"wait": "0.3", "seen": "queued"}] + [{"wait": "0.3", "seen": "running"}] * 2
    assert runner.looks == [{}, *state]
    # The first look (plain) is followed by a pause either way.
    assert len(pauses) == (1 if waits else 3)
