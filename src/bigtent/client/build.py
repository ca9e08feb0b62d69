"""The ``bigtent build`` flow: instantiate, upload the missing closure, build, follow, fetch.

architecture §1 steps 1 and 6. The decisions (upload order, result-link names, hash spelling, the
progress summary) are pure functions; ``run_build`` wires them to Nix and the runner, and reports
through a ``BuildObserver`` so that rendering stays in ``cli/buildview.py``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from bigtent import humanize
from bigtent.client.api import (
    Build,
    BuildRoot,
    RunnerClient,
    RunnerStatus,
    Step,
    StepAttempt,
    StepCounts,
    WaitingStep,
    not_sent,
    runner_answered,
)
from bigtent.client.progress import StepLogStreams, nothing_to_build
from bigtent.client.targets import Job
from bigtent.errors import BigtentError, NixError, NotFound, RunnerUnreachable, UsageError
from bigtent.graphs import CycleError, dependencies_first
from bigtent.nix import base32
from bigtent.nix.nar import dump_path
from bigtent.nix.store import NixStore, PathInfo, RealiseStatus
from bigtent.protocol import Outcome
from bigtent.runner.scheduler.leases import Disposition, classify
from bigtent.states import BuildState, StepState

log = logging.getLogger(__name__)
_T = TypeVar("_T")

MISSING_BATCH = 1000
"""Store paths per ``POST /paths/missing`` request."""
UPLOAD_CONCURRENCY = 4
"""NAR uploads in flight at once (each still waits for its references)."""
STEPS_POLL_SECS = 1.0
"""With ``BuildOptions.follow_steps``, how often the build's step list is asked for: a step
event is printed at most this long (plus a poll) after it happened."""
POLL_INTERVAL_SECS = 0.3
"""How often ``follow_build`` asks for the build and its new attempts: a failed attempt is
printed at most this long after the runner recorded it."""
ATTEMPTS_PAGE = 1000
"""Attempt records asked for per request (the runner's page size)."""
UNREACHABLE_GRACE_SECS = 60.0
"""How long the client keeps trying through an outage of the runner or its database (a
runner restart, PostgreSQL restarting): then it gives up with the runner's last reason."""
UNAVAILABLE = "runner unavailable, retrying"
"""The start of the line said when an outage of the runner or its database begins."""
RETRY_FIRST_SECS = 0.5
RETRY_MAX_SECS = 5.0
"""Pauses between tries through an outage: doubling from the first to the most."""

BUILT_ROOT_STATES = frozenset({"succeeded", "cached"})
"""Root states meaning the requested derivation's outputs exist (``cached``: no step needed)."""


# ---- pure decisions -------------------------------------------------------------------------


def nar_hash_to_nix32(nar_hash: str) -> str:
    """``sha256:<nix32>`` for any spelling Nix prints (SRI ``sha256-<b64>`` on 2.8, hex, nix32)."""
    try:
        return base32.format_hash("sha256", base32.parse_hash(nar_hash, "sha256"))
    except ValueError as exc:
        raise NixError(f"Nix reported an unexpected NAR hash {nar_hash!r}: {exc}") from exc


def upload_order(infos: Sequence[PathInfo], missing: Sequence[str]) -> list[PathInfo]:
    """The missing paths, every one after the missing paths it references (docs/api.md: the
    runner accepts a path only once its references are in the cache).

    Ties are broken by path, so the order is deterministic; self-references are ignored.
    """
    by_path = {i.path: i for i in infos}
    wanted = set(missing)
    unknown = wanted - by_path.keys()
    if unknown:
        raise BigtentError(
            f"runner asked for paths outside the closure: {', '.join(sorted(unknown))}"
        )
    try:
        order = dependencies_first({p: by_path[p].references for p in wanted})
    except CycleError as exc:
        stuck = ", ".join(str(p) for p in exc.nodes[:5])
        raise BigtentError(f"reference cycle among store paths: {stuck}") from None
    return [by_path[p] for p in order]


@dataclass(frozen=True, slots=True)
class ResultLink:
    link: str
    path: str


def result_links(out_link: str, outputs: Sequence[Mapping[str, str]]) -> list[ResultLink]:
    """nix-build's names: ``result``, ``result-2`` for the second derivation, and a ``-NAME``
    suffix for outputs other than ``out`` (``result-dev``, ``result-2-dev``).

    ``outputs`` holds one ``{output name: store path}`` per requested derivation, in order.
    """
    links: list[ResultLink] = []
    for index, outs in enumerate(outputs):
        prefix = out_link if index == 0 else f"{out_link}-{index + 1}"
        for name in sorted(outs, key=lambda n: (n != "out", n)):
            suffix = "" if name == "out" else f"-{name}"
            links.append(ResultLink(prefix + suffix, outs[name]))
    return links


def _sequential(out_link: str, links: Sequence[ResultLink]) -> bool:
    """Whether ``nix-store --realise P1 P2 … --add-root OUT`` names the roots as ``links``."""
    return all(
        link.link == (out_link if i == 0 else f"{out_link}-{i + 1}") for i, link in enumerate(links)
    ) and len({link.path for link in links}) == len(links)


def summarize_progress(counts: StepCounts) -> str:
    """One line: ``3/10 steps done, 2 running, 5 waiting`` (plus failures when there are some)."""
    done = counts.succeeded + counts.failed + counts.cancelled
    parts = [f"{done}/{counts.total} steps done"]
    if counts.running:
        parts.append(f"{counts.running} running")
    waiting = counts.waiting + counts.runnable
    if waiting:
        parts.append(f"{waiting} waiting")
    if counts.failed:
        parts.append(f"{counts.failed} failed")
    if counts.cancelled:
        parts.append(f"{counts.cancelled} cancelled")
    return ", ".join(parts)


def progress_line(build: Build) -> str:
    """``summarize_progress`` of the build's counts, or for a build with no step at all
    ``nothing to build: all N outputs cached``."""
    return nothing_to_build(build) or summarize_progress(build.counts)


def failed_roots(build: Build) -> list[BuildRoot]:
    """The requested derivations that did not build (any root of a build that is not
    successful, unless its own state says it built)."""
    return [root for root in build.roots if root.state not in BUILT_ROOT_STATES]


def build_succeeded(build: Build) -> bool:
    """Success only when the build and every requested derivation built (architecture §7)."""
    return build.state is BuildState.SUCCEEDED and not failed_roots(build)


def _first_line(text: str | None) -> str:
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()
    return ""


def is_infrastructure_failure(attempt: StepAttempt) -> bool:
    """Whether the attempt failed for an infrastructure reason (retried up to
    ``scheduler.max_infra_attempts``), as the runner classifies outcomes."""
    try:
        outcome = Outcome(attempt.outcome)
    except ValueError:
        return False
    return classify(outcome).disposition is Disposition.RETRY


def attempt_notice(attempt: StepAttempt) -> str | None:
    """The line ``bigtent build`` prints for an attempt, or None for one not worth a line (a
    success, a build failure: the build's own report shows those). E.g. ``retrying hello-1.0
    (attempt 2/5 failed on agent-1: prepare_failure: error: ...; next try in 10 s)``. The
    wait is measured on the runner's clock (retry time minus finish time)."""
    if not is_infrastructure_failure(attempt):
        return None
    name = attempt.name or attempt.drv_path
    where = f" on {attempt.agent_name}" if attempt.agent_name else ""
    reason = ": ".join(x for x in (attempt.outcome, _first_line(attempt.error)) if x)
    what = f"attempt {attempt.attempt}/{attempt.max_attempts} failed{where}: {reason}"
    if attempt.retry_at is None:
        return f"giving up on {name} ({what}; no more tries)"
    wait = humanize.seconds_between(attempt.finished_at, attempt.retry_at)
    when = "at once" if wait is None or wait < 0.05 else f"in {humanize.duration(wait)}"
    return f"retrying {name} ({what}; next try {when})"


def job_states(build: Build, jobs: Sequence[Job]) -> list[dict[str, Any]]:
    """Each job (attribute path, target, .drv) with its root's state and outputs, in the
    order evaluated: the ``jobs`` of the ``--json`` document."""
    roots = {root.drv_path: root for root in build.roots}
    out = []
    for job in jobs:
        root = roots.get(job.drv_path)
        out.append(
            {
                **job.as_json(),
                "state": root.state if root is not None else None,
                "built": root is not None and root.state in BUILT_ROOT_STATES,
                "outputs": root.outputs if root is not None else {},
            }
        )
    return out


def job_labels(jobs: Sequence[Job]) -> dict[str, str]:
    """The name to show for each .drv path: its job's attribute path (several jobs naming one
    derivation are joined by ``, ``)."""
    labels: dict[str, list[str]] = {}
    for job in jobs:
        if job.attr is not None:
            labels.setdefault(job.drv_path, []).append(job.label)
    return {drv: ", ".join(names) for drv, names in labels.items()}


def build_report(
    build: Build,
    links: Sequence[ResultLink] = (),
    attempts: Sequence[StepAttempt] = (),
    jobs: Sequence[Job] = (),
) -> dict[str, Any]:
    """The ``--json`` document. ``attempts``: the attempt records seen while following;
    ``jobs``: what the targets evaluated to, each by its attribute path."""
    return {
        "build_id": build.id,
        "state": build.state.value,
        "succeeded": build_succeeded(build),
        "trusted": build.trusted,
        "repository": build.repository,
        "ref": build.ref,
        "created_at": build.created_at,
        "finished_at": build.finished_at,
        "outputs": {root.drv_path: root.outputs for root in build.roots},
        "roots": [root.model_dump(mode="json") for root in build.roots],
        "failed_steps": [step.model_dump(mode="json") for step in build.failed_steps],
        "waiting_for_capacity_count": build.waiting_for_capacity_count,
        "waiting_for_capacity": [w.model_dump(mode="json") for w in build.waiting_for_capacity],
        "links": [{"link": link.link, "path": link.path} for link in links],
        "attempts": [attempt.model_dump(mode="json") for attempt in attempts],
        "jobs": job_states(build, jobs),
    }


# ---- waiting for capacity, timeouts and interruptions (pure) ----------------------------------

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


def capacity_summary(build: Build) -> str | None:
    """``2 waiting for capacity`` for the progress line, or None."""
    n = build.waiting_for_capacity_count
    return f"{n} waiting for capacity" if n else None


def waiting_line(step: WaitingStep) -> str:
    """``step 7 hello-arm: waiting for capacity: no agent offers aarch64-linux``."""
    return f"step {step.step_id} {step.name or step.drv_path}: {step.reason}"


def newly_waiting(build: Build, shown: set[tuple[str, str]]) -> list[WaitingStep]:
    """The build's steps waiting for capacity not yet in ``shown`` (step id, reason): each
    is reported once, and again only if its reason changes."""
    return [w for w in build.waiting_for_capacity if (w.step_id, w.reason) not in shown]


def pending_steps(steps: Sequence[Step]) -> list[Step]:
    """The steps that have not ended (waiting, runnable, assigned, building)."""
    return [s for s in steps if not _is_final_state(s.state)]


def _is_final_state(state: str) -> bool:
    try:
        return StepState(state).is_final
    except ValueError:
        return False


def pending_line(step: Step) -> str:
    """``step 7 hello-arm: runnable (waiting for capacity: no agent offers aarch64-linux)``."""
    text = f"step {step.id} {step.name or step.drv_path}: {step.state}"
    if step.waiting_reason:
        text += f" ({step.waiting_reason})"
    return text


def stop_report(
    build: Build | None,
    pending: Sequence[Step],
    *,
    reason: str,
    cancelled: bool,
    jobs: Sequence[Job] = (),
) -> dict[str, Any]:
    """The ``--json`` document of a client that stopped before the build ended:
    ``reason`` is ``timeout``, ``interrupted`` (Ctrl-C) or ``terminated`` (SIGTERM)."""
    doc: dict[str, Any] = (
        build_report(build, jobs=jobs) if build is not None else {"build_id": None}
    )
    doc.update(
        stopped=reason,
        cancelled=cancelled,
        pending=[s.model_dump(mode="json") for s in pending],
    )
    return doc


# ---- the flow -------------------------------------------------------------------------------


class BuildObserver(Protocol):
    """Receives progress; ``cli/buildview.py`` renders it (or stays silent for ``--json``)."""

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


@dataclass(slots=True)
class BuildTracker:
    """Holds the id of the build once created, so an interrupted client can name it."""

    build_id: str | None = None
    last: Build | None = None
    """The build as last polled."""
    jobs: tuple[Job, ...] = ()
    """What the targets evaluated to (attribute paths and .drv paths)."""


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


async def riding_out(
    request: Callable[[], Awaitable[_T]],
    observer: BuildObserver,
    *,
    grace_secs: float = UNREACHABLE_GRACE_SECS,
    sent_once: bool = False,
) -> _T:
    """``request()``, tried again through an outage of the runner or its database
    (``RunnerUnreachable``: no connection, or 502/503/504) for up to ``grace_secs``, with a
    "runner unavailable, retrying" line at its start. ``sent_once``: the request must not be
    sent twice (creating a build), so it is tried again only when the runner answered that
    it could not take it (an HTTP status), never after a connection that broke."""
    since: float | None = None
    pause = RETRY_FIRST_SECS
    while True:
        try:
            return await request()
        except RunnerUnreachable as exc:
            if sent_once and not (runner_answered(exc) or not_sent(exc)):
                raise
            now = time.monotonic()
            if since is None:
                since = now
                observer.on_phase(f"{UNAVAILABLE}: {exc}")
            elif now - since > grace_secs:
                raise
        await asyncio.sleep(pause)
        pause = min(pause * 2, RETRY_MAX_SECS)


async def upload_closure(
    client: RunnerClient,
    store: NixStore,
    drvs: Sequence[str],
    observer: BuildObserver,
    *,
    concurrency: int = UPLOAD_CONCURRENCY,
) -> int:
    """Upload the derivations' closure paths the runner lacks; return how many were uploaded."""
    infos = await store.path_info(drvs, recursive=True, derivation=True)
    paths = [i.path for i in infos]
    missing: list[str] = []
    for start in range(0, len(paths), MISSING_BATCH):
        batch = paths[start : start + MISSING_BATCH]
        missing += await riding_out(functools.partial(client.missing_paths, batch), observer)
    if not missing:
        observer.on_phase(f"runner has all {len(paths)} paths of the closure")
        return 0
    order = upload_order(infos, missing)
    observer.on_phase(f"uploading {len(order)} of {len(paths)} closure paths")
    await _upload_in_order(client, store, order, observer, max(1, concurrency))
    return len(order)


async def _upload_in_order(
    client: RunnerClient,
    store: NixStore,
    order: Sequence[PathInfo],
    observer: BuildObserver,
    concurrency: int,
) -> None:
    """Upload concurrently, each path only after the uploads of the paths it references."""
    uploaded = {info.path: asyncio.Event() for info in order}
    slots = asyncio.Semaphore(concurrency)
    done = 0

    async def upload_one(info: PathInfo) -> None:
        nonlocal done
        for ref in info.references:
            if ref != info.path and ref in uploaded:
                await uploaded[ref].wait()
        async with slots:
            # An upload is idempotent: streamed anew from the store on each try.
            await riding_out(
                lambda: client.upload_path(
                    info.path,
                    _nar_chunks(store, info.path),
                    nar_hash=nar_hash_to_nix32(info.nar_hash),
                    nar_size=info.nar_size,
                    references=[r.rsplit("/", 1)[-1] for r in info.references],
                ),
                observer,
            )
        log.debug("uploaded %s", info.path)
        uploaded[info.path].set()
        done += 1
        observer.on_upload(done, len(order))

    try:
        async with asyncio.TaskGroup() as tg:
            for info in order:
                tg.create_task(upload_one(info))
    except BaseExceptionGroup as group:
        raise _first_leaf(group) from None


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


async def _nar_chunks(store: NixStore, path: str) -> AsyncIterator[bytes]:
    """The NAR of ``path``, serialised here from the filesystem (no Nix process per path);
    ``nix-store --dump`` only when the path cannot be read directly."""
    chunks: Iterator[bytes] = dump_path(store.real_path(path))
    try:
        first = await asyncio.to_thread(_next_chunk, chunks)
    except OSError as exc:
        log.debug("cannot read %s directly (%s); using nix-store --dump", path, exc)
        async for piece in store.dump(path):
            yield piece
        return
    try:
        chunk: bytes | None = first
        while chunk is not None:
            yield chunk
            chunk = await asyncio.to_thread(_next_chunk, chunks)
    except OSError as exc:
        raise BigtentError(f"cannot read store path {path}: {exc}") from exc


def _next_chunk(chunks: Iterator[bytes]) -> bytes | None:
    return next(chunks, None)


@dataclass(slots=True)
class AttemptFollower:
    """Follows a build's attempt records, ``after=`` the last id seen, and hands each new one
    to the observer once (docs/api.md "Attempts")."""

    build_id: str
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


async def follow_build(
    client: RunnerClient,
    build_id: str,
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
    ``STEPS_POLL_SECS`` and once more after the build ended. ``pause``: waits between
    looks instead of ``asyncio.sleep(interval_secs)`` (the nix hook looks again as soon as
    its step's log stream ended)."""
    follower = attempts if attempts is not None else AttemptFollower(build_id)
    shown: set[tuple[str, str]] = set()
    steps_at: float | None = None

    async def poll() -> Build:
        nonlocal steps_at
        build = await client.fetch_build(build_id)
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
        await (pause or asyncio.sleep)(interval_secs)


def substituter_options(
    status: RunnerStatus, runner_url: str, *, untrusted: bool = False
) -> dict[str, str]:
    """Nix options to substitute from the runner's cache (and its upstreams), trusting their
    keys; the negative narinfo TTL is 0 because a lookup made before the build is stale now.

    Only for an ``untrusted`` build's outputs is the untrusted cache added (after the main
    one) and its key trusted: a client never trusts it for anything else."""

    def absolute(url: str) -> str:
        return runner_url.rstrip("/") + url if url.startswith("/") else url

    urls = [absolute(status.cache_url or "/cache")]
    keys = [status.cache_public_key]
    if untrusted:
        if not status.untrusted_cache_url or not status.untrusted_cache_public_key:
            raise BigtentError(
                "the build is untrusted but the runner names no untrusted cache to fetch its "
                "outputs from (an older runner?); use --no-download"
            )
        urls.append(absolute(status.untrusted_cache_url))
        keys.append(status.untrusted_cache_public_key)
    urls += [u.url for u in status.upstreams]
    keys += [u.public_key for u in status.upstreams]
    return {
        "substituters": " ".join(urls),
        "trusted-public-keys": " ".join(k for k in keys if k),
        "narinfo-cache-negative-ttl": "0",
    }


async def download_outputs(
    store: NixStore,
    status: RunnerStatus,
    build: Build,
    out_link: str | None,
    *,
    runner_url: str,
) -> list[ResultLink]:
    """Substitute the requested outputs into the local store and add ``result`` links."""
    options = substituter_options(status, runner_url, untrusted=not build.trusted)
    outputs = [root.outputs for root in build.roots]
    paths = list(dict.fromkeys(p for outs in outputs for p in outs.values()))
    if not paths:
        return []
    links = result_links(out_link, outputs) if out_link is not None else []
    links = [ResultLink(str(Path(link.link).absolute()), link.path) for link in links]
    if not links:
        await _realise(store, paths, options, None)
    elif _sequential(links[0].link, links):
        await _realise(store, [link.path for link in links], options, links[0].link)
    else:
        await _realise(store, paths, options, None)
        try:
            async with asyncio.TaskGroup() as tg:
                for link in links:
                    tg.create_task(_realise(store, [link.path], options, link.link))
        except BaseExceptionGroup as group:
            raise _first_leaf(group) from None
    return links


async def _realise(
    store: NixStore, paths: Sequence[str], options: Mapping[str, str], add_root: str | None
) -> None:
    # nix-store replaces an existing link atomically, as nix-build does.
    result = await store.realise(paths, options=options, add_root=add_root)
    if result.status is not RealiseStatus.SUCCESS:
        raise NixError(
            f"fetching the outputs from the runner's cache failed: {result.error or result.status}"
        )
