"""The only package that spawns Nix: thin async wrappers over nix-store, nix-instantiate and
nix (``nixstore.NixStore``), and ``nix eval`` bounded in memory and time
(``bounded.BoundedEval``).

Every command runs with the configured store (``--store``) and options, so one host can run
several agents with separate stores. Works with Nix 2.8 (Debian) and current releases.
``results`` holds what the commands answer and ``messages`` what their failures say (pure).
"""

from bigtent.nix.store.bounded import BoundedEval, BoundedRun, probe_sandbox
from bigtent.nix.store.messages import command_line, evaluation_failure, last_error_line
from bigtent.nix.store.nixstore import NIX_COMMAND, NixStore, spawn_daemon_stdio
from bigtent.nix.store.results import (
    LineSink,
    PathInfo,
    RealiseResult,
    RealiseStatus,
    classify_exit,
    store_root,
)

__all__ = [
    "NIX_COMMAND",
    "BoundedEval",
    "BoundedRun",
    "LineSink",
    "NixStore",
    "PathInfo",
    "RealiseResult",
    "RealiseStatus",
    "classify_exit",
    "command_line",
    "evaluation_failure",
    "last_error_line",
    "probe_sandbox",
    "spawn_daemon_stdio",
    "store_root",
]
