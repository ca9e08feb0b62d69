"""NAR archives: streaming serialisation, strict incremental validation, restore, and the
reference scanner."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import struct
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from bigtent.nix import base32

NAR_MAGIC = b"nix-archive-1"
"""First string of every NAR."""

MAX_NAME_BYTES = 255
"""Longest directory entry name accepted (NAME_MAX on every filesystem Nix supports)."""

MAX_TARGET_BYTES = 4095
"""Longest symlink target accepted (PATH_MAX minus the terminating NUL)."""

_MAX_TOKEN_BYTES = 64
"""Longest structural token ("nix-archive-1", "directory", ...) a NAR can contain."""

_U64 = struct.Struct("<Q")


class NarError(ValueError):
    """The byte stream is not a well-formed, canonical NAR."""


def _pad_len(n: int) -> int:
    return (-n) % 8


def _str(data: bytes) -> bytes:
    """Frame one NAR string: little-endian u64 length, bytes, zero padding to 8."""
    return _U64.pack(len(data)) + data + b"\0" * _pad_len(len(data))


# ----------------------------------------------------------------------------- dump


def _dump_node(path: bytes, chunk_size: int) -> Iterator[bytes]:
    st = os.lstat(path)
    yield _str(b"(") + _str(b"type")
    if stat.S_ISREG(st.st_mode):
        header = _str(b"regular")
        # Nix (dumpPath) looks only at the owner's execute bit.
        if st.st_mode & stat.S_IXUSR:
            header += _str(b"executable") + _str(b"")
        yield header + _str(b"contents") + _U64.pack(st.st_size)
        remaining = st.st_size
        with open(path, "rb") as f:
            while remaining:
                data = f.read(min(chunk_size, remaining))
                if not data:
                    raise OSError(f"file {os.fsdecode(path)!r} shrank while being archived")
                remaining -= len(data)
                yield data
        yield b"\0" * _pad_len(st.st_size) + _str(b")")
    elif stat.S_ISLNK(st.st_mode):
        target = os.readlink(path)
        yield _str(b"symlink") + _str(b"target") + _str(target) + _str(b")")
    elif stat.S_ISDIR(st.st_mode):
        yield _str(b"directory")
        for name in sorted(os.listdir(path)):
            yield _str(b"entry") + _str(b"(") + _str(b"name") + _str(name) + _str(b"node")
            yield from _dump_node(path + b"/" + name, chunk_size)
            yield _str(b")")
        yield _str(b")")
    else:
        raise ValueError(f"file {os.fsdecode(path)!r} has an unsupported type for a NAR")


def dump_path(path: os.PathLike[str] | str, chunk_size: int = 256 * 1024) -> Iterator[bytes]:
    """Stream the NAR of `path`, byte-identical to `nix-store --dump`.

    File contents are read `chunk_size` bytes at a time and small framing pieces are coalesced,
    so memory stays O(chunk_size + depth) however large the tree. Directory entries are ordered by
    their raw bytes, as Nix's std::map<std::string> orders them.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive (got {chunk_size})")
    pending = bytearray(_str(NAR_MAGIC))
    for piece in _dump_node(os.fsencode(path), chunk_size):
        pending += piece
        if len(pending) >= chunk_size:
            yield bytes(pending)
            pending.clear()
    if pending:
        yield bytes(pending)


# ----------------------------------------------------------------------------- parse


class NarSink(Protocol):
    """Receives the parsed tree; paths are tuples of entry names below the root."""

    def directory(self, path: tuple[bytes, ...]) -> None: ...

    def file_start(self, path: tuple[bytes, ...], executable: bool, size: int) -> None: ...

    def file_data(self, data: bytes) -> None: ...

    def file_end(self) -> None: ...

    def symlink(self, path: tuple[bytes, ...], target: bytes) -> None: ...


class _NullSink:
    def directory(self, path: tuple[bytes, ...]) -> None:
        pass

    def file_start(self, path: tuple[bytes, ...], executable: bool, size: int) -> None:
        pass

    def file_data(self, data: bytes) -> None:
        pass

    def file_end(self) -> None:
        pass

    def symlink(self, path: tuple[bytes, ...], target: bytes) -> None:
        pass


@dataclass(slots=True)
class _Contents:
    """Parser request: stream the next `size` bytes to the sink instead of returning them."""

    size: int


@dataclass(slots=True)
class _Dir:
    path: tuple[bytes, ...]
    prev_name: bytes | None = None


# The parser is a generator that yields either a byte count it needs (and is sent exactly those
# bytes) or a _Contents request (and is sent None once the contents were streamed).
_Request = int | _Contents
_Parser = Generator[_Request, bytes | None, None]
_Read = Generator[_Request, bytes | None, bytes]


def _read_bytes(n: int) -> _Read:
    data = yield n
    assert data is not None and len(data) == n  # guaranteed by NarValidator._drive
    return data


def _read_u64() -> Generator[_Request, bytes | None, int]:
    data = yield from _read_bytes(8)
    value: int = _U64.unpack(data)[0]
    return value


def _read_str(limit: int, what: str) -> _Read:
    n = yield from _read_u64()
    if n > limit:
        raise NarError(f"NAR {what} is {n} bytes long, over the limit of {limit}")
    padded = yield from _read_bytes(n + _pad_len(n))
    if any(padded[n:]):
        raise NarError(f"NAR {what} has non-zero padding")
    return padded[:n]


def _expect(token: bytes) -> Generator[_Request, bytes | None, None]:
    got = yield from _read_str(_MAX_TOKEN_BYTES, "token")
    if got != token:
        raise NarError(f"expected NAR token {token!r}, got {got!r}")


def _check_name(name: bytes, prev: bytes | None) -> None:
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise NarError(f"NAR contains invalid file name {name!r}")
    if prev is not None and name <= prev:
        raise NarError(f"NAR directory entries are not sorted or unique at {name!r}")


def _parse(sink: NarSink) -> _Parser:
    """Parse exactly one canonical NAR (the form `nix-store --dump` writes) with an explicit
    stack, so hostile nesting depth cannot exhaust the Python stack."""
    magic = yield from _read_str(_MAX_TOKEN_BYTES, "magic")
    if magic != NAR_MAGIC:
        raise NarError(f"not a NAR: bad magic {magic!r}")
    stack: list[_Dir] = []
    path: tuple[bytes, ...] = ()
    while True:
        # Parse the node at `path`.
        yield from _expect(b"(")
        yield from _expect(b"type")
        kind = yield from _read_str(_MAX_TOKEN_BYTES, "node type")
        if kind == b"regular":
            tag = yield from _read_str(_MAX_TOKEN_BYTES, "token")
            executable = tag == b"executable"
            if executable:
                yield from _expect(b"")
                tag = yield from _read_str(_MAX_TOKEN_BYTES, "token")
            if tag != b"contents":
                raise NarError(f"expected NAR token b'contents', got {tag!r}")
            size = yield from _read_u64()
            sink.file_start(path, executable, size)
            yield _Contents(size)
            padding = yield from _read_bytes(_pad_len(size))
            if any(padding):
                raise NarError("NAR file contents have non-zero padding")
            sink.file_end()
            yield from _expect(b")")
        elif kind == b"symlink":
            yield from _expect(b"target")
            target = yield from _read_str(MAX_TARGET_BYTES, "symlink target")
            if not target or b"\0" in target:
                raise NarError(f"NAR contains invalid symlink target {target!r}")
            sink.symlink(path, target)
            yield from _expect(b")")
        elif kind == b"directory":
            sink.directory(path)
            stack.append(_Dir(path))
        else:
            raise NarError(f"unknown NAR node type {kind!r}")

        # Close the finished entry and any directories that end here, until the next entry
        # starts or the root node is complete.
        child_done = kind != b"directory"
        while True:
            if not stack:
                return
            frame = stack[-1]
            if child_done:
                yield from _expect(b")")
            tag = yield from _read_str(_MAX_TOKEN_BYTES, "token")
            if tag == b")":
                stack.pop()
                child_done = True
                continue
            if tag != b"entry":
                raise NarError(f"expected NAR token b'entry' or b')', got {tag!r}")
            yield from _expect(b"(")
            yield from _expect(b"name")
            name = yield from _read_str(MAX_NAME_BYTES, "file name")
            _check_name(name, frame.prev_name)
            frame.prev_name = name
            yield from _expect(b"node")
            path = (*frame.path, name)
            break


@dataclass
class NarValidator:
    """Incremental, strict NAR parser: feed chunks of any size, then call finish().

    Memory is bounded by the largest chunk fed plus one string (names and targets are capped);
    file contents are streamed to the sink, never buffered. It also measures the NAR's size and
    sha256 so an upload can be checked against its declared NarSize and NarHash in one pass.
    Once it has raised NarError it stays failed.
    """

    sink: NarSink = field(default_factory=_NullSink)
    nar_size: int = field(default=0, init=False)
    _hasher: hashlib._Hash = field(default_factory=hashlib.sha256, init=False, repr=False)
    _parser: _Parser | None = field(default=None, init=False, repr=False)
    _request: _Request | None = field(default=None, init=False, repr=False)
    _buf: bytearray = field(default_factory=bytearray, init=False, repr=False)
    _done: bool = field(default=False, init=False)
    _error: NarError | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._parser = _parse(self.sink)
        self._request = next(self._parser)

    def feed(self, chunk: bytes) -> None:
        if self._error is not None:
            raise NarError(f"NAR already rejected: {self._error}")
        self.nar_size += len(chunk)
        self._hasher.update(chunk)
        if self._done:
            if chunk:
                self._fail(NarError("trailing data after the end of the NAR"))
            return
        request = self._request
        if not self._buf and isinstance(request, _Contents) and request.size >= len(chunk):
            # Fast path for file contents: hand the chunk to the sink without copying it.
            if chunk:
                self.sink.file_data(chunk)
                request.size -= len(chunk)
            if request.size:
                return
            chunk = b""
        self._buf += chunk
        try:
            self._drive()
        except NarError as exc:
            self._fail(exc)

    def finish(self) -> None:
        """Raise NarError unless exactly one complete NAR was fed."""
        if self._error is not None:
            raise NarError(f"NAR already rejected: {self._error}")
        if not self._done:
            self._fail(NarError(f"NAR is truncated after {self.nar_size} bytes"))

    def sha256(self) -> bytes:
        """Digest of every byte fed so far (the NarHash once finish() succeeded)."""
        return self._hasher.digest()

    def _fail(self, exc: NarError) -> None:
        self._error = exc
        self._buf = bytearray()
        if self._parser is not None:
            self._parser.close()
        raise exc

    def _drive(self) -> None:
        assert self._parser is not None
        buf = self._buf
        pos = 0
        try:
            while True:
                request = self._request
                if isinstance(request, _Contents):
                    take = min(request.size, len(buf) - pos)
                    if take:
                        self.sink.file_data(bytes(buf[pos : pos + take]))
                        pos += take
                        request.size -= take
                    if request.size:
                        break
                    self._request = self._parser.send(None)
                else:
                    assert request is not None
                    if len(buf) - pos < request:
                        break
                    data = bytes(buf[pos : pos + request])
                    pos += request
                    self._request = self._parser.send(data)
        except StopIteration:
            self._done = True
            if pos != len(buf):
                raise NarError("trailing data after the end of the NAR") from None
        finally:
            del buf[:pos]


def validate(chunks: Iterable[bytes]) -> NarValidator:
    """Validate a whole NAR stream and return the finished validator (for size and hash)."""
    validator = NarValidator()
    for chunk in chunks:
        validator.feed(chunk)
    validator.finish()
    return validator


# ----------------------------------------------------------------------------- restore


class _RestoreSink:
    """Writes the tree below `root`; every create is exclusive and never follows symlinks,
    and names were validated by the parser, so a NAR cannot write outside `root`."""

    def __init__(self, root: Path) -> None:
        self._root = os.fsencode(root)
        self._fd: int | None = None

    def _path(self, path: tuple[bytes, ...]) -> bytes:
        return b"/".join((self._root, *path))

    def directory(self, path: tuple[bytes, ...]) -> None:
        os.mkdir(self._path(path), 0o777)

    def file_start(self, path: tuple[bytes, ...], executable: bool, size: int) -> None:
        mode = 0o777 if executable else 0o666
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        self._fd = os.open(self._path(path), flags, mode)

    def file_data(self, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def file_end(self) -> None:
        self.close()

    def symlink(self, path: tuple[bytes, ...], target: bytes) -> None:
        os.symlink(target, self._path(path))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def restore(chunks: Iterable[bytes], dest: Path) -> None:
    """Unpack a NAR to `dest`, which must not exist yet; on any failure nothing is left behind.

    Modes follow `nix-store --restore`: 0666/0777 (executable) filtered by the umask.
    """
    if dest.exists() or dest.is_symlink():
        raise FileExistsError(f"restore destination {dest} already exists")
    sink = _RestoreSink(dest)
    try:
        validator = NarValidator(sink)
        for chunk in chunks:
            validator.feed(chunk)
        validator.finish()
    except BaseException:
        sink.close()
        if dest.is_symlink() or dest.is_file():
            dest.unlink()
        elif dest.exists():
            shutil.rmtree(dest)
        raise
    finally:
        sink.close()


# ----------------------------------------------------------------------------- references

_NIX32_ALPHABET = base32.ALPHABET.encode()
_NIX32_BYTES = frozenset(_NIX32_ALPHABET)
# Maps nix32 characters to b"a" and everything else to b"\0", so runs are found with bytes.find.
_RUN_TABLE = bytes(0x61 if b in _NIX32_BYTES else 0 for b in range(256))
_REF_LEN = 32
FIND_EACH_MAX = 8
"""Up to this many hash parts still wanted, each is searched for on its own (``bytes.find``);
more, and the chunk's runs of nix32 bytes are mapped once and their windows looked up."""


class ReferenceScanner:
    """Find which store hash parts occur in a byte stream, like Nix's reference scanner.

    Linear time: maximal runs of nix32 characters at least 32 long are located with bytes.find
    on a translated copy of the chunk, and each 32-byte window of a run is looked up in a set;
    while at most ``FIND_EACH_MAX`` hash parts are still wanted, each is searched for directly.
    Up to 31 trailing nix32 bytes of a chunk are carried into the next one, so a hash split
    across chunks is found and no window is checked twice.
    """

    def __init__(self, hash_parts: Iterable[str]) -> None:
        wanted: set[bytes] = set()
        for part in hash_parts:
            encoded = part.encode()
            # Deleting the nix32 bytes leaves nothing of a hash part (in C: no set per part).
            if len(encoded) != _REF_LEN or encoded.translate(None, _NIX32_ALPHABET):
                raise ValueError(f"not a store path hash part: {part!r}")
            wanted.add(encoded)
        self._wanted = frozenset(wanted)
        self._left = set(wanted)
        """The hash parts not found yet."""
        self._tail = b""
        self.found: set[str] = set()

    def feed(self, chunk: bytes) -> None:
        if not self._left:
            return
        tail = self._tail
        few = len(self._left) <= FIND_EACH_MAX
        if tail and len(chunk) >= _REF_LEN:
            # The windows that start in the tail end within the chunk's first 31 bytes: look
            # at those here, so a large chunk is never copied to be joined with the tail.
            seam = tail + chunk[: _REF_LEN - 1]
            if few:
                self._find_each(seam)
            else:
                self._scan(seam, last_start=len(tail) - 1)
            tail = b""
        data = tail + chunk if tail else chunk
        if few:
            self._find_each(data)
        else:
            self._scan(data, last_start=len(data) - _REF_LEN)
        keep = 0
        limit = min(len(data), _REF_LEN - 1)
        while keep < limit and data[len(data) - 1 - keep] in _NIX32_BYTES:
            keep += 1
        self._tail = bytes(data[len(data) - keep :]) if keep else b""

    def _find_each(self, data: bytes) -> None:
        """Look for each hash part not found yet with ``bytes.find`` (a fast search in C):
        for a few hash parts, faster than mapping every byte (``_scan``)."""
        for wanted in [w for w in self._left if w in data]:
            self._left.discard(wanted)
            self.found.add(wanted.decode())

    def _scan(self, data: bytes, last_start: int) -> None:
        """Look up every window of a run of at least 32 nix32 bytes that starts at or before
        ``last_start``."""
        wanted = self._wanted
        mapped = data.translate(_RUN_TABLE)
        marker = b"a" * _REF_LEN
        pos = mapped.find(marker)
        while pos != -1 and pos <= last_start:
            end = mapped.find(b"\0", pos + _REF_LEN)
            if end == -1:
                end = len(data)
            for i in range(pos, min(end - _REF_LEN, last_start) + 1):
                window = data[i : i + _REF_LEN]
                if window in wanted:
                    self._left.discard(bytes(window))
                    self.found.add(bytes(window).decode())
            pos = mapped.find(marker, end)
