"""Optional imports that are known to fail, made to fail at once.

httpcore (under httpx) runs ``import sniffio`` inside ``current_async_library`` several times
per request, and falls back to asyncio when it fails. sniffio is optional (anyio no longer
needs it) and not installed here, so every one of those imports searched ``sys.path`` anew:
~60 µs each, about a tenth of an agent's CPU per step (py-spy, ``docs/benchmarks.md``
"Where the time goes"). A ``None`` in ``sys.modules`` makes such an import raise the same
``ImportError`` without the search (the import system's documented way to block a module).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterable
from importlib.machinery import ModuleSpec

ABSENT_OPTIONAL = ("sniffio",)
"""Modules libraries try to import on hot paths and do without."""


def block_absent(
    names: Iterable[str] = ABSENT_OPTIONAL,
    find_spec: Callable[[str], ModuleSpec | None] = importlib.util.find_spec,
) -> list[str]:
    """Make each of ``names`` that is not installed fail to import at once; -> those blocked.
    A module that is installed (or already imported) is left alone."""
    blocked = []
    for name in names:
        if name not in sys.modules and find_spec(name) is None:
            sys.modules[name] = None  # type: ignore[assignment]
            blocked.append(name)
    return blocked
