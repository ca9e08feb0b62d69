"""What ``bigtent build`` shows while it waits and when it stops: the progress bars on a
terminal, the failure report, and the notice of a build left before it ended (``--timeout``,
Ctrl-C, SIGTERM) with ``Stop``, which records why and winds the build up."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import click

from bigtent.cli.output import echo_json
from bigtent.errors import BigtentError

if TYPE_CHECKING:  # the client modules (and rich, for a terminal only) load lazily
    from rich.progress import TaskID

    from bigtent.apimodels import Build, Step, StepAttempt, WaitingStep
    from bigtent.client.api import RunnerClient
    from bigtent.client.build import BuildResult
    from bigtent.client.follow import BuildTracker
    from bigtent.client.progress import StepLogStreams

log = logging.getLogger(__name__)

WIND_UP_SECS = 15.0
"""How long a stopping ``bigtent build`` waits for the runner to list and cancel its steps."""
PENDING_SHOWN = 20
"""The pending steps a stop notice lists by name."""


class RichBuildObserver:
    """Progress on stderr: phase lines, an upload bar, then a build bar with the step summary."""

    def __init__(self, logs: StepLogStreams | None = None) -> None:
        # Imported here: only a build shown on a terminal draws bars.
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self.logs = logs
        self.console = Console(stderr=True, highlight=False)
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        self._upload: TaskID | None = None
        self._build: TaskID | None = None

    def __enter__(self) -> RichBuildObserver:
        self.progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.progress.stop()

    def on_phase(self, message: str) -> None:
        self.progress.console.print(message, markup=False)

    def on_upload(self, done: int, total: int) -> None:
        if self._upload is None:
            self._upload = self.progress.add_task("uploading", total=total)
        self.progress.update(self._upload, completed=done, total=total)

    def on_progress(self, build: Build) -> None:
        from bigtent.client.reports import capacity_summary, progress_line

        c = build.counts
        done = c.succeeded + c.failed + c.cancelled
        text = f"build {build.id} {build.state.value}: {progress_line(build)}"
        waiting = capacity_summary(build)
        if waiting:
            text += f" ({waiting})"
        if not c.total and build.state.is_final:
            done = 1  # nothing to build: a full bar, not 0/1
        if self._build is None:
            self._build = self.progress.add_task(text, total=max(c.total, 1))
        self.progress.update(self._build, description=text, completed=done, total=max(c.total, 1))

    def on_attempt(self, attempt: StepAttempt) -> None:
        """A failed infrastructure attempt, as the poll that sees it comes in."""
        from bigtent.client.reports import attempt_notice

        notice = attempt_notice(attempt)
        if notice is not None:
            self.progress.console.print(notice, markup=False, style="yellow", soft_wrap=True)

    def on_waiting_for_capacity(self, steps: Sequence[WaitingStep]) -> None:
        from bigtent.client.reports import waiting_line

        for step in steps:
            self.progress.console.print(
                waiting_line(step), markup=False, style="yellow", soft_wrap=True
            )

    def on_steps(self, steps: Sequence[Step]) -> None:
        if self.logs is not None:
            self.logs.watch(steps)

    def print_log_line(self, line: str) -> None:
        """A line of ``-L``: above the bars, exactly as the builder wrote it."""
        self.progress.console.print(line, markup=False, highlight=False, soft_wrap=True)


def report_result(result: BuildResult, labels: Mapping[str, str] | None = None) -> None:
    """A build that ended: the result links (else the output paths) of a success on stdout,
    the failure report on stderr."""
    if not result.succeeded:
        report_failure(result.build, labels)
    elif result.links:
        for link in result.links:
            click.echo(link.path)
    else:
        for root in result.build.roots:
            for path in root.outputs.values():
                click.echo(path)


def report_failure(build: Build, labels: Mapping[str, str] | None = None) -> None:
    """Which requested derivations failed (by attribute path when known), why, and the tail
    of each failed step's log.

    Plain lines (no rich wrapping or markup): log text is shown exactly as the builder wrote it.
    """
    from bigtent.client.reports import failed_roots

    names = labels or {}
    click.secho(f"build {build.id} {build.state.value}", err=True, fg="red", bold=True)
    for root in failed_roots(build):
        name = (
            f"{names[root.drv_path]} ({root.drv_path})" if root.drv_path in names else root.drv_path
        )
        click.echo(f"  not built: {name} ({root.state or 'unknown'})", err=True)
    for step in build.failed_steps:
        why = ", ".join(x for x in (step.outcome, step.error) if x) or step.state
        click.secho(f"  failed step {step.id}: {step.drv_path}: {why}", err=True, fg="red")
        if step.log_tail:
            click.echo(f"  last lines of its log (full log: bigtent log {step.id}):", err=True)
            for line in step.log_tail.rstrip("\n").splitlines():
                click.echo(f"    {line}", err=True)


class Stop:
    """Why ``bigtent build`` stopped before its build ended, and what it saw then."""

    def __init__(self, *, cancel: bool) -> None:
        self.cancel = cancel
        self.reason: str | None = None
        """``timeout``, ``interrupted`` (Ctrl-C) or ``terminated`` (SIGTERM)."""
        self.pending: list[Step] = []
        self.cancelled = False

    def terminate(self, main: asyncio.Task[Any]) -> None:
        """SIGTERM: stop as Ctrl-C does (the main task is cancelled)."""
        self.reason = self.reason or "terminated"
        main.cancel()

    async def wind_up(self, client: RunnerClient, tracker: BuildTracker) -> None:
        """What was still pending, then (``--cancel-on-exit``) cancel the build: bounded,
        and a runner that does not answer only costs the report."""
        from bigtent.client.reports import pending_steps

        build_id = tracker.build_id
        if build_id is None:
            return
        try:
            async with asyncio.timeout(WIND_UP_SECS):
                self.pending = pending_steps(await client.fetch_steps(build_id))
                if self.cancel:
                    await client.cancel_build(build_id)
                    self.cancelled = True
                tracker.last = await client.fetch_build(build_id)
        except (BigtentError, TimeoutError) as exc:
            log.warning("could not finish up build %s: %s", build_id, exc)


def report_stop(stop: Stop, tracker: BuildTracker, as_json: bool, timeout: str | None) -> None:
    """The notice of a ``bigtent build`` that stops before its build ended."""
    from bigtent.client.reports import pending_line, stop_report

    if as_json:
        echo_json(
            stop_report(
                tracker.last,
                stop.pending,
                reason=stop.reason or "",
                cancelled=stop.cancelled,
                jobs=tracker.jobs,
            )
        )
    build_id = tracker.build_id
    if build_id is None:
        return
    why = {
        "timeout": f"no result within {timeout}",
        "terminated": "terminated (SIGTERM)",
    }.get(stop.reason or "", "interrupted")
    if stop.pending:
        click.echo(f"{why}: {len(stop.pending)} step(s) of build {build_id} pending:", err=True)
        for step in stop.pending[:PENDING_SHOWN]:
            click.echo(f"  {pending_line(step)}", err=True)
        if len(stop.pending) > PENDING_SHOWN:
            click.echo(f"  and {len(stop.pending) - PENDING_SHOWN} more", err=True)
    else:
        click.echo(f"{why}", err=True)
    if stop.cancelled:
        click.echo(f"build {build_id} cancelled (its steps no other build needs)", err=True)
    else:
        click.echo(
            f"build {build_id} keeps running on the runner; "
            f"stop it with: bigtent cancel {build_id}",
            err=True,
        )
