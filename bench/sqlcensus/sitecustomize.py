"""Developer aid for ``bench/dag.py``: a census of the SQL statements a process executes.

``bench/dag.py`` with ``BENCH_SQL_CENSUS=PREFIX`` puts this directory on the farm's
``PYTHONPATH``, so every Python process of the farm imports this module at start-up. In the
process that uses SQLAlchemy (the runner) it counts each statement executed, by its text
(whitespace collapsed), and the transactions' ends as ``(commit)`` and ``(rollback)`` (a
connection used without ``begin`` ends in a rollback). On ``SIGUSR2`` it writes the counts
to ``PREFIX.PID.json`` (``{"seq": N, "counts": {statement: executions}}``; ``seq`` grows
with every dump), so the bench takes a census before and after the CPU DAG. An
``executemany`` counts once. Not part of ``bigtent``: a census run is not a CPU measurement
(counting costs CPU).
"""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from typing import Any

_PREFIX = os.environ.get("BENCH_SQL_CENSUS")


def _install(prefix: str) -> None:
    counts: Counter[str] = Counter()
    seq = [0]
    installed = [False]

    def count(_conn: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
        counts[" ".join(statement.split())] += 1

    def listen() -> None:
        if installed[0]:
            return
        from sqlalchemy import event
        from sqlalchemy.engine import Engine

        event.listen(Engine, "before_cursor_execute", count)
        event.listen(Engine, "commit", lambda _conn: count(None, None, "(commit)"))
        event.listen(Engine, "rollback", lambda _conn: count(None, None, "(rollback)"))
        installed[0] = True

    def dump(_sig: int, _frame: object) -> None:
        seq[0] += 1
        path = f"{prefix}.{os.getpid()}.json"
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"seq": seq[0], "counts": dict(counts)}, f)
        os.replace(tmp, path)

    # Listen once SQLAlchemy is imported by the process itself (an agent or the CLI never
    # imports it, and pays nothing): a meta path finder that waits for ``sqlalchemy.engine``.
    import importlib.abc
    import sys

    class _Watch(importlib.abc.MetaPathFinder):
        def find_spec(self, name: str, path: Any, target: Any = None) -> None:
            if name == "sqlalchemy.ext.asyncio" and not installed[0]:
                sys.meta_path.remove(self)
                listen()
            return None

    sys.meta_path.insert(0, _Watch())
    signal.signal(signal.SIGUSR2, dump)


if _PREFIX:
    _install(_PREFIX)
