"""Riding out an outage of the runner or its database: a request tried again, with pauses
doubling, for a grace period, said once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from bigtent.client.api import not_sent, runner_answered
from bigtent.errors import RunnerUnreachable

if TYPE_CHECKING:
    from bigtent.client.observer import BuildObserver

_T = TypeVar("_T")


UNREACHABLE_GRACE_SECS = 60.0
"""How long the client keeps trying through an outage of the runner or its database (a
runner restart, PostgreSQL restarting): then it gives up with the runner's last reason."""


UNAVAILABLE = "runner unavailable, retrying"
"""The start of the line said when an outage of the runner or its database begins."""


RETRY_FIRST_SECS = 0.5


RETRY_MAX_SECS = 5.0
"""Pauses between tries through an outage: doubling from the first to the most."""


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
