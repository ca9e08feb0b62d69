"""Where compressed NAR files live. Local directory storage now; S3 later, same protocol."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Protocol


class Storage(Protocol):
    """Stores NAR files (already compressed) under names like ``nar/<filehash>.nar.zst``."""

    def new_temp(self) -> tuple[BinaryIO, str]:
        """A writable temporary file and its handle name for ``commit``/``discard``."""
        ...

    def commit(self, temp: str, name: str) -> None:
        """Publish a finished temporary file under ``name`` (atomic; idempotent)."""
        ...

    def discard(self, temp: str) -> None: ...

    def exists(self, name: str) -> bool: ...

    def local_path(self, name: str) -> Path | None:
        """A filesystem path to serve ``name`` from, when the storage is local."""
        ...


class LocalStorage:
    """NAR files in a directory: ``ROOT/nar/...``; temporary files in ``ROOT/tmp``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "nar").mkdir(parents=True, exist_ok=True)
        (root / "tmp").mkdir(parents=True, exist_ok=True)
        # Uploads cut short by a crash left their partial files; nothing refers to them.
        for leftover in (root / "tmp").glob("*.part"):
            leftover.unlink(missing_ok=True)

    def new_temp(self) -> tuple[BinaryIO, str]:
        fd, name = tempfile.mkstemp(dir=self.root / "tmp", suffix=".part")
        return os.fdopen(fd, "wb"), name

    def _target(self, name: str) -> Path:
        target = (self.root / name).resolve()
        if not target.is_relative_to(self.root.resolve()) or not name.startswith("nar/"):
            raise ValueError(f"bad storage name {name!r}")
        return target

    def commit(self, temp: str, name: str) -> None:
        os.replace(temp, self._target(name))

    def discard(self, temp: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)

    def exists(self, name: str) -> bool:
        return self._target(name).is_file()

    def local_path(self, name: str) -> Path | None:
        try:
            target = self._target(name)
        except ValueError:
            return None
        return target if target.is_file() else None

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in (self.root / "nar").iterdir() if p.is_file())
