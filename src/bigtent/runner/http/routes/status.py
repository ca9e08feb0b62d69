"""``GET /api/v1/status``: the runner's version, caches, queue and scheduler health."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy.exc import SQLAlchemyError

from bigtent import __version__
from bigtent.apimodels import RunnerStatus, SchedulerHealth, UpstreamInfo
from bigtent.runner.components import Components
from bigtent.runner.db import queries
from bigtent.runner.http.deps import ClientAuth, Comps, iso
from bigtent.runner.scheduler import recovery

router = APIRouter()


# A healthy scheduler's answer has only ``healthy`` and ``problem``.
@router.get("/status", response_model_exclude_unset=True)
async def status(comps: Comps, _: ClientAuth) -> RunnerStatus:
    counts: dict[str, int] | None = None
    paths: int | None = None
    size: int | None = None
    database_error: str | None = None
    try:
        async with comps.engine.connect() as conn:
            counts = await queries.count_steps_by_state(conn)
            paths, size = await queries.cache_totals(conn)
    except (SQLAlchemyError, OSError) as exc:
        if comps.scheduler.recovery is None:
            raise
        # The scheduler's reload failed too: say so rather than answer 500.
        database_error = recovery.describe(exc)
    overview = comps.scheduler.overview()
    return RunnerStatus(
        version=__version__,
        cache_url=comps.cache.url,
        cache_public_key=comps.cache.public_key,
        untrusted_cache_url=comps.untrusted_cache.url if comps.untrusted_cache else None,
        untrusted_cache_public_key=(
            comps.untrusted_cache.public_key if comps.untrusted_cache else None
        ),
        upstreams=[UpstreamInfo(**u.model_dump()) for u in comps.config.cache.upstreams],
        steps=counts,
        queue=dict(overview.queue),
        agents_connected=overview.agents_connected,
        ssh_builders=len(comps.ssh.builders),
        builds_active=overview.builds_active,
        steps_waiting_for_capacity=overview.steps_waiting_for_capacity,
        cache_paths=paths,
        cache_bytes=size,
        scheduler=_scheduler_status(comps, database_error),
    )


def _scheduler_status(comps: Components, database_error: str | None) -> SchedulerHealth:
    """Whether the scheduler is sound: while reloading its state from the database fails, it
    dispatches nothing (and ``/healthz`` fails)."""
    failure = comps.scheduler.recovery
    if failure is None:
        return SchedulerHealth(healthy=True, problem=None)
    return SchedulerHealth(
        healthy=False,
        problem=recovery.problem(failure),
        recovery_failures=failure.failures,
        failing_since=iso(failure.since),
        next_retry_at=iso(failure.retry_at),
        database_error=database_error,
    )
