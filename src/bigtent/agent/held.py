"""The steps an agent holds, as plain data with its decisions (architecture §4). No I/O: the
session (``agent/session.py``) sends what these decide, and unit tests drive them directly.

A step is *running* from the moment its ``assign`` is reserved until its result exists; its
result is then *pending* until the runner's ``result_ack``. Both are *held*: ``register`` and
heartbeats name them so the runner keeps their leases. Log lines a held step printed while
the agent had no session wait in ``backlog``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection
from dataclasses import dataclass, field

from bigtent.agent.backlog import LogBacklog
from bigtent.agent.stepstore import CacheSettings
from bigtent.protocol import Abort, Assign, Result, ResultAck, RunningStep, StepId

log = logging.getLogger(__name__)


@dataclass(slots=True)
class HeldStep:
    """A running step: its assignment, the caches it builds with, its abort switch."""

    assign: Assign
    cache: CacheSettings
    abort: asyncio.Event = field(default_factory=asyncio.Event)
    lease_lost: bool = False
    """The runner no longer holds its lease: its result is dropped, never sent."""


@dataclass(slots=True)
class Held:
    """Every step the agent holds, running or waiting for its result's acknowledgement."""

    running: dict[StepId, HeldStep] = field(default_factory=dict)
    pending: dict[StepId, Result] = field(default_factory=dict)
    runner_aborted: dict[str, str] = field(default_factory=dict)
    """Leases of steps the runner told to abort (a cancel, say), with its reason: their
    results are expected to be ignored."""
    backlog: LogBacklog = field(default_factory=LogBacklog)
    """Log batches of held steps not sent for want of a session (persistent agents)."""

    def holds(self, step_id: StepId) -> bool:
        return step_id in self.running or step_id in self.pending

    @property
    def count(self) -> int:
        return len(self.running) + len(self.pending)

    def ids(self) -> list[StepId]:
        """Every held step, for a heartbeat."""
        return sorted({*self.running, *self.pending})

    def leases(self) -> list[RunningStep]:
        """Every held step with its lease, for ``register``."""
        return [
            RunningStep(step_id=sid, lease_id=step.assign.lease_id)
            for sid, step in self.running.items()
        ] + [
            RunningStep(step_id=sid, lease_id=result.lease_id)
            for sid, result in self.pending.items()
        ]

    def refusal(
        self, assign: Assign, *, draining: bool, drain_reason: str | None, max_jobs: int
    ) -> str | None:
        """Why this assignment cannot be taken now, or None when a slot is free."""
        if draining:
            if drain_reason is not None:
                return f"the agent is draining: {drain_reason}"
            return "the agent is draining"
        if self.holds(assign.step_id):
            return f"the agent already holds step {assign.step_id}"
        if len(self.running) >= max_jobs:
            return f"no free slot ({len(self.running)}/{max_jobs} running)"
        return None

    def keep_only(self, keep: Collection[StepId]) -> None:
        """After a registration: steps whose leases the runner no longer keeps are aborted
        (running) or dropped (pending results, backlogs)."""
        for sid, step in self.running.items():
            if sid not in keep:
                log.warning("step %s: the runner no longer holds its lease; aborting it", sid)
                step.lease_lost = True
                step.abort.set()
        for sid in [sid for sid in self.pending if sid not in keep]:
            log.warning("step %s: the runner no longer holds its lease; dropping its result", sid)
            del self.pending[sid]
        for sid in self.backlog.steps:
            if sid not in keep:
                self.backlog.discard(sid)

    def runner_abort(self, abort: Abort) -> None:
        """The runner's ``abort``: stop the step, and expect its result to be ignored."""
        step = self.running.get(abort.step_id)
        if step is None:
            log.debug("abort for step %s, which is not running here", abort.step_id)
            return
        reason = abort.reason or "asked by the runner"
        log.info("aborting step %s: %s", abort.step_id, reason)
        self.runner_aborted[step.assign.lease_id] = reason
        step.abort.set()

    def abort_all(self, reason: str) -> None:
        for sid, step in self.running.items():
            if not step.abort.is_set():
                log.info("aborting step %s: %s", sid, reason)
                step.abort.set()

    def finished(self, step: HeldStep, result: Result) -> bool:
        """A running step's result exists: it waits for the runner's acknowledgement, unless
        its lease was lost (then it is dropped: False)."""
        assign = step.assign
        self.running.pop(assign.step_id, None)
        if step.lease_lost:
            self.backlog.discard(assign.step_id)
            self.runner_aborted.pop(assign.lease_id, None)
            return False
        self.pending[assign.step_id] = result
        return True

    def acknowledged(self, ack: ResultAck) -> bool:
        """The runner's ``result_ack``: the result no longer waits. False when it names no
        result held here (another lease, already acknowledged)."""
        result = self.pending.get(ack.step_id)
        if result is None or result.lease_id != ack.lease_id:
            return False
        del self.pending[ack.step_id]
        self.backlog.discard(ack.step_id)
        aborted = self.runner_aborted.pop(ack.lease_id, None)
        if not ack.recorded and aborted is not None:
            # The runner asked for the abort (a cancelled build): nothing went wrong.
            log.info(
                "step %s: aborted (%s); the runner no longer needs its result", ack.step_id, aborted
            )
        elif not ack.recorded:
            log.warning(
                "step %s: the runner ignored its result (lease %s no longer current)",
                ack.step_id,
                ack.lease_id,
            )
        return True
