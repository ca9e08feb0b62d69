"""Cancel, bump and restart a build for someone: the API's routes
(``runner/http/routes/builds.py``) and the dashboard's forms (``runner/dashboard/actions.py``)
both act through here, so both apply one ownership rule (``auth/ownership.py``) and one
default bump."""

from __future__ import annotations

import logging
from typing import Any

from bigtent.apilimits import known_id
from bigtent.errors import Forbidden, NotFound
from bigtent.runner.auth.ownership import BuildAction, check_build_action
from bigtent.runner.auth.tokens import Principal
from bigtent.runner.components import Components
from bigtent.runner.db import queries

log = logging.getLogger(__name__)

BUMP_STEP = 10
"""A bump without a priority raises the build's priority by this much."""


async def authorized_build(
    comps: Components, who: Principal, action: BuildAction, build_id: int
) -> Any:
    """The build's row if ``who`` may do ``action`` on it (``ownership.check_build_action``);
    NotFound (404) for an unknown build, Forbidden (403, logged with the actor) for someone
    else's."""
    known_id(build_id, "build")
    async with comps.engine.connect() as conn:
        row = await queries.fetch_build(conn, build_id)
    if row is None:
        raise NotFound(f"no build {build_id}")
    try:
        check_build_action(who, action, build_id, row.created_by)
    except Forbidden:
        log.warning(
            "refused: %s (%s) may not %s build %d (created by %s)",
            who.name,
            who.role,
            action,
            build_id,
            row.created_by,
        )
        raise
    return row


async def act_on_build(
    comps: Components,
    who: Principal,
    action: BuildAction,
    build_id: int,
    *,
    priority: int | None = None,
) -> bool:
    """Do ``action`` on the build for ``who`` (``priority``: a bump's new priority, else the
    build's own raised by ``BUMP_STEP``); whether it changed the build (a finished build has
    nothing to cancel, say)."""
    row = await authorized_build(comps, who, action, build_id)
    if action is BuildAction.CANCEL:
        changed = await comps.scheduler.cancel_build(build_id, actor=who.name)
        done = "cancelled"
    elif action is BuildAction.RESTART:
        changed = await comps.scheduler.restart_build(build_id, actor=who.name)
        done = "restarted"
    else:
        if priority is None:
            priority = int(row.priority) + BUMP_STEP
        changed = await comps.scheduler.bump_build(build_id, priority, actor=who.name)
        done = f"bumped to priority {priority}"
    if changed:
        log.info("build %d %s by %s", build_id, done, who.name)
    return changed
