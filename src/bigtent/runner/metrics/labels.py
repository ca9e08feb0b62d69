"""The metrics' label values (phases, auth failure reasons, upload kinds, agent kinds, the
bounded ``system`` label) and the pure decisions of which label an event counts under (an
auth failure's reason, an upload failure's, the phases an agent's timings report, the
queue depth by system and state)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from enum import StrEnum
from typing import Protocol

from bigtent.errors import (
    AuthError,
    BigtentError,
    NarMismatch,
    PayloadTooLarge,
    TooManyAuthFailures,
)
from bigtent.protocol import Timings
from bigtent.runner.auth.oidc import InvalidToken, IssuerUnavailable
from bigtent.runner.auth.policy import PolicyDenied
from bigtent.runner.scheduler.steps import StepNode
from bigtent.states import StepState

PREFIX = "bigtent"

PHASE_BUCKETS_SECS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    600.0, 1800.0, 3600.0, 7200.0, 14400.0, math.inf,
)  # fmt: skip
"""Upper bounds of the phase histogram: from a few milliseconds (dispatch latency on an idle
farm) to four hours (a long build); one set for every phase, so phases compare."""

MAX_SYSTEM_LABELS = 32
"""Distinct ``system`` label values kept; later ones are counted as ``other``. Systems come
from uploaded derivations: this bounds the series a client could create."""
OTHER_SYSTEM = "other"

ACTIVE_STATES = (StepState.WAITING, StepState.RUNNABLE, StepState.ASSIGNED, StepState.BUILDING)
"""The states ``bigtent_queue_depth`` reports (every step that is not final)."""


class Phase(StrEnum):
    """A phase of a step, the ``phase`` label of ``bigtent_step_phase_seconds``."""

    QUEUED = "queued"
    """From the step's creation to when all its dependencies had succeeded (runnable)."""
    DISPATCH = "dispatch"
    """From runnable (or runnable again, or a retry's not-before time) to assigned: the
    dispatch latency."""
    ACCEPT = "accept"
    """From the assign to the venue's ``accepted`` (building)."""
    PREPARE = "prepare"
    """The agent substituting the step's inputs (its reported ``prepare_secs``)."""
    BUILD = "build"
    """The build itself (the venue's reported ``build_secs``)."""
    UPLOAD = "upload"
    """Uploading the outputs to the cache (the venue's reported ``upload_secs``)."""


class AuthFailure(StrEnum):
    """Why a credential was refused, the ``reason`` label of ``bigtent_auth_failures_total``."""

    MISSING = "missing_credential"
    INVALID_TOKEN = "invalid_token"
    FORBIDDEN = "forbidden"
    """A valid token whose role may not do this."""
    OIDC_REJECTED = "oidc_rejected"
    """An OIDC ID token refused: malformed, badly signed, expired, or denied by the rules."""
    OIDC_UNAVAILABLE = "oidc_unavailable"
    """The issuer's keys could not be fetched (the agent may try again)."""
    RATE_LIMITED = "rate_limited"
    """The address had too many recent failures; its credential was not looked at."""


class UploadKind(StrEnum):
    """Which door a NAR came in by, the ``kind`` label of the upload metrics."""

    SOURCE = "source"
    """A client's ``.drv`` files and sources (``PUT /api/v1/paths/...``)."""
    OUTPUT = "output"
    """A build output, from an agent or an SSH builder."""


class UploadFailure(StrEnum):
    """Why a NAR failed verification while it streamed in."""

    TOO_LARGE = "too_large"
    """Larger than declared or than ``cache.max_nar_bytes``."""
    NAR_MISMATCH = "nar_mismatch"
    """Not what its headers declared: another hash, shorter, or not a well-formed NAR."""
    REJECTED = "rejected"
    """Refused for its content in another way (e.g. a ``.drv`` too large to parse)."""
    INTERRUPTED = "interrupted"
    """The upload stopped before its end (the peer went away)."""


class Lifetime(StrEnum):
    PERSISTENT = "persistent"
    EPHEMERAL = "ephemeral"


class AuthKind(StrEnum):
    """How an agent authenticated: the agent row's ``auth_kind``."""

    TOKEN = "token"
    OIDC = "oidc"


AGENT_KINDS = (
    (Lifetime.PERSISTENT, AuthKind.TOKEN),
    (Lifetime.EPHEMERAL, AuthKind.TOKEN),
    (Lifetime.EPHEMERAL, AuthKind.OIDC),
)
"""The kinds of agent there are (an OIDC agent is always ephemeral, architecture §6)."""


class CacheLookup(StrEnum):
    HIT = "hit"
    MISS = "miss"


# ---- pure decisions ----------------------------------------------------------------------------
def auth_failure_reason(exc: AuthError, credential: str | None) -> AuthFailure:
    """The reason label for a refused credential. ``credential`` is what the peer presented
    (None or empty: nothing). Checked most specific first: a rate-limited address is refused
    before its credential is looked at, and an OIDC policy denial is also a 403."""
    if isinstance(exc, TooManyAuthFailures):
        return AuthFailure.RATE_LIMITED
    if isinstance(exc, IssuerUnavailable):
        return AuthFailure.OIDC_UNAVAILABLE
    if isinstance(exc, InvalidToken | PolicyDenied):
        return AuthFailure.OIDC_REJECTED
    if exc.http_status == 403:
        return AuthFailure.FORBIDDEN
    if not credential:
        return AuthFailure.MISSING
    return AuthFailure.INVALID_TOKEN


def upload_failure_reason(exc: BaseException) -> UploadFailure:
    """The reason label for an upload whose verification raised ``exc``."""
    if isinstance(exc, PayloadTooLarge):
        return UploadFailure.TOO_LARGE
    if isinstance(exc, NarMismatch):
        return UploadFailure.NAR_MISMATCH
    if isinstance(exc, BigtentError):
        return UploadFailure.REJECTED
    return UploadFailure.INTERRUPTED


def reported_phases(timings: Timings) -> list[tuple[Phase, float]]:
    """The phases a venue's result timings report. A phase that did not run is reported as 0
    and is not observed; a value that is negative or not finite (the timings come from the
    agent) is not observed either."""
    values = [
        (Phase.PREPARE, timings.prepare_secs),
        (Phase.BUILD, timings.build_secs),
        (Phase.UPLOAD, timings.upload_secs),
    ]
    return [(phase, secs) for phase, secs in values if math.isfinite(secs) and secs > 0]


def queue_depth(nodes: Iterable[StepNode]) -> Counter[tuple[str, StepState]]:
    """Steps that are not final, by (system, state). The scheduler also keeps the final
    steps of builds still running: those are not counted."""
    # Counted in C (a generator into Counter), then the few final keys dropped: a scrape
    # with 100 000 active steps costs ~25 ms of the event loop, not ~50.
    depth = Counter((node.req.system, node.state) for node in nodes)
    for key in [k for k in depth if k[1].is_final]:
        del depth[key]
    return depth


class SessionView(Protocol):
    """What the collector reads of a live agent session (``sessions.AgentSession``)."""

    @property
    def closed(self) -> bool: ...
    @property
    def venue(self) -> object | None: ...
    @property
    def identity(self) -> object | None: ...
    @property
    def record(self) -> dict[str, object]: ...


def agent_kinds(sessions: Iterable[SessionView]) -> Counter[tuple[Lifetime, AuthKind]]:
    """Registered, open agent sessions by lifetime and credential. An OIDC agent is always
    ephemeral (its row says so, architecture §6)."""
    kinds: Counter[tuple[Lifetime, AuthKind]] = Counter()
    for s in sessions:
        if s.closed or s.venue is None:
            continue
        lifetime = Lifetime.EPHEMERAL if s.record.get("ephemeral") else Lifetime.PERSISTENT
        auth = AuthKind.TOKEN if s.identity is None else AuthKind.OIDC
        kinds[lifetime, auth] += 1
    return kinds


class SystemLabels:
    """The ``system`` label values in use: the first ``limit`` systems seen keep their own
    label, later ones share ``other`` (a bound on the series an uploaded derivation can make)."""

    def __init__(self, limit: int = MAX_SYSTEM_LABELS) -> None:
        self.limit = limit
        self.known: list[str] = []
        self._set: set[str] = set()

    def label(self, system: str) -> tuple[str, bool]:
        """The label for ``system`` and whether it is new (its series should be made)."""
        if system in self._set:
            return system, False
        if len(self.known) >= self.limit:
            system = OTHER_SYSTEM
            if system in self._set:
                return system, False
        self.known.append(system)
        self._set.add(system)
        return system, True
