"""How durations and times read to people: one formatter for the CLI, the dashboard and the
runner's messages (pure)."""

from __future__ import annotations

from datetime import UTC, datetime

RELATIVE_DAYS = 7
"""Times further than this from now are shown as a date instead of "3 d ago"."""


def duration(secs: float) -> str:
    """``0.4 s``, ``12 s``, ``3 min 04 s``, ``2 h 05 min`` (negative counts as 0)."""
    secs = max(0.0, secs)
    if secs < 10:
        return f"{secs:.1f} s"
    whole = int(secs)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


def _coarse(secs: float) -> str:
    """A whole-unit span for relative times: ``12 s``, ``3 min``, ``2 h 05 min``, ``3 d 4 h``."""
    whole = int(secs)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min"
    if whole < 86400:
        return f"{whole // 3600} h {whole % 3600 // 60:02d} min"
    return f"{whole // 86400} d {whole % 86400 // 3600} h"


def relative(then: datetime, now: datetime) -> str:
    """``just now``, ``12 s ago``, ``3 min ago``, ``2 h 05 min ago``, ``in 30 s`` (ahead of
    now), and beyond ``RELATIVE_DAYS`` the UTC date and minute (``2026-11-02 14:03``): no
    microseconds, no time zone offsets. Naive datetimes count as UTC."""
    then = then if then.tzinfo is not None else then.replace(tzinfo=UTC)
    now = now if now.tzinfo is not None else now.replace(tzinfo=UTC)
    secs = (now - then).total_seconds()
    if abs(secs) >= RELATIVE_DAYS * 86400:
        return then.astimezone(UTC).strftime("%Y-%m-%d %H:%M")
    if abs(secs) < 1:
        return "just now"
    return f"{_coarse(secs)} ago" if secs > 0 else f"in {_coarse(-secs)}"


def relative_iso(text: str | None, now: datetime, *, missing: str = "-") -> str:
    """``relative`` for an ISO 8601 time as the runner's API writes it; ``missing`` for None
    or an empty string, and the text itself when it is no ISO time."""
    if not text:
        return missing
    try:
        then = datetime.fromisoformat(text)
    except ValueError:
        return text
    return relative(then, now)


def seconds_between(start: str | None, end: str | None) -> float | None:
    """Seconds from one ISO 8601 time to another, None when either is missing or malformed."""
    if not start or not end:
        return None
    try:
        return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
    except (ValueError, TypeError):  # TypeError: one naive, one aware
        return None


__all__ = ["duration", "relative", "relative_iso", "seconds_between"]
