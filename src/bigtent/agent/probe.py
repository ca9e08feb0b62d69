"""The start-up probe: before it registers, an agent proves that its store can build.

A tiny derivation is instantiated and realised with the agent's own store URI, ``--option``s
(``nix_options``: sandbox paths, ``extra_nix_options``, no substituters) and environment, the
way a step is realised. Its builder is Nix's ``builtin:buildenv`` with no derivations, so it
needs nothing in the sandbox (no ``/bin/sh``: an agent without host tools has none), yet it runs
through the same build users, sandbox and store writes as a real step. A random nonce makes it a
new derivation at every start, so it is really built; its paths are deleted afterwards.

When the probe fails the agent exits with ``AgentCannotBuild`` (exit 6): Nix's error and a
one-line hint chosen by ``probe_hint`` (pure) from that error.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from enum import StrEnum

from bigtent.errors import AgentCannotBuild, NixError
from bigtent.nix.store import NixStore, RealiseStatus, last_error_line

log = logging.getLogger(__name__)

PROBE_NAME = "bigtent-probe"
PROBE_TIMEOUT_SECS = 120.0
"""A probe that has not built in this long fails (it takes well under a second)."""


def probe_expression(nonce: str) -> str:
    """The probe derivation as a Nix expression: ``builtin:buildenv`` with empty
    ``derivations`` creates an empty output with a ``manifest.nix`` symlink, inside the
    sandbox, as a build user, with no program from the host."""
    if not nonce.isalnum():
        raise ValueError(f"probe nonce must be alphanumeric, got {nonce!r}")
    return (
        f'derivation {{ name = "{PROBE_NAME}"; system = "builtin"; '
        f'builder = "builtin:buildenv"; derivations = ""; manifest = "/dev/null"; '
        f'nonce = "{nonce}"; }}'
    )


class ProbeCause(StrEnum):
    """Why a probe failed, as far as Nix's error says."""

    BUILD_USERS = "build_users"
    SANDBOX = "sandbox"
    STORE_NOT_WRITABLE = "store_not_writable"
    NIX_MISSING = "nix_missing"
    OTHER = "other"


_CAUSE_PATTERNS: tuple[tuple[ProbeCause, tuple[str, ...]], ...] = (
    (ProbeCause.NIX_MISSING, ("is nix installed",)),
    (ProbeCause.BUILD_USERS, ("build-users-group", "build users group", "nixbld")),
    (
        ProbeCause.SANDBOX,
        (
            "sandbox",
            "namespace",
            "cloning builder process",
            "unshare",
            "pivot_root",
            "mounting /proc",
            "bind mount",
            "setting up the build environment",
        ),
    ),
    (
        ProbeCause.STORE_NOT_WRITABLE,
        (
            "read-only file system",
            "permission denied",
            "operation not permitted",
            "opening lock file",
            "no space left on device",
        ),
    ),
)
"""First match wins, on the lower-cased error: build users before the sandbox (a sandbox
error may name the build user), both before a bare "permission denied"."""

HINTS: dict[ProbeCause, str] = {
    ProbeCause.BUILD_USERS: (
        "Nix builds as the members of its build-users-group (nixbld), which this machine "
        "lacks: run scripts/install-deps.sh, or create the group and its build users as "
        "Nix's installer does (groupadd --system nixbld; useradd --system --no-create-home "
        "--home-dir /var/empty --shell /usr/sbin/nologin --gid nixbld --groups nixbld "
        "nixbldN, N = 1..32)"
    ),
    ProbeCause.SANDBOX: (
        "Nix cannot set up its build sandbox here (user or mount namespaces not permitted, "
        "e.g. an unprivileged container): allow them (a privileged container, or sysctl "
        "kernel.unprivileged_userns_clone=1), check that every sandbox_paths source exists, "
        'or, where builds need no isolation, set extra_nix_options = { sandbox = "false" }'
    ),
    ProbeCause.STORE_NOT_WRITABLE: (
        "the agent's Nix store is not writable by this user: run the agent as the store's "
        'owner (root for /nix), or set store = "local?root=DIR" (--store) to a directory '
        "it can write on a disk with free space"
    ),
    ProbeCause.NIX_MISSING: (
        "install Nix (Debian: apt-get install nix-bin) and put its commands on the agent's PATH"
    ),
    ProbeCause.OTHER: (
        "check that this user can build in the agent's store with its extra_nix_options "
        "(nix-store --realise); probe = false (--skip-probe) skips this check"
    ),
}


def probe_cause(error: str) -> ProbeCause:
    """Classify a probe's error text (pure)."""
    text = error.lower()
    for cause, patterns in _CAUSE_PATTERNS:
        if any(p in text for p in patterns):
            return cause
    return ProbeCause.OTHER


def probe_hint(error: str) -> str:
    """The one-line hint for a probe that failed with ``error`` (pure)."""
    return HINTS[probe_cause(error)]


def probe_failure(error: str) -> AgentCannotBuild:
    """The error the agent exits with: Nix's error, then the hint."""
    error = error.strip() or "the probe build failed without an error message"
    return AgentCannotBuild(
        f"this agent cannot build (start-up probe): {error}\nhint: {probe_hint(error)}",
        detail={"cause": probe_cause(error).value, "error": error},
    )


def _nix_error_text(exc: NixError) -> str:
    return last_error_line(exc.stderr) or str(exc)


PROBE_ATTEMPTS = 2
"""A failure no hint explains (``may_retry``) is tried once more with a new nonce."""


def may_retry(error: str) -> bool:
    """Whether a probe failure may be passing (pure): one that no known cause explains, e.g.
    a builder killed from outside, is tried again; a missing build users group, a sandbox that
    cannot be set up, a store that cannot be written, a missing Nix are not."""
    return probe_cause(error) is ProbeCause.OTHER


async def run_probe(
    store: NixStore, *, nonce: str | None = None, attempts: int = PROBE_ATTEMPTS
) -> float:
    """Build the probe in ``store``; return how long it took (seconds), raise
    ``AgentCannotBuild`` when it fails. The probe's paths are deleted either way (failures
    to delete are ignored)."""
    started = time.monotonic()
    for attempt in range(1, attempts + 1):
        error, timed_out = await _probe_once(store, nonce or secrets.token_hex(8))
        if error is None:
            secs = time.monotonic() - started
            log.info("start-up probe: built %s in %.2f s", PROBE_NAME, secs)
            return secs
        if attempt == attempts or timed_out or not may_retry(error):
            raise probe_failure(error)
        log.warning("start-up probe failed (%s); trying once more", error)
        nonce = None
    raise AssertionError("unreachable: attempts < 1")


async def _probe_once(store: NixStore, nonce: str) -> tuple[str | None, bool]:
    """One probe build: (None, False) when it built, else (Nix's error, whether it timed
    out)."""
    made: list[str] = []
    try:
        try:
            drvs = await store.instantiate(None, expr=probe_expression(nonce))
        except NixError as exc:
            return _nix_error_text(exc), False
        made += drvs
        try:
            result = await store.realise(drvs, timeout_secs=PROBE_TIMEOUT_SECS)
        except NixError as exc:
            return _nix_error_text(exc), False
        made[:0] = result.output_paths
        if result.status is RealiseStatus.TIMED_OUT:
            limit = f"{PROBE_TIMEOUT_SECS:.0f} s"
            return f"the probe did not build within {limit}: {result.error}", True
        if result.status is not RealiseStatus.SUCCESS:
            return result.error, False
        return None, False
    finally:
        with contextlib.suppress(NixError):
            await store.delete(made)


__all__ = [
    "HINTS",
    "PROBE_ATTEMPTS",
    "PROBE_NAME",
    "ProbeCause",
    "may_retry",
    "probe_cause",
    "probe_expression",
    "probe_failure",
    "probe_hint",
    "run_probe",
]
