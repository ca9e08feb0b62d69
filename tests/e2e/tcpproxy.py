"""A TCP proxy on 127.0.0.1 that a test can cut (reset every connection, refuse new ones) and
restore, to put a network outage between an agent and the runner."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from dataclasses import dataclass
from types import TracebackType

_CHUNK_BYTES = 64 * 1024
_FIRST_LINE_SECS = 2.0
"""While cut: how long to wait for a refused client's first line before resetting it."""
_ACCEPT_POLL_SECS = 0.05
"""How often the accept loop looks at the stop flag (the listener's accept timeout)."""


def _reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0): the peer sees the connection break, not a clean end."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RD)  # wakes our pump blocked in recv; sends nothing
    sock.close()


class TcpProxy:
    """Forwards ``127.0.0.1:port`` to ``target_host:target_port``, one thread per direction.

    While cut, every new connection is accepted, its first line read (``refused_requests``) and
    reset, so a test can wait until a client has tried, and failed, to come back or to upload.
    """

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(_ACCEPT_POLL_SECS)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._links: set[_Link] = set()
        self._cut = False
        self._stop = threading.Event()
        self.accepted = 0
        """Connections forwarded so far."""
        self._refused_requests: list[str] = []
        self._thread = threading.Thread(target=self._accept_loop, name="tcpproxy", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def refused(self) -> int:
        """How many connections arrived while cut (and were reset)."""
        with self._lock:
            return len(self._refused_requests)

    @property
    def refused_requests(self) -> list[str]:
        """The first line sent on each connection reset because the proxy was cut
        (``PUT /api/v1/agent/upload/... HTTP/1.1``), "" when none came."""
        with self._lock:
            return list(self._refused_requests)

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._links)

    def cut(self) -> None:
        """Reset every forwarded connection and refuse new ones until ``restore``."""
        with self._lock:
            self._cut = True
            links, self._links = self._links, set()
        for link in links:
            _reset(link.client)
            _reset(link.upstream)

    def restore(self) -> None:
        """Forward new connections again."""
        with self._lock:
            self._cut = False

    def close(self) -> None:
        self._stop.set()
        self.cut()
        self._thread.join(5)
        self._listener.close()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ---- threads --------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            if self._refuse(client):
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _reset(client)
                continue
            upstream.settimeout(None)
            link = _Link(client, upstream)
            with self._lock:
                cut = self._cut  # cut while we were connecting upstream
                if cut:
                    self._refused_requests.append("")
                else:
                    self._links.add(link)
                    self.accepted += 1
            if cut:
                _reset(client)
                _reset(upstream)
                continue
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(
                    target=self._pump, args=(link, src, dst), name="tcpproxy-pump", daemon=True
                ).start()

    def _refuse(self, client: socket.socket) -> bool:
        with self._lock:
            cut = self._cut
        if cut:
            threading.Thread(
                target=self._turn_away, args=(client,), name="tcpproxy-refuse", daemon=True
            ).start()
        return cut

    def _turn_away(self, client: socket.socket) -> None:
        """Read what the client meant to say (its first line), then reset the connection."""
        client.settimeout(_FIRST_LINE_SECS)
        data = b""
        with contextlib.suppress(OSError):
            while b"\n" not in data and len(data) < _CHUNK_BYTES:
                chunk = client.recv(_CHUNK_BYTES)
                if not chunk:
                    break
                data += chunk
        _reset(client)
        with self._lock:
            self._refused_requests.append(data.split(b"\r\n", 1)[0].decode(errors="replace"))

    def _pump(self, link: _Link, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(_CHUNK_BYTES):
                dst.sendall(data)
        except OSError:
            # Broken, or cut: break the other side too (unless ``cut`` already did).
            with self._lock:
                owned = link in self._links
                self._links.discard(link)
            if owned:
                _reset(link.client)
                _reset(link.upstream)
            return
        # A clean end in one direction: pass the half-close on; close when both are done.
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
        with self._lock:
            link.pumps_done += 1
            last = link.pumps_done == 2 and link in self._links
            if last:
                self._links.discard(link)
        if last:
            link.client.close()
            link.upstream.close()


@dataclass(eq=False)
class _Link:
    """One forwarded connection: the client's socket and ours to the target."""

    client: socket.socket
    upstream: socket.socket
    pumps_done: int = 0
