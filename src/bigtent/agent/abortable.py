"""Run this unless aborted: one awaitable raced against events that stop it.

A step's work is cut short when the session sets its ``abort`` event (the runner's abort, a
lost lease, the agent stopping), and a serve command also by its log limit or its backstop
timeout. Every such race in the agent is ``unless_set``: the work wins if it finished, and
nothing it started outlives the call. ``first_completed`` runs a session's loops until the
first of them ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class Interrupted(Exception):
    """``unless_set`` stopped its work: ``by`` is the event that was set, None the timeout."""

    def __init__(self, by: asyncio.Event | None) -> None:
        super().__init__("timed out" if by is None else "interrupted")
        self.by = by


async def unless_set(work: Awaitable[T], *stops: asyncio.Event, timeout: float | None = None) -> T:
    """``work``'s result (or its exception), unless one of ``stops`` is set, or ``timeout``
    seconds pass, before it ends: then ``work`` is cancelled and ``Interrupted`` raised.

    Work that ended wins over a stop set at the same time. ``work`` and the watchers are
    cancelled and awaited before this returns or raises, also when the caller is cancelled.
    """
    task = asyncio.ensure_future(work)
    watchers = {asyncio.ensure_future(event.wait()): event for event in stops}
    try:
        done, _ = await asyncio.wait(
            {task, *watchers}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if task in done:
            return task.result()
        raise Interrupted(next((watchers[w] for w in watchers if w in done), None))
    finally:
        for t in (task, *watchers):
            t.cancel()
        await asyncio.wait({task, *watchers})


async def first_completed(*coros: Coroutine[Any, Any, object]) -> None:
    """Run ``coros`` until the first finishes; cancel and await the rest; re-raise its error."""
    tasks = [asyncio.create_task(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in done:
        if not task.cancelled() and (exc := task.exception()) is not None:
            raise exc
