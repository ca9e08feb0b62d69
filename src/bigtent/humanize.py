"""How durations read to people: one formatter for the CLI, the dashboard and the runner's
messages (pure)."""

from __future__ import annotations


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


__all__ = ["duration"]
