"""Live build logs: one producer per step fans its log out to any number of viewers.

The runner appends a step's log lines once (``LogStore.append``, fed by the agent's ``log``
messages) and hands the appended bytes to every subscriber of that step here. Many viewers
of one live log therefore cost one reader: nobody re-reads or polls the stored log to follow
it. Each subscriber has its own bounded buffer; a subscriber that falls behind by more than
its bound is dropped (it learns so, and may resume from the stored log at the offset it
reached), never the producer, which never waits.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass, field

from bigtent.errors import Unavailable

SUBSCRIBER_MAX_BYTES = 1024 * 1024
"""Log bytes one viewer may lag behind before it is dropped."""
MAX_SUBSCRIBERS_PER_STEP = 200
MAX_SUBSCRIBERS = 2000
"""Live viewers at once, per step and in all (beyond: 503, try again later)."""


@dataclass(frozen=True, slots=True)
class Chunk:
    """Bytes appended to a step's log, starting at ``offset`` (uncompressed bytes)."""

    offset: int
    data: bytes

    @property
    def end(self) -> int:
        return self.offset + len(self.data)


@dataclass(frozen=True, slots=True)
class LiveBatch:
    """What a subscriber got since it last looked."""

    chunks: list[Chunk]
    attempt_ended: bool
    """The log was closed (an attempt ended): the step may be final now, or run again."""
    dropped: bool
    """The subscriber fell too far behind and gets nothing more."""


@dataclass(eq=False)
class Subscription:
    """One viewer of one step's live log: a bounded buffer the producer fills without
    waiting."""

    step_id: int
    max_bytes: int = SUBSCRIBER_MAX_BYTES
    dropped: bool = False
    _chunks: deque[Chunk] = field(default_factory=deque)
    _bytes: int = 0
    _ended: bool = False
    _event: asyncio.Event = field(default_factory=asyncio.Event)

    def offer(self, chunk: Chunk) -> bool:
        """Take a chunk; False (and the subscription is dropped) when it would exceed the
        bound."""
        if self.dropped:
            return False
        if self._bytes + len(chunk.data) > self.max_bytes:
            self.dropped = True
            self._chunks.clear()
            self._bytes = 0
            self._event.set()
            return False
        self._chunks.append(chunk)
        self._bytes += len(chunk.data)
        self._event.set()
        return True

    def attempt_ended(self) -> None:
        self._ended = True
        self._event.set()

    async def next_batch(self, timeout_secs: float) -> LiveBatch:
        """What arrived since the last call, waiting up to ``timeout_secs`` when nothing did
        (an empty batch then)."""
        if not self._chunks and not self._ended and not self.dropped:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), timeout_secs)
        self._event.clear()
        chunks = list(self._chunks)
        self._chunks.clear()
        self._bytes = 0
        ended, self._ended = self._ended, False
        return LiveBatch(chunks, ended, self.dropped)


class LogFanout:
    """Subscribers per step. ``publish`` and ``attempt_ended`` never block or await."""

    def __init__(
        self,
        *,
        max_per_step: int = MAX_SUBSCRIBERS_PER_STEP,
        max_total: int = MAX_SUBSCRIBERS,
        subscriber_max_bytes: int = SUBSCRIBER_MAX_BYTES,
    ) -> None:
        self.max_per_step = max_per_step
        self.max_total = max_total
        self.subscriber_max_bytes = subscriber_max_bytes
        self._subs: dict[int, set[Subscription]] = {}
        self._total = 0
        self.dropped_total = 0
        """Subscribers dropped for falling behind, since start."""

    def subscribe(self, step_id: int) -> Subscription:
        """A new subscription (call on the event loop); ``Unavailable`` when too many
        viewers are watching already."""
        subs = self._subs.setdefault(step_id, set())
        if len(subs) >= self.max_per_step or self._total >= self.max_total:
            if not subs:
                del self._subs[step_id]
            raise Unavailable("too many live log viewers; try again later")
        sub = Subscription(step_id, self.subscriber_max_bytes)
        subs.add(sub)
        self._total += 1
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.step_id)
        if subs is None or sub not in subs:
            return
        subs.discard(sub)
        self._total -= 1
        if not subs:
            del self._subs[sub.step_id]

    @property
    def total(self) -> int:
        """Live viewers of all steps."""
        return self._total

    def viewers(self, step_id: int) -> int:
        return len(self._subs.get(step_id, ()))

    def publish(self, step_id: int, chunk: Chunk) -> None:
        """Hand appended bytes to the step's subscribers; drop those that lag too far."""
        subs = self._subs.get(step_id)
        if not subs:
            return
        for sub in list(subs):
            if not sub.offer(chunk):
                self.dropped_total += 1
                self.unsubscribe(sub)

    def attempt_ended(self, step_id: int) -> None:
        for sub in self._subs.get(step_id, ()):
            sub.attempt_ended()
