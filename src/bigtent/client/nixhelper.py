"""The helper behind ``bigtent-nix-hook``: one long-lived process per runner and credential.

Nix starts a new hook process for every derivation it builds remotely. Doing the farm's side
there would pay, per derivation, for importing the HTTP client, a new connection and the
credential; the hook instead hands the accepted derivation to this helper over a Unix socket
(one JSON line: ``{"drv", "wanted", "store"}``) and relays what it answers, lines of
``log TEXT``, ``error TEXT`` and last ``exit STATUS`` (``TEXT`` escaped to one line:
``hookentry.relay`` reads them without importing ``json``). The helper runs
``hookfarm.build_on_farm`` with one shared ``RunnerClient`` for every derivation, concurrently.

The first hook that finds no helper starts one (``hookhandover.start_helper``); a lock file next to
the socket makes sure only one serves, the others exit at once. The helper exits after
``--helper-idle`` seconds without a derivation. Its socket is mode 0600 in a directory only
its user may enter.

    python -m bigtent.client.nixhelper [hook options] --socket PATH
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import sys
import time
from collections.abc import Coroutine, Sequence
from typing import Any

from bigtent.client.api import RunnerClient
from bigtent.client.hookcommon import HookConfig
from bigtent.client.hookentry import escape_line
from bigtent.client.hookfarm import FarmMemory, build_on_farm, runner_client
from bigtent.client.nixhook import parse_args
from bigtent.errors import BigtentError

log = logging.getLogger(__name__)
MAX_REQUEST_BYTES = 64 * 1024


class StreamSink:
    """Log lines, errors and the exit status as reply lines to the hook (``log TEXT``,
    ``error TEXT``, ``exit N``: ``hookentry.relay`` reads them without ``json``)."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer

    def _send(self, kind: str, text: str) -> None:
        if not self.writer.is_closing():
            self.writer.write(f"{kind} {escape_line(text)}\n".encode(errors="replace"))

    def line(self, text: str) -> None:
        self._send("log", text)

    def error(self, text: str) -> None:
        self._send("error", text)

    def exit(self, code: int) -> None:
        self._send("exit", str(code))


def parse_request(raw: bytes) -> tuple[str, list[str], str]:
    """The derivation, the wanted outputs and the local store of one request; ValueError for
    anything else."""
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("a request is a JSON object")
    drv, wanted, store = data.get("drv"), data.get("wanted"), data.get("store")
    if not isinstance(drv, str) or not drv.startswith("/") or not drv.endswith(".drv"):
        raise ValueError(f"not a derivation path: {drv!r}")
    if not isinstance(wanted, list) or not all(isinstance(w, str) for w in wanted):
        raise ValueError("wanted must be a list of output names")
    if not isinstance(store, str):
        raise ValueError("store must be a string")
    return drv, wanted, store


async def until_hook_leaves(
    reader: asyncio.StreamReader, work: Coroutine[Any, Any, int]
) -> int | None:
    """``work``'s result, or None once the hook closes its side first (Nix was interrupted
    and killed it): then the work is cancelled. The build on the farm goes on, as after an
    interrupted ``bigtent build``; a later run finds it built or building."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(reader.read())  # the hook sends nothing after its request
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return None
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()


class Helper:
    def __init__(self, config: HookConfig) -> None:
        self.config = config
        self.active = 0
        self.last_activity = time.monotonic()
        self._client: RunnerClient | None = None
        self.memory = FarmMemory()
        self.changed = asyncio.Event()
        """Set when a derivation starts or ends (``until_idle`` looks again)."""

    async def client(self) -> RunnerClient:
        """One client for every derivation (a CI job's ID token is asked for anew each time:
        it expires)."""
        if self.config.oidc_audience is not None:
            return await runner_client(self.config)
        if self._client is None:
            self._client = await runner_client(self.config)
        return self._client

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.active += 1
        self.changed.set()
        sink = StreamSink(writer)
        try:
            try:
                drv, wanted, store = parse_request(await reader.readline())
            except ValueError as exc:
                sink.error(f"bad request to the helper: {exc}")
                sink.exit(1)
                return
            try:
                client = await self.client()
            except BigtentError as exc:
                sink.error(f"cannot build {drv} on the farm: {exc}")
                sink.exit(1)
                return
            try:
                code = await until_hook_leaves(
                    reader,
                    build_on_farm(self.config, store, drv, wanted, sink, client, self.memory),
                )
            finally:
                if client is not self._client:
                    await client.aclose()
            if code is None:
                log.info("the hook for %s went away (Nix stopped): no longer following it", drv)
                return
            sink.exit(code)
        except Exception as exc:  # one derivation's surprise must not end the helper
            log.exception("building a derivation failed")
            sink.error(f"the helper failed: {exc}")
            sink.exit(1)
        finally:
            self.active -= 1
            self.last_activity = time.monotonic()
            self.changed.set()
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            writer.close()

    async def until_idle(self) -> None:
        """Return once no derivation was asked for or built for ``helper_idle_secs``."""
        while True:
            self.changed.clear()
            if self.active:
                await self.changed.wait()
                continue
            remaining = self.config.helper_idle_secs - (time.monotonic() - self.last_activity)
            if remaining <= 0:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self.changed.wait()

    async def serve(self, path: str) -> int:
        lock_fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            return 0  # another helper serves this socket
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            old = os.umask(0o177)
            try:
                server = await asyncio.start_unix_server(self.handle, path=path)
            finally:
                os.umask(old)
            log.info("helper for %s listening on %s", self.config.runner_url, path)
            async with server:
                await self.until_idle()
            log.info("helper idle for %.0f s: exiting", self.config.helper_idle_secs)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return 0
        finally:
            if self._client is not None:
                await self._client.aclose()
            os.close(lock_fd)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("httpx", "httpcore"):  # a line per request: the log is appended to
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        config = parse_args(sys.argv[1:] if argv is None else argv, os.environ)
        if not config.socket:
            raise ValueError("the helper needs --socket")
    except ValueError as exc:
        print(f"bigtent nix-hook helper: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(Helper(config).serve(config.socket))


if __name__ == "__main__":
    sys.exit(main())
