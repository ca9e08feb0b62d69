"""Rate-limited logging: a line that may repeat thousands of times a second (an accept error
under a connection flood, an evicted connection) is written at most once per interval per key,
with the number of lines left out since the last one written."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(slots=True)
class _Window:
    last: float
    suppressed: int = 0


@dataclass(slots=True)
class RateLimitedLog:
    """``log(key, level, msg, *args)`` writes through ``logger`` unless a line of the same
    ``key`` was written less than ``interval_secs`` ago; then it only counts it. The next line
    written for the key says how many were left out."""

    logger: logging.Logger
    interval_secs: float = 10.0
    clock: Callable[[], float] = time.monotonic
    _windows: dict[str, _Window] = field(default_factory=dict)

    def log(
        self, key: str, level: int, msg: str, *args: object, exc_info: BaseException | None = None
    ) -> bool:
        """Whether the line was written."""
        now = self.clock()
        window = self._windows.get(key)
        if window is not None and now - window.last < self.interval_secs:
            window.suppressed += 1
            return False
        suppressed = window.suppressed if window is not None else 0
        self._windows[key] = _Window(last=now)
        if suppressed:
            msg += " (and %d more like this not logged)"
            args = (*args, suppressed)
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True
