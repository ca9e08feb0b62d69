"""Following a build: polling it, its new attempt records and (with follow_steps) its steps
until it ends, through outages of the runner.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from bigtent.apilimits import BUILD_WAIT_MAX_SECS
from bigtent.apimodels import Build, StepAttempt, StepCounts
from bigtent.client.api import RunnerClient
from bigtent.client.outage import UNREACHABLE_GRACE_SECS, riding_out
from bigtent.client.reports import newly_waiting
from bigtent.client.targets import Job
from bigtent.errors import NotFound

if TYPE_CHECKING:
    from bigtent.client.observer import BuildObserver

STEPS_POLL_SECS = 1.0
"""With ``BuildOptions.follow_steps``, how often the build's step list is asked for: a step
event is printed at most this long (plus a poll) after it happened."""


POLL_INTERVAL_SECS = 0.3
"""How often ``follow_build`` asks for the build and its new attempts: a failed attempt is
printed at most this long after the runner recorded it."""


NEAR_END_STEPS = 2
"""A build with at most this many steps not yet ended is near its end: ``follow_build``
looks again sooner (``poll_delay``), so its end is seen within tens of milliseconds rather
than a whole interval."""


QUICK_POLL_SECS = 0.05
"""The first wait near a build's end after something changed; it doubles (up to the
interval) while nothing does, so a long last step costs no more polls than before."""


ATTEMPTS_PAGE = 1000
"""Attempt records asked for per request (the runner's page size)."""


def unfinished_steps(counts: StepCounts) -> int:
    """A build's steps not yet ended: waiting, runnable or running (pure)."""
    return counts.waiting + counts.runnable + counts.running


def poll_delay(interval_secs: float, unfinished: int, changed: bool, last_secs: float) -> float:
    """How long ``follow_build`` waits before its next look (pure): the interval, except
    near the build's end (at most ``NEAR_END_STEPS`` steps unfinished), where it waits
    ``QUICK_POLL_SECS`` after a change and twice its last wait while nothing changes,
    never longer than the interval."""
    if unfinished > NEAR_END_STEPS:
        return interval_secs
    if changed:
        return min(interval_secs, QUICK_POLL_SECS)
    return min(interval_secs, max(last_secs, QUICK_POLL_SECS) * 2)


def look_wait_secs(interval_secs: float) -> float:
    """How long a look waits at the runner for the build's state to change: the interval,
    within what the runner takes (pure)."""
    return min(max(interval_secs, 0.0), BUILD_WAIT_MAX_SECS)


@dataclass(slots=True)
class BuildTracker:
    """Holds the id of the build once created, so an interrupted client can name it."""

    build_id: int | None = None
    last: Build | None = None
    """The build as last polled."""
    jobs: tuple[Job, ...] = ()
    """What the targets evaluated to (attribute paths and .drv paths)."""


@dataclass(slots=True)
class AttemptFollower:
    """Follows a build's attempt records, ``after=`` the last id seen, and hands each new one
    to the observer once (docs/api.md "Attempts")."""

    build_id: int
    seen: list[StepAttempt] = field(default_factory=list)
    supported: bool = True
    """False once the runner answered 404 to the attempts route (an older runner)."""

    async def poll(self, client: RunnerClient, observer: BuildObserver) -> None:
        while self.supported:
            after = self.seen[-1].id if self.seen else 0
            try:
                page = await client.fetch_attempts(self.build_id, after=after, limit=ATTEMPTS_PAGE)
            except NotFound:
                self.supported = False
                return
            for attempt in page:
                if attempt.id > after:
                    self.seen.append(attempt)
                    after = attempt.id
                    observer.on_attempt(attempt)
            if len(page) < ATTEMPTS_PAGE:
                return


async def follow_build(
    client: RunnerClient,
    build_id: int,
    observer: BuildObserver,
    interval_secs: float = POLL_INTERVAL_SECS,
    unreachable_grace_secs: float = UNREACHABLE_GRACE_SECS,
    *,
    attempts: AttemptFollower | None = None,
    tracker: BuildTracker | None = None,
    follow_steps: bool = False,
    pause: Callable[[float], Awaitable[None]] | None = None,
) -> Build:
    """Poll the build, and its new attempts, until its state is final, riding out a short
    runner outage. The attempts are asked for after the build: the transaction that ends a
    build also records its last attempt, so the final poll sees every attempt.
    ``follow_steps``: hand the build's steps to ``observer.on_steps`` too, at most every
    ``STEPS_POLL_SECS`` and once more after the build ended. Looks come every
    ``interval_secs``: after the first, each look waits at the runner up to the interval
    for the build's state to change (``GET /builds/{id}?wait=&seen=STATE``), so its end is
    seen as the runner commits it; after an answer of a runner that did not wait (an older
    one), a pause before the next look, sooner near the build's end (``poll_delay``).
    ``pause``: waits between looks instead of ``asyncio.sleep(delay)`` (the nix hook looks
    again as soon as its step's log stream ended)."""
    follower = attempts if attempts is not None else AttemptFollower(build_id)
    shown: set[tuple[int, str | None]] = set()
    steps_at: float | None = None
    counts: StepCounts | None = None
    delay = interval_secs
    seen: str | None = None
    """The state the next look waits to change, or None (a plain look)."""
    waited = False
    """Whether the runner waited for the last look."""

    async def poll() -> Build:
        nonlocal steps_at, waited
        if seen is None:
            build, waited = await client.fetch_build(build_id), False
        else:
            wait_secs = look_wait_secs(interval_secs)
            build, waited = await client.wait_for_build(build_id, wait_secs=wait_secs, seen=seen)
        await follower.poll(client, observer)
        now = time.monotonic()
        due = steps_at is None or now - steps_at >= STEPS_POLL_SECS or build.state.is_final
        if follow_steps and due:
            steps_at = now
            observer.on_steps(await client.fetch_steps(build_id))
        return build

    while True:
        build = await riding_out(poll, observer, grace_secs=unreachable_grace_secs)
        if tracker is not None:
            tracker.last = build
        observer.on_progress(build)
        fresh = newly_waiting(build, shown)
        if fresh:
            shown.update((w.step_id, w.reason) for w in fresh)
            observer.on_waiting_for_capacity(fresh)
        if build.state.is_final:
            return build
        delay = poll_delay(
            interval_secs, unfinished_steps(build.counts), build.counts != counts, delay
        )
        counts = build.counts
        seen = build.state.value
        if not waited:
            await (pause or asyncio.sleep)(delay)
