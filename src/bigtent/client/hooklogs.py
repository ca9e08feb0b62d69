"""The build log a hook shows while the farm builds: each root step's log streamed to the sink,
and how long each phase took.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from bigtent.client.hookcommon import Sink

if TYPE_CHECKING:
    import asyncio

    from bigtent.apimodels import Build
    from bigtent.client.api import RunnerClient
    from bigtent.client.observer import BuildObserver
    from bigtent.client.progress import PrefixedLines

log = logging.getLogger(__name__)


LOG_END_WAIT_SECS = 5.0
"""How long the rest of a step's log may take once the build ended."""


class PhaseClock:
    """Where a derivation's time went in the helper (logged: architecture §"Plain nix-build
    on the farm", docs/benchmarks.md)."""

    def __init__(self) -> None:
        import time

        self._clock = time.monotonic
        self._last = self._clock()
        self.spans: list[tuple[str, float]] = []

    def mark(self, phase: str) -> None:
        now = self._clock()
        self.spans.append((phase, now - self._last))
        self._last = now

    def summary(self) -> str:
        return ", ".join(f"{name} {secs:.3f} s" for name, secs in self.spans)


class RootLogs:
    """The live log of the build's root steps, line by line to the sink (Nix's fd 4) while
    they run, from the runner's log stream (``GET /api/v1/steps/{id}/events``, as
    ``bigtent build -L``). A step whose stream fails (an older runner, an outage past the
    grace) has its log fetched whole once the build ended."""

    def __init__(self, client: RunnerClient, sink: Sink) -> None:
        self.client = client
        self.sink = sink
        self.tasks: dict[int, asyncio.Task[bool]] = {}
        self.streamed: set[int] = set()
        """Steps whose whole log reached the sink."""
        self.unstreamable: set[int] = set()
        """Steps whose stream failed (an older runner, an outage): fetched whole."""
        self.offsets: dict[int, int] = {}
        """The log offset each step's stream reached."""
        self.lines: dict[int, PrefixedLines] = {}
        self.cached = False

    def start(self, build: Build) -> None:
        import asyncio

        for root in build.roots:
            if root.step_id is None:
                self.cached = True
            elif root.step_id not in self.tasks:
                self.tasks[root.step_id] = asyncio.get_running_loop().create_task(
                    self._follow(root.step_id), name=f"hook-log-{root.step_id}"
                )

    async def _follow(self, step_id: int, start: int = 0) -> bool:
        from bigtent.client.progress import PrefixedLines, follow_step_log
        from bigtent.errors import BigtentError

        lines = self.lines.setdefault(step_id, PrefixedLines(""))

        def text(piece: str) -> None:
            for line in lines.feed(piece):
                self.sink.line(line)

        def reset() -> None:
            for line in lines.flush():
                self.sink.line(line)
            self.sink.line("bigtent: the step's log started again (another attempt)")

        def reached(offset: int) -> None:
            self.offsets[step_id] = offset

        try:
            await follow_step_log(
                self.client, step_id, text, start=start, on_reset=reset, on_offset=reached
            )
        except BigtentError as exc:
            log.info("no live log of step %s: %s", step_id, exc)
            self.unstreamable.add(step_id)
            self.sink.line(f"bigtent: the live log stopped ({exc}); the whole log follows")
            return False
        self.streamed.add(step_id)
        return True

    async def pause(self, interval_secs: float) -> None:
        """``follow_build``'s wait between looks: ``interval_secs``, or less when a step's
        log stream ends first (its end is a hint, not the signal: the runner may send it
        late when the step ended as the stream began)."""
        import asyncio

        running = [t for t in self.tasks.values() if not t.done()]
        if running:
            await asyncio.wait(running, timeout=interval_secs)
        else:
            await asyncio.sleep(interval_secs)

    async def finish(self, build: Build) -> None:
        """Once the build ended, its steps have: the streams still open are closed and the
        rest of each log is asked for from the offset reached (a final step's stream sends
        it and ends at once); a log that did not stream is fetched whole. Says so when the
        farm had built it already."""
        import asyncio

        from bigtent.client.reports import build_succeeded
        from bigtent.errors import BigtentError

        await self.stop()
        rest = [
            asyncio.wait_for(self._follow(step_id, self.offsets.get(step_id, 0)), LOG_END_WAIT_SECS)
            for step_id in self.tasks
            if step_id not in self.streamed and step_id not in self.unstreamable
        ]
        for result in await asyncio.gather(*rest, return_exceptions=True):
            if isinstance(result, BaseException) and not isinstance(result, TimeoutError):
                log.info("the rest of a step's log: %s", result)
        for lines in self.lines.values():
            for line in lines.flush():
                self.sink.line(line)
        if self.cached:
            self.sink.line("bigtent: the farm had built it already")
        if not build_succeeded(build):
            return  # ``_show_failure`` fetches the failed steps' logs
        for step_id in self.tasks:
            if step_id in self.streamed:
                continue
            if step_id not in self.unstreamable and self.offsets.get(step_id):
                # Part of it streamed, the rest did not come in time: no second copy.
                self.sink.line(f"bigtent: the rest of step {step_id}'s log did not come")
                continue
            try:
                self.sink.line((await self.client.fetch_log(step_id)).rstrip("\n"))
            except BigtentError as exc:
                self.sink.line(f"bigtent: no log of step {step_id}: {exc}")
            self.streamed.add(step_id)

    async def stop(self) -> None:
        import asyncio
        import contextlib

        for task in self.tasks.values():
            if not task.done():
                task.cancel()
        for task in self.tasks.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def build_and_follow(
    client: RunnerClient,
    drvs: Sequence[str],
    observer: BuildObserver,
    logs: RootLogs,
    phases: PhaseClock,
    *,
    poll_interval_secs: float,
    unreachable_grace_secs: float,
    what: str = "",
) -> Build:
    """Submit the build of ``drvs`` for Nix (no result link), say so on the sink (``what``:
    after its id), stream its roots' logs and follow it to its end. One request per look,
    not two: retries show in the failed step's record; the end of a root's log stream starts
    the next look early."""
    from bigtent.client.build import BuildOptions, submit_build
    from bigtent.client.follow import AttemptFollower, follow_build

    build = await submit_build(
        client, drvs, BuildOptions(out_link=None), observer, unreachable_grace_secs
    )
    phases.mark("submit")
    logs.sink.line(f"bigtent: build {build.id}{what} on {client.base_url}")
    logs.start(build)
    return await follow_build(
        client,
        build.id,
        observer,
        poll_interval_secs,
        unreachable_grace_secs,
        attempts=AttemptFollower(build.id, supported=False),
        pause=logs.pause,
    )
