"""Near a build's end ``follow_build`` waits at the runner for the build to change
(``GET /builds/{id}?wait=&seen=``); an older runner, which ignores the parameters and answers
at once, is followed as before."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from bigtent.apimodels import Build, progress_token
from bigtent.client.follow import LONG_POLL_SECS, NEAR_END_STEPS, NextLook, follow_build, next_look
from bigtent.client.observer import SilentObserver
from tests.unit.client.test_client_build import FakeRunner, _client, _wire_build


@pytest.mark.parametrize(
    ("unfinished", "changed", "look"),
    [
        (NEAR_END_STEPS + 1, True, NextLook(wait=False, pause=True)),
        (50, False, NextLook(wait=False, pause=True)),
        (NEAR_END_STEPS, True, NextLook(wait=True, pause=False)),
        (1, False, NextLook(wait=True, pause=True)),
        (0, True, NextLook(wait=True, pause=False)),
    ],
)
def test_next_look(unfinished: int, changed: bool, look: NextLook) -> None:
    assert next_look(unfinished, changed) == look


def test_the_progress_token_is_the_state_and_the_counts() -> None:
    build = Build.model_validate(_wire_build("running", running=1, succeeded=2))
    assert build.progress_token() == "running.3.0.0.1.2.0.0"
    assert build.progress_token() == progress_token("running", build.counts.model_dump())
    assert progress_token("running", {"total": 3, "running": 1}) != build.progress_token()


class RecordingRunner(FakeRunner):
    """A runner without the wait (it answers at once), recording the build looks' queries."""

    def __init__(self, builds: list[dict[str, Any]]) -> None:
        super().__init__([], [], builds)
        self.looks: list[dict[str, str]] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/v1/builds/5":
            self.looks.append(dict(request.url.params))
        return await super().__call__(request)


async def test_an_older_runner_that_answers_at_once_is_followed_to_the_end() -> None:
    many = _wire_build("running", waiting=1, runnable=1, running=1)
    near = _wire_build("running", running=1, succeeded=2)
    runner = RecordingRunner([many, near, near, near, _wire_build("succeeded", succeeded=3)])
    pauses: list[float] = []

    async def pause(secs: float) -> None:
        pauses.append(secs)

    async with _client(runner) as client:
        final = await follow_build(client, 5, SilentObserver(), interval_secs=0.3, pause=pause)
    assert final.state.value == "succeeded"
    token = Build.model_validate(near).progress_token()
    wait = {"wait": f"{LONG_POLL_SECS:g}", "seen": token}
    # Far from the end a plain look; near it each look waits, and one that came back
    # unchanged (as an older runner answers) is followed by a pause as before.
    assert runner.looks == [{}, {}, wait, wait, wait]
    assert len(pauses) == 3
