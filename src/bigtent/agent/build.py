"""Build one step's derivation, either way, with the shared setup once (``build``): its log
batched to the runner, and when it started and when the build itself began.

- ``serving`` (agent config ``executor = "serve"``, the default): the agent takes the step's
  .drv text and input paths from the assignment when it carries them, else reads the .drv and
  its input .drvs from the runner's cache over HTTP (``DrvCache``); either way the text is
  checked against its path and no .drv enters the store. It asks the slot's *substituter*
  serve process to make the inputs valid (``cmdQueryValidPaths`` with substitute), then its
  *builder* to build the ``BasicDerivation`` (``cmdBuildDerivation``): no Nix process starts
  per step (``agent/servepool.py``). A derivation it cannot build that way raises ``Fallback``.
- ``realising``: one ``nix-store --realise`` per step, which substitutes the .drv closure and
  the inputs from the runner's cache itself.

Both end in a ``RealiseResult``, which ``bigtent.outcome`` classifies alike.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from bigtent.agent.abortable import Interrupted, unless_set
from bigtent.agent.drvfetch import DrvCache, DrvFetchError, drv_from_text
from bigtent.agent.logbatch import LogBatcher, SendLog
from bigtent.agent.servepool import SERVE_BACKSTOP_SECS, Role, ServePool, Stopped, command
from bigtent.agent.stepstore import CacheSettings
from bigtent.errors import NixError
from bigtent.nix.drv import Derivation, UnresolvedInput, input_paths
from bigtent.nix.serve import BasicDerivation, BuildOptions
from bigtent.nix.store import NixStore, RealiseResult, RealiseStatus
from bigtent.outcome import exit_code_of, realise_status_of
from bigtent.protocol import Assign
from bigtent.storebudget import StepRoots

log = logging.getLogger(__name__)

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class Fallback(Exception):
    """The serve executor cannot build this step (e.g. floating CA outputs): realise it."""


def plain_error(message: str) -> str:
    """Nix's error message without colours, as ``error: …``."""
    text = _ANSI.sub("", message).strip()
    return text if text.startswith("error:") or not text else f"error: {text}"


class StepLog:
    """A step's log while it builds: lines go to the runner in batches; the builder notes
    when it had read the derivations (serve) and when the build itself began (before it,
    Nix substitutes)."""

    def __init__(self, batcher: LogBatcher) -> None:
        self._batcher = batcher
        self.fetched: float | None = None
        self.build_started: float | None = None

    def add(self, line: str) -> Awaitable[None] | None:
        return self._batcher.add(line)

    def mark_fetched(self) -> None:
        self.fetched = time.monotonic()

    def mark_build_started(self) -> None:
        if self.build_started is None:
            self.build_started = time.monotonic()


Builder = Callable[[StepLog], Awaitable[RealiseResult]]
"""One way to build a step, writing its log to the ``StepLog``."""


@dataclass(frozen=True, slots=True)
class Built:
    """How a build ended, and when it started, had read its derivations and its build began
    (None: it never did; ``fetched`` is only known to the serve way)."""

    realised: RealiseResult
    started: float
    build_started: float | None
    fetched: float | None = None


async def build(assign: Assign, send_log: SendLog, builder: Builder) -> Built:
    """Run ``builder`` with its log batched to ``send_log``; every line is sent (or dropped)
    before this returns. ``Fallback`` passes through."""
    started = time.monotonic()
    batcher = LogBatcher(assign.step_id, assign.lease_id, send_log)
    step_log = StepLog(batcher)
    fallback: Fallback | None = None
    async with asyncio.TaskGroup() as tg:
        tg.create_task(batcher.run())
        try:
            realised = await builder(step_log)
        except Fallback as exc:
            fallback = exc  # raised below, not wrapped in the task group's ExceptionGroup
        finally:
            batcher.close()
    if fallback is not None:
        raise fallback
    return Built(realised, started, step_log.build_started, step_log.fetched)


def realising(store: NixStore, assign: Assign, abort: asyncio.Event) -> Builder:
    """One ``nix-store --realise`` of the step's .drv."""

    async def realise(step_log: StepLog) -> RealiseResult:
        def on_line(line: str) -> Awaitable[None] | None:
            # Nix announces the build itself; before that it substitutes the .drv and inputs.
            if line.startswith("building '"):
                step_log.mark_build_started()
            return step_log.add(line)

        log.info("step %s (%s): realising", assign.step_id, assign.drv_path)
        try:
            return await store.realise(
                [assign.drv_path],
                on_line=on_line,
                timeout_secs=assign.timeout_secs,
                max_silent_secs=assign.max_silent_secs,
                max_log_bytes=assign.max_log_bytes,
                abort=abort,
            )
        except NixError as exc:
            # Nix could not even start (not installed, bad store URI): the agent's problem.
            return RealiseResult(RealiseStatus.OTHER_FAILURE, exc.status, error=str(exc))

    return realise


@dataclass(frozen=True, slots=True)
class ServeBuild:
    """The serve way to build one step in ``slot`` (a ``Builder``)."""

    assign: Assign
    cache: CacheSettings
    store: NixStore
    slot: int
    pool: ServePool
    drvs: DrvCache
    roots: StepRoots | None
    abort: asyncio.Event

    async def __call__(self, step_log: StepLog) -> RealiseResult:
        log_limit = asyncio.Event()
        log_bytes = 0

        def on_line(line: str) -> Awaitable[None] | None:
            nonlocal log_bytes
            log_bytes += len(line) + 1
            if log_bytes > self.assign.max_log_bytes:
                log_limit.set()
                return None
            return step_log.add(line)

        log.info("step %s (%s): building (serve)", self.assign.step_id, self.assign.drv_path)
        try:
            return await self._build(step_log, on_line, log_limit)
        except Stopped as stop:
            return RealiseResult(stop.status, None, error=stop.error)
        except (DrvFetchError, NixError) as exc:
            # Includes ServeProtocolError: the process died or spoke nonsense (it is replaced).
            code = exc.status if isinstance(exc, NixError) and exc.status else 1
            return RealiseResult(RealiseStatus.OTHER_FAILURE, code, error=str(exc))

    async def _build(
        self,
        step_log: StepLog,
        on_line: Callable[[str], Awaitable[None] | None],
        log_limit: asyncio.Event,
    ) -> RealiseResult:
        """Read the derivation (from the assignment, else the cache), substitute its inputs,
        build it."""
        assign, cache, abort = self.assign, self.cache, self.abort
        drv_path = assign.drv_path
        try:
            text = assign.drv_text
            if text is not None:
                # Checked against its path as a fetched one is: no request to the runner.
                drv = drv_from_text(drv_path, text.encode(), "the assignment's text")
            else:
                drv = await unless_set(self.drvs.get(cache.cache_url, drv_path), abort)
            if any(not out.path for out in drv.outputs.values()):
                raise Fallback("it has floating content-addressed outputs")
            if drv.output_paths != assign.outputs:
                raise DrvFetchError(
                    f"{drv_path} has outputs {drv.output_paths}, the assignment {assign.outputs}"
                )
            if text is not None and assign.inputs is not None:
                inputs = set(assign.inputs)
            else:
                inputs = await unless_set(self._fetch_inputs(drv), abort)
        except Interrupted:
            raise Stopped(RealiseStatus.ABORTED, "aborted") from None
        step_log.mark_fetched()
        if self.roots is not None:
            self.roots.add(assign.step_id, inputs)
        if inputs:
            substituter = await self.pool.connection(self.slot, self.store, Role.SUBSTITUTER)
            valid = await command(
                substituter, substituter.query_valid_paths(inputs), on_line, abort, log_limit
            )
            missing = sorted(inputs - valid)
            if missing:
                more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
                return RealiseResult(
                    RealiseStatus.OTHER_FAILURE,
                    1,
                    error="error: cannot substitute the inputs "
                    + ", ".join(missing[:3])
                    + more
                    + f" from {cache.cache_url} or the upstream caches",
                )
        builder = await self.pool.connection(self.slot, self.store, Role.BUILDER)
        options = BuildOptions(
            max_silent_secs=int(max(1, assign.max_silent_secs)),
            build_timeout_secs=int(max(1, assign.timeout_secs)),
            max_log_bytes=assign.max_log_bytes,
        )
        step_log.mark_build_started()
        result = await command(
            builder,
            builder.build_derivation(drv_path, BasicDerivation.of(drv, inputs), options),
            on_line,
            abort,
            log_limit,
            backstop=assign.timeout_secs + SERVE_BACKSTOP_SECS,
        )
        status = realise_status_of(result.status)
        return RealiseResult(
            status,
            exit_code_of(result.status),
            error="" if status is RealiseStatus.SUCCESS else plain_error(result.error_msg),
        )

    async def _fetch_inputs(self, drv: Derivation) -> set[str]:
        """The step's input paths, from its input .drvs fetched from the cache: its input
        sources and the wanted outputs of its input derivations."""
        input_drvs = await asyncio.gather(
            *(self.drvs.get(self.cache.cache_url, d) for d in drv.input_drvs)
        )
        outputs_of = {
            path: {name: out.path for name, out in input_drv.outputs.items()}
            for path, input_drv in zip(drv.input_drvs, input_drvs, strict=True)
        }
        try:
            return input_paths(drv.input_srcs, drv.input_drvs, outputs_of)
        except UnresolvedInput as exc:
            if exc.floating:
                raise Fallback(f"its input {exc}") from None
            raise DrvFetchError(str(exc)) from None
