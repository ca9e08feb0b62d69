"""Build logs: one file per step under ``STATE/logs``, appended while it runs, bounded in size."""

from __future__ import annotations

import contextlib
from collections import deque
from pathlib import Path
from typing import BinaryIO


class LogStore:
    """Appends log lines per step and reads them back (whole or tail)."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        root.mkdir(parents=True, exist_ok=True)
        self._open: dict[int, BinaryIO] = {}
        self._sizes: dict[int, int] = {}

    def path(self, step_id: int) -> Path:
        return self.root / f"{step_id}.log"

    def append(self, step_id: int, lines: list[str]) -> None:
        """Append lines; past ``max_bytes`` further lines are dropped with one marker line."""
        f = self._open.get(step_id)
        if f is None:
            f = self.path(step_id).open("ab")
            self._open[step_id] = f
            self._sizes[step_id] = f.tell()
        size = self._sizes[step_id]
        if size >= self.max_bytes:
            return
        data = "".join(line + "\n" for line in lines).encode(errors="replace")
        if size + len(data) > self.max_bytes:
            data = data[: max(0, self.max_bytes - size)] + b"\n[bigtent: log truncated]\n"
        f.write(data)
        f.flush()
        self._sizes[step_id] = size + len(data)

    def close(self, step_id: int) -> None:
        f = self._open.pop(step_id, None)
        self._sizes.pop(step_id, None)
        if f is not None:
            f.close()

    def reset(self, step_id: int) -> None:
        """Forget a step's log (it is about to run again from scratch)."""
        self.close(step_id)
        self.path(step_id).unlink(missing_ok=True)

    def close_all(self) -> None:
        for step_id in list(self._open):
            self.close(step_id)

    def read(self, step_id: int) -> bytes:
        with contextlib.suppress(FileNotFoundError):
            return self.path(step_id).read_bytes()
        return b""

    def tail(self, step_id: int, lines: int = 30) -> str:
        try:
            with self.path(step_id).open("rb") as f:
                f.seek(0, 2)
                f.seek(max(0, f.tell() - 64 * 1024))
                data = f.read()
        except FileNotFoundError:
            return ""
        last = deque(data.decode(errors="replace").splitlines(), maxlen=lines)
        return "\n".join(last)
