"""Nix's daemon worker protocol, as much as a relay needs (pure: bytes in, values out).

What ``nix-daemon --stdio``, ``unix://`` and ``ssh-ng://`` speak. Numbers are u64 little
endian; a string is its length, its bytes, then zeros to a multiple of 8; a list is its length
then its items. The client opens with ``WORKER_MAGIC_1`` and its version, the daemon answers
``WORKER_MAGIC_2`` and its version, both then use the lower minor. After the handshake the
client sends one op at a time (a number, then the op's arguments, some followed by a framed
source: chunks of u64 length + bytes, unpadded, ending with a 0 length); the daemon answers
with a stream of stderr messages ending in ``STDERR_LAST`` (then the op's reply) or
``STDERR_ERROR``. The client waits for the whole answer before the next op, so a relay that
knows where each op's arguments end knows where the conversation stands without parsing a
single reply. ``layout`` says, per op and protocol minor, what its arguments are.

Checked against a real Nix 2.8 (protocol 1.34) in the tests; 1.35 to 1.37 change only what the
daemon sends in the handshake (its version string, whether the client is trusted) and the
replies. Ops that make the daemon ask the client for data (``STDERR_READ``: ``ImportPaths``,
``AddToStoreNar`` before 1.23) and ops whose argument layout this module does not know are
refused (``UnsupportedOp``): the relay closes the connection rather than desynchronise.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

from bigtent.errors import BigtentError

WORKER_MAGIC_1 = 0x6E697863
"""The client's first number ("cxin")."""
WORKER_MAGIC_2 = 0x6478696F
"""The daemon's answer ("oixd")."""
PROTOCOL_MAX = (1 << 8) | 37
"""The newest protocol the relay parses: a newer daemon's version is lowered to this (1.38
adds a feature exchange to the handshake)."""
PROTOCOL_MIN_MINOR = 25
"""Older clients send ``AddToStore`` with an unframed NAR, which the relay cannot delimit."""


class Stderr(IntEnum):
    """The daemon's messages while an op runs."""

    NEXT = 0x6F6C6D67
    READ = 0x64617461
    WRITE = 0x64617416
    LAST = 0x616C7473
    ERROR = 0x63787470
    START_ACTIVITY = 0x53545254
    STOP_ACTIVITY = 0x53544F50
    RESULT = 0x52534C54


class Op(IntEnum):
    QUIT = 0
    IS_VALID_PATH = 1
    HAS_SUBSTITUTES = 3
    QUERY_PATH_HASH = 4
    QUERY_REFERENCES = 5
    QUERY_REFERRERS = 6
    ADD_TO_STORE = 7
    ADD_TEXT_TO_STORE = 8
    BUILD_PATHS = 9
    ENSURE_PATH = 10
    ADD_TEMP_ROOT = 11
    ADD_INDIRECT_ROOT = 12
    SYNC_WITH_GC = 13
    FIND_ROOTS = 14
    EXPORT_PATH = 16
    QUERY_DERIVER = 18
    SET_OPTIONS = 19
    COLLECT_GARBAGE = 20
    QUERY_SUBSTITUTABLE_PATH_INFO = 21
    QUERY_DERIVATION_OUTPUTS = 22
    QUERY_ALL_VALID_PATHS = 23
    QUERY_FAILED_PATHS = 24
    CLEAR_FAILED_PATHS = 25
    QUERY_PATH_INFO = 26
    IMPORT_PATHS = 27
    QUERY_DERIVATION_OUTPUT_NAMES = 28
    QUERY_PATH_FROM_HASH_PART = 29
    QUERY_SUBSTITUTABLE_PATH_INFOS = 30
    QUERY_VALID_PATHS = 31
    QUERY_SUBSTITUTABLE_PATHS = 32
    QUERY_VALID_DERIVERS = 33
    OPTIMISE_STORE = 34
    VERIFY_STORE = 35
    BUILD_DERIVATION = 36
    ADD_SIGNATURES = 37
    NAR_FROM_PATH = 38
    ADD_TO_STORE_NAR = 39
    QUERY_MISSING = 40
    QUERY_DERIVATION_OUTPUT_MAP = 41
    REGISTER_DRV_OUTPUT = 42
    QUERY_REALISATION = 43
    ADD_MULTIPLE_TO_STORE = 44
    ADD_BUILD_LOG = 45
    BUILD_PATHS_WITH_RESULTS = 46
    ADD_PERM_ROOT = 47


BUILD_OPS = frozenset({Op.BUILD_PATHS, Op.BUILD_PATHS_WITH_RESULTS, Op.BUILD_DERIVATION})
"""The ops the store proxy answers on the farm first."""


class Field(IntEnum):
    """How one argument is laid out."""

    U64 = 1
    STRING = 2
    STRINGS = 3
    """A list of strings."""
    PAIRS = 4
    """A list of string pairs (a map)."""
    OUTPUTS = 5
    """A derivation's outputs: a list of (name, path, hash algorithm, hash)."""


Value = int | bytes | list[bytes] | list[tuple[bytes, ...]]

_DERIVATION = (Field.OUTPUTS, Field.STRINGS, Field.STRING, Field.STRING, Field.STRINGS, Field.PAIRS)
"""A ``BasicDerivation``: outputs, input sources, system, builder, arguments, environment."""


@dataclass(frozen=True)
class Layout:
    fields: tuple[Field, ...]
    framed: bool = False
    """A framed source follows the arguments."""


class WireError(BigtentError):
    """Bytes that do not follow the protocol."""


class UnsupportedOp(WireError):
    """An op whose arguments this module cannot delimit (at this protocol version)."""


class NeedMore(Exception):
    """The buffer ends before the value does: read more and try again."""


_PATH = (Field.STRING,)
_PATHS = (Field.STRINGS,)


def layout(op: int, minor: int) -> Layout:
    """The arguments of ``op`` at protocol ``1.minor``; ``UnsupportedOp`` if unknown."""
    try:
        known = Op(op)
    except ValueError:
        raise UnsupportedOp(f"unknown daemon op {op}") from None
    found = _layout(known, minor)
    if found is None:
        raise UnsupportedOp(f"daemon op {known.name} at protocol 1.{minor} is not supported")
    return found


def _layout(op: Op, minor: int) -> Layout | None:
    U, S, SS = Field.U64, Field.STRING, Field.STRINGS
    match op:
        case (
            Op.IS_VALID_PATH
            | Op.HAS_SUBSTITUTES
            | Op.QUERY_PATH_HASH
            | Op.QUERY_REFERENCES
            | Op.QUERY_REFERRERS
            | Op.ENSURE_PATH
            | Op.ADD_TEMP_ROOT
            | Op.ADD_INDIRECT_ROOT
            | Op.QUERY_DERIVER
            | Op.QUERY_SUBSTITUTABLE_PATH_INFO
            | Op.QUERY_DERIVATION_OUTPUTS
            | Op.QUERY_PATH_INFO
            | Op.QUERY_DERIVATION_OUTPUT_NAMES
            | Op.QUERY_PATH_FROM_HASH_PART
            | Op.QUERY_VALID_DERIVERS
            | Op.NAR_FROM_PATH
            | Op.QUERY_DERIVATION_OUTPUT_MAP
            | Op.QUERY_REALISATION
        ):
            return Layout(_PATH)
        case Op.QUIT | Op.SYNC_WITH_GC | Op.FIND_ROOTS | Op.QUERY_ALL_VALID_PATHS:
            return Layout(())
        case Op.OPTIMISE_STORE | Op.QUERY_FAILED_PATHS:
            return Layout(())
        case Op.QUERY_SUBSTITUTABLE_PATHS | Op.QUERY_MISSING | Op.CLEAR_FAILED_PATHS:
            return Layout(_PATHS)
        case Op.ADD_TO_STORE:
            # name, content-address method, references, repair; then the NAR, framed.
            return Layout((S, S, SS, U), framed=True) if minor >= 25 else None
        case Op.ADD_TEXT_TO_STORE:
            return Layout((S, S, SS))
        case Op.BUILD_PATHS:
            return Layout((SS, U) if minor >= 15 else (SS,))
        case Op.BUILD_PATHS_WITH_RESULTS:
            return Layout((SS, U))
        case Op.BUILD_DERIVATION:
            return Layout((S, *_DERIVATION, U))
        case Op.EXPORT_PATH:
            return Layout((S, U))
        case Op.SET_OPTIONS:
            # keepFailed ... useSubstitutes (12 numbers), then the overrides.
            return Layout((U,) * 12 + ((Field.PAIRS,) if minor >= 12 else ()))
        case Op.COLLECT_GARBAGE:
            return Layout((U, SS, U, U, U, U, U))
        case Op.QUERY_SUBSTITUTABLE_PATH_INFOS:
            return Layout((Field.PAIRS,) if minor >= 22 else _PATHS)
        case Op.QUERY_VALID_PATHS:
            return Layout((SS, U) if minor >= 27 else _PATHS)
        case Op.VERIFY_STORE:
            return Layout((U, U))
        case Op.ADD_SIGNATURES:
            return Layout((S, SS))
        case Op.ADD_TO_STORE_NAR:
            # path, deriver, narHash, references, registrationTime, narSize, ultimate,
            # signatures, content address, repair, dontCheckSigs; then the NAR, framed.
            fields = (S, S, S, SS, U, U, U, SS, S, U, U)
            return Layout(fields, framed=True) if minor >= 23 else None
        case Op.REGISTER_DRV_OUTPUT:
            return Layout((S,) if minor >= 31 else (S, S))
        case Op.ADD_MULTIPLE_TO_STORE:
            return Layout((U, U), framed=True)
        case Op.ADD_BUILD_LOG:
            return Layout(_PATH, framed=True)
        case Op.ADD_PERM_ROOT:
            return Layout((S, S))
        case Op.IMPORT_PATHS:
            return None  # the daemon reads the data with STDERR_READ


# ---- reading ------------------------------------------------------------------------------------


class Reader:
    """Values from the front of ``data``; ``NeedMore`` when it ends too soon (nothing is
    consumed then: ``offset`` says how far a complete read got)."""

    def __init__(self, data: bytes | bytearray | memoryview, offset: int = 0) -> None:
        self.data = memoryview(data)
        self.offset = offset

    def u64(self) -> int:
        end = self.offset + 8
        if end > len(self.data):
            raise NeedMore
        (value,) = struct.unpack_from("<Q", self.data, self.offset)
        self.offset = end
        return int(value)

    def string(self, limit: int = 1 << 26) -> bytes:
        start = self.offset
        length = self.u64()
        if length > limit:
            raise WireError(f"a string of {length} bytes in the daemon protocol")
        end = self.offset + length
        padded = end + (-length % 8)
        if padded > len(self.data):
            self.offset = start
            raise NeedMore
        value = bytes(self.data[self.offset : end])
        self.offset = padded
        return value

    def count(self) -> int:
        n = self.u64()
        if n > 1 << 24:
            raise WireError(f"a list of {n} items in the daemon protocol")
        return n

    def field(self, kind: Field) -> Value:
        start = self.offset
        try:
            match kind:
                case Field.U64:
                    return self.u64()
                case Field.STRING:
                    return self.string()
                case Field.STRINGS:
                    return [self.string() for _ in range(self.count())]
                case Field.PAIRS:
                    return [tuple(self.string() for _ in range(2)) for _ in range(self.count())]
                case Field.OUTPUTS:
                    return [tuple(self.string() for _ in range(4)) for _ in range(self.count())]
        except NeedMore:
            self.offset = start
            raise
        raise AssertionError(kind)


@dataclass(frozen=True)
class Request:
    """One op and its arguments, as the client sent them (``size``: their bytes)."""

    op: Op
    args: tuple[Value, ...]
    size: int
    framed: bool


def read_request(data: bytes | bytearray | memoryview, minor: int) -> Request:
    """The op at the front of ``data`` with its arguments (not a framed source after them).
    ``NeedMore``: not all of it is here yet; ``UnsupportedOp``: the relay cannot go on."""
    reader = Reader(data)
    op = reader.u64()
    shape = layout(op, minor)
    args = tuple(reader.field(kind) for kind in shape.fields)
    return Request(Op(op), args, reader.offset, shape.framed)


@dataclass(frozen=True)
class ClientHello:
    """The client's side of the handshake: its version and the bytes it took."""

    version: int
    size: int


def read_client_hello(data: bytes | bytearray | memoryview, daemon_version: int) -> ClientHello:
    """Magic, version, then (by the daemon's version, as the client decides) CPU affinity and
    the obsolete reserve-space."""
    reader = Reader(data)
    if reader.u64() != WORKER_MAGIC_1:
        raise WireError("not a Nix daemon protocol client (bad magic)")
    version = reader.u64()
    if version >> 8 != 1:
        raise WireError(f"unsupported daemon protocol major version {version >> 8}")
    minor = min(version, daemon_version, PROTOCOL_MAX) & 0xFF
    if minor >= 14 and reader.u64():
        reader.u64()
    if minor >= 11:
        reader.u64()
    return ClientHello(version, reader.offset)


def read_daemon_hello(data: bytes | bytearray | memoryview) -> int:
    """The daemon's version from its first 16 bytes."""
    reader = Reader(data)
    if reader.u64() != WORKER_MAGIC_2:
        raise WireError("the store's daemon did not answer the protocol (bad magic)")
    return reader.u64()


def negotiated_minor(client_version: int, daemon_version: int) -> int:
    return min(client_version, daemon_version, PROTOCOL_MAX) & 0xFF


def derived_drvs(paths: Sequence[bytes]) -> list[tuple[str, list[str]]]:
    """The derivations among ``BuildPaths``' derived paths (``/nix/store/x.drv!out,dev``;
    ``!*``: every output) with the outputs wanted (empty: all); an opaque path is not built."""
    found: list[tuple[str, list[str]]] = []
    for raw in paths:
        text = raw.decode()
        drv, bang, outputs = text.partition("!")
        if not bang or not drv.endswith(".drv"):
            continue
        wanted = [] if outputs in ("", "*") else outputs.split(",")
        found.append((drv, wanted))
    return found


# ---- writing ------------------------------------------------------------------------------------


def u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def string(value: bytes | str) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return u64(len(raw)) + raw + b"\0" * (-len(raw) % 8)


def field(kind: Field, value: Value) -> bytes:
    match kind:
        case Field.U64:
            assert isinstance(value, int)
            return u64(value)
        case Field.STRING:
            assert isinstance(value, bytes)
            return string(value)
        case _:
            assert isinstance(value, list)
            out = [u64(len(value))]
            for item in value:
                items = item if isinstance(item, tuple) else (item,)
                out += [string(piece) for piece in items]
            return b"".join(out)


def request(op: Op, args: Sequence[Value], minor: int) -> bytes:
    """The bytes of ``op`` with ``args`` (the inverse of ``read_request``)."""
    shape = layout(op, minor)
    if len(args) != len(shape.fields):
        raise ValueError(f"{op.name} takes {len(shape.fields)} arguments at 1.{minor}")
    return u64(op) + b"".join(field(k, v) for k, v in zip(shape.fields, args, strict=True))


def framed(data: bytes, chunk: int = 1 << 16) -> bytes:
    """``data`` as a framed source."""
    pieces = [
        u64(len(data[i : i + chunk])) + data[i : i + chunk] for i in range(0, len(data), chunk)
    ]
    return b"".join(pieces) + u64(0)


def stderr_next(text: str) -> bytes:
    """A log line Nix prints (``STDERR_NEXT``; Nix adds no newline of its own)."""
    return u64(Stderr.NEXT) + string(text)


def stderr_error(message: str, minor: int, status: int = 1) -> bytes:
    """``STDERR_ERROR``: the op failed with ``message`` (the client throws it)."""
    if minor < 26:
        return u64(Stderr.ERROR) + string(message) + u64(status)
    # type, level (0: error), name, message, no position, no traces
    return (
        u64(Stderr.ERROR)
        + string("Error")
        + u64(0)
        + string("Error")
        + string(message)
        + u64(0)
        + u64(0)
    )


def read_error(data: bytes, minor: int) -> str:
    """The message of a ``STDERR_ERROR`` (its code included): for the tests and logs."""
    reader = Reader(data)
    if reader.u64() != Stderr.ERROR:
        raise WireError("not an error message")
    if minor < 26:
        return reader.string().decode()
    reader.string()
    reader.u64()
    reader.string()
    return reader.string().decode()
