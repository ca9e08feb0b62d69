"""The file system an evaluating Nix process sees (pure: the bubblewrap command line).

Pure evaluation blocks ``builtins.readFile /abs/path``, but Nix accepts any input it considers
locked, and ``builtins.fetchTree { type = "path"; path = "/any/file"; narHash = …; }`` is
locked: a project's Nix code could read any file the runner can read (its signing key, its
token files, other projects' mirrors), and Nix's "hash mismatch" error would even print the
file's hash. So CI evaluation runs under bubblewrap (``bwrap``) with an allow-list file
system: the system's programs and libraries read-only, Nix's configuration, TLS certificates,
name resolution, the project's own git mirror read-only, the evaluation store and Nix's cache
read-write, a fresh ``/tmp`` and an empty ``HOME`` — never the runner's state directory, its
config or key files (docs/security.md "CI evaluation").
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

BWRAP = "bwrap"

SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/nix")
"""Programs and libraries (and Nix's own store, where the official installer puts Nix),
read-only; a merged-/usr link (``/bin -> usr/bin``) is made as the same link."""
SYSTEM_FILES = (
    "/etc/nix",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/passwd",
    "/etc/group",
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/nsswitch.conf",
    "/etc/gitconfig",
)
"""Nix's configuration, TLS certificates, users (Nix and git look the user up) and name
resolution, read-only; only those that exist."""
HOME = "/tmp/home"
"""The sandbox's ``HOME``: an empty directory on its fresh ``/tmp``."""
ENV_KEPT = (
    "PATH",
    "LANG",
    "LC_ALL",
    "TZ",
    "NIX_SSL_CERT_FILE",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "GIT_SSL_CAINFO",
    "CURL_CA_BUNDLE",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "all_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "ALL_PROXY",
)
"""The runner's environment variables an evaluation keeps (nothing else: the runner's
``BIGTENT_*`` settings may hold secrets)."""


@dataclass(frozen=True, slots=True)
class EvalSandbox:
    """What one evaluation may reach besides the system: ``read_only`` (the project's git
    mirror) and ``read_write`` (the evaluation store, Nix's cache directory) paths, and
    whether it keeps the network (flakes with inputs fetch them)."""

    read_only: tuple[Path, ...] = ()
    read_write: tuple[Path, ...] = ()
    network: bool = True
    extra_env: Mapping[str, str] = field(default_factory=dict)
    bwrap: str = BWRAP
    """The bubblewrap program."""


def bwrap_argv(
    sandbox: EvalSandbox,
    *,
    exists: Callable[[str], bool] = os.path.exists,
    link_target: Callable[[str], str | None] | None = None,
) -> list[str]:
    """The ``bwrap`` command line (up to and including ``--``) that runs a command in
    ``sandbox`` (pure given ``exists`` and ``link_target``, which look at the host)."""
    target = link_target or _link_target
    argv = [
        sandbox.bwrap,
        "--die-with-parent",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--hostname",
        "bigtent-eval",
    ]
    if not sandbox.network:
        argv.append("--unshare-net")
    for path in SYSTEM_DIRS:
        if not exists(path):
            continue
        link = target(path)
        if link is not None:
            argv += ["--symlink", link, path]
        else:
            argv += ["--ro-bind", path, path]
    for path in SYSTEM_FILES:
        if exists(path):
            argv += ["--ro-bind", path, path]
    argv += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--dir", HOME]
    # After /tmp: a state directory under /tmp (tests) is bound onto the fresh /tmp.
    for ro in sandbox.read_only:
        argv += ["--ro-bind", str(ro), str(ro)]
    for rw in sandbox.read_write:
        argv += ["--bind", str(rw), str(rw)]
    argv += ["--chdir", HOME, "--"]
    return argv


def sandbox_env(environ: Mapping[str, str], sandbox: EvalSandbox) -> dict[str, str]:
    """The environment of the sandboxed process (pure): ``ENV_KEPT`` of ``environ``, an
    empty ``HOME`` and the sandbox's own variables."""
    env = {k: environ[k] for k in ENV_KEPT if k in environ}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env["HOME"] = HOME
    env.update(sandbox.extra_env)
    return env


def _link_target(path: str) -> str | None:
    try:
        return os.readlink(path) if os.path.islink(path) else None
    except OSError:
        return None


def resolve_program(name: str, path_env: str | None) -> str:
    """The real file ``name`` runs (links followed), so that a Nix reached through a
    profile link outside the sandbox's file system still runs inside it."""
    found = shutil.which(name, path=path_env)
    return os.path.realpath(found) if found else name


def probe_argv(bwrap_prefix: Sequence[str], nix: str) -> list[str]:
    """The start-up probe: ``nix --version`` in the sandbox."""
    return [*bwrap_prefix, nix, "--version"]
