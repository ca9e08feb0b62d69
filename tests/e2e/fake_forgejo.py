"""A stand-in for Forgejo's (and Gitea's) commit status API on loopback HTTPS (the test CA).

``POST /api/v1/repos/{owner}/{repo}/statuses/{sha}`` with ``Authorization: token TOKEN``
records the status (``statuses``, in arrival order) and answers 201 like Forgejo; a wrong
token gets 401. The next calls can be told to fail (``fail_next``).
"""

from __future__ import annotations

import json
import re
import ssl
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.integration.runner.oidc_issuer import TlsFiles

_STATUSES = re.compile(r"/api/v1/repos/([^/]+)/([^/]+)/statuses/([0-9a-f]{7,64})")
_STATES = {"pending", "success", "error", "failure", "warning"}


@dataclass(frozen=True)
class Status:
    at: float
    repository: str
    sha: str
    context: str
    state: str
    description: str
    target_url: str


class FakeForgejo:
    """``https://127.0.0.1:PORT`` (API at ``/api/v1``) taking commit statuses with ``token``."""

    def __init__(self, tls: TlsFiles, token: str) -> None:
        self.token = token
        self._lock = threading.Lock()
        self._statuses: list[Status] = []
        self._failures: list[tuple[int, str | None]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                raw = self.rfile.read(length)
                m = _STATUSES.fullmatch(self.path)
                if m is None:
                    self._answer(404, {"message": "Not Found"})
                    return
                if self.headers.get("Authorization") != f"token {outer.token}":
                    self._answer(401, {"message": "invalid token"})
                    return
                with outer._lock:
                    if outer._failures:
                        code, retry_after = outer._failures.pop(0)
                        headers = {"Retry-After": retry_after} if retry_after else {}
                        self._answer(code, {"message": "try later"}, headers)
                        return
                body = json.loads(raw)
                if body.get("state") not in _STATES or not isinstance(body.get("context"), str):
                    self._answer(422, {"message": "invalid state or context"})
                    return
                status = Status(
                    time.time(),
                    f"{m.group(1)}/{m.group(2)}",
                    m.group(3),
                    body["context"],
                    body["state"],
                    body.get("description", ""),
                    body.get("target_url", ""),
                )
                with outer._lock:
                    outer._statuses.append(status)
                    number = len(outer._statuses)
                self._answer(201, {"id": number, "context": status.context, "status": status.state})

            def _answer(
                self, status: int, body: Any, headers: dict[str, str] | None = None
            ) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
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
        self.api_url = self.url + "/api/v1"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self._thread.start()

    def fail_next(self, status: int, retry_after: str | None = None, times: int = 1) -> None:
        with self._lock:
            self._failures.extend([(status, retry_after)] * times)

    @property
    def statuses(self) -> list[Status]:
        with self._lock:
            return list(self._statuses)

    def latest(self, sha: str) -> dict[str, Status]:
        """Per context, the newest status on ``sha`` (what Forgejo shows)."""
        out: dict[str, Status] = {}
        for status in self.statuses:
            if status.sha == sha:
                out[status.context] = status
        return out

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
