"""The hook's live log: the root step's stream reaches Nix line by line, its end starts the
next look at the build early, the rest of the log is asked for once the build ended, and a
stream that fails falls back to the whole log."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, cast

from bigtent.apimodels import Build
from bigtent.client.api import RunnerClient
from bigtent.client.hooklogs import RootLogs
from bigtent.client.sse import LogEvent
from bigtent.errors import NotFound
from bigtent.states import BuildState


class Lines:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.two = asyncio.Event()

    def line(self, text: str) -> None:
        self.lines.append(text)
        if len(self.lines) == 2:
            self.two.set()

    def error(self, text: str) -> None:
        self.lines.append(f"error: {text}")


class FakeClient:
    def __init__(self, events: list[LogEvent] | None, gate: asyncio.Event) -> None:
        self.events = events
        self.gate = gate
        self.fetched: list[int | str] = []

    async def stream_step_log(
        self, step_id: int | str, *, start: int = 0
    ) -> AsyncIterator[LogEvent]:
        if self.events is None:
            raise NotFound("no such route (an older runner)")
        for event in self.events:
            if event.end_state is not None:
                await self.gate.wait()  # the step ends when the test says so
            yield event

    async def fetch_log(self, step_id: int | str) -> str:
        self.fetched.append(step_id)
        return "the whole log\n"


def build(state: BuildState, step_id: int | None = 7) -> Build:
    data: dict[str, Any] = {
        "id": "1",
        "state": state.value,
        "roots": [
            {
                "drv_path": "/nix/store/x-a.drv",
                "outputs": {},
                "step_id": step_id,
                "state": state.value,
            }
        ],
    }
    return Build.model_validate(data)


async def test_lines_arrive_while_the_step_runs_and_its_end_ends_the_pause() -> None:
    gate = asyncio.Event()
    events = [
        LogEvent(text="first li", offset=8),
        LogEvent(text="ne\nsecond", offset=18),
        LogEvent(text=" line\n", offset=24),
        LogEvent(offset=24, end_state="succeeded"),
    ]
    client = FakeClient(events, gate)
    sink = Lines()
    logs = RootLogs(cast(RunnerClient, client), sink)
    logs.start(build(BuildState.RUNNING))
    async with asyncio.timeout(5):
        await sink.two.wait()
    assert sink.lines == ["first line", "second line"]  # before the step ended
    # The step still runs: the pause waits (up to the interval) for the stream's end.
    pause = asyncio.create_task(logs.pause(30.0))
    done, _ = await asyncio.wait({pause}, timeout=0.1)
    assert not done
    gate.set()
    async with asyncio.timeout(5):
        await pause
        await logs.finish(build(BuildState.SUCCEEDED))
    assert sink.lines == ["first line", "second line"]
    assert logs.streamed == {7} and client.fetched == []


async def test_a_stream_that_fails_falls_back_to_the_whole_log() -> None:
    client = FakeClient(None, asyncio.Event())
    sink = Lines()
    logs = RootLogs(cast(RunnerClient, client), sink)
    logs.start(build(BuildState.RUNNING))
    async with asyncio.timeout(5):
        await logs.finish(build(BuildState.SUCCEEDED))
    assert client.fetched == [7]
    assert sink.lines[-1] == "the whole log"
    assert "the live log stopped" in sink.lines[0]


async def test_a_cached_derivation_says_so() -> None:
    sink = Lines()
    logs = RootLogs(cast(RunnerClient, FakeClient([], asyncio.Event())), sink)
    logs.start(build(BuildState.SUCCEEDED, step_id=None))
    await logs.pause(0.0)  # nothing streams: a plain pause
    await logs.finish(build(BuildState.SUCCEEDED, step_id=None))
    assert sink.lines == ["bigtent: the farm had built it already"]


async def test_the_rest_of_the_log_is_asked_for_once_the_build_ended() -> None:
    """The runner may send a stream's end late (the step ended as the stream began): the
    build's end closes it and the rest comes from the offset reached."""
    gate = asyncio.Event()
    head = [LogEvent(text="one\ntw", offset=6)]
    client = FakeClient(head, gate)
    tail = [LogEvent(text="o\n", offset=8), LogEvent(offset=8, end_state="succeeded")]
    asked: list[int] = []
    never, hanging = asyncio.Event(), asyncio.Event()

    async def stream(step_id: int | str, *, start: int = 0) -> AsyncIterator[LogEvent]:
        asked.append(start)
        for event in head if start == 0 else tail:
            yield event
        if start == 0:
            hanging.set()
            await never.wait()  # no end: the stream hangs on

    client.stream_step_log = stream  # type: ignore[method-assign]
    sink = Lines()
    logs = RootLogs(cast(RunnerClient, client), sink)
    logs.start(build(BuildState.RUNNING))
    async with asyncio.timeout(5):
        await hanging.wait()
        await logs.finish(build(BuildState.SUCCEEDED))
    assert asked == [0, 6]
    assert sink.lines == ["one", "two"]
    assert client.fetched == []
