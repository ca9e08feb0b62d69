"""Tables of the read commands (``bigtent builds``, ``steps``, ``agents``, ...): column widths
that fit the terminal without cutting names, and human times.

Rich shrinks every column of a table that is too wide, down to cutting a name to ``local…``
and headers to ``conne/cted``. Here the widths are decided first (``fit_widths``, pure): key
columns (ids, names) keep their full width, the other columns give up space widest first,
down to their longest word, and fold only words longer than that. A table that cannot fit even
then is printed wider than the terminal rather than cut.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from rich import box
from rich.console import Console
from rich.table import Table

from bigtent import humanize
from bigtent.apimodels import Build, Step

PIPE_WIDTH = 250
"""Width of output into a pipe or file without ``COLUMNS``: wide lines, nothing wrapped."""
FOLD_WORD_CHARS = 12
"""A word of a non-key column longer than this may be folded over lines."""
COLUMN_GAP = 3
"""Characters between two columns (rich's padding and the blank column divider)."""

_WORD = re.compile(r"\S+")


@dataclass(frozen=True, slots=True)
class Column:
    header: str
    key: bool = False
    """Never narrowed below its longest cell: ids and names (what a reader copies) and short
    values that read badly folded (times, durations)."""


def terminal_width() -> int:
    """``COLUMNS`` when set (a test, or the user's choice), else the terminal's width, else
    ``PIPE_WIDTH`` for a pipe."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    if sys.stdout.isatty():
        return os.get_terminal_size(sys.stdout.fileno()).columns
    return PIPE_WIDTH


def _longest_word(text: str) -> int:
    return max((len(w) for w in _WORD.findall(text)), default=0)


def _longest_line(text: str) -> int:
    return max((len(line) for line in text.splitlines()), default=0)


def fit_widths(columns: Sequence[Column], rows: Sequence[Sequence[str]], width: int) -> list[int]:
    """Each column's width so that the table is at most ``width`` wide if it can be (pure).

    A column starts at its widest cell (or header). While the table is too wide, the widest
    column that can still give up space gives one character; a key column cannot, another
    column not below its longest header word nor its longest word (up to
    ``FOLD_WORD_CHARS``)."""
    natural: list[int] = []
    floor: list[int] = []
    for i, col in enumerate(columns):
        cells = [row[i] for row in rows]
        wide = max([_longest_line(col.header), *(_longest_line(c) for c in cells)])
        natural.append(max(1, wide))
        if col.key:
            floor.append(natural[-1])
        else:
            word = max([0, *(_longest_word(c) for c in cells)])
            floor.append(max(1, _longest_word(col.header), min(word, FOLD_WORD_CHARS)))
    widths = list(natural)
    budget = width - COLUMN_GAP * max(0, len(columns) - 1)
    excess = sum(widths) - budget
    while excess > 0:
        give = [i for i in range(len(widths)) if widths[i] > floor[i]]
        if not give:
            break
        widest = max(give, key=lambda i: (widths[i], i))
        widths[widest] -= 1
        excess -= 1
    return widths


def render_table(
    columns: Sequence[Column], rows: Sequence[Sequence[str]], width: int | None = None
) -> tuple[Table, int]:
    """The rich table with fitted column widths, and the console width to print it at (the
    terminal's, or more when even the narrowest fit is wider)."""
    width = terminal_width() if width is None else width
    widths = fit_widths(columns, rows, width)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, highlight=False)
    for col, w in zip(columns, widths, strict=True):
        table.add_column(col.header, width=w, overflow="fold", no_wrap=col.key)
    for row in rows:
        table.add_row(*row)
    needed = sum(widths) + COLUMN_GAP * max(0, len(columns) - 1)
    return table, max(width, needed)


def print_table(columns: Sequence[Column], rows: Sequence[Sequence[str]]) -> None:
    """Print a table on stdout, fitted to the terminal (``render_table``)."""
    table, width = render_table(columns, rows)
    Console(highlight=False, width=width, soft_wrap=False).print(table)


def now_utc() -> datetime:
    return datetime.now(UTC)


# ---- the read commands' rows (pure) -----------------------------------------------------------


def drv_name(path: str) -> str:
    """``hello-2.12`` of ``/nix/store/<hash>-hello-2.12.drv``."""
    base = path.rsplit("/", 1)[-1]
    name = base.split("-", 1)[1] if "-" in base else base
    return name.removesuffix(".drv")


def build_trust(b: Build) -> str:
    """``trusted`` or ``untrusted``, with the repository and ref when the build names them."""
    where = "@".join(x for x in (b.repository, b.ref) if x)
    return ("trusted" if b.trusted else "untrusted") + (f" {where}" if where else "")


def _took(start: str | None, end: str | None) -> str:
    secs = humanize.seconds_between(start, end)
    return humanize.duration(secs) if secs is not None else "-"


BUILD_COLUMNS = (
    Column("id", key=True),
    Column("state"),
    Column("prio"),
    Column("trust"),
    Column("steps"),
    Column("created", key=True),
    Column("took", key=True),
    Column("derivations"),
)


def build_row(b: Build, now: datetime) -> list[str]:
    """A row of ``bigtent builds``: steps done of all (``cached``: none were needed), when it
    was created, how long it took, the first requested derivations."""
    c = b.counts
    names = [drv_name(r.drv_path) for r in b.roots]
    shown = ", ".join(names[:3]) + (f" +{len(names) - 3}" if len(names) > 3 else "")
    return [
        str(b.id),
        b.state.value,
        str(b.priority),
        build_trust(b),
        f"{c.succeeded + c.failed + c.cancelled}/{c.total}" if c.total else "cached",
        humanize.relative_iso(b.created_at, now),
        _took(b.created_at, b.finished_at),
        shown,
    ]


STEP_COLUMNS = (
    Column("id", key=True),
    Column("name", key=True),
    Column("state", key=True),
    Column("agent", key=True),
    Column("retries"),
    Column("started", key=True),
    Column("took", key=True),
    Column("outcome"),
)


def step_row(s: Step, now: datetime) -> list[str]:
    """A row of ``bigtent steps``: its infrastructure retries, when it started, how long it
    took, and how it ended (the error's first line) or why it waits for capacity."""
    started = s.started_at or s.assigned_at
    shown = s.outcome if s.outcome != "success" else None
    error = next((line.strip() for line in (s.error or "").splitlines() if line.strip()), None)
    outcome = ": ".join(x for x in (shown, error) if x)
    return [
        str(s.id),
        s.name or drv_name(s.drv_path),
        s.state,
        s.agent_name or "-",
        str(s.attempts),
        humanize.relative_iso(started, now),
        _took(started, s.finished_at),
        s.waiting_reason or outcome or "-",
    ]


__all__ = [
    "BUILD_COLUMNS",
    "STEP_COLUMNS",
    "Column",
    "build_row",
    "build_trust",
    "drv_name",
    "fit_widths",
    "now_utc",
    "print_table",
    "render_table",
    "step_row",
    "terminal_width",
]
