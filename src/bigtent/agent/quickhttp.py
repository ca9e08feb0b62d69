"""The agent's small requests to the runner on kept-alive HTTP/1.1 connections, without httpx.

A serve step reads its derivations from the cache (``agent/drvfetch.py``): a narinfo and a
NAR for the step's .drv and for each input .drv the agent has not seen, about four small GETs
a step; then it PUTs each output's NAR (``agent/upload.py``, small ones from memory). Through
httpx each request cost ~2 ms of the agent's CPU (its connection pool, anyio wrappers and
response streams: py-spy put 60 % of the agent's CPU per step in the GETs alone, see
``docs/benchmarks.md``); here a request is a write and two reads on a connection kept open.

Only what the runner answers is taken: a status line, headers, then a body of
``Content-Length`` bytes or chunked. Anything else (a redirect to a bucket, a malformed
answer, a connection that cannot be made or that broke) gives ``None``, and the caller asks
httpx, which follows redirects and words the errors. Both kinds of request may be sent twice
that way: GETs are safe, and the output PUT is idempotent. What comes back is judged by the
caller as before (a .drv against its store path, an upload's answer by its status), so this
adds no trust; TLS uses the agent's context (its CA file and client certificate).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

MAX_HEAD_BYTES = 64 * 1024
"""A status line and headers longer than this are not the cache's: ask httpx."""
MAX_IDLE_PER_HOST = 8
GET_TIMEOUT_SECS = 300.0


class BodyTooLarge(Exception):
    """The answer's body is larger than the caller allows."""


@dataclass(frozen=True, slots=True)
class Head:
    """A response's status, headers (names in lower case) and whether the connection stays
    open after its body."""

    status: int
    headers: dict[str, str]
    keep_alive: bool


def parse_head(raw: bytes) -> Head:
    """The status line and headers of an HTTP/1.x response, up to the blank line (pure).
    Raises ``ValueError`` when it is not one."""
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or parts[0] not in ("HTTP/1.1", "HTTP/1.0") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise ValueError(f"bad header line {line[:80]!r}")
        key = name.lower()
        value = value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    keep_alive = "close" not in tokens if parts[0] == "HTTP/1.1" else "keep-alive" in tokens
    return Head(int(parts[1]), headers, keep_alive)


def body_length(head: Head) -> int | None:
    """The body's length from ``Content-Length``; None when chunked (pure). Raises
    ``ValueError`` for a body this client does not read (neither, or another coding)."""
    coding = head.headers.get("transfer-encoding")
    if coding is not None:
        if coding.lower() != "chunked":
            raise ValueError(f"transfer-encoding {coding!r}")
        return None
    if head.status in (204, 304) or 100 <= head.status < 200:
        return 0
    length = head.headers.get("content-length")
    if length is None or not length.isdigit():
        raise ValueError("no content-length")
    return int(length)


def encode_request(
    method: str, target: str, host: str, headers: Mapping[str, str], body: bytes
) -> bytes | None:
    """The bytes of one HTTP/1.1 request (pure); None when something in it cannot be sent
    as is (not ASCII, a line break or space where none may be)."""
    fields = {"Host": host, "Accept-Encoding": "identity", "User-Agent": "bigtent-agent"}
    fields.update(headers)
    if body or method not in ("GET", "HEAD"):
        fields = {k: v for k, v in fields.items() if k.lower() != "content-length"}
        fields["Content-Length"] = str(len(body))
    lines = [f"{method} {target} HTTP/1.1", *(f"{k}: {v}" for k, v in fields.items())]
    text = "\r\n".join(lines)
    if not text.isascii() or any(c in target for c in " \r\n\t"):
        return None
    if any(c in k + v for k, v in fields.items() for c in "\r\n") or any(
        not k or ":" in k or " " in k for k in fields
    ):
        return None
    return text.encode("ascii") + b"\r\n\r\n" + body


_Key = tuple[str, str, int]


@dataclass(slots=True)
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    reused: bool = False

    def close(self) -> None:
        self.writer.close()


class QuickHttp:
    """Kept-alive connections to the cache's hosts, a few idle ones per host."""

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None = None,
        timeout_secs: float = GET_TIMEOUT_SECS,
        max_idle: int = MAX_IDLE_PER_HOST,
    ) -> None:
        self._ssl = ssl_context
        self._timeout = timeout_secs
        self._max_idle = max_idle
        self._idle: dict[_Key, list[_Connection]] = {}
        self.connections_made = 0

    async def get(self, url: str, max_bytes: int) -> tuple[int, bytes] | None:
        """(status, body) of ``GET url``; None when httpx should ask instead (a redirect,
        an answer or URL this client does not take, no connection). Raises ``BodyTooLarge``."""
        answer = await self.request("GET", url, {}, b"", max_bytes)
        return None if answer is None else (answer[0].status, answer[1])

    async def request(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes, max_bytes: int
    ) -> tuple[Head, bytes] | None:
        """The answer's head and body to one request; None when httpx should send it instead
        (see ``get``). Raises ``BodyTooLarge``."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.username:
            return None
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            return None
        key = (parts.scheme, parts.hostname, port)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        request = encode_request(method, target, parts.netloc, headers, body)
        if request is None:
            return None
        while True:
            conn = self._take_idle(key)
            reused = conn is not None
            try:
                async with asyncio.timeout(self._timeout):
                    if conn is None:
                        conn = await self._connect(key)
                    answer = await self._exchange(conn, request, max_bytes)
            except BodyTooLarge:
                if conn is not None:
                    conn.close()
                raise
            except (
                OSError,
                EOFError,
                ValueError,
                TimeoutError,
                asyncio.IncompleteReadError,
                asyncio.LimitOverrunError,
                ssl.SSLError,
            ):
                if conn is not None:
                    conn.close()
                if reused:
                    continue  # the server closed a kept-alive connection: try a fresh one
                return None
            head, body = answer
            if head.keep_alive and len(self._idle.setdefault(key, [])) < self._max_idle:
                self._idle[key].append(conn)
            else:
                conn.close()
            if 300 <= head.status < 400:
                return None  # a bucket's presigned URL: httpx follows it
            return head, body

    async def aclose(self) -> None:
        """Close every idle connection."""
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()
                with contextlib.suppress(OSError, ssl.SSLError):
                    await conn.writer.wait_closed()

    def _take_idle(self, key: _Key) -> _Connection | None:
        conns = self._idle.get(key)
        while conns:
            conn = conns.pop()
            if not conn.reader.at_eof() and not conn.writer.is_closing():
                return conn
            conn.close()
        return None

    async def _connect(self, key: _Key) -> _Connection:
        scheme, hostname, port = key
        context: ssl.SSLContext | None = None
        if scheme == "https":
            if self._ssl is None:
                # Without the agent's own context, trust exactly what httpx trusts by default.
                self._ssl = httpx.create_ssl_context()
            context = self._ssl
        reader, writer = await asyncio.open_connection(
            hostname, port, ssl=context, limit=MAX_HEAD_BYTES
        )
        self.connections_made += 1
        return _Connection(reader, writer)

    async def _exchange(
        self, conn: _Connection, request: bytes, max_bytes: int
    ) -> tuple[Head, bytes]:
        conn.writer.write(request)
        await conn.writer.drain()
        raw = await conn.reader.readuntil(b"\r\n\r\n")
        head = parse_head(raw[:-4])
        length = body_length(head)
        if length is not None:
            if length > max_bytes:
                raise BodyTooLarge(f"{length} bytes")
            return head, await conn.reader.readexactly(length)
        body = bytearray()
        while True:
            size_line = await conn.reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while await conn.reader.readuntil(b"\r\n") != b"\r\n":
                    pass  # trailers
                return head, bytes(body)
            if len(body) + size > max_bytes:
                raise BodyTooLarge(f"more than {max_bytes} bytes")
            body += await conn.reader.readexactly(size)
            if await conn.reader.readexactly(2) != b"\r\n":
                raise ValueError("bad chunk")
