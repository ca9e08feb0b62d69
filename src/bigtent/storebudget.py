"""A Nix store's disk budget: when to collect, how much, and what must survive.

An agent with ``min_free_bytes`` set (and the runner's SSH-builder store with
``ssh_store_min_free_bytes``) collects its store with Nix's GC (``nix-store --gc --max-freed
N``) whenever the free disk of the store falls below that, aiming for the target. What a
running step needs survives because it is rooted twice over:

- every running step's paths (its ``.drv``, its outputs, and with the agent's serve executor
  its inputs) are GC roots for the whole step, symlinks in the store's own ``gcroots``
  directory (``StepRoots``), removed once its outputs are uploaded;
- the Nix processes of running steps keep their temporary roots (Nix's ``temproots``), and
  those of a path being substituted or built during a collection reach the GC through its
  socket.

A long-lived serve process keeps temporary roots for everything it ever substituted or
built, so before collecting, the agent's executor closes the serve processes of its idle
slots (``Executor.release_idle``); they are started again at the next step.

``bytes_to_free`` is the decision (pure); ``StoreCollector`` does the I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import shutil
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from bigtent.errors import NixError
from bigtent.nix.store import NixStore, store_root

log = logging.getLogger(__name__)

ROOTS_PREFIX = "bigtent-agent-"


@dataclass(frozen=True, slots=True)
class StoreBudget:
    """``min_free_bytes`` 0: never collect. ``target_free_bytes`` below ``min_free_bytes``
    (0 included) means twice ``min_free_bytes``."""

    min_free_bytes: int = 0
    target_free_bytes: int = 0

    @property
    def enabled(self) -> bool:
        return self.min_free_bytes > 0

    @property
    def target(self) -> int:
        if self.target_free_bytes >= self.min_free_bytes and self.target_free_bytes > 0:
            return self.target_free_bytes
        return 2 * self.min_free_bytes


def bytes_to_free(free_bytes: int | None, budget: StoreBudget) -> int:
    """How many bytes a collection should free now: 0 when the budget is off, the free disk
    is unknown, or it is at least ``min_free_bytes``; else up to the target."""
    if not budget.enabled or free_bytes is None or free_bytes >= budget.min_free_bytes:
        return 0
    return max(1, budget.target - free_bytes)


def free_disk_bytes(path: Path) -> int | None:
    """Free bytes of the file system holding ``path`` (or its nearest existing ancestor: the
    store directory of a fresh chroot store may not exist yet); None when none can be read."""
    for candidate in (path, *path.parents):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(candidate).free
    return None


_FREED = re.compile(r"(\d+) store paths deleted, ([0-9.]+) MiB freed")


def parse_gc_summary(text: str) -> tuple[int, int] | None:
    """``(paths deleted, bytes freed)`` from ``nix-store --gc``'s last line, or None."""
    found = _FREED.findall(text)
    if not found:
        return None
    paths, mib = found[-1]
    return int(paths), int(float(mib) * 1024 * 1024)


def gc_roots_dir(store: str, work_dir: Path) -> Path:
    """Where this agent keeps its GC roots: a directory of its own (named after its work
    directory, so agents sharing a store never remove each other's roots) in the store's
    ``gcroots``: ``ROOT/nix/var/nix/gcroots`` for ``local?root=ROOT``, else
    ``/nix/var/nix/gcroots``."""
    root = store_root(store)
    tag = hashlib.sha256(str(work_dir.resolve()).encode()).hexdigest()[:16]
    return Path(root + "/nix/var/nix/gcroots") / f"{ROOTS_PREFIX}{tag}"


def _link_name(step_id: int, store_path: str) -> str:
    return f"step-{step_id}-{store_path.rsplit('/', 1)[-1]}"


class StepRoots:
    """GC roots for the paths running steps need: one symlink per path, named after the
    step, in the agent's own directory of the store's ``gcroots`` (Nix's GC reads a symlink
    there whose target is a store path as a root; an invalid target is skipped)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._links: dict[int, set[str]] = {}

    def reset(self) -> None:
        """Forget roots left by an earlier run of the agent (its steps are over)."""
        shutil.rmtree(self.directory, ignore_errors=True)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._links.clear()

    def add(self, step_id: int, paths: Iterable[str]) -> None:
        names = self._links.setdefault(step_id, set())
        for path in paths:
            name = _link_name(step_id, path)
            if name in names:
                continue
            link = self.directory / name
            with contextlib.suppress(FileExistsError):
                link.symlink_to(path)
            names.add(name)

    def remove(self, step_id: int) -> None:
        for name in self._links.pop(step_id, set()):
            with contextlib.suppress(FileNotFoundError):
                (self.directory / name).unlink()

    def held(self) -> set[str]:
        """The store paths rooted now (for tests and logs)."""
        return {str((self.directory / n).readlink()) for ns in self._links.values() for n in ns}


@dataclass(frozen=True, slots=True)
class Collection:
    """One collection: free disk before and after, what Nix says it deleted."""

    free_before: int
    free_after: int | None
    asked_bytes: int
    paths_deleted: int
    bytes_freed: int
    secs: float


class StoreCollector:
    """Runs Nix's GC on the agent's store when ``bytes_to_free`` says so, one at a time."""

    def __init__(
        self,
        store: NixStore,
        budget: StoreBudget,
        free_bytes: Callable[[], int | None],
        release_idle: Callable[[], Awaitable[None]],
    ) -> None:
        self._store = store
        self.budget = budget
        self._free_bytes = free_bytes
        self._release_idle = release_idle
        self._lock = asyncio.Lock()
        self.collections = 0
        self.last: Collection | None = None

    async def maybe_collect(self) -> Collection | None:
        """Collect if the free disk is below the budget's minimum (else None). A collection
        already running is waited for, then the free disk is looked at again."""
        if not self.budget.enabled:
            return None
        async with self._lock:
            free = self._free_bytes()
            wanted = bytes_to_free(free, self.budget)
            if wanted == 0 or free is None:
                return None
            return await self._collect(free, wanted)

    async def _collect(self, free: int, wanted: int) -> Collection | None:
        started = time.monotonic()
        log.info(
            "store has %d bytes free, below min_free_bytes %d: collecting up to %d bytes",
            free,
            self.budget.min_free_bytes,
            wanted,
        )
        await self._release_idle()
        try:
            out = await self._store.run("nix-store", ["--gc", "--max-freed", str(wanted)])
        except NixError as exc:
            log.warning("store collection failed: %s", exc)
            return None
        summary = parse_gc_summary(out) or (0, 0)
        after = self._free_bytes()
        done = Collection(
            free_before=free,
            free_after=after,
            asked_bytes=wanted,
            paths_deleted=summary[0],
            bytes_freed=summary[1],
            secs=time.monotonic() - started,
        )
        self.collections += 1
        self.last = done
        log.info(
            "store collected: %d paths deleted, %d bytes freed, %s bytes free now (%.1f s)",
            done.paths_deleted,
            done.bytes_freed,
            "unknown" if after is None else after,
            done.secs,
        )
        if after is not None and after < self.budget.min_free_bytes:
            log.warning(
                "store still has only %d bytes free after collecting (min_free_bytes %d): "
                "the running steps' paths and other roots need the rest",
                after,
                self.budget.min_free_bytes,
            )
        return done
