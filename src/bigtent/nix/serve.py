"""Nix's legacy serve protocol (``nix-store --serve --write``), as Hydra's queue runner and Nix's
``ssh://`` store speak it: the framing and the commands the agent uses, plus one connection to a
long-lived serve process.

Wire format (``src/libutil/serialise.hh``): integers are little-endian u64; a string is its
length as u64, the bytes, then zero padding to a multiple of 8; a list or set is a count, then
its items; a map is a count, then key and value per entry.

Session (``src/nix-store/nix-store.cc`` ``opServe``, ``src/libstore/serve-protocol.hh``):
the client sends ``SERVE_MAGIC_1``; the server answers ``SERVE_MAGIC_2`` and its version
(``major << 8 | minor``); the client sends its own version. Every field that depends on the
version depends on the lower of the two minors (``negotiated``). Then commands, one at a time:

- ``cmdQueryValidPaths``: lock (u64 bool), substitute (u64 bool), paths; with ``--write`` and
  substitute set, the server first substitutes what is missing (with its configured
  substituters); reply: the valid subset.
- ``cmdBuildDerivation``: the .drv path, a ``BasicDerivation`` (outputs as name, path, hash
  algorithm, hash; input sources; platform; builder; args; env), then the build options
  (``BuildOptions``); reply: a ``BuildResult``. The build log goes to the server's stderr.

Nothing here spawns Nix or touches the network except ``ServeConnection``, which drives a
process that ``NixStore.spawn_serve`` started. The encoders and decoders are pure.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import struct
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TypeVar

from bigtent.errors import NixError
from bigtent.nix.drv import Derivation

SERVE_MAGIC_1 = 0x390C9DEB
SERVE_MAGIC_2 = 0x5452EECB
PROTOCOL_MAJOR = 0x200
CLIENT_MINOR = 7
"""The newest minor this client speaks (Nix 2.8 serves 2.7)."""
CLIENT_VERSION = PROTOCOL_MAJOR | CLIENT_MINOR
MIN_SERVER_MINOR = 2
"""Below 2.2 there is no max log size; we do not speak to such servers."""

CMD_QUERY_VALID_PATHS = 1
CMD_BUILD_DERIVATION = 8

MAX_STRING_BYTES = 64 * 1024 * 1024
"""Refuse to buffer a reply string longer than this (an error message, a realisation)."""
MAX_LIST_ITEMS = 1 << 20

_U64 = struct.Struct("<Q")
T = TypeVar("T")


class ServeProtocolError(NixError):
    """The serve process said something this client does not understand, or went away."""


class NeedMore(Exception):
    """The buffer ends before the value does: read more and decode again."""


# ---------------------------------------------------------------------------- encoding


def put_int(n: int) -> bytes:
    if not 0 <= n < 1 << 64:
        raise ValueError(f"{n} does not fit in a u64")
    return _U64.pack(n)


def put_str(s: str | bytes) -> bytes:
    data = s.encode() if isinstance(s, str) else s
    return _U64.pack(len(data)) + data + b"\0" * (-len(data) % 8)


def put_strs(items: Iterable[str | bytes]) -> bytes:
    items = list(items)
    return put_int(len(items)) + b"".join(put_str(i) for i in items)


def put_map(items: Mapping[str, str]) -> bytes:
    parts = [put_int(len(items))]
    for key in sorted(items):
        parts += [put_str(key), put_str(items[key])]
    return b"".join(parts)


def negotiated_minor(server_version: int) -> int:
    """The minor both sides use: the lower of ours and the server's."""
    return min(CLIENT_MINOR, server_version & 0xFF)


@dataclass(frozen=True, slots=True)
class BuildOptions:
    """What ``getBuildSettings`` reads after a build command (0 = no limit)."""

    max_silent_secs: int = 0
    build_timeout_secs: int = 0
    max_log_bytes: int = 0
    keep_failed: bool = False


def encode_build_options(options: BuildOptions, minor: int) -> bytes:
    """Exactly the fields a server of this minor reads: silent time and timeout always; max
    log size from 2.2; repeats (0) and enforce-determinism (0) from 2.3; keep-failed from 2.7."""
    parts = [put_int(options.max_silent_secs), put_int(options.build_timeout_secs)]
    if minor >= 2:
        parts.append(put_int(options.max_log_bytes))
    if minor >= 3:
        parts += [put_int(0), put_int(0)]
    if minor >= 7:
        parts.append(put_int(int(options.keep_failed)))
    return b"".join(parts)


@dataclass(frozen=True, slots=True)
class BasicDerivation:
    """A derivation without input derivations: what ``cmdBuildDerivation`` carries. Its input
    sources are the derivation's input sources plus the outputs it uses of its input
    derivations; the build runs in a closure of exactly those paths."""

    outputs: Mapping[str, tuple[str, str, str]]
    """Output name -> (path, hash algorithm, hash), as in the .drv."""
    input_srcs: frozenset[str]
    platform: str
    builder: str
    args: tuple[str, ...]
    env: Mapping[str, str]

    @classmethod
    def of(cls, drv: Derivation, input_outputs: Iterable[str]) -> BasicDerivation:
        """``drv`` with ``input_outputs`` (the paths of the outputs it uses of its input
        derivations) folded into its input sources."""
        return cls(
            outputs={n: (o.path, o.hash_algo, o.hash) for n, o in drv.outputs.items()},
            input_srcs=frozenset({*drv.input_srcs, *input_outputs}),
            platform=drv.system,
            builder=drv.builder,
            args=drv.args,
            env=dict(drv.env),
        )


def encode_basic_derivation(drv: BasicDerivation) -> bytes:
    """``writeDerivation`` (``src/libstore/derivations.cc``)."""
    parts = [put_int(len(drv.outputs))]
    for name in sorted(drv.outputs):
        path, algo, hash_ = drv.outputs[name]
        parts += [put_str(name), put_str(path), put_str(algo), put_str(hash_)]
    parts += [
        put_strs(sorted(drv.input_srcs)),
        put_str(drv.platform),
        put_str(drv.builder),
        put_strs(drv.args),
        put_map(drv.env),
    ]
    return b"".join(parts)


def encode_query_valid_paths(
    paths: Iterable[str], *, lock: bool = False, substitute: bool = True
) -> bytes:
    return (
        put_int(CMD_QUERY_VALID_PATHS)
        + put_int(int(lock))
        + put_int(int(substitute))
        + put_strs(sorted(set(paths)))
    )


def encode_build_derivation(
    drv_path: str, drv: BasicDerivation, options: BuildOptions, minor: int
) -> bytes:
    return (
        put_int(CMD_BUILD_DERIVATION)
        + put_str(drv_path)
        + encode_basic_derivation(drv)
        + encode_build_options(options, minor)
    )


# ---------------------------------------------------------------------------- decoding


class Cursor:
    """Reads wire values from a bytes buffer; raises ``NeedMore`` at its end."""

    def __init__(self, data: bytes | bytearray | memoryview, pos: int = 0) -> None:
        self.data = memoryview(data)
        self.pos = pos

    def _take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise NeedMore
        view = self.data[self.pos : self.pos + n]
        self.pos += n
        return view

    def u64(self) -> int:
        return int(_U64.unpack(self._take(8))[0])

    def flag(self) -> bool:
        return self.u64() != 0

    def blob(self, limit: int = MAX_STRING_BYTES) -> bytes:
        n = self.u64()
        if n > limit:
            raise ServeProtocolError(f"serve protocol: a string of {n} bytes (limit {limit})")
        data = bytes(self._take(n))
        pad = self._take(-n % 8)
        if any(pad):
            raise ServeProtocolError("serve protocol: non-zero string padding")
        return data

    def text(self, limit: int = MAX_STRING_BYTES) -> str:
        return self.blob(limit).decode(errors="replace")

    def count(self) -> int:
        n = self.u64()
        if n > MAX_LIST_ITEMS:
            raise ServeProtocolError(f"serve protocol: a list of {n} items")
        return n

    def strs(self) -> list[str]:
        return [self.text() for _ in range(self.count())]


def decode_server_hello(buf: bytes | bytearray) -> tuple[int, int]:
    """``SERVE_MAGIC_2`` and the server's version -> (server version, bytes used)."""
    cur = Cursor(buf)
    magic = cur.u64()
    if magic != SERVE_MAGIC_2:
        raise ServeProtocolError(f"serve protocol mismatch: magic {magic:#x}")
    version = cur.u64()
    if version & 0xFF00 != PROTOCOL_MAJOR or version & 0xFF < MIN_SERVER_MINOR:
        raise ServeProtocolError(
            f"unsupported serve protocol {version >> 8}.{version & 0xFF} "
            f"(this client speaks {PROTOCOL_MAJOR >> 8}.{MIN_SERVER_MINOR}-{CLIENT_MINOR})"
        )
    return version, cur.pos


def decode_path_set(buf: bytes | bytearray) -> tuple[set[str], int]:
    cur = Cursor(buf)
    return set(cur.strs()), cur.pos


class BuildStatus(IntEnum):
    """``BuildResult::Status`` (``src/libstore/build-result.hh``)."""

    BUILT = 0
    SUBSTITUTED = 1
    ALREADY_VALID = 2
    PERMANENT_FAILURE = 3
    INPUT_REJECTED = 4
    OUTPUT_REJECTED = 5
    TRANSIENT_FAILURE = 6
    CACHED_FAILURE = 7
    TIMED_OUT = 8
    MISC_FAILURE = 9
    DEPENDENCY_FAILED = 10
    LOG_LIMIT_EXCEEDED = 11
    NOT_DETERMINISTIC = 12
    RESOLVES_TO_ALREADY_VALID = 13
    NO_SUBSTITUTERS = 14

    @property
    def success(self) -> bool:
        return self in _SUCCESS


_SUCCESS = frozenset(
    {
        BuildStatus.BUILT,
        BuildStatus.SUBSTITUTED,
        BuildStatus.ALREADY_VALID,
        BuildStatus.RESOLVES_TO_ALREADY_VALID,
    }
)


@dataclass(frozen=True, slots=True)
class BuildResult:
    status: BuildStatus | int
    """A ``BuildStatus``, or the raw number when this client does not know it."""
    error_msg: str = ""
    times_built: int = 0
    is_non_deterministic: bool = False
    start_time: int = 0
    stop_time: int = 0
    built_outputs: dict[str, str] = field(default_factory=dict)
    """From 2.6: DrvOutput id (``sha256:…!out``) -> realisation JSON, as the server sent them."""


def encode_build_result(result: BuildResult, minor: int) -> bytes:
    """What a server of this minor writes (the other side, for tests)."""
    parts = [put_int(int(result.status)), put_str(result.error_msg)]
    if minor >= 3:
        parts += [
            put_int(result.times_built),
            put_int(int(result.is_non_deterministic)),
            put_int(result.start_time),
            put_int(result.stop_time),
        ]
    if minor >= 6:
        parts.append(put_map(result.built_outputs))
    return b"".join(parts)


def decode_build_result(buf: bytes | bytearray, minor: int) -> tuple[BuildResult, int]:
    cur = Cursor(buf)
    raw = cur.u64()
    status: BuildStatus | int = BuildStatus(raw) if raw in BuildStatus._value2member_map_ else raw
    error = cur.text()
    times_built, non_det, start, stop = 0, False, 0, 0
    if minor >= 3:
        times_built, non_det, start, stop = cur.u64(), cur.flag(), cur.u64(), cur.u64()
    built: dict[str, str] = {}
    if minor >= 6:
        for _ in range(cur.count()):
            key = cur.text()
            built[key] = cur.text()
    return BuildResult(status, error, times_built, non_det, start, stop, built), cur.pos


# ---------------------------------------------------------------------------- connection

LineSink = Callable[[str], Awaitable[None] | None]
STDERR_READ_BYTES = 64 * 1024
STDERR_TAIL_BYTES = 16 * 1024
STDOUT_READ_BYTES = 64 * 1024


class ServeConnection:
    """One ``nix-store --serve --write`` process: commands in on stdin, replies on stdout, the
    log of whatever it is doing on stderr, line by line, to the current ``sink``.

    stderr is a pipe this object reads itself (not an asyncio transport), so that once a reply
    has arrived everything Nix logged before it can be read at once: Nix writes the log before
    the reply, so when the reply is here the log is in the pipe (``drain_log``).
    One command at a time; a connection that failed or was killed is dead and is replaced.
    """

    def __init__(self, proc: asyncio.subprocess.Process, stderr_fd: int) -> None:
        self.proc = proc
        self._stderr_fd = stderr_fd
        self._stdout = proc.stdout
        self._buf = bytearray()
        self._partial = bytearray()
        self.tail = bytearray()
        self.sink: LineSink | None = None
        self.minor = 0
        self.server_version = 0
        self._dead = False
        self._stderr_eof = False
        self._paused: asyncio.Future[None] | None = None
        self._loop = asyncio.get_running_loop()
        os.set_blocking(stderr_fd, False)
        self._loop.add_reader(stderr_fd, self._on_stderr)

    @property
    def alive(self) -> bool:
        return not self._dead and self.proc.returncode is None

    async def handshake(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(put_int(SERVE_MAGIC_1))
        version = await self._reply(decode_server_hello)
        self.server_version = version
        self.minor = negotiated_minor(version)
        self.proc.stdin.write(put_int(CLIENT_VERSION))
        await self._drain_stdin()

    async def query_valid_paths(
        self, paths: Iterable[str], *, lock: bool = False, substitute: bool = True
    ) -> set[str]:
        """The valid subset of ``paths``, after substituting the missing ones if asked."""
        await self._send(encode_query_valid_paths(paths, lock=lock, substitute=substitute))
        return await self._reply(decode_path_set)

    async def build_derivation(
        self, drv_path: str, drv: BasicDerivation, options: BuildOptions
    ) -> BuildResult:
        await self._send(encode_build_derivation(drv_path, drv, options, self.minor))
        minor = self.minor
        return await self._reply(lambda buf: decode_build_result(buf, minor))

    def drain_log(self) -> None:
        """Deliver every log line already written (call after a reply, before the next
        command, to give a step all of its log)."""
        self._on_stderr(force=True)

    def kill(self) -> None:
        """Kill the process (and what it started in its process group); the connection is
        dead from now on."""
        self._dead = True
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, 9)

    async def close(self, timeout: float = 5.0) -> None:
        """Stop the process: closing stdin ends it between commands; kill what is left."""
        self._dead = True
        if self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.kill()
            await self.proc.wait()
        self._close_stderr()

    def _close_stderr(self) -> None:
        if self._stderr_fd >= 0:
            self._loop.remove_reader(self._stderr_fd)
            os.close(self._stderr_fd)
            self._stderr_fd = -1

    async def wait_closed(self) -> None:
        """After ``kill``: reap the process and release the pipe."""
        with contextlib.suppress(ProcessLookupError):
            await self.proc.wait()
        self._close_stderr()

    # ---- plumbing --------------------------------------------------------------------
    async def _send(self, data: bytes) -> None:
        if not self.alive:
            raise ServeProtocolError("the serve process is not running")
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        await self._drain_stdin()

    async def _drain_stdin(self) -> None:
        assert self.proc.stdin is not None
        try:
            await self.proc.stdin.drain()
        except (ConnectionError, BrokenPipeError) as exc:
            self._dead = True
            raise self._gone(f"writing to it failed: {exc}") from exc

    async def _reply(self, decode: Callable[[bytearray], tuple[T, int]]) -> T:
        assert self._stdout is not None
        while True:
            try:
                value, used = decode(self._buf)
            except NeedMore:
                pass
            except ServeProtocolError:
                self._dead = True
                raise
            else:
                del self._buf[:used]
                return value
            chunk = await self._stdout.read(STDOUT_READ_BYTES)
            if not chunk:
                self._dead = True
                # Whatever it said last explains why.
                self.drain_log()
                raise self._gone("it closed its output")
            self._buf += chunk

    def _gone(self, what: str) -> ServeProtocolError:
        tail = self.tail.decode(errors="replace")
        lines = [line for line in tail.strip().splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:")]
        last = errors[-1] if errors else (lines[-1] if lines else "")
        return ServeProtocolError(
            f"nix-store --serve: {what}" + (f": {last}" if last else ""), stderr=tail
        )

    def _on_stderr(self, force: bool = False) -> None:
        """Read what stderr has (up to the end of what is there) and hand out whole lines."""
        if self._stderr_fd < 0 or self._stderr_eof or (self._paused is not None and not force):
            return
        while True:
            try:
                chunk = os.read(self._stderr_fd, STDERR_READ_BYTES)
            except BlockingIOError:
                break
            except OSError:
                chunk = b""
            if not chunk:
                self._stderr_eof = True
                self._loop.remove_reader(self._stderr_fd)
                if self._partial:
                    self._line(bytes(self._partial), force)
                    self._partial.clear()
                break
            self.tail += chunk
            del self.tail[:-STDERR_TAIL_BYTES]
            self._partial += chunk
            *lines, rest = self._partial.split(b"\n")
            self._partial[:] = rest
            for line in lines:
                self._line(line, force)
            if self._paused is not None and not force:
                break

    def _line(self, line: bytes | bytearray, force: bool) -> None:
        if self.sink is None:
            return
        waiter = self.sink(line.decode(errors="replace").rstrip("\r"))
        if waiter is None:
            return
        if force or self._paused is not None:
            # Already paused, or delivering the rest of a reply's log: no waiting.
            if inspect.iscoroutine(waiter):
                waiter.close()
            return
        # Backpressure: stop reading (Nix blocks on a full pipe) until the sink catches up.
        self._loop.remove_reader(self._stderr_fd)
        self._paused = asyncio.ensure_future(waiter)
        self._paused.add_done_callback(self._resume)

    def _resume(self, _: object) -> None:
        self._paused = None
        if self._stderr_fd >= 0 and not self._stderr_eof:
            self._loop.add_reader(self._stderr_fd, self._on_stderr)
            self._on_stderr()
