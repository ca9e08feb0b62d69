"""Shared fixtures: a clean environment for every test, and bounded waiting."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# Property tests judge behaviour, not speed: no per-example deadline, which a loaded CI
# machine (several real-Nix tests in parallel) would otherwise miss at random.
settings.register_profile("bigtent", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("bigtent")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--screenshots",
        metavar="DIR",
        default=None,
        help="also save the dashboard browser tests' screenshots into DIR (docs/screenshots)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The PostgreSQL pass runs the unit and integration tests (every query on PostgreSQL) and
    the end-to-end tests marked ``database``; the other end-to-end tests drive the same queries
    through real Nix, agents and browsers, and run in the SQLite pass only (CI's time)."""
    from tests.databases import ON_POSTGRESQL

    if not ON_POSTGRESQL:
        return
    e2e = Path(__file__).parent / "e2e"
    kept: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        once = item.path.is_relative_to(e2e) and not item.get_closest_marker("database")
        (dropped if once else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


pytest_plugins = ["tests.databases", "tests.integration.runner.oidc_issuer"]
"""``make_database``, ``database_url``: SQLite, or PostgreSQL with
``BIGTENT_TEST_DB=postgresql``; ``tls``, ``key``, ``issuer``: a loopback OIDC issuer."""

_CLEARED_PREFIXES = ("BIGTENT_", "NIX_", "XDG_CACHE_HOME", "ACTIONS_ID_TOKEN_")
_PROXIES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The developer's shell must not leak into tests (httpx's ``clean_environ``)."""
    for key in list(os.environ):
        if key.startswith(_CLEARED_PREFIXES) or key.lower() in _PROXIES:
            monkeypatch.delenv(key, raising=False)
    yield


HOST_TOOLS = ["/bin=/usr/bin", "/usr", "/lib=/usr/lib", "/lib64=/usr/lib64"]
"""The host tools mapped into Nix's build sandbox (``extra-sandbox-paths``) for derivations
whose builder is the host's ``/bin/sh``, as the agents' ``sandbox_paths`` do: tests pass them
to Nix themselves and rely on no nix.conf of the machine."""
HOST_TOOLS_OPTION = ["--option", "extra-sandbox-paths", " ".join(HOST_TOOLS)]


def have_nix() -> bool:
    return shutil.which("nix-store") is not None


_SETNS_ROOT = """
import ctypes, os
fd = os.open("/proc/self/ns/mnt", os.O_RDONLY)
if ctypes.CDLL(None, use_errno=True).setns(fd, 0x00020000) != 0:  # CLONE_NEWNS
    raise SystemExit(1)
st = os.stat("/")
print(st.st_dev, st.st_ino)
"""


def _in_chroot() -> bool:
    """Whether this process runs in a plain chroot: a process that enters its own mount
    namespace again (as Nix 2.8 does before it starts ``git`` or ``ssh``) lands at another
    root. Asked of a child process, so this one keeps its root."""
    here = os.stat("/")
    try:
        out = subprocess.run(
            [sys.executable, "-c", _SETNS_ROOT], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return False
    if out.returncode != 0:  # not allowed to (not root): no chroot store either
        return False
    dev, ino = (int(x) for x in out.stdout.split())
    return (dev, ino) != (here.st_dev, here.st_ino)


IN_CHROOT = _in_chroot()

nix_children_see_our_root = pytest.mark.skipif(
    IN_CHROOT,
    reason="in a plain chroot, Nix 2.8 starts git and ssh at the machine's real root "
    "(NixOS/nix#7602; docs/security.md, 'Not inside a chroot with Nix 2.8')",
)
"""For tests where Nix itself starts ``git`` (flakes, ``fetchGit``: Nix CI's evaluation) or
``ssh`` (SSH builders): they cannot pass inside a chroot such as a debootstrap fresh-machine
check, and do on a machine, VM or container."""


def current_system() -> str:
    """The local Nix system (``builtins.currentSystem``), without asking any substituter."""
    out = subprocess.run(
        ["nix-instantiate", "--option", "substituters", "", "--eval", "--expr",
         "builtins.currentSystem"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return out.stdout.strip().strip('"')


async def eventually(
    predicate: Callable[[], Awaitable[bool] | bool],
    timeout: float = 30.0,
    interval: float = 0.05,
    what: str = "condition",
) -> None:
    """Wait until ``predicate`` holds, polling; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def wait_until(
    predicate: Callable[[], bool],
    timeout: float = 30.0,
    interval: float = 0.05,
    what: str = "condition",
) -> None:
    """Synchronous ``eventually``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
