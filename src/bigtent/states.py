"""Step and build states: the words the database, the API and the CLI share.

Values are the stored and wire strings: add values, never rename them.
"""

from __future__ import annotations

from enum import StrEnum


class StepState(StrEnum):
    """A step's state. Values are the database and API strings: add, never rename."""

    WAITING = "waiting"
    """Some dependency has not succeeded yet."""
    RUNNABLE = "runnable"
    ASSIGNED = "assigned"
    """An assign with a lease was sent; the venue has not accepted yet."""
    BUILDING = "building"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DEPENDENCY_FAILED = "dependency_failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in _FINAL

    @property
    def is_leased(self) -> bool:
        return self in (StepState.ASSIGNED, StepState.BUILDING)


_FINAL = frozenset(
    {StepState.SUCCEEDED, StepState.FAILED, StepState.DEPENDENCY_FAILED, StepState.CANCELLED}
)


class BuildState(StrEnum):
    """A build's state. Values are the database and API strings."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in (BuildState.SUCCEEDED, BuildState.FAILED, BuildState.CANCELLED)


class BuildEventKind(StrEnum):
    """What happened to a build, as recorded in its history (``build_events``). Values are the
    database and API strings."""

    CANCELLED = "cancelled"
    BUMPED = "bumped"
    RESTARTED = "restarted"
    ADMISSION_INTERRUPTED = "admission_interrupted"
    """The runner stopped while it was admitting the build: it was cancelled at the next start
    (nobody asked for it); the client's retry submits it again."""
    REPLACED = "replaced"
    """A retried submission (same ``submission`` key and token) of a build whose admission was
    interrupted created a new build instead (``detail`` names it)."""


class LaunchState(StrEnum):
    """An autoscaler launch's state (docs/autoscaling.md). Values are the database and API
    strings: add, never rename."""

    PENDING = "pending"
    """Dispatched (or about to be); its agent has not registered yet: supply on the way."""
    REGISTERED = "registered"
    """An agent registered with this launch id."""
    EXPIRED = "expired"
    """No agent registered within the pool's ``launch_ttl_secs``: counted as failed."""
    FAILED = "failed"
    """The workflow_dispatch call failed; the pool cooled down."""

    @property
    def is_final(self) -> bool:
        return self is not LaunchState.PENDING
