"""The rows the dashboard's pages list: builds, steps, attempts (from database rows), and how
long each build took.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bigtent.runner.dashboard import present
from bigtent.runner.db import queries
from bigtent.states import StepState


@dataclass(frozen=True, slots=True)
class BuildRow:
    id: int
    state: str
    priority: int
    created_at: float
    finished_at: float | None
    created_by: str
    progress: present.Progress
    repository: str | None = None
    ref: str | None = None
    roots: list[str] = field(default_factory=list)
    """The names of its first requested derivations (``present.roots_summary``)."""
    more_roots: int = 0
    took_secs: float | None = None
    """Time at least one of its steps ran (``present.busy_secs``); None: not looked up."""


@dataclass(frozen=True, slots=True)
class StepRow:
    id: int
    name: str
    drv_path: str
    system: str
    state: str
    outcome: str | None
    error: str | None
    agent_name: str | None
    attempts: int
    created_at: float
    assigned_at: float | None
    started_at: float | None
    finished_at: float | None
    prepare_secs: float | None
    build_secs: float | None
    upload_secs: float | None
    exit_code: int | None
    required_features: list[str]
    outputs: dict[str, str]

    def queued_secs(self, now: float) -> float | None:
        """From queued to handed to a venue (so far, while it waits)."""
        if self.assigned_at is not None:
            return self.assigned_at - self.created_at
        return None if present.is_final(self.state) else now - self.created_at

    def run_secs(self, now: float) -> float | None:
        """From the venue accepting it to its end (so far, while it runs)."""
        start = self.started_at or self.assigned_at
        if start is None:
            return None
        if self.finished_at is not None:
            return self.finished_at - start
        return now - start if StepState(self.state).is_leased else None


def step_row(r: Any) -> StepRow:
    return StepRow(
        id=int(r.id),
        name=str(r.name),
        drv_path=str(r.drv_path),
        system=str(r.system),
        state=str(r.state),
        outcome=r.outcome,
        error=r.error,
        agent_name=r.agent_name,
        attempts=int(r.attempts),
        created_at=float(r.created_at),
        assigned_at=r.assigned_at,
        started_at=r.started_at,
        finished_at=r.finished_at,
        prepare_secs=r.prepare_secs,
        build_secs=r.build_secs,
        upload_secs=r.upload_secs,
        exit_code=r.exit_code,
        required_features=json.loads(r.required_features),
        outputs=json.loads(r.outputs),
    )


@dataclass(frozen=True, slots=True)
class AttemptRow:
    """One attempt of a step (docs/dashboard.md): where it ran, how it ended, why, and when
    the step will be tried again (None: the outcome was final)."""

    id: int
    step_id: int
    name: str
    attempt: int
    max_attempts: int
    agent_name: str | None
    started_at: float | None
    finished_at: float
    outcome: str
    error: str | None
    retry_at: float | None

    @property
    def ran_secs(self) -> float | None:
        return None if self.started_at is None else self.finished_at - self.started_at


def attempt_row(r: Any) -> AttemptRow:
    return AttemptRow(
        id=int(r.id),
        step_id=int(r.step_id),
        name=str(r.name),
        attempt=int(r.attempt),
        max_attempts=int(r.max_attempts),
        agent_name=r.agent_name,
        started_at=r.started_at,
        finished_at=float(r.finished_at),
        outcome=str(r.outcome),
        error=r.error,
        retry_at=r.retry_at,
    )


TOOK_TTL_SECS = 10.0
"""A running build's "took" in the build lists is recomputed from its attempts at most this
often (a finished build's once, until a restart changes its end)."""


TOOK_CACHED_BUILDS = 2000


@dataclass(eq=False)
class TookCache:
    """How long builds took (``present.busy_secs``), for the build lists (the overview polls
    every few seconds): each build's attempt records are read at most every ``ttl_secs``
    while it runs, and once after it ended (again when its end changes: a restart), and kept
    as a few merged spans (``present.merge_spans``), not one read of every attempt per view.
    Measured: 100,000 attempt records take ~0.6 s to read and ~0.3 s to add up."""

    ttl_secs: float = TOOK_TTL_SECS
    max_builds: int = TOOK_CACHED_BUILDS
    _spans: dict[int, tuple[float | None, float, list[tuple[float, float | None]]]] = field(
        default_factory=dict
    )
    """Build id -> (its end when read, when read (monotonic), merged spans)."""

    async def spans(
        self, conn: Any, rows: Sequence[Any]
    ) -> dict[int, list[tuple[float, float | None]]]:
        mono = time.monotonic()
        stale = [
            b
            for b in rows
            if (got := self._spans.get(int(b.id))) is None
            or got[0] != b.finished_at
            or (b.finished_at is None and mono - got[1] >= self.ttl_secs)
        ]
        if stale:
            fresh = await queries.fetch_build_run_intervals(conn, [int(b.id) for b in stale])
            for b in stale:
                merged = present.merge_spans(fresh[int(b.id)], float(b.created_at))
                self._spans.pop(int(b.id), None)
                self._spans[int(b.id)] = (b.finished_at, mono, merged)
            while len(self._spans) > self.max_builds:  # the longest unread go first
                del self._spans[next(iter(self._spans))]
        return {int(b.id): self._spans[int(b.id)][2] for b in rows}


def build_row(
    b: Any,
    counts: dict[str, int],
    root_names: tuple[Sequence[str], int] = ((), 0),
    intervals: Iterable[tuple[float, float | None]] | None = None,
    now: float | None = None,
) -> BuildRow:
    shown, more = present.roots_summary(*root_names)
    took = None
    if intervals is not None and now is not None:
        end = float(b.finished_at) if b.finished_at is not None else now
        took = present.busy_secs(intervals, float(b.created_at), end)
    return BuildRow(
        id=int(b.id),
        state=str(b.state),
        priority=int(b.priority),
        created_at=float(b.created_at),
        finished_at=b.finished_at,
        created_by=str(b.created_by),
        progress=present.progress_from_counts(counts),
        repository=b.repository,
        ref=b.ref,
        roots=shown,
        more_roots=more,
        took_secs=took,
    )


async def build_rows(conn: Any, rows: Sequence[Any], now: float, took: TookCache) -> list[BuildRow]:
    """List rows for these builds: progress, what each was for, how long it took."""
    ids = [int(b.id) for b in rows]
    per_build = await queries.fetch_build_state_counts(conn, ids)
    names = await queries.fetch_root_names(conn, ids)
    spans = await took.spans(conn, rows)
    return [
        build_row(b, per_build.get(int(b.id), {}), names[int(b.id)], spans[int(b.id)], now)
        for b in rows
    ]


@dataclass(frozen=True, slots=True)
class DepLink:
    """A dependency that failed (or was dependency-failed, or cancelled): why a
    dependency-failed step failed."""

    id: int
    name: str
    state: str


async def dep_links(conn: Any, step_ids: Sequence[int]) -> dict[int, list[DepLink]]:
    found = await queries.fetch_failed_dependencies(conn, step_ids)
    return {
        sid: [DepLink(int(d.id), str(d.name), str(d.state)) for d in deps]
        for sid, deps in found.items()
    }
