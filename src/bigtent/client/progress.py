"""What ``bigtent build`` says while it waits, outside a terminal, and the live logs of ``-L``
and ``bigtent log --follow``.

In a CI log a progress bar is nothing but its last frame. There the client prints one line per
step event instead (``step 12 hello-1.0: started on agent-1``, ``... succeeded on agent-1 in
4.2 s``, failures, retries, waiting for capacity), from the build's steps it polls anyway
(``step_events``, pure, compares two looks). ``-L`` streams the running steps' log lines,
each prefixed with its derivation's name (``hello-1.0> ...``) as ``nix build -L`` does, from
the runner's live log stream (``GET /api/v1/steps/{id}/events``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from bigtent import humanize
from bigtent.apimodels import Build, Step, StepAttempt, WaitingStep
from bigtent.client.api import RunnerClient
from bigtent.errors import BigtentError, RunnerUnreachable
from bigtent.states import BuildState, StepState

log = logging.getLogger(__name__)

Write = Callable[[str], None]

LOG_GRACE_SECS = 60.0
"""How long a live log follower keeps trying through an outage of the runner."""
LOG_RETRY_SECS = 1.0
"""Pause before asking again after the stream failed (an outage)."""
LOG_RESUME_SECS = 0.1
"""Pause before asking again after the stream ended early (the reader fell behind)."""
CLOSE_WAIT_SECS = 5.0
"""How long ``bigtent build -L`` waits, once the build ended, for its log streams' ends."""


# ---- step events (pure) ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SeenStep:
    """What the last look showed of a step."""

    state: str
    attempts: int


def _state(text: str) -> StepState | None:
    try:
        return StepState(text)
    except ValueError:
        return None


def step_label(step: Step) -> str:
    """``step 12 hello-1.0``, as the waiting-for-capacity lines name a step."""
    return f"step {step.id} {step.name or step.drv_path}"


def _first_line(text: str | None) -> str:
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()
    return ""


def _final_line(step: Step, state: StepState) -> str:
    where = f" on {step.agent_name}" if step.agent_name else ""
    took = humanize.seconds_between(step.started_at or step.assigned_at, step.finished_at)
    span = f" in {humanize.duration(took)}" if took is not None else ""
    if state is StepState.SUCCEEDED:
        return f"{step_label(step)}: succeeded{where}{span}"
    if state is StepState.FAILED:
        why = ": ".join(x for x in (step.outcome, _first_line(step.error)) if x)
        after = f" after {humanize.duration(took)}" if took is not None else ""
        return f"{step_label(step)}: failed{where}{after}" + (f" ({why})" if why else "")
    if state is StepState.DEPENDENCY_FAILED:
        return f"{step_label(step)}: not built, a dependency failed"
    return f"{step_label(step)}: cancelled"


def step_events(
    seen: Mapping[int, SeenStep], steps: Iterable[Step]
) -> tuple[list[str], dict[int, SeenStep]]:
    """The lines for what changed since the last look (``seen``), and the new look.

    A step that is now assigned or building, and was not in this attempt before, *started*;
    a step that is now final, and was not before, *succeeded*, *failed*, was *cancelled* or
    was not built for a failed dependency. Waiting and runnable steps say nothing here (the
    waiting-for-capacity and retry lines of ``bigtent build`` cover them)."""
    lines: list[str] = []
    now: dict[int, SeenStep] = {}
    for step in steps:
        prev = seen.get(step.id)
        now[step.id] = SeenStep(step.state, step.attempts)
        state = _state(step.state)
        if state is None:
            continue
        if state.is_leased:
            before = _state(prev.state) if prev is not None else None
            running = before is not None and before.is_leased
            if running and prev is not None and prev.attempts == step.attempts:
                continue  # the same attempt, still running
            where = f" on {step.agent_name}" if step.agent_name else ""
            # ``attempts`` counts the attempts that failed for an infrastructure reason.
            again = f" (attempt {step.attempts + 1})" if step.attempts else ""
            lines.append(f"{step_label(step)}: started{where}{again}")
        elif state.is_final and (prev is None or prev.state != step.state):
            lines.append(_final_line(step, state))
    return lines, now


def has_log(step: Step) -> bool:
    """Whether the step has a log to show: it runs now, or it ran (succeeded or failed on an
    agent; a step seen for the first time when it is already final still has its log)."""
    state = _state(step.state)
    if state is None:
        return False
    ran = state in (StepState.SUCCEEDED, StepState.FAILED) and step.agent_name is not None
    return state.is_leased or ran


def nothing_to_build(build: Build) -> str | None:
    """``nothing to build: all 3 outputs cached`` for a build without steps, else None."""
    if build.counts.total:
        return None
    outputs = sum(len(root.outputs) for root in build.roots)
    return f"nothing to build: all {outputs} output{'s' if outputs != 1 else ''} cached"


# ---- log lines (pure) -----------------------------------------------------------------------


@dataclass(slots=True)
class PrefixedLines:
    """Log text in pieces in, whole lines out, each prefixed (``hello-1.0> ``); ``flush``
    gives the last line when it had no newline."""

    prefix: str
    _partial: str = ""

    def feed(self, text: str) -> list[str]:
        text = self._partial + text
        *whole, self._partial = text.split("\n")
        return [f"{self.prefix}{line.rstrip(chr(13))}" for line in whole]

    def flush(self) -> list[str]:
        rest, self._partial = self._partial, ""
        return [f"{self.prefix}{rest}"] if rest else []


# ---- live logs ------------------------------------------------------------------------------


async def follow_step_log(
    client: RunnerClient,
    step_id: int | str,
    on_text: Callable[[str], None],
    *,
    start: int = 0,
    grace_secs: float = LOG_GRACE_SECS,
    on_reset: Callable[[], None] | None = None,
    on_offset: Callable[[int], None] | None = None,
) -> str:
    """Hand the step's log to ``on_text`` from ``start`` on, as it grows, until the step is
    final; return its final state. A stream that ends early (this reader fell behind, a
    runner restart) is asked for again from the offset reached, for up to ``grace_secs`` of
    failures in a row. ``on_offset`` is told the log offset reached after each event."""
    offset = start
    failing_since: float | None = None
    while True:
        try:
            async for event in client.stream_step_log(step_id, start=offset):
                failing_since = None
                if event.reset:
                    offset = 0
                    if on_reset is not None:
                        on_reset()
                    continue
                if event.text:
                    on_text(event.text)
                offset = max(offset, event.offset)
                if on_offset is not None:
                    on_offset(offset)
                if event.end_state is not None:
                    return event.end_state
        except RunnerUnreachable:
            now = time.monotonic()
            failing_since = failing_since if failing_since is not None else now
            if now - failing_since > grace_secs:
                raise
            await asyncio.sleep(LOG_RETRY_SECS)
            continue
        await asyncio.sleep(LOG_RESUME_SECS)  # ended early: resume from the offset reached


async def print_step_log(
    client: RunnerClient, step_id: str, write: Callable[[str], None], *, follow: bool | None
) -> bool:
    """``bigtent log STEP``: the step's log through ``write``, followed until the step ends
    when ``follow`` (None: while the step has not ended), else as it is now. True when what
    was written ended with a newline (or was empty)."""
    if follow is None:
        state = _state((await client.fetch_step(step_id)).state)
        follow = state is None or not state.is_final
    if not follow:
        text = await client.fetch_log(step_id)
        write(text)
        return not text or text.endswith("\n")
    last = ""

    def piece(text: str) -> None:
        nonlocal last
        write(text)
        last = text or last

    await follow_step_log(client, step_id, piece)
    return not last or last.endswith("\n")


@dataclass(slots=True)
class StepLogStreams:
    """``bigtent build -L``: one live log follower per step seen running, printing its lines
    prefixed with the derivation's name."""

    client: RunnerClient
    write: Write
    _tasks: dict[int, asyncio.Task[None]] = field(default_factory=dict)

    def watch(self, steps: Iterable[Step]) -> None:
        """Start following the logs of the steps that run now, and of those that ran and
        ended between two looks (their whole log, at once), once per step."""
        for step in steps:
            if step.id in self._tasks or not has_log(step):
                continue
            name = step.name or step.drv_path.rsplit("/", 1)[-1]
            self._tasks[step.id] = asyncio.get_running_loop().create_task(
                self._follow(step.id, PrefixedLines(f"{name}> ")), name=f"log-{step.id}"
            )

    async def _follow(self, step_id: int, lines: PrefixedLines) -> None:
        def text(piece: str) -> None:
            for line in lines.feed(piece):
                self.write(line)

        try:
            await follow_step_log(self.client, step_id, text)
        except BigtentError as exc:  # an outage past the grace, an older runner (404)
            log.warning("stopped following the log of step %s: %s", step_id, exc)
        finally:
            for line in lines.flush():
                self.write(line)

    async def close(self, wait_secs: float = CLOSE_WAIT_SECS) -> None:
        """Let the followers reach their steps' ends (a step ended before the build did, so
        its end is near) for up to ``wait_secs``, then stop the rest."""
        tasks = [t for t in self._tasks.values() if not t.done()]
        if tasks and wait_secs > 0:
            await asyncio.wait(tasks, timeout=wait_secs)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


# ---- the observer outside a terminal ---------------------------------------------------------


class PlainBuildObserver:
    """``bigtent build`` progress as plain lines (stderr not a terminal: a CI log, a pipe):
    phases, the upload once done, one line per step event, retries, steps waiting for
    capacity, and the build's state when it changes. No bar, no spinner."""

    def __init__(self, write: Write, logs: StepLogStreams | None = None) -> None:
        self.write = write
        self.logs = logs
        self._seen: dict[int, SeenStep] = {}
        self._state: BuildState | None = None

    def on_phase(self, message: str) -> None:
        self.write(message)

    def on_upload(self, done: int, total: int) -> None:
        if done == total:
            self.write(f"uploaded {total} path{'s' if total != 1 else ''}")

    def on_progress(self, build: Build) -> None:
        from bigtent.client.reports import progress_line

        if build.state is self._state:
            return
        self._state = build.state
        if build.state is not BuildState.QUEUED:  # "build N queued" is a phase already
            self.write(f"build {build.id} {build.state.value}: {progress_line(build)}")

    def on_attempt(self, attempt: StepAttempt) -> None:
        from bigtent.client.reports import attempt_notice

        notice = attempt_notice(attempt)
        if notice is not None:
            self.write(notice)

    def on_waiting_for_capacity(self, steps: Sequence[WaitingStep]) -> None:
        from bigtent.client.reports import waiting_line

        for step in steps:
            self.write(waiting_line(step))

    def on_steps(self, steps: Sequence[Step]) -> None:
        lines, self._seen = step_events(self._seen, steps)
        for line in lines:
            self.write(line)
        if self.logs is not None:
            self.logs.watch(steps)


__all__ = [
    "PlainBuildObserver",
    "PrefixedLines",
    "SeenStep",
    "StepLogStreams",
    "follow_step_log",
    "has_log",
    "nothing_to_build",
    "print_step_log",
    "step_events",
    "step_label",
]
