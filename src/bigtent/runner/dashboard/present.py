"""How the dashboard shows things: durations, sizes, progress and step order (pure)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from bigtent import humanize
from bigtent.states import StepState

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)")


def strip_ansi(text: str) -> str:
    """Log text without terminal colour and cursor escapes."""
    return _ANSI.sub("", text)


def _finite(value: float | None) -> float | None:
    """``value`` as a finite float, or None for none or a stored odd value (a huge integer,
    infinity, NaN, not a number at all): presentation never raises on what it is given."""
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return out if math.isfinite(out) else None


def fmt_duration(secs: float | None) -> str:
    """``humanize.duration``; an em dash for none (or an odd value)."""
    checked = _finite(secs)
    return "—" if checked is None else humanize.duration(checked)


def fmt_bytes(n: int | None) -> str:
    """``512 B``, ``1.5 KiB`` … up to EiB; an em dash for none or an odd value."""
    size = _finite(n)
    if size is None:
        return "—"
    if size < 0:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if size < 1024:
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return "≥ 1024 EiB"


def _datetime(ts: float | None) -> datetime | None:
    value = _finite(ts)
    if value is None:
        return None
    try:
        return datetime.fromtimestamp(value, UTC)
    except (OverflowError, OSError, ValueError):
        return None


def quota_percent(size: int, quota: int | None) -> int | None:
    """How full the cache is, in whole percent of its quota (None: no quota)."""
    if not quota:
        return None
    return round(100 * size / quota)


def fmt_time(ts: float | None) -> str:
    """A UTC time to the second, ``2025-01-31 12:00:05Z``; an em dash for none or a time
    out of range."""
    when = _datetime(ts)
    return "—" if when is None else when.strftime("%Y-%m-%d %H:%M:%SZ")


def fmt_ago(ts: float | None, now: float) -> str:
    checked = _finite(ts)
    if checked is None:
        return "never"
    delta = now - checked
    if delta < 0:
        return "in " + fmt_duration(-delta)
    if delta < 1:
        return "just now"
    return fmt_duration(delta).replace(".0 s", " s") + " ago"


def iso(ts: float | None) -> str:
    when = _datetime(ts) if ts else None
    return "" if when is None else when.isoformat(timespec="seconds")


def store_name(path: str) -> str:
    """The name part of a store path (``/nix/store/<hash>-hello-2.12.drv`` →
    ``hello-2.12.drv``)."""
    base = path.rsplit("/", 1)[-1]
    _, sep, name = base.partition("-")
    return name if sep else base


_FINAL = frozenset(s for s in StepState if s.is_final)


@dataclass(frozen=True, slots=True)
class Progress:
    """How far a build is, from its steps' states."""

    total: int
    succeeded: int
    failed: int
    """Failed and dependency-failed."""
    cancelled: int
    running: int

    @property
    def done(self) -> int:
        return self.succeeded + self.failed + self.cancelled

    @property
    def percent(self) -> int:
        """Final steps out of all, rounded down (100 only when every step is final; a build
        with no steps to run is complete)."""
        if self.total == 0:
            return 100
        return self.done * 100 // self.total

    def segments(self) -> list[tuple[str, float, float]]:
        """(CSS class, x, width) of the bar's parts, in percent of its width."""
        out: list[tuple[str, float, float]] = []
        x = 0.0
        total = self.total or 1
        for cls, n in (
            ("succeeded", self.succeeded),
            ("failed", self.failed),
            ("cancelled", self.cancelled),
            ("running", self.running),
        ):
            if n:
                end = x + 100.0 * n / total
                # Rounded ends, so neighbours meet exactly.
                out.append((cls, round(x, 3), round(round(end, 3) - round(x, 3), 3)))
                x = end
        return out


def progress(states: Iterable[str]) -> Progress:
    counts: dict[StepState, int] = dict.fromkeys(StepState, 0)
    total = 0
    for s in states:
        counts[StepState(s)] += 1
        total += 1
    return Progress(
        total=total,
        succeeded=counts[StepState.SUCCEEDED],
        failed=counts[StepState.FAILED] + counts[StepState.DEPENDENCY_FAILED],
        cancelled=counts[StepState.CANCELLED],
        running=counts[StepState.ASSIGNED] + counts[StepState.BUILDING],
    )


def progress_from_counts(counts: Mapping[str, int]) -> Progress:
    return progress(state for state, n in counts.items() for _ in range(n))


_STEP_ORDER = {
    StepState.FAILED: 0,
    StepState.DEPENDENCY_FAILED: 1,
    StepState.BUILDING: 2,
    StepState.ASSIGNED: 3,
    StepState.RUNNABLE: 4,
    StepState.WAITING: 5,
    StepState.CANCELLED: 6,
    StepState.SUCCEEDED: 7,
}


def step_order_key(state: str, step_id: int) -> tuple[int, int]:
    """Failed steps first (the reason a build failed), then running, then queued, then the
    rest; by id within each."""
    return (_STEP_ORDER[StepState(state)], step_id)


def is_final(state: str) -> bool:
    return StepState(state) in _FINAL


def agent_kind(ephemeral: bool) -> str:
    return "ephemeral" if ephemeral else "persistent"


def online_by_kind(connected: Iterable[tuple[bool, str]], ssh_usable: int) -> dict[str, int]:
    """Counts of connected agents by kind: ``persistent``/``ephemeral`` and ``token``/
    ``oidc`` (from ``(ephemeral, auth_kind)`` pairs), and usable SSH builders."""
    out = {"persistent": 0, "ephemeral": 0, "token": 0, "oidc": 0, "ssh": ssh_usable}
    for ephemeral, auth_kind in connected:
        out[agent_kind(ephemeral)] += 1
        out["oidc" if auth_kind == "oidc" else "token"] += 1
    return out


def attempt_next(retry_at: float | None, finished_at: float) -> str:
    """What came after an attempt: ``final`` (no more tries), ``retried at once``, or
    ``retry after 10 s`` (the backoff, from the attempt's end)."""
    if retry_at is None:
        return "final"
    wait = retry_at - finished_at
    return "retried at once" if wait < 0.05 else f"retry after {fmt_duration(wait)}"


def outcome_class(outcome: str) -> str:
    """The badge class of an attempt's outcome: green for a success, red for the rest."""
    return "succeeded" if outcome == "success" else "failed"


def busy_secs(intervals: Iterable[tuple[float, float | None]], start: float, end: float) -> float:
    """How long a build "took": the time between ``start`` (its creation) and ``end`` (its
    end, or now while it runs) during which at least one of its steps was running (assigned
    to a venue until its attempt ended; an end of None: running now). Time it only waited —
    queued without a free slot, waiting for capacity, or between a failed attempt and its
    retry with nothing else running — does not count; overlapping steps count once."""
    spans = sorted(
        (max(s, start), min(end if e is None else e, end))
        for s, e in intervals
        if _finite(s) is not None and (e is None or _finite(e) is not None)
    )
    total = 0.0
    cur_start: float | None = None
    cur_end = 0.0
    for s, e in spans:
        if e <= s:
            continue
        if cur_start is None or s > cur_end:
            if cur_start is not None:
                total += cur_end - cur_start
            cur_start, cur_end = s, e
        else:
            cur_end = max(cur_end, e)
    if cur_start is not None:
        total += cur_end - cur_start
    return total


def merge_spans(
    intervals: Iterable[tuple[float, float | None]], start: float
) -> list[tuple[float, float | None]]:
    """``intervals`` made compact for ``busy_secs``, which gives the same answer for any end
    at or after the latest of them: the ended ones (clipped at ``start``) merged into disjoint
    spans, and the running ones (end None, which all reach the end) as one span from the
    earliest of them. A build's thousands of attempt records become a few spans to keep."""
    ended: list[tuple[float, float]] = []
    running: float | None = None
    for s, e in intervals:
        if _finite(s) is None:
            continue
        s = max(s, start)
        if e is None:
            running = s if running is None else min(running, s)
        elif _finite(e) is not None and e > s:
            ended.append((s, e))
    ended.sort()
    out: list[tuple[float, float | None]] = []
    for s, e in ended:
        last = out[-1] if out else None
        if last is not None and last[1] is not None and s <= last[1]:
            out[-1] = (last[0], max(last[1], e))
        else:
            out.append((s, e))
    if running is not None:
        out.append((running, None))
    return out


def roots_summary(names: Sequence[str], total: int) -> tuple[list[str], int]:
    """The names of a build's first requested derivations (without ``.drv``) and how many
    more it requested (of ``total``)."""
    return [n.removesuffix(".drv") for n in names], max(0, total - len(names))
