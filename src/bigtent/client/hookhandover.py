"""The helper, seen from the hook: its socket (one per runner and credential, in a private
directory), starting it, and handing a derivation over to it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

from bigtent.client.hookcommon import HookConfig, Sink
from bigtent.client.hookentry import encode_request, is_private_dir, relay, socket_path

HELPER_START_SECS = 15.0
"""How long a hook waits for the helper it started to listen."""


def helper_socket(config: HookConfig, uid: int, env: Mapping[str, str]) -> str:
    """The helper's socket: ``--socket``, else one per runner and credential in
    ``$XDG_RUNTIME_DIR``, ``/run/bigtent-nix-hook`` for root, or ``/tmp/bigtent-nix-hook-UID``
    (a directory only this user may enter, checked by ``private_dir`` before the hook
    connects: a helper listening there is this user's own)."""
    if config.socket:
        return config.socket
    return socket_path(
        config.runner_url, config.token or "", config.oidc_audience or "", config.ca_file or "",
        uid, env,
    )  # fmt: skip


def private_dir(path: str) -> None:
    """Create ``path`` (mode 0700) or check that it is this user's and closed to others."""
    import contextlib

    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    if not is_private_dir(path):
        raise OSError(f"{path} must be a directory of uid {os.getuid()} closed to others")


def via_helper(
    config: HookConfig, store_uri: str, drv_path: str, wanted: Sequence[str], sink: Sink
) -> int:
    """Hand the derivation to the helper (starting it when none listens) and relay what it
    says: log lines, errors, then the exit status."""
    import socket
    import time

    path = helper_socket(config, os.getuid(), os.environ)
    if not config.socket:
        try:  # before connecting: whoever owns the directory could serve a fake helper
            private_dir(os.path.dirname(path))
        except OSError as err:
            sink.error(f"cannot use the helper at {path}: {err}")
            return 1
    deadline: float | None = None
    while True:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(path)
            break
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            conn.close()
            if deadline is None:
                try:
                    start_helper(config, path)
                except OSError as err:
                    sink.error(f"cannot start the helper at {path}: {err}")
                    return 1
                deadline = time.monotonic() + HELPER_START_SECS
            elif time.monotonic() > deadline:
                sink.error(f"the helper at {path} did not start listening: {exc}")
                return 1
            time.sleep(0.02)
    with conn:
        code = relay(conn, encode_request(drv_path, wanted, store_uri), sink.line, sink.error)
    if code is not None:
        return code
    sink.error(f"the helper at {path} stopped before {drv_path} was built")
    return 1


def start_helper(config: HookConfig, path: str) -> None:
    """Start the helper in its own session, detached from Nix's pipes (Nix waits for the
    hook's stderr and log to close); it exits after ``helper_idle_secs`` without work."""
    import subprocess

    if not config.socket:
        private_dir(os.path.dirname(path))
    argv = [sys.executable, "-m", "bigtent.client.nixhelper", *helper_argv(config), path]
    # The token goes in the environment, never on a command line others can read.
    env = {k: v for k, v in os.environ.items() if k != "BIGTENT_TOKEN"}
    if config.token:
        env["BIGTENT_TOKEN"] = config.token
    with open(path + ".log", "ab") as log:
        subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            close_fds=True,
        )


def helper_argv(config: HookConfig) -> list[str]:
    """The options the helper is started with (its token comes by the environment)."""
    argv = ["--runner", config.runner_url, "--on-unreachable", config.on_unreachable.value]
    argv += ["--poll-interval", str(config.poll_interval_secs)]
    argv += ["--helper-idle", str(config.helper_idle_secs)]
    if config.ca_file:
        argv += ["--ca-file", config.ca_file]
    if config.oidc_audience:
        argv += ["--oidc", "github", "--audience", config.oidc_audience]
    for system in sorted(config.systems):
        argv += ["--system", system]
    for key in config.public_keys:
        argv += ["--public-key", key]
    argv.append("--socket")
    return argv
