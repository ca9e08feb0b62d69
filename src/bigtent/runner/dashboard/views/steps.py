"""One step's page (its log's end, attempts, builds) and the search page."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bigtent.apilimits import known_id
from bigtent.errors import NotFound
from bigtent.runner.components import Components
from bigtent.runner.dashboard import present
from bigtent.runner.dashboard.views.rows import (
    AttemptRow,
    DepLink,
    StepRow,
    attempt_row,
    dep_links,
    step_row,
)
from bigtent.runner.db import queries
from bigtent.states import StepState

LOG_PAGE_BYTES = 256 * 1024
"""The step page shows at most this much of the end of a log (the full log is a link)."""


SEARCH_LIMIT = 50


MIN_SEARCH_CHARS = 3


STEP_BUILDS_SHOWN = 20


STEP_ATTEMPTS_SHOWN = 200
"""A step page's newest attempt records."""


# ---- one step --------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class StepPage:
    now: float
    step: StepRow
    build_ids: list[int]
    log_text: str
    log_offset: int
    """Where the shown log ends (the live stream continues from here)."""
    log_skipped: int
    """Bytes at the start of the log not shown on the page."""
    attempts: list[AttemptRow] = field(default_factory=list)
    """Its newest attempts (``STEP_ATTEMPTS_SHOWN``), oldest first."""
    waiting_reason: str | None = None
    """Why the step waits, when no venue can take it (``Scheduler.waiting_reason``)."""
    failed_deps: list[DepLink] = field(default_factory=list)
    """For a dependency-failed step: its dependencies that failed."""
    cached_in: set[int] = field(default_factory=set)
    """Which of ``build_ids`` failed it from the failure cache (did not run it)."""

    @property
    def live(self) -> bool:
        return not present.is_final(self.step.state)


async def load_step(comps: Components, step_id: int) -> StepPage:
    known_id(step_id, "step")
    async with comps.engine.connect() as conn:
        row = await queries.fetch_step(conn, step_id)
        if row is None:
            raise NotFound(f"no step {step_id}")
        build_ids = await queries.fetch_step_build_ids(conn, step_id, STEP_BUILDS_SHOWN)
        attempts = await queries.fetch_step_attempts(conn, step_id, STEP_ATTEMPTS_SHOWN)
        failed_deps = (
            (await dep_links(conn, [step_id])).get(step_id, [])
            if row.state == StepState.DEPENDENCY_FAILED
            else []
        )
        cached_in = await queries.fetch_cached_failure_builds(conn, step_id, build_ids)
    size = comps.logs.size(step_id)
    start = max(0, size - LOG_PAGE_BYTES)
    data = comps.logs.read_range(step_id, start, size)
    if start:
        # Start at a line boundary.
        cut = data.find(b"\n")
        if 0 <= cut < len(data) - 1:
            start += cut + 1
            data = data[cut + 1 :]
    return StepPage(
        now=comps.scheduler.clock(),
        step=step_row(row),
        build_ids=build_ids,
        log_text=present.strip_ansi(data.decode(errors="replace")),
        log_offset=size,
        log_skipped=start,
        attempts=[attempt_row(r) for r in attempts],
        waiting_reason=comps.scheduler.waiting_reason(step_id),
        failed_deps=failed_deps,
        cached_in=cached_in,
    )


# ---- search ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SearchPage:
    query: str
    too_short: bool
    steps: list[StepRow]
    paths: list[Any]


async def search(comps: Components, query: str) -> SearchPage:
    """Steps by .drv or output path, and cached paths, containing ``query``."""
    text = query.strip()
    if len(text) < MIN_SEARCH_CHARS:
        return SearchPage(query, bool(text), [], [])
    async with comps.engine.connect() as conn:
        steps = await queries.search_steps(conn, text, SEARCH_LIMIT)
        paths = await queries.search_store_paths(conn, text, SEARCH_LIMIT)
    return SearchPage(query, False, [step_row(r) for r in steps], paths)
