"""One lock per NAR file name, shared by publishing and collecting in one runner.

A publish holds it while it puts the file in place and records the narinfo; a collection holds
it while it checks that no narinfo names a doomed file and deletes the file. So a file being
published again is never deleted between the two steps of the publish. (Between runners the
file's modification time does the same: a collection keeps a file written after it was doomed.)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence


class FileGate:
    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, name: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(name, (asyncio.Lock(), 0))
        self._locks[name] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[name]
            if users == 1:
                del self._locks[name]
            else:
                self._locks[name] = (lock, users - 1)

    @contextlib.asynccontextmanager
    async def hold_all(self, names: Sequence[str]) -> AsyncIterator[None]:
        """Hold the locks of several names at once (taken in sorted order)."""
        taken: list[str] = []
        acquired: set[str] = set()
        try:
            for name in sorted(set(names)):
                lock, users = self._locks.get(name, (asyncio.Lock(), 0))
                self._locks[name] = (lock, users + 1)
                taken.append(name)
                await lock.acquire()
                acquired.add(name)
            yield
        finally:
            for name in taken:
                lock, users = self._locks[name]
                if name in acquired:
                    lock.release()
                if users == 1:
                    del self._locks[name]
                else:
                    self._locks[name] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)
