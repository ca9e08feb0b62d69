"""Waiting for a build to change: ``GET /api/v1/builds/{id}?wait=&seen=`` (docs/api.md).

The scheduler calls ``BuildWatch.steps_changed`` once it committed a step's end
(``scheduler/results.py``) and ``BuildWatch.ended`` when a build leaves its memory, ended or
cancelled (``SchedulerState._forget_build``, also when it catches up with another runner
sharing the database); a request waiting on one of those builds reads it again. A request
that waits for the build's state only is not woken by its steps. Nothing else is notified
(a dispatch, another runner's step ends): a wait also ends at its cap, so a change the watch
did not see is answered then.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Iterator


class BuildWatch:
    """Per build, the futures of the requests waiting for it to change, and whether each
    waits for its steps too (else only for its end)."""

    def __init__(self) -> None:
        self._waiting: dict[int, dict[asyncio.Future[None], bool]] = {}

    def steps_changed(self, build_ids: Iterable[int]) -> None:
        """A step of each build ended (after the database commit): wake the requests that
        wait for the build's steps."""
        self._wake(build_ids, steps=True)

    def ended(self, build_ids: Iterable[int]) -> None:
        """The builds ended or were cancelled: wake every request waiting on them."""
        self._wake(build_ids, steps=False)

    def _wake(self, build_ids: Iterable[int], *, steps: bool) -> None:
        if not self._waiting:
            return
        for build_id in build_ids:
            for future, for_steps in self._waiting.get(build_id, {}).items():
                if (for_steps or not steps) and not future.done():
                    future.set_result(None)

    @contextlib.contextmanager
    def watching(self, build_id: int, *, steps: bool) -> Iterator[asyncio.Future[None]]:
        """A future done once the build changed (``steps``: a step ended too), registered
        before the caller reads the build, so a change committed while it reads is not
        missed."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(build_id, {})[future] = steps
        try:
            yield future
        finally:
            waiting = self._waiting.get(build_id)
            if waiting is not None:
                waiting.pop(future, None)
                if not waiting:
                    del self._waiting[build_id]

    def waiters(self) -> int:
        """Requests waiting now (for tests and the curious)."""
        return sum(len(w) for w in self._waiting.values())
