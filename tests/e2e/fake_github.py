"""A stand-in for GitHub's REST API on loopback HTTPS (the test CA), for the autoscaler.

It answers ``POST /repos/{owner}/{repo}/actions/workflows/{workflow}/dispatches`` like GitHub:
it checks the token and the body, records the dispatch, and answers 204 — or, when told,
another status with ``Retry-After``. Like GitHub queuing a run, an accepted dispatch is handed
to ``on_dispatch`` (the test starts the job: a real agent process), unless the fake was told to
only record it (a job that never starts).
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.integration.runner.oidc_issuer import TlsFiles


class Mode(Enum):
    START = "start"
    """Answer 204 and start the job (``on_dispatch``)."""
    RECORD = "record"
    """Answer 204 and start nothing: the job never runs."""


@dataclass(frozen=True)
class Failure:
    """Answer this status (and Retry-After) instead of 204."""

    status: int
    retry_after: str | None = None


@dataclass(frozen=True)
class Dispatch:
    at: float
    """``time.time()`` when it arrived."""
    path: str
    ref: str
    inputs: dict[str, str]
    answered: int


@dataclass
class _State:
    dispatches: list[Dispatch] = field(default_factory=list)
    script: list[Mode | Failure] = field(default_factory=list)
    """What to do with the next dispatches, in order; then ``default``."""
    default: Mode | Failure = Mode.START
    lock: threading.Lock = field(default_factory=threading.Lock)


class FakeGithub:
    """``https://127.0.0.1:PORT`` accepting workflow dispatches made with ``token``."""

    def __init__(self, tls: TlsFiles, token: str, on_dispatch: Callable[[Dispatch], None]) -> None:
        self.token = token
        self.state = _State()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                raw = self.rfile.read(length)
                if self.headers.get("Authorization") != f"Bearer {outer.token}":
                    self._answer(401, {"message": "Bad credentials"})
                    return
                if not self.path.endswith("/dispatches") or "/actions/workflows/" not in self.path:
                    self._answer(404, {"message": "Not Found"})
                    return
                body = json.loads(raw)
                inputs = body.get("inputs", {})
                if not isinstance(body.get("ref"), str) or not all(
                    isinstance(v, str) for v in inputs.values()
                ):
                    self._answer(422, {"message": "inputs must be strings"})
                    return
                state = outer.state
                with state.lock:
                    todo = state.script.pop(0) if state.script else state.default
                    status = todo.status if isinstance(todo, Failure) else 204
                    dispatch = Dispatch(time.time(), self.path, body["ref"], inputs, status)
                    state.dispatches.append(dispatch)
                if isinstance(todo, Failure):
                    headers = {"Retry-After": todo.retry_after} if todo.retry_after else {}
                    self._answer(todo.status, {"message": "try later"}, headers)
                    return
                self._answer(204, None)
                if todo is Mode.START:
                    on_dispatch(dispatch)

            def _answer(
                self, status: int, body: Any, headers: dict[str, str] | None = None
            ) -> None:
                data = b"" if body is None else json.dumps(body).encode()
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                if body is not None:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
        self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self._thread.start()

    def then(self, *steps: Mode | Failure, default: Mode | Failure | None = None) -> None:
        """Handle the next dispatches with ``steps`` (then ``default``, if given)."""
        with self.state.lock:
            self.state.script.extend(steps)
            if default is not None:
                self.state.default = default

    @property
    def dispatches(self) -> list[Dispatch]:
        with self.state.lock:
            return list(self.state.dispatches)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
