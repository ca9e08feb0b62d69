"""``bigtent nix-hook``: Nix's build hook, so plain ``nix-build``/``nix build`` build on the farm.

Nix starts the program named by its ``build-hook`` setting (with the verbosity appended) and
speaks to it in Nix's wire format (64-bit little-endian integers, padded strings) on stdin:

1. every setting of the parent (``1 NAME VALUE`` … ``0``), once per hook process;
2. for each derivation Nix would build: ``"try" AM_WILLING SYSTEM DRV_PATH [FEATURES]``. The
   hook answers on stderr with a line ``# accept`` (then a machine name line), ``# decline``
   (Nix builds it itself, if it may), ``# postpone`` or ``# decline-permanently``. Other lines
   before the answer are copied to Nix's stderr;
3. after ``# accept``: the input paths and the wanted output names (string lists); Nix then
   closes stdin. The outputs must be valid in the local store when the hook exits: exit 0 is
   success, 100 a build failure, 101 a timeout, anything else a miscellaneous failure.

Fd 4 is the build log (``nix build -L`` shows it, a failure shows its last lines); after the
answer, stderr carries only Nix's JSON log messages (``@nix {...}``), plain lines are dropped.
Nix holds the locks on the output paths while the hook runs: the outputs are copied in with
``nix copy`` and ``NIX_HELD_LOCKS`` naming them, which makes Nix's local store skip those locks
(without it the copy waits for them forever).

``hookentry`` reads the wire and answers (importing nothing heavy); this module holds the
command line and the loop (answer, then build). ``hookcommon`` holds the options and where
the hook reports, ``hookhandover`` the hand-over to the helper (``nixhelper``), ``hookfarm``
the farm's side, which reuses ``bigtent build``'s flow (``client/build.py``): upload what the
runner lacks of the ``.drv`` closure, submit, follow, and take the outputs from the runner's
signed cache, whose signature the local Nix checks; ``hooklogs`` the build log meanwhile. The
decisions are pure functions.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Coroutine, Mapping, Sequence
from typing import IO, Any, TypeVar

from bigtent.client.hookcommon import HookConfig, LogSink, OnUnreachable, Sink, open_log
from bigtent.client.hookentry import (
    HookError,
    TryRequest,
    WireReader,
    answer,
    farm_systems,
    local_store_uri,
    read_settings,
)
from bigtent.client.hookfarm import build_on_farm, probe_runner
from bigtent.client.hookhandover import via_helper

# The farm's side imports asyncio, httpx and the client inside its functions: ``run_hook``
# (the full path, for ``--on-unreachable local`` and the tests) answers before it needs them.

_T = TypeVar("_T")
log = logging.getLogger(__name__)


# ---- the loop ---------------------------------------------------------------------------------


def _run(coro: Coroutine[Any, Any, _T]) -> _T:
    import asyncio

    return asyncio.run(coro)


def run_hook(
    config: HookConfig,
    stdin: IO[bytes],
    stderr: IO[bytes],
    log: IO[bytes],
) -> int:
    """Answer Nix's ``try``s until one is accepted (then build it and return its status) or
    Nix has no more (0). Nix starts a new hook for the next derivation after an accept.
    (``hookentry.main`` is the same without importing this module before the answer.)"""
    wire = WireReader(stdin)
    sink = LogSink(log, stderr)
    verdict: list[bool] = []  # the probe's, asked once per hook process

    def runner_ok(request: TryRequest) -> bool | None:
        if config.on_unreachable is not OnUnreachable.LOCAL:
            return None
        if not verdict:
            why = _run(probe_runner(config, request.drv_path))
            verdict.append(why is None)
            if why is not None:
                stderr.write(
                    f"bigtent: {why}; Nix builds locally (on-unreachable = local)\n".encode()
                )
        return verdict[0]

    try:
        settings = read_settings(wire)
        accepted = answer(wire, stderr, farm_systems(config.systems, settings), runner_ok)
    except (EOFError, HookError, UnicodeDecodeError) as exc:
        sink.error(f"cannot read Nix's request: {exc}")
        return 1
    if accepted is None:
        return 0
    request, wanted = accepted
    return build_accepted(config, settings, request.drv_path, wanted, sink)


def build_accepted(
    config: HookConfig,
    settings: Mapping[str, str],
    drv_path: str,
    wanted: Sequence[str],
    sink: Sink,
) -> int:
    """The farm's side of an accepted derivation: through the helper, or in this process."""
    store_uri = local_store_uri(settings)
    if not config.helper:
        return _run(build_on_farm(config, store_uri, drv_path, wanted, sink))
    return via_helper(config, store_uri, drv_path, wanted, sink)


def after_accept(
    argv: Sequence[str],
    settings: Mapping[str, str],
    drv_path: str,
    wanted: Sequence[str],
    stderr: IO[bytes],
) -> int:
    """``hookentry.main`` after ``# accept``: check the whole command line, then build."""
    sink = LogSink(open_log(), stderr)
    try:
        config = parse_args(argv, os.environ)
    except ValueError as exc:
        sink.error(f"bigtent-nix-hook: {exc}")
        return 1
    return build_accepted(config, settings, drv_path, wanted, sink)


# ---- the command ------------------------------------------------------------------------------


def parse_args(argv: Sequence[str], env: Mapping[str, str]) -> HookConfig:
    """``bigtent-nix-hook [OPTIONS] [VERBOSITY]`` (Nix appends its verbosity). Raises
    ``ValueError`` with a message for a usage mistake."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="bigtent-nix-hook",
        description="Nix's build hook: build derivations on a bigtent farm "
        "(nix.conf: build-hook = /path/to/bigtent-nix-hook --runner URL --token-file FILE).",
        exit_on_error=False,
    )
    parser.add_argument("--runner", default=env.get("BIGTENT_URL", "http://127.0.0.1:8470"))
    parser.add_argument("--token-file")
    parser.add_argument("--oidc", choices=["github"])
    parser.add_argument("--audience")
    parser.add_argument("--ca-file", default=env.get("BIGTENT_CA_FILE") or None)
    parser.add_argument("--system", action="append", default=[])
    parser.add_argument(
        "--on-unreachable", choices=[m.value for m in OnUnreachable], default="fail"
    )
    parser.add_argument("--poll-interval", type=float, default=0.1)
    parser.add_argument("--public-key", action="append", default=[])
    parser.add_argument("--socket")
    parser.add_argument("--no-helper", action="store_true")
    parser.add_argument("--helper-idle", type=float, default=60.0)
    parser.add_argument("verbosity", nargs="?", type=int, default=0)
    try:
        args = parser.parse_args(list(argv))
    except argparse.ArgumentError as exc:
        raise ValueError(f"bad arguments {' '.join(argv)!r}: {exc}") from None
    except SystemExit as exc:
        if exc.code == 0:  # --help
            raise
        raise ValueError(f"bad arguments {' '.join(argv)!r}") from None
    token: str | None = None
    audience: str | None = None
    if args.oidc is not None:
        if args.token_file is not None:
            raise ValueError("give --token-file or --oidc, not both")
        audience = args.audience or env.get("BIGTENT_AUDIENCE")
        if not audience:
            raise ValueError("--oidc github needs --audience (the runner's [[auth.oidc]])")
    elif args.token_file is not None:
        from bigtent.errors import ConfigError
        from bigtent.secretfile import read_secret_file

        try:
            token = read_secret_file(args.token_file, "token file")
        except ConfigError as exc:
            raise ValueError(exc.message) from None
    else:
        token = env.get("BIGTENT_TOKEN") or None
    if args.poll_interval <= 0:
        raise ValueError("--poll-interval must be positive")
    return HookConfig(
        runner_url=args.runner,
        token=token,
        oidc_audience=audience,
        ca_file=args.ca_file,
        systems=frozenset(args.system),
        on_unreachable=OnUnreachable(args.on_unreachable),
        poll_interval_secs=args.poll_interval,
        public_keys=tuple(args.public_key),
        helper=not args.no_helper,
        socket=args.socket,
        helper_idle_secs=args.helper_idle,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``bigtent-nix-hook`` (and ``bigtent nix-hook``)."""
    stderr = sys.stderr.buffer
    log = open_log()
    try:
        config = parse_args(sys.argv[1:] if argv is None else argv, os.environ)
    except ValueError as exc:
        # Before any answer Nix copies plain lines to its stderr; after one it wants JSON.
        stderr.write(f"bigtent-nix-hook: {exc}\n".encode())
        stderr.flush()
        return 1
    try:
        return run_hook(config, sys.stdin.buffer, stderr, log)
    except KeyboardInterrupt:
        return 1
