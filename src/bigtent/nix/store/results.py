"""What the store's commands answer, as plain values (pure): a path's info, how a realisation
ended, a store URI's chroot directory.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum


@dataclass(frozen=True, slots=True)
class PathInfo:
    """What ``nix path-info --json`` says about one valid store path."""

    path: str
    nar_hash: str
    """As Nix printed it: SRI (``sha256-…``) on 2.8, ``sha256:<nix32>`` on some versions."""
    nar_size: int
    references: tuple[str, ...]
    deriver: str | None = None
    ca: str | None = None


class RealiseStatus(StrEnum):
    """How a ``nix-store --realise`` ended, classified from its exit status and our limits."""

    SUCCESS = "success"
    BUILD_FAILURE = "build_failure"
    TIMED_OUT = "timed_out"
    LOG_LIMIT = "log_limit"
    ABORTED = "aborted"
    OTHER_FAILURE = "other_failure"
    """Nix exited 1: typically inputs that could not be substituted or a store problem."""


@dataclass(slots=True)
class RealiseResult:
    status: RealiseStatus
    exit_code: int | None
    output_paths: list[str] = field(default_factory=list)
    error: str = ""
    log_bytes: int = 0


LineSink = Callable[[str], Awaitable[None] | None]


def classify_exit(code: int) -> RealiseStatus:
    """Map ``nix-store --realise`` exit codes (100 + bit mask: 1 timeout, 2 hash, 4 check)."""
    if code == 0:
        return RealiseStatus.SUCCESS
    if 100 <= code <= 107:
        return RealiseStatus.TIMED_OUT if (code - 100) & 1 else RealiseStatus.BUILD_FAILURE
    return RealiseStatus.OTHER_FAILURE


def store_root(store: str) -> str:
    """The chroot directory of a ``local?root=DIR`` (or bare path) store URI, else ""."""
    if store.startswith("/"):
        return store.rstrip("/")
    if store.startswith("local?") or store.startswith("local://?"):
        query = store.split("?", 1)[1]
        for part in query.split("&"):
            key, _, value = part.partition("=")
            if key == "root":
                return value.rstrip("/")
    return ""
