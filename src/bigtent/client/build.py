"""The ``bigtent build`` flow: upload the missing closure, submit, follow, fetch.

architecture §1 steps 1 and 6. One module per stage: ``upload`` (the closure, dependencies
first), ``follow`` (the build and its attempts), ``outputs`` (substitution and result links),
``outage`` (riding out a runner outage); ``reports`` holds the pure decisions of what is said
(progress, notices, the ``--json`` report). ``run_build`` here wires them to Nix and the
runner, and reports through a ``BuildObserver`` (``observer``) so that rendering stays in
``cli.py``.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from bigtent.apimodels import Build, StepAttempt
from bigtent.client.api import RunnerClient
from bigtent.client.follow import POLL_INTERVAL_SECS, AttemptFollower, BuildTracker, follow_build
from bigtent.client.observer import BuildObserver
from bigtent.client.outage import UNREACHABLE_GRACE_SECS, riding_out
from bigtent.client.outputs import ResultLink, download_outputs
from bigtent.client.reports import build_succeeded
from bigtent.client.upload import UPLOAD_CONCURRENCY, upload_closure
from bigtent.errors import UsageError
from bigtent.nix.store import NixStore

log = logging.getLogger(__name__)
_T = TypeVar("_T")


# ---- --timeout (pure) -----------------------------------------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_UNIT_SECS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``10m``, ``2h``, ``1h30m``, ``1.5h`` or ``1d``; a
    ``UsageError`` (exit 2) for anything else or for zero."""
    spec = text.strip().lower()
    pos, total = 0, 0.0
    while pos < len(spec):
        match = _DURATION.match(spec, pos)
        if match is None:
            break
        total += float(match.group(1)) * _UNIT_SECS[match.group(2)]
        pos = match.end()
    if not spec or pos != len(spec) or total <= 0:
        raise UsageError(
            f"--timeout needs a positive duration such as 90s, 10m, 2h or 1h30m (got {text!r})"
        )
    return total


# ---- the flow -------------------------------------------------------------------------------


@dataclass(slots=True)
class BuildOptions:
    priority: int = 0
    download: bool = True
    out_link: str | None = "result"
    """None: substitute the outputs but create no links (``--no-out-link``)."""
    poll_interval_secs: float = POLL_INTERVAL_SECS
    upload_concurrency: int = UPLOAD_CONCURRENCY
    repository: str | None = None
    ref: str | None = None
    trusted: bool = True
    """Ask for a trusted build (``--untrusted``: False)."""
    follow_steps: bool = False
    """Also poll the build's steps for ``BuildObserver.on_steps`` (step events outside a
    terminal, ``-L``), at most every ``STEPS_POLL_SECS``."""


@dataclass(slots=True)
class BuildResult:
    build: Build
    links: list[ResultLink] = field(default_factory=list)
    attempts: list[StepAttempt] = field(default_factory=list)
    """Every attempt record seen while following the build."""

    @property
    def succeeded(self) -> bool:
        return build_succeeded(self.build)


async def run_build(
    client: RunnerClient,
    store: NixStore,
    drvs: Sequence[str],
    options: BuildOptions,
    observer: BuildObserver,
    tracker: BuildTracker | None = None,
) -> BuildResult:
    """Upload what the runner lacks, create the build, wait for it, fetch its outputs."""
    await upload_closure(client, store, drvs, observer, concurrency=options.upload_concurrency)
    build = await submit_build(client, drvs, options, observer)
    if tracker is not None:
        tracker.build_id = build.id
    log.info(
        "created build %s for %d derivation(s)%s",
        build.id,
        len(drvs),
        "" if build.trusted else " (untrusted)",
    )
    observer.on_phase(f"build {build.id} queued")
    observer.on_progress(build)
    attempts = AttemptFollower(build.id)
    build = await follow_build(
        client,
        build.id,
        observer,
        options.poll_interval_secs,
        attempts=attempts,
        tracker=tracker,
        follow_steps=options.follow_steps,
    )
    result = BuildResult(build, attempts=attempts.seen)
    if result.succeeded and options.download:
        status = await riding_out(client.fetch_status, observer)
        observer.on_phase("fetching outputs")
        result.links = await download_outputs(
            store, status, build, options.out_link, runner_url=client.base_url
        )
    return result


async def submit_build(
    client: RunnerClient,
    drvs: Sequence[str],
    options: BuildOptions,
    observer: BuildObserver,
    unreachable_grace_secs: float = UNREACHABLE_GRACE_SECS,
) -> Build:
    """Create the build, retrying the submission while the runner is unreachable (a restart,
    or a large admission that outlasts the request timeout) for up to the grace. Every retry
    carries the same random submission key: the runner answers the build an earlier attempt
    created, or, when a stop of the runner interrupted that one's admission, makes a new one
    (docs/api.md, "Build events")."""
    key = secrets.token_urlsafe(24)
    return await riding_out(
        lambda: client.create_build(
            drvs,
            priority=options.priority,
            repository=options.repository,
            ref=options.ref,
            trusted=options.trusted,
            submission=key,
        ),
        observer,
        grace_secs=unreachable_grace_secs,
    )
