"""``bigtent nix-proxy``: a Nix store on a Unix socket whose builds run on the farm.

``nix build --store unix:///PATH`` (or ``store = unix://…`` in nix.conf) talks Nix's daemon
protocol to this process. For each connection it starts the real store's daemon side
(``nix-daemon --stdio``, with ``--store``) and relays the protocol both ways, reading only
the client's ops (``nix/daemonwire.py``). A build op (``BuildPaths``,
``BuildPathsWithResults``, ``BuildDerivation``) is held back: the derivations whose outputs
the local store lacks are uploaded with their closure, submitted as ONE build (the farm gets
the whole DAG at once), followed with the root steps' logs sent to Nix as ``STDERR_NEXT``
lines, and their outputs copied from the runner's cache into the local store, signatures
checked by Nix. Then the op goes to the real daemon, which finds the outputs valid and builds
nothing. A failed build answers the op with ``STDERR_ERROR`` (the failed steps, their log
tails): Nix's command fails with it. Architecture §"Plain nix-build on the farm".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from bigtent.client.hooklogs import PhaseClock, RootLogs, build_and_follow
from bigtent.nix import daemonwire as wire
from bigtent.nix.store import spawn_daemon_stdio

if TYPE_CHECKING:
    from bigtent.client.api import RunnerClient

log = logging.getLogger(__name__)
_T = TypeVar("_T")

READ_CHUNK = 1 << 16
DAEMON_EXIT_SECS = 5.0
"""How long the store's daemon may take to exit after the client left."""
PROBE_TIMEOUT_SECS = 5.0
"""How long the runner may take to answer the first request of a build."""


@dataclass(frozen=True)
class ProxyConfig:
    runner_url: str
    connect: Callable[[], RunnerClient]
    """A client for the runner with the credential (not yet open)."""
    socket: str
    store: str = ""
    """The local store the outputs land in ("": Nix's default store)."""
    nix_daemon: str = "nix-daemon"
    public_keys: tuple[str, ...] = ()
    """Trust only these keys for the outputs; empty: the keys the runner names."""
    poll_interval_secs: float = 0.1
    unreachable_grace_secs: float = 10.0


class ClientSink:
    """The farm's log lines to the Nix client, as ``STDERR_NEXT`` messages."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer

    def line(self, text: str) -> None:
        for piece in text.splitlines() or [""]:
            self.writer.write(wire.stderr_next(piece + "\n"))

    def error(self, text: str) -> None:
        self.line(f"bigtent: {text}")


def failure_message(build_id: int, failed: Sequence[tuple[str, str, str]]) -> str:
    """The error Nix shows for a failed farm build: each failed step (derivation, what
    happened, its log tail)."""
    if not failed:
        return f"bigtent: build {build_id} failed on the farm"
    parts = []
    for drv, what, tail in failed:
        text = f"bigtent: building {drv} failed on the farm: {what}"
        if tail.strip():
            lines = tail.rstrip("\n").splitlines()[-25:]
            text += "\nlast log lines:\n" + "\n".join(f"> {line}" for line in lines)
        parts.append(text)
    return "\n".join(parts)


class Farm:
    """The farm's side of the proxy: one per process (one runner client, what it knows)."""

    def __init__(self, config: ProxyConfig) -> None:
        from bigtent.client.hookfarm import FarmMemory
        from bigtent.nix.store import NixStore

        self.config = config
        self.store = NixStore(config.store)
        self.memory = FarmMemory()

    async def wanted(self, drvs: Sequence[str]) -> list[str]:
        """The derivations some output of which the local store lacks (a floating output,
        path unknown, counts as lacking). A ``.drv`` not in the local store (a
        ``BuildDerivation`` of one sent inline) is left to the real daemon."""
        from bigtent.nix.drv import DrvError, parse_drv

        outputs: dict[str, list[str]] = {}
        for drv in dict.fromkeys(drvs):
            try:
                parsed = parse_drv(self.store.real_path(drv).read_text())
            except (OSError, UnicodeDecodeError, DrvError) as exc:
                log.info("%s is left to the local store: %s", drv, exc)
                continue
            outputs[drv] = [o.path for o in parsed.outputs.values()]
        known = [p for paths in outputs.values() for p in paths if p]
        valid = await self.store.valid_paths(known)
        return [d for d, paths in outputs.items() if "" in paths or not valid.issuperset(paths)]

    async def build(self, drvs: Sequence[str], sink: ClientSink) -> str | None:
        """Build ``drvs`` on the farm as one build and copy their outputs into the local
        store; None, or the error Nix shows."""
        from bigtent.client.hookfarm import copy_outputs
        from bigtent.client.observer import SilentObserver
        from bigtent.client.reports import build_succeeded
        from bigtent.client.upload import upload_closure
        from bigtent.errors import BigtentError

        farm = self.config
        observer = SilentObserver()
        try:
            client = farm.connect()
        except BigtentError as exc:
            return f"bigtent: cannot build on the farm: {exc}"
        async with client:
            try:
                async with asyncio.timeout(PROBE_TIMEOUT_SECS):
                    await client.missing_paths(list(drvs))
            except TimeoutError:
                return (
                    f"bigtent: runner at {farm.runner_url} did not answer within "
                    f"{PROBE_TIMEOUT_SECS:.0f} s"
                )
            except BigtentError as exc:
                return f"bigtent: cannot build on the farm ({farm.runner_url}): {exc}"
            logs: RootLogs | None = None
            phases = PhaseClock()
            try:
                await upload_closure(client, self.store, drvs, observer)
                phases.mark("upload")
                logs = RootLogs(client, sink)
                build = await build_and_follow(
                    client,
                    drvs,
                    observer,
                    logs,
                    phases,
                    poll_interval_secs=farm.poll_interval_secs,
                    unreachable_grace_secs=farm.unreachable_grace_secs,
                    what=f" ({len(drvs)} roots)",
                )
                await logs.finish(build)
                phases.mark("build")
                if not build_succeeded(build):
                    failed = [
                        (
                            step.drv_path,
                            ": ".join(x for x in (step.outcome or step.state, step.error) if x),
                            step.log_tail or "",
                        )
                        for step in build.failed_steps
                    ]
                    return failure_message(build.id, failed)
                await copy_outputs(client, self.store, build, (), self.memory, farm.public_keys)
                phases.mark("copy")
                log.info("build %s, %d roots: %s", build.id, len(drvs), phases.summary())
                return None
            except BigtentError as exc:
                return f"bigtent: building on the farm failed: {exc}"
            finally:
                if logs is not None:
                    await logs.stop()


class Relay:
    """One client connection: the real daemon behind it, the protocol relayed both ways."""

    def __init__(
        self, farm: Farm, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.farm = farm
        self.reader = reader
        self.writer = writer
        self.buffer = bytearray()
        self.daemon_version: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def run(self) -> None:
        config = self.farm.config
        daemon = await spawn_daemon_stdio(config.nix_daemon, config.store)
        assert daemon.stdin is not None and daemon.stdout is not None
        pump = asyncio.create_task(self._daemon_to_client(daemon.stdout))
        try:
            await self._client_to_daemon(daemon.stdin, pump)
        except wire.WireError as exc:
            log.warning("closing a Nix connection: %s", exc)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump
            # End of input first: the daemon finishes what it read and exits.
            daemon.stdin.close()
            try:
                await asyncio.wait_for(daemon.wait(), DAEMON_EXIT_SECS)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    daemon.kill()
                await daemon.wait()
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()

    async def _daemon_to_client(self, stdout: asyncio.StreamReader) -> None:
        hello = await stdout.readexactly(16)
        version = wire.read_daemon_hello(hello)
        self.daemon_version.set_result(version)
        self.writer.write(hello[:8] + wire.u64(min(version, wire.PROTOCOL_MAX)))
        while chunk := await stdout.read(READ_CHUNK):
            self.writer.write(chunk)
            await self.writer.drain()
        # The daemon is gone: the client must not wait for an answer that cannot come.
        self.writer.close()

    async def _more(self) -> None:
        chunk = await self.reader.read(READ_CHUNK)
        if not chunk:
            raise ConnectionError("the client left")
        self.buffer += chunk

    async def _take(self, n: int) -> bytes:
        while len(self.buffer) < n:
            await self._more()
        out = bytes(self.buffer[:n])
        del self.buffer[:n]
        return out

    async def _client_to_daemon(
        self, stdin: asyncio.StreamWriter, pump: asyncio.Task[None]
    ) -> None:
        magic = await self._take(8)
        if wire.Reader(magic).u64() != wire.WORKER_MAGIC_1:
            raise wire.WireError("not a Nix daemon protocol client (bad magic)")
        stdin.write(magic)
        await stdin.drain()
        daemon_version = await self.daemon_version
        while True:
            try:
                hello = wire.read_client_hello(magic + bytes(self.buffer), daemon_version)
                break
            except wire.NeedMore:
                await self._more()
        raw = await self._take(hello.size - 8)
        # Both sides use the lower version: the daemon must not see a newer one than the
        # client was told.
        version = min(hello.version, wire.PROTOCOL_MAX)
        stdin.write(wire.u64(version) + raw[8:])
        await stdin.drain()
        minor = wire.negotiated_minor(hello.version, daemon_version)
        if minor < wire.PROTOCOL_MIN_MINOR:
            raise wire.WireError(f"daemon protocol 1.{minor} is older than the proxy reads")
        while True:
            try:
                request = wire.read_request(bytes(self.buffer), minor)
            except wire.NeedMore:
                if pump.done():
                    return
                await self._more()
                continue
            raw = await self._take(request.size)
            if request.op in wire.BUILD_OPS:
                error = await self._build(request)
                if error is not None:
                    self.writer.write(wire.stderr_error(error, minor))
                    await self.writer.drain()
                    continue
            stdin.write(raw)
            if request.framed:
                await self._relay_frames(stdin)
            await stdin.drain()

    async def _relay_frames(self, stdin: asyncio.StreamWriter) -> None:
        while True:
            size = wire.Reader(await self._take(8)).u64()
            stdin.write(wire.u64(size))
            if size == 0:
                return
            while size:
                piece = await self._take(min(size, READ_CHUNK))
                stdin.write(piece)
                size -= len(piece)
                await stdin.drain()

    async def _build(self, request: wire.Request) -> str | None:
        if request.op is wire.Op.BUILD_DERIVATION:
            assert isinstance(request.args[0], bytes)
            drvs = [request.args[0].decode()]
        else:
            paths = request.args[0]
            assert isinstance(paths, list)
            drvs = [drv for drv, _ in wire.derived_drvs([p for p in paths if isinstance(p, bytes)])]
        if not drvs:
            return None
        wanted = await self.farm.wanted(drvs)
        if not wanted:
            return None
        sink = ClientSink(self.writer)
        error = await self._while_connected(self.farm.build(wanted, sink))
        await self.writer.drain()
        return error

    async def _while_connected(self, work: Coroutine[Any, Any, _T]) -> _T:
        """``work``'s result, unless the client closes its side first (Nix was interrupted):
        then following stops (``ConnectionError``) and the farm's build goes on, as after an
        interrupted ``bigtent build``. The client sends nothing while its build op runs."""
        task = asyncio.ensure_future(work)
        gone = asyncio.ensure_future(self.reader.read(READ_CHUNK))
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            task.cancel()
            gone.cancel()
            # Both really ended before the reader is read again.
            await asyncio.gather(task, gone, return_exceptions=True)
        if gone.done() and not gone.cancelled():
            if gone.result():
                raise wire.WireError("the client sent data while its build op ran")
            if task.cancelled():
                raise ConnectionError("the client left during a build")
        return task.result()


async def serve(config: ProxyConfig, ready: asyncio.Event | None = None) -> None:
    """Listen on ``config.socket`` (the user's only) until cancelled."""
    farm = Farm(config)

    async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await Relay(farm, reader, writer).run()
        except OSError as exc:  # no nix-daemon to start
            log.error("cannot serve a Nix connection: %s", exc)
            writer.close()

    with contextlib.suppress(FileNotFoundError):
        os.unlink(config.socket)
    old = os.umask(0o177)
    try:
        server = await asyncio.start_unix_server(connected, path=config.socket)
    finally:
        os.umask(old)
    log.info("nix store proxy on unix://%s for %s", config.socket, config.runner_url)
    async with server:
        if ready is not None:
            ready.set()
        await server.serve_forever()
