"""Run one assigned step to its result: take a slot, build, upload, report.

The parts, each in its module:

- ``agent/stepstore.py``: the store a step builds in (the runner's caches, Nix's options and
  environment per slot);
- ``agent/build.py``: the build, by the slot's serve processes (``agent/servepool.py``, the
  default ``executor = "serve"``) or by one ``nix-store --realise`` (``executor = "realise"``,
  and the fallback for derivations the serve way cannot build), its log batched to the runner
  (``agent/logbatch.py``);
- ``bigtent/outcome.py``: what the build's end means for the step;
- ``agent/upload.py``: the outputs of a successful build, to the runner or its bucket.

An abort (``abort`` set by the session) cuts any part short (``agent/abortable.py``): the
step's outcome is then ``aborted``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import ssl
import time
from collections.abc import Callable

import httpx

from bigtent.agent import presigned
from bigtent.agent.abortable import Interrupted, unless_set
from bigtent.agent.build import Built, Fallback, ServeBuild, build, realising
from bigtent.agent.credentials import CredentialSource, as_credential_source
from bigtent.agent.drvfetch import DrvCache
from bigtent.agent.logbatch import SendLog
from bigtent.agent.quickhttp import QuickHttp
from bigtent.agent.servepool import ServePool
from bigtent.agent.stepstore import CacheSettings, step_store, write_nix_ca_bundle
from bigtent.agent.upload import UPLOADS_DIR, UploadError, Uploads
from bigtent.config import AgentSection
from bigtent.nix.serve import ServeConnection
from bigtent.nix.store import NixStore
from bigtent.outcome import outcome_of
from bigtent.protocol import MAX_ERROR_CHARS, Assign, Outcome, OutputInfo, Result, Timings
from bigtent.storebudget import StepRoots

log = logging.getLogger(__name__)


class Executor:
    """Runs assignments for one agent: a ``NixStore`` (and serve processes) per slot, one
    shared HTTP client, one LRU of parsed derivations."""

    def __init__(
        self,
        section: AgentSection,
        *,
        http: httpx.AsyncClient,
        token: str | CredentialSource | None,
        nix_bin_dir: str = "",
        rand: Callable[[], float] = random.random,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._section = section
        self._nix_bin_dir = nix_bin_dir
        self._busy_slots: set[int] = set()
        self._pool = ServePool()
        self._quick = QuickHttp(ssl_context=ssl_context)
        self._uploads = Uploads(
            runner_url=section.runner_url,
            work_dir=section.work_dir,
            http=http,
            credentials=as_credential_source(token),
            rand=rand,
            quick=self._quick,
        )
        self.roots: StepRoots | None = None
        """GC roots for the running steps' paths, when the agent collects its store."""
        self.drvs = DrvCache(http, quick=self._quick)
        presigned.remove_stale_uploads(section.work_dir / UPLOADS_DIR)
        write_nix_ca_bundle(section, os.environ)

    def nix_store(self, cache: CacheSettings, slot: int = 0) -> NixStore:
        """The store a step builds in, with the runner's caches as substituters; each
        concurrent step gets its slot's environment (``nix_env``)."""
        return step_store(self._section, cache, f"slot-{slot}", bin_dir=self._nix_bin_dir)

    def _take_slot(self) -> int:
        slot = next(i for i in range(len(self._busy_slots) + 1) if i not in self._busy_slots)
        self._busy_slots.add(slot)
        return slot

    async def aclose(self) -> None:
        """Stop every serve process (the agent is exiting)."""
        await self._pool.aclose()
        await self.drvs.aclose()
        await self._quick.aclose()

    async def release_idle(self) -> None:
        """Stop the serve processes of idle slots, so that their temporary GC roots (every
        path they ever substituted or built) stop holding paths (before a collection). Busy
        slots' processes are stopped when their step ends, for the next collection."""
        await self._pool.release_idle(self._busy_slots)

    @property
    def serve_processes(self) -> list[ServeConnection]:
        """The live serve processes (for tests and metrics)."""
        return self._pool.processes

    async def run(
        self, assign: Assign, cache: CacheSettings, *, send_log: SendLog, abort: asyncio.Event
    ) -> Result:
        """Build ``assign.drv_path`` and upload its outputs; never raises for a step failure.

        ``abort`` set by the session kills the build (or stops the upload): outcome ``aborted``.
        """
        slot = self._take_slot()
        if self.roots is not None:
            self.roots.add(assign.step_id, [assign.drv_path, *assign.outputs.values()])
        try:
            store = self.nix_store(cache, slot)
            built: Built | None = None
            if self._section.executor == "serve":
                serve = ServeBuild(
                    assign, cache, store, slot, self._pool, self.drvs, self.roots, abort
                )
                try:
                    built = await build(assign, send_log, serve)
                except Fallback as exc:
                    log.info("step %s: %s; realising it instead", assign.step_id, exc)
            if built is None:
                built = await build(assign, send_log, realising(store, assign, abort))
            return await self._finish(assign, cache, store, built, abort)
        finally:
            self._busy_slots.discard(slot)
            if self.roots is not None:
                self.roots.remove(assign.step_id)
            await self._pool.step_ended(slot)

    async def _finish(
        self,
        assign: Assign,
        cache: CacheSettings,
        store: NixStore,
        built: Built,
        abort: asyncio.Event,
    ) -> Result:
        """Report a failed build, or upload the outputs of a successful one."""
        realised = built.realised
        ended = time.monotonic()
        if built.build_started is None:
            timings = Timings(prepare_secs=ended - built.started)
        else:
            timings = Timings(
                prepare_secs=built.build_started - built.started,
                build_secs=ended - built.build_started,
            )
        outcome = outcome_of(realised.status)
        if outcome is not Outcome.SUCCESS:
            log.info(
                "step %s (%s): %s (exit %s) %s (%s)",
                assign.step_id,
                assign.drv_path,
                outcome,
                realised.exit_code,
                realised.error,
                phase_text(phase_times(built, ended)),
            )
            return _result(assign, outcome, realised.exit_code, realised.error, timings)
        outputs: list[OutputInfo] = []
        exit_code, error = realised.exit_code, ""
        try:
            outputs = await unless_set(self._uploads.upload_all(store, assign, cache), abort)
        except Interrupted:
            outcome, exit_code, error = Outcome.ABORTED, None, "aborted during upload"
        except UploadError as failure:
            log.warning("step %s (%s): upload failed: %s", assign.step_id, assign.drv_path, failure)
            outcome, error = Outcome.UPLOAD_FAILURE, str(failure)
        uploaded = time.monotonic()
        if outcome is Outcome.SUCCESS:
            log.info(
                "step %s (%s): success (%s)",
                assign.step_id,
                assign.drv_path,
                phase_text(phase_times(built, ended, uploaded)),
            )
        timings = timings.model_copy(update={"upload_secs": uploaded - ended})
        return _result(assign, outcome, exit_code, error, timings, outputs)


def phase_times(built: Built, ended: float, uploaded: float | None = None) -> dict[str, float]:
    """Seconds in each phase of a step on this agent, in order, for the phases it went
    through: ``fetch`` (the step's derivations read from the runner's cache, serve way only),
    ``substitute`` (its inputs made valid; with realise also the .drv closure), ``build``,
    ``upload`` (the outputs into the runner's cache)."""
    phases: dict[str, float] = {}
    before_build = ended if built.build_started is None else built.build_started
    if built.fetched is not None:
        phases["fetch"] = built.fetched - built.started
        phases["substitute"] = before_build - built.fetched
    else:
        phases["substitute"] = before_build - built.started
    if built.build_started is not None:
        phases["build"] = ended - built.build_started
    if uploaded is not None:
        phases["upload"] = uploaded - ended
    return phases


def phase_text(phases: dict[str, float]) -> str:
    """``fetch 0.030 s, substitute 0.011 s, ...`` for the step's log line."""
    return ", ".join(f"{name} {secs:.3f} s" for name, secs in phases.items())


def _result(
    assign: Assign,
    outcome: Outcome,
    exit_code: int | None,
    error: str,
    timings: Timings,
    outputs: list[OutputInfo] | None = None,
) -> Result:
    if len(error) > MAX_ERROR_CHARS:
        error = error[: MAX_ERROR_CHARS - 3] + "..."
    return Result(
        step_id=assign.step_id,
        lease_id=assign.lease_id,
        outcome=outcome,
        exit_code=exit_code,
        error=error,
        timings=timings,
        outputs=outputs or [],
    )
