"""``bigtent nix-proxy`` as the tests run it: a process on a socket of its own, gone after."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

BIGTENT = Path(sys.executable).parent / "bigtent"
START_SECS = 30.0


@contextlib.contextmanager
def running_proxy(
    runner_url: str, store: Path, env: Mapping[str, str], *extra: str
) -> Iterator[str]:
    """Yield ``unix://SOCKET?root=STORE`` of a proxy for the chroot store ``store`` (its log
    is printed when it stops)."""
    # Short: AF_UNIX paths end at 108 bytes.
    sock = Path(tempfile.mkdtemp(prefix="bt-proxy-")) / "s"
    log = sock.with_suffix(".log")
    argv = [str(BIGTENT), "nix-proxy", "--runner", runner_url, "--socket", str(sock)]
    argv += ["--store", f"local?root={store}", *extra]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=dict(env))
    try:
        deadline = time.monotonic() + START_SECS
        while not sock.exists():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the proxy did not listen: " + log.read_text()
            time.sleep(0.05)  # polling for the socket file, not synchronising with a sleep
        # ?root=: Nix reads the chroot store's files (a flake's source) where they are.
        yield f"unix://{sock}?root={store}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        print(log.read_text()[-4000:])


def nix_via(
    proxy: str, env: Mapping[str, str], *args: str, tool: str = "nix-build", timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """A plain Nix command with ``--store`` the proxy (``nix``: the subcommand comes first);
    ``max-jobs = 0``: nothing can be built locally."""
    argv = [tool]
    if tool == "nix":  # the subcommand (one word, or "flake check") comes first
        words = 2 if args[0] == "flake" else 1
        argv += [*args[:words], "--extra-experimental-features", "nix-command flakes"]
        args = args[words:]
    argv += ["--store", proxy, "--option", "max-jobs", "0", "--option", "substituters", "", *args]
    return subprocess.run(argv, capture_output=True, text=True, env=dict(env), timeout=timeout)
