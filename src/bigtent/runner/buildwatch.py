"""Waiting for a build to change: ``GET /api/v1/builds/{id}?wait=&seen=`` (docs/api.md).

The scheduler calls ``BuildWatch.changed`` once it committed a step's end
(``scheduler/results.py``) and when a build leaves its memory, ended or cancelled
(``SchedulerState._forget_build``, also when it catches up with another runner sharing the
database); a request waiting on one of those builds reads it again. Nothing else is
notified (a dispatch, another runner's step ends): a wait also ends at its cap, so a change
the watch did not see is answered then.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Iterator


class BuildWatch:
    """Per build, the futures of the requests waiting for it to change."""

    def __init__(self) -> None:
        self._waiting: dict[int, set[asyncio.Future[None]]] = {}

    def changed(self, build_ids: Iterable[int]) -> None:
        """Wake every request waiting on one of ``build_ids`` (after the database commit)."""
        if not self._waiting:
            return
        for build_id in build_ids:
            for future in self._waiting.pop(build_id, ()):
                if not future.done():
                    future.set_result(None)

    @contextlib.contextmanager
    def watching(self, build_id: int) -> Iterator[asyncio.Future[None]]:
        """A future done once the build changed, registered before the caller reads the
        build, so a change committed while it reads is not missed."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(build_id, set()).add(future)
        try:
            yield future
        finally:
            waiting = self._waiting.get(build_id)
            if waiting is not None:
                waiting.discard(future)
                if not waiting:
                    del self._waiting[build_id]

    def waiters(self) -> int:
        """Requests waiting now (for tests and the curious)."""
        return sum(len(w) for w in self._waiting.values())
