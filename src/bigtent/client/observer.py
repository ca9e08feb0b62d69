"""What the build flow reports as it goes (BuildObserver; cli.py renders it), and the observer
for --json, which says only warnings.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

from bigtent.apimodels import Build, Step, StepAttempt, WaitingStep
from bigtent.client.outage import UNAVAILABLE
from bigtent.client.progress import StepLogStreams
from bigtent.client.reports import attempt_notice, waiting_line

log = logging.getLogger(__name__)


class BuildObserver(Protocol):
    """Receives progress; ``cli.py`` renders it (or stays silent for ``--json``)."""

    def on_phase(self, message: str) -> None: ...

    def on_upload(self, done: int, total: int) -> None: ...

    def on_progress(self, build: Build) -> None: ...

    def on_attempt(self, attempt: StepAttempt) -> None:
        """A new attempt record of the build (any outcome), as soon as a poll sees it."""

    def on_waiting_for_capacity(self, steps: Sequence[WaitingStep]) -> None:
        """Steps that no venue can take, each reported once (``newly_waiting``)."""
        ...

    def on_steps(self, steps: Sequence[Step]) -> None:
        """The build's steps, as polled (only with ``BuildOptions.follow_steps``)."""
        ...


class SilentObserver:
    """``--json``: nothing on stdout but the document; warnings, and ``-L``'s log lines, on
    stderr."""

    def __init__(self, logs: StepLogStreams | None = None) -> None:
        self.logs = logs

    def on_phase(self, message: str) -> None:
        # An outage is said on stderr even with --json (the client logs warnings there).
        log.log(logging.WARNING if message.startswith(UNAVAILABLE) else logging.INFO, "%s", message)

    def on_upload(self, done: int, total: int) -> None:
        pass

    def on_progress(self, build: Build) -> None:
        pass

    def on_attempt(self, attempt: StepAttempt) -> None:
        notice = attempt_notice(attempt)
        if notice is not None:
            log.info("%s", notice)

    def on_waiting_for_capacity(self, steps: Sequence[WaitingStep]) -> None:
        # A warning: shown on stderr even with --json, where nothing else is.
        for step in steps:
            log.warning("%s", waiting_line(step))

    def on_steps(self, steps: Sequence[Step]) -> None:
        if self.logs is not None:
            self.logs.watch(steps)
