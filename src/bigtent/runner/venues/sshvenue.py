"""SSH remote builders as a second venue (architecture §1, §5, §6), through Nix's own build hook.

The runner keeps a Nix store of its own (``local?root=STATE/ssh-store``). For a step leased
to an SSH builder it runs ``nix-store --realise STEP.drv`` in that store with the runner's
cache (then the upstreams) as substituters, trusting their keys, so Nix substitutes the
.drv closure and the inputs; ``max-jobs = 0`` and ``builders = <that one builder>`` make
Nix's build hook copy the inputs to the builder over SSH, build there, and copy the outputs
back. SSH is hardened through ``NIX_SSHOPTS`` (``bigtent.runner.venues.ssh.nix_sshopts``): the
builder's pinned host key is the only entry of a temporary known_hosts file (0600, in a
fresh temporary directory whose path has no whitespace), ``StrictHostKeyChecking=yes``,
``BatchMode``, ``IdentitiesOnly``, no agent.

Each builder is a scheduler ``Venue`` of kind ``SSH``: the scheduler matches it like an
agent (systems, features, max_jobs, speed factor, backoff) but only for steps no agent slot
takes in the same pass. Its ``send`` starts (``assign``) or aborts (``abort``) a local task;
the task streams Nix's log into the step log, publishes each output through the same
verified ingest as agent uploads (``outputs.ingest_leased_output``: current lease, an output
of the leased .drv, size caps, hash and size while streaming, references by the runner's
scan), and then records the result through ``Scheduler.result`` — the path an agent's
``result`` takes, so a step finishes exactly once and stale leases are ignored. Failures
are classified like an agent's: Nix exit 100/102/104 is a build failure, 101 a timeout, and
anything else (connection refused, host key mismatch, Nix exit 1) an infrastructure failure
(``prepare_failure``) that backs the builder off exponentially.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel

from bigtent import protocol as p
from bigtent.config import RunnerConfig, SshBuilderSection, ssh_builder_warnings
from bigtent.config.sshuri import (
    SshTarget,
    check_no_whitespace,
    parse_ssh_uri,
    store_settings,
)
from bigtent.errors import BigtentError, NixError
from bigtent.nix import base32
from bigtent.nix.nar import dump_path
from bigtent.nix.store import LineSink, NixStore, PathInfo, RealiseResult, RealiseStatus
from bigtent.outcome import outcome_of
from bigtent.runner.cache.outputs import ingest_leased_output
from bigtent.runner.cache.service import Cache
from bigtent.runner.cache.upstreams import Upstreams
from bigtent.runner.scheduler.model import SSH, SessionClosed, Venue
from bigtent.runner.scheduler.service import Scheduler
from bigtent.runner.venues.ssh import (
    builders_line,
    known_hosts_line,
    nix_sshopts,
)
from bigtent.storebudget import (
    StepRoots,
    StoreBudget,
    StoreCollector,
    free_disk_bytes,
    gc_roots_dir,
)

log = logging.getLogger(__name__)

STORE_DIR = "ssh-store"
"""Under the state dir: the runner's own Nix store for SSH builds."""
XDG_DIR = "ssh-xdg"
"""Under the state dir: ``XDG_CACHE_HOME`` per builder and slot (Nix's narinfo cache)."""
CONNECT_TIMEOUT_SECS = 10
"""SSH ``ConnectTimeout``: a dead builder fails fast and is backed off."""
KNOWN_HOSTS = "known_hosts"


class BuildStore(Protocol):
    """What the venue needs of a Nix store (``NixStore``; tests pass a fake)."""

    async def realise(
        self,
        paths: list[str],
        *,
        on_line: LineSink | None = ...,
        timeout_secs: float | None = ...,
        max_silent_secs: float | None = ...,
        max_log_bytes: int | None = ...,
        abort: asyncio.Event | None = ...,
    ) -> RealiseResult: ...

    async def path_info(
        self, paths: list[str], *, recursive: bool = ..., derivation: bool = ...
    ) -> list[PathInfo]: ...

    def real_path(self, store_path: str) -> Path: ...


StoreFactory = Callable[[str, Mapping[str, str], Mapping[str, str]], BuildStore]
"""(store URI, ``--option`` pairs, extra environment) -> a store to realise in."""


def _nix_store(store: str, options: Mapping[str, str], env: Mapping[str, str]) -> BuildStore:
    return NixStore(store=store, options=options, env=env)


@dataclass(eq=False)
class _Job:
    task: asyncio.Task[None]
    abort: asyncio.Event
    slot: int


@dataclass(eq=False)
class SshBuilder:
    """One configured, usable builder: its section, parsed target and scheduler venue."""

    section: SshBuilderSection
    target: SshTarget
    venue: Venue
    ident: str
    """Short stable id (for directories): a digest of the URI."""
    jobs: dict[int, _Job] = field(default_factory=dict)


def machine_id_of(uri: str) -> str:
    return "ssh:" + uri


def skip_reason(section: SshBuilderSection, require_host_key: bool) -> str:
    """Why a configured builder is not used (for the start-up log)."""
    if not section.enabled:
        return "disabled (enabled = false)"
    if require_host_key and not section.host_key:
        return "no host_key pinned and ssh_require_host_key = true"
    return "not usable"


def write_known_hosts(directory: Path, line: str) -> Path:
    """The pinned host key as the only line of ``DIRECTORY/known_hosts``, mode 0600."""
    path = directory / KNOWN_HOSTS
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(line.rstrip("\n") + "\n")
    return path


class SshBuilders:
    """The SSH builder venues of one runner, and the local tasks that drive their builds."""

    def __init__(
        self,
        config: RunnerConfig,
        scheduler: Scheduler,
        cache: Cache,
        upstreams: Upstreams,
        *,
        make_store: StoreFactory = _nix_store,
        temp_root: str | None = None,
    ) -> None:
        self.config = config
        self.scheduler = scheduler
        self.cache = cache
        self.upstreams = upstreams
        self.make_store = make_store
        self.temp_root = temp_root
        state = config.runner.state_dir
        self.store_uri = f"local?root={state / STORE_DIR}"
        self.xdg_root = state / XDG_DIR
        self.builders: dict[str, SshBuilder] = {}
        self.skipped: list[tuple[str, str]] = []
        budget = StoreBudget(config.ssh_store_min_free_bytes, config.ssh_store_target_free_bytes)
        self.roots: StepRoots | None = None
        """GC roots of the running steps' paths, when the store has a budget."""
        self.collector: StoreCollector | None = None
        if budget.enabled:
            self.roots = StepRoots(gc_roots_dir(self.store_uri, state / STORE_DIR))
            store_dir = state / STORE_DIR / "nix" / "store"
            self.collector = StoreCollector(
                NixStore(store=self.store_uri),
                budget,
                free_bytes=lambda: free_disk_bytes(store_dir),
                release_idle=_nothing,
            )
        self._closed = False
        usable = {id(b) for b in config.usable_ssh_builders()}
        for section in config.ssh_builders:
            if id(section) not in usable:
                self.skipped.append(
                    (section.uri, skip_reason(section, config.ssh_require_host_key))
                )
                continue
            target = parse_ssh_uri(section.uri)
            mid = machine_id_of(section.uri)
            builder = SshBuilder(
                section,
                target,
                Venue(
                    machine_id=mid,
                    name=section.name,
                    systems=frozenset(section.systems),
                    supported_features=frozenset(section.supported_features),
                    mandatory_features=frozenset(section.mandatory_features),
                    max_jobs=section.max_jobs,
                    speed_factor=section.speed_factor,
                    send=lambda msg: None,
                    kind=SSH,
                ),
                hashlib.sha256(section.uri.encode()).hexdigest()[:12],
            )
            builder.venue.send = self._sender(builder)
            self.builders[mid] = builder

    # ---- life cycle ---------------------------------------------------------------------
    def attach(self) -> None:
        """Make the usable builders venues of the scheduler; log once which were skipped."""
        if self.roots is not None and self.builders:
            self.roots.reset()  # roots of steps an earlier run left: those steps are over
        for warning in ssh_builder_warnings(self.config):
            log.warning("%s", warning)
        for uri, why in self.skipped:
            log.warning("SSH builder %s is not used: %s", uri, why)
        for builder in self.builders.values():
            self.scheduler.attach(builder.venue, [])
            log.info(
                "SSH builder %s: systems %s, max_jobs %d",
                builder.section.name,
                ",".join(builder.section.systems),
                builder.section.max_jobs,
            )

    async def run(self) -> None:
        """Renew the leases of the steps running on SSH builders (as agent heartbeats do)."""
        period = max(0.1, self.scheduler.config.lease_secs / 3)
        while True:
            await asyncio.sleep(period)
            for builder in self.builders.values():
                if builder.jobs:
                    self.scheduler.heartbeat(builder.venue, list(builder.jobs))

    async def aclose(self) -> None:
        """Abort every running build and wait for its task (bounded)."""
        self._closed = True
        tasks = []
        for builder in self.builders.values():
            self.scheduler.detach(builder.venue)
            for job in builder.jobs.values():
                job.abort.set()
                job.task.cancel()
                tasks.append(job.task)
        if tasks:
            await asyncio.wait(tasks, timeout=10)

    # ---- read side ------------------------------------------------------------------------
    def describe(self, now: float) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for builder in self.builders.values():
            v, s = builder.venue, builder.section
            backoff = max(v.backoff_until, v.cooldown_until)
            out.append(
                {
                    "machine_id": v.machine_id,
                    "uri": s.uri,
                    "kind": SSH,
                    "usable": True,
                    "reason": None,
                    "systems": sorted(v.systems),
                    "supported_features": sorted(v.supported_features),
                    "mandatory_features": sorted(v.mandatory_features),
                    "max_jobs": v.max_jobs,
                    "running": len(v.running),
                    "speed_factor": v.speed_factor,
                    "consecutive_failures": v.consecutive_failures,
                    "backoff_until": backoff if backoff > now else None,
                    "in_backoff": backoff > now,
                }
            )
        for uri, why in self.skipped:
            out.append(
                {
                    "machine_id": machine_id_of(uri),
                    "uri": uri,
                    "kind": SSH,
                    "usable": False,
                    "reason": why,
                }
            )
        return out

    # ---- one step -------------------------------------------------------------------------
    def _sender(self, builder: SshBuilder) -> Callable[[BaseModel], None]:
        def send(msg: BaseModel) -> None:
            if self._closed:
                raise SessionClosed(builder.section.uri)
            if isinstance(msg, p.Assign):
                self._start(builder, msg)
            elif isinstance(msg, p.Abort):
                job = builder.jobs.get(msg.step_id)
                if job is not None:
                    job.abort.set()

        return send

    def _start(self, builder: SshBuilder, assign: p.Assign) -> None:
        busy = {j.slot for j in builder.jobs.values()}
        slot = next(i for i in range(len(busy) + 1) if i not in busy)
        abort = asyncio.Event()
        task = asyncio.get_running_loop().create_task(
            self._run_step(builder, assign, slot, abort), name=f"ssh-step-{assign.step_id}"
        )
        builder.jobs[assign.step_id] = _Job(task, abort, slot)

        def done(t: asyncio.Task[None]) -> None:
            if (
                builder.jobs.get(assign.step_id) is not None
                and builder.jobs[assign.step_id].task is t
            ):
                del builder.jobs[assign.step_id]
            if not t.cancelled() and t.exception() is not None:
                log.error("SSH step %d task failed", assign.step_id, exc_info=t.exception())

        task.add_done_callback(done)

    def options_for(self, builder: SshBuilder) -> dict[str, str]:
        """``--option`` pairs of a step's realise on ``builder``."""
        ups = self.config.cache.upstreams
        s = builder.section
        remote = store_settings(s.uri)
        return {
            "substituters": " ".join([self.cache.url, *(u.url for u in ups)]),
            "trusted-public-keys": " ".join([self.cache.public_key, *(u.public_key for u in ups)]),
            "narinfo-cache-negative-ttl": "0",
            "max-jobs": "0",
            "builders": builders_line(
                builder.target,
                systems=s.systems,
                ssh_key=s.ssh_key,
                max_jobs=s.max_jobs,
                speed_factor=s.speed_factor,
                supported_features=s.supported_features,
                mandatory_features=s.mandatory_features,
                remote_store=remote.remote_store,
                remote_program=remote.remote_program,
            ),
        }

    def env_for(self, builder: SshBuilder, slot: int, known_hosts: Path) -> dict[str, str]:
        """Environment of a step's realise: hardened ``NIX_SSHOPTS``, ``XDG_CACHE_HOME``."""
        s = builder.section
        return {
            "NIX_SSHOPTS": nix_sshopts(
                ssh_key=s.ssh_key,
                known_hosts_file=str(known_hosts),
                port=builder.target.port,
                connect_timeout_secs=CONNECT_TIMEOUT_SECS,
            ),
            "XDG_CACHE_HOME": str(self.xdg_root / builder.ident / f"slot-{slot}"),
        }

    def _log(self, assign: p.Assign, lines: list[str]) -> None:
        node = self.scheduler.lease_holder(assign.lease_id)
        if node is not None and node.id == assign.step_id:
            self.scheduler.logs.append(node.id, [x[: p.MAX_LOG_LINE_CHARS] for x in lines])

    async def _run_step(
        self, builder: SshBuilder, assign: p.Assign, slot: int, abort: asyncio.Event
    ) -> None:
        venue = builder.venue
        started = time.monotonic()
        await self.scheduler.accepted(
            venue, p.Accepted(step_id=assign.step_id, lease_id=assign.lease_id)
        )
        self._log(assign, [f"[bigtent: building on SSH builder {builder.section.uri}]"])
        if self.roots is None:
            await self._build_and_report(builder, assign, slot, abort, started)
            return
        # The .drv (its closure) and the outputs stay until they are published; the inputs
        # are the realise process's temporary roots while it runs.
        self.roots.add(assign.step_id, [assign.drv_path, *assign.outputs.values()])
        try:
            await self._build_and_report(builder, assign, slot, abort, started)
        finally:
            self.roots.remove(assign.step_id)
        if self.collector is not None:
            await self.collector.maybe_collect()

    async def _build_and_report(
        self,
        builder: SshBuilder,
        assign: p.Assign,
        slot: int,
        abort: asyncio.Event,
        started: float,
    ) -> None:
        venue = builder.venue
        tmp = Path(tempfile.mkdtemp(prefix="bigtent-ssh-", dir=self.temp_root))
        store: BuildStore | None = None
        try:
            try:
                check_no_whitespace("temporary directory", str(tmp))
                host_key = builder.section.host_key
                if host_key is not None:
                    known_hosts = write_known_hosts(tmp, known_hosts_line(builder.target, host_key))
                else:
                    # Only with ssh_require_host_key = false: the runner user's known_hosts.
                    known_hosts = Path(os.path.expanduser("~/.ssh/known_hosts"))
                store = self.make_store(
                    self.store_uri,
                    self.options_for(builder),
                    self.env_for(builder, slot, known_hosts),
                )

                def on_line(line: str) -> None:
                    self._log(assign, [line])

                realised = await store.realise(
                    [assign.drv_path],
                    on_line=on_line,
                    timeout_secs=assign.timeout_secs,
                    max_silent_secs=assign.max_silent_secs,
                    max_log_bytes=assign.max_log_bytes,
                    abort=abort,
                )
            except NixError as exc:
                realised = RealiseResult(RealiseStatus.OTHER_FAILURE, exc.status, error=str(exc))
            except (ValueError, OSError, BigtentError) as exc:
                realised = RealiseResult(RealiseStatus.OTHER_FAILURE, None, error=str(exc))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        built = time.monotonic()
        outcome = outcome_of(realised.status)
        error = realised.error
        timings = p.Timings(prepare_secs=0.0, build_secs=built - started)
        if outcome is p.Outcome.SUCCESS:
            assert store is not None
            try:
                await self._publish(store, assign)
            except (BigtentError, NixError, OSError, ValueError) as exc:
                outcome, error = p.Outcome.UPLOAD_FAILURE, f"publishing outputs failed: {exc}"
            timings = timings.model_copy(update={"upload_secs": time.monotonic() - built})
        if outcome is not p.Outcome.SUCCESS:
            log.info(
                "step %d on %s: %s (exit %s) %s",
                assign.step_id,
                builder.section.uri,
                outcome,
                realised.exit_code,
                error,
            )
            self._log(assign, [f"[bigtent: {outcome} on {builder.section.uri}: {error}]"])
        if len(error) > p.MAX_ERROR_CHARS:
            error = error[: p.MAX_ERROR_CHARS - 3] + "..."
        await self.scheduler.result(
            venue,
            p.Result(
                step_id=assign.step_id,
                lease_id=assign.lease_id,
                outcome=outcome,
                exit_code=realised.exit_code,
                error=error,
                timings=timings,
            ),
        )

    async def _publish(self, store: BuildStore, assign: p.Assign) -> None:
        """Each output into the cache, through the verified ingest of agent uploads."""
        infos = {
            i.path: i
            for i in await store.path_info(list(assign.outputs.values()), derivation=False)
        }
        for name, path in sorted(assign.outputs.items()):
            info = infos.get(path)
            if info is None:
                raise ValueError(f"output {path} is not valid in the runner's SSH store")
            await ingest_leased_output(
                self.cache,
                self.upstreams,
                self.scheduler,
                assign.lease_id,
                name,
                _dump(store.real_path(path)),
                declared_hash=base32.parse_hash(info.nar_hash, "sha256"),
                declared_size=info.nar_size,
            )


async def _nothing() -> None:
    """No long-lived Nix processes to stop before collecting the SSH-builder store."""


async def _dump(path: Path) -> AsyncIterator[bytes]:
    """``dump_path`` (a blocking generator) in a thread, chunk by chunk."""
    chunks = iter(dump_path(path))
    while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
        yield chunk
