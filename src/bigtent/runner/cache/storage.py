"""Where compressed NAR files live: a local directory (here) or an S3 bucket (``s3.py``),
behind one ``Storage`` protocol; a file on its way in is a ``Staged`` until it is published."""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import secrets
from pathlib import Path
from typing import BinaryIO, Protocol

_PLAIN_NAR_NAME = re.compile(r"nar/[0-9a-z]{1,128}\.nar(?:\.[a-z0-9]{1,8})?")
"""A published NAR file's name as the cache makes them (``nar_file_name``)."""


class Staged(Protocol):
    """A NAR file received but not published: ``commit`` it under its final name once it is
    verified, or ``discard`` it. Both are idempotent."""

    async def commit(self, name: str) -> None: ...

    async def discard(self) -> None: ...


class Storage(Protocol):
    """Stores NAR files (already compressed) under names like ``nar/<filehash>.nar.zst``."""

    def new_temp(self) -> tuple[BinaryIO, Staged]:
        """A writable local temporary file, and its handle for ``commit``/``discard``."""
        ...

    def local_path(self, name: str) -> Path | None:
        """A filesystem path to serve ``name`` from, when the storage is local."""
        ...

    def open_file(self, name: str) -> BinaryIO:
        """Read published file ``name`` (blocking: call it from a worker thread). Raises
        FileNotFoundError when there is none."""
        ...

    def surely_missing(self, name: str) -> bool:
        """True when published file ``name`` is known to be gone, at the cost of a ``stat``
        (a local directory); storages that would need a request per look (S3) answer False
        and are checked by ``bigtent cache verify`` instead."""
        ...

    def remove(self, name: str) -> None:
        """Delete published file ``name`` (a bad one; blocking). No error when it is gone."""
        ...

    def modified_at(self, name: str) -> float | None:
        """When published file ``name`` was last written (blocking), or None when it is gone:
        a collection deletes a doomed file only if nobody published it again since."""
        ...


MAX_NAME_BYTES = 255
"""The longest file name (one path component) Linux file systems hold."""


class LocalStaged:
    """A temporary file in ``ROOT/tmp``; committing renames it into ``ROOT/nar``."""

    def __init__(self, storage: LocalStorage, path: str) -> None:
        self._storage = storage
        self.path = path

    async def commit(self, name: str) -> None:
        target = self._storage.target(name)
        try:
            os.replace(self.path, target)
        except FileNotFoundError:
            # The NAR directory was deleted under the runner: make it again.
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.path, target)
        # Published now (the rename keeps the staging file's time): a collection that doomed
        # this file name before sees it was published again and keeps it.
        with contextlib.suppress(OSError):
            os.utime(target)

    async def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


STAGING_PREFIX = f"{secrets.token_hex(6)}-"
"""Staging files of this process are named ``<prefix><n>.part``: a random prefix, then a
count."""
_staging_numbers = itertools.count()


def new_staging_file(tmp_dir: Path) -> tuple[BinaryIO, str]:
    """A new file of ours in ``tmp_dir``, open for writing: created with ``O_EXCL`` (as
    ``mkstemp`` does: never a file that exists, never through a link), named by the process's
    prefix and a count instead of ``mkstemp``'s random letters per file (a third of the cost of
    staging a small upload). A name taken (a process with the same prefix) is skipped."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    while True:
        name = os.path.join(tmp_dir, f"{STAGING_PREFIX}{next(_staging_numbers)}.part")
        try:
            fd = os.open(name, flags, 0o600)
        except FileExistsError:
            continue
        return os.fdopen(fd, "wb"), name


def clear_staging_dir(tmp_dir: Path) -> None:
    """Uploads cut short by a crash left their partial files; nothing refers to them."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    for leftover in tmp_dir.glob("*.part"):
        leftover.unlink(missing_ok=True)


def checked_name(name: str) -> str:
    """``name`` when it is a storage name: ``nar/`` and then plain names (no empty part, no
    ``.`` or ``..``, no NUL, none longer than a file name can be); ValueError otherwise (pure)."""
    parts = name.split("/")
    if any(len(part.encode()) > MAX_NAME_BYTES for part in parts):
        # No such file can exist; asking the file system would fail with ENAMETOOLONG.
        raise ValueError(f"storage name too long: {name[:80]!r}…")
    if (
        len(parts) < 2
        or parts[0] != "nar"
        or "\0" in name
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise ValueError(f"bad storage name {name[:80]!r}")
    return name


class LocalStorage:
    """NAR files in a directory: ``ROOT/nar/...``; temporary files in ``ROOT/tmp``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._root_text = str(root)
        (root / "nar").mkdir(parents=True, exist_ok=True)
        clear_staging_dir(root / "tmp")

    def new_temp(self) -> tuple[BinaryIO, Staged]:
        tmp = self.root / "tmp"
        try:
            out, name = new_staging_file(tmp)
        except FileNotFoundError:  # deleted under the runner: make it again
            tmp.mkdir(parents=True, exist_ok=True)
            out, name = new_staging_file(tmp)
        return out, LocalStaged(self, name)

    def target(self, name: str) -> Path:
        """The file of storage name ``name`` (``nar/...``); ValueError for a name that is not
        one. Checked by its parts, without asking the file system (``os.path.realpath`` on
        every request was 6 % of the runner's CPU): only the runner writes under ``ROOT``, so
        a name whose parts are plain names stays inside it."""
        return self.root / checked_name(name)

    def exists(self, name: str) -> bool:
        return self.target(name).is_file()

    def local_path(self, name: str) -> Path | None:
        try:
            target = self.target(name)
        except ValueError:
            return None
        return target if target.is_file() else None

    def open_file(self, name: str) -> BinaryIO:
        try:
            target = self.target(name)
        except ValueError as exc:
            raise FileNotFoundError(name) from exc
        return target.open("rb")

    def surely_missing(self, name: str) -> bool:
        # One stat per lookup: a plain NAR file name needs no resolve() to stay inside ROOT.
        if _PLAIN_NAR_NAME.fullmatch(name) is None:
            try:
                return not self.target(name).is_file()
            except (ValueError, OSError):
                return True
        return not os.path.isfile(os.path.join(self._root_text, name))

    def remove(self, name: str) -> None:
        with contextlib.suppress(ValueError):
            self.target(name).unlink(missing_ok=True)

    def modified_at(self, name: str) -> float | None:
        try:
            return self.target(name).stat().st_mtime
        except (ValueError, OSError):
            return None

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in (self.root / "nar").iterdir() if p.is_file())
