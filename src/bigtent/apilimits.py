"""Limits of API request fields that a client can check before it sends anything.

The runner's request models (``runner/http/routes/builds.py``) use these same values, so
``bigtent build`` refuses a priority out of range at once instead of after uploading the
closure.
"""

from __future__ import annotations

import re

from bigtent.errors import NotFound

MAX_ID = 2**31 - 1
"""Build, step and attempt ids are positive 32-bit integers: their columns are ``INTEGER``,
which PostgreSQL keeps in 32 bits (a larger number cannot even be sent as a parameter)."""


def known_id(ident: int, what: str) -> int:
    """``ident`` if it can name a build, step or attempt, else NotFound (404): any other
    number names nothing, and must not reach the database, which cannot even compare it."""
    if not 0 < ident <= MAX_ID:
        raise NotFound(f"no {what} {ident}")
    return ident


MAX_REFERENCES = 4096
"""References of one store path (an output an agent reports, a path a client uploads): the
wire protocol's bound too (``bigtent.protocol`` takes it from here)."""


BUILD_WAIT_MAX_SECS = 10.0
"""The longest ``GET /builds/{id}?wait=`` holds its answer (a client asks again after it)."""
PROGRESS_TOKEN_MAX_CHARS = 200
"""``GET /builds/{id}?seen=``: a progress token (``apimodels.progress_token``) is far shorter."""


PRIORITY_MIN = -1000
PRIORITY_MAX = 1000
"""A build's priority (``POST /builds``, ``POST /builds/{id}/bump``)."""

BUILD_DRVS_MAX = 100_000
"""The most derivations one build may request."""

LABEL_MAX_CHARS = 256
"""The longest ``repository`` or ``ref`` of a build."""
REPOSITORY_PATTERN = r"^[^\s*]+$"
"""A build's repository (``acme/widgets``): no whitespace, no ``*``."""
REF_PATTERN = r"^\S+$"
"""A build's git ref (``refs/heads/main``): no whitespace."""


def build_field_problem(repository: str | None, ref: str | None) -> str | None:
    """Why the runner would refuse this ``repository`` or ``ref``, or None (pure)."""
    for flag, value, pattern, what in (
        ("--repository", repository, REPOSITORY_PATTERN, "no whitespace or '*'"),
        ("--ref", ref, REF_PATTERN, "no whitespace"),
    ):
        if value is None:
            continue
        if not value or len(value) > LABEL_MAX_CHARS:
            return f"{flag} must have 1 to {LABEL_MAX_CHARS} characters (got {len(value)})"
        if re.fullmatch(pattern, value) is None:
            return f"{flag} must have {what} (got {value!r})"
    return None
