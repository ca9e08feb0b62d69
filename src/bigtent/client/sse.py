"""A step's live log as server-sent events (``GET /api/v1/steps/{id}/events``), parsed a
line at a time (pure)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from bigtent.errors import ProtocolError

LOG_STREAM_READ_SECS = 60.0
"""Silence after which a live log stream counts as broken (the runner sends a keep-alive
comment every 15 s)."""


@dataclass(frozen=True, slots=True)
class LogEvent:
    """One event of a step's live log stream."""

    text: str = ""
    """Log text (a ``log`` event; not necessarily whole lines)."""
    offset: int = 0
    """The log offset after this event: where to ask again from."""
    end_state: str | None = None
    """Set by the ``end`` event: the step's final state."""
    reset: bool = False
    """The log started afresh: what was shown of it before is stale."""


class SseParser:
    """Server-sent events, a line at a time (the runner's ``event:``, ``data:`` and ``id:``
    fields; ``data`` is JSON). ``feed`` returns an event at the blank line ending it."""

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None

    def feed(self, line: str) -> LogEvent | None:
        if line:
            if line.startswith(":"):
                return None
            name, _, field_value = line.partition(":")
            field_value = field_value.removeprefix(" ")
            if name == "event":
                self._event = field_value
            elif name == "data":
                self._data.append(field_value)
            elif name == "id":
                self._id = field_value
            return None
        event, data, ident = self._event, "\n".join(self._data), self._id
        self._event, self._data, self._id = "", [], None
        offset = int(ident) if ident is not None and ident.isdigit() else 0
        try:
            value: Any = json.loads(data) if data else None
        except ValueError as exc:
            raise ProtocolError(f"runner sent a malformed log event: {data[:200]!r}") from exc
        if event == "log" and isinstance(value, str):
            return LogEvent(text=value, offset=offset)
        if event == "end":
            state = value.get("state") if isinstance(value, dict) else None
            return LogEvent(offset=offset, end_state=str(state or "unknown"))
        if event == "reset":
            return LogEvent(reset=True)
        return None
