"""When cached paths were last used, recorded in memory and written in batches.

Every narinfo and NAR request counts as a use (a client that finds a path cached and never
downloads it still keeps it alive). A request only sets a dictionary entry; ``flush`` writes
the whole batch in one transaction every ``usage_flush_secs`` (and before a collection), so
serving never waits for the database.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from bigtent.runner.db import queries
from bigtent.runner.db.tables import store_paths, untrusted_store_paths

log = logging.getLogger(__name__)

MAX_PENDING = 200_000
"""Uses kept in memory before a flush is due regardless of the interval."""


class UsageRecorder:
    def __init__(self, engine: AsyncEngine, clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.clock = clock
        self._narinfos: dict[bool, dict[str, float]] = {False: {}, True: {}}
        """Per cache (untrusted?): hash part -> last use."""
        self._files: dict[str, float] = {}
        """NAR file name -> last use."""
        self._due = asyncio.Event()
        self.flushed_at: float | None = None

    def narinfo(self, hash_part: str, *, untrusted: bool = False) -> None:
        self._narinfos[untrusted][hash_part] = self.clock()
        self._check_size()

    def nar(self, file_name: str) -> None:
        self._files[file_name] = self.clock()
        self._check_size()

    def _check_size(self) -> None:
        if len(self._files) + len(self._narinfos[False]) + len(self._narinfos[True]) >= MAX_PENDING:
            self._due.set()

    def used_since(self, since: float) -> tuple[set[str], set[str], set[str]]:
        """Not yet flushed uses at ``since`` or later: (main hash parts, untrusted hash parts,
        NAR file names)."""
        return (
            {h for h, t in self._narinfos[False].items() if t >= since},
            {h for h, t in self._narinfos[True].items() if t >= since},
            {f for f, t in self._files.items() if t >= since},
        )

    def forget(self) -> None:
        """Drop the uses not flushed yet."""
        self._narinfos = {False: {}, True: {}}
        self._files = {}

    async def flush(self) -> int:
        """Write every pending use; returns how many. On a database error the uses are kept
        for the next flush."""
        main, untrusted, files = self._narinfos[False], self._narinfos[True], self._files
        if not (main or untrusted or files):
            return 0
        self._narinfos = {False: {}, True: {}}
        self._files = {}
        try:
            async with self.engine.begin() as conn:
                await queries.touch_store_paths(conn, store_paths, sorted(main.items()))
                await queries.touch_store_paths(
                    conn, untrusted_store_paths, sorted(untrusted.items())
                )
                await queries.touch_nar_files(conn, sorted(files.items()))
        except BaseException:
            # Put them back (newer uses recorded meanwhile win).
            for cache, old in ((False, main), (True, untrusted)):
                for key, t in old.items():
                    self._narinfos[cache].setdefault(key, t)
            for key, t in files.items():
                self._files.setdefault(key, t)
            raise
        self.flushed_at = self.clock()
        return len(main) + len(untrusted) + len(files)

    async def run(self, interval_secs: float) -> None:
        """Flush every ``interval_secs``, or sooner when many uses are pending."""
        while True:
            try:
                async with asyncio.timeout(interval_secs):
                    await self._due.wait()
            except TimeoutError:
                pass
            self._due.clear()
            try:
                await self.flush()
            except (SQLAlchemyError, OSError) as exc:
                log.warning("recording when cached paths were last used failed: %s", exc)
