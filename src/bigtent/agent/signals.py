"""SIGTERM and SIGINT for a running agent."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def shutdown_signals(request_shutdown: Callable[[], None]) -> Iterator[None]:
    """While inside: SIGTERM and SIGINT call ``request_shutdown`` (the first drains the agent,
    the second aborts its steps). Not installed outside the main thread."""
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, request_shutdown)
        except (NotImplementedError, RuntimeError, ValueError):
            continue  # not the main thread, or not supported here
        installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
