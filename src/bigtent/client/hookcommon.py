"""What every part of the hook shares: its options (HookConfig), and where it reports (the
build log on fd 4, Nix's JSON messages on stderr).
"""

from __future__ import annotations

import os
import sys
from enum import StrEnum
from typing import IO, NamedTuple, Protocol

LOG_FD = 4
"""Nix reads the build log of a hook from this descriptor."""


PROBE_TIMEOUT_SECS = 5.0
"""How long the first request to the runner may take before the hook gives up on it."""


class OnUnreachable(StrEnum):
    """What the hook does when the runner cannot be reached or refuses the credential."""

    FAIL = "fail"
    """The derivation fails with a message saying why (the default)."""
    LOCAL = "local"
    """Decline every derivation, so Nix builds them itself (when its ``max-jobs`` allows)."""


def json_message(text: str, level: int = 0) -> bytes:
    """A message Nix prints from the hook's stderr after the answer (level 0: an error)."""
    import json

    return b"@nix " + json.dumps({"action": "msg", "level": level, "msg": text}).encode() + b"\n"


class HookConfig(NamedTuple):
    runner_url: str
    token: str | None = None
    """A client token; None when ``oidc_audience`` is set or the runner has no auth."""
    oidc_audience: str | None = None
    """Ask the CI job (GitHub Actions) for an ID token with this audience instead of a token."""
    ca_file: str | None = None
    systems: frozenset[str] = frozenset()
    """Systems sent to the farm; empty: the local Nix's ``system`` and ``extra-platforms``."""
    on_unreachable: OnUnreachable = OnUnreachable.FAIL
    poll_interval_secs: float = 0.1
    unreachable_grace_secs: float = 10.0
    """How long a runner that stopped answering part way through is waited for."""
    public_keys: tuple[str, ...] = ()
    """Trust only these keys for the outputs (``--public-key``); empty: the keys the runner
    names in ``GET /api/v1/status``."""
    helper: bool = True
    """Hand each accepted derivation to the helper process (started on first use) instead of
    doing the farm's side in this short-lived process."""
    socket: str | None = None
    """The helper's socket; None: one per runner and credential in a private directory."""
    helper_idle_secs: float = 60.0


class Sink(Protocol):
    """Where the farm side reports: the build log, and errors Nix prints at once."""

    def line(self, text: str) -> None: ...

    def error(self, text: str) -> None: ...


class LogSink:
    """The build log Nix shows (fd 4), and Nix's error messages (stderr, JSON)."""

    def __init__(self, log: IO[bytes], messages: IO[bytes]) -> None:
        self.log = log
        self.messages = messages

    def line(self, text: str) -> None:
        for piece in text.splitlines() or [""]:
            self.log.write(piece.encode(errors="replace") + b"\n")
        self.log.flush()

    def error(self, text: str) -> None:
        """An error Nix prints at once, and in the log so a failure's tail shows it."""
        self.line(f"bigtent: {text}")
        self.messages.write(json_message(f"bigtent: {text}"))
        self.messages.flush()


def open_log() -> IO[bytes]:
    """Fd 4 when Nix gave one, else stderr (the hook run by hand)."""
    try:
        os.fstat(LOG_FD)
    except OSError:
        return sys.stderr.buffer
    return os.fdopen(LOG_FD, "wb", buffering=0, closefd=False)
