"""A stand-in for GitHub's REST API on loopback HTTPS (the test CA), for the autoscaler and
for the reporting of evaluations (a GitHub App's check runs).

For the autoscaler it answers ``POST /repos/{owner}/{repo}/actions/workflows/{workflow}/dispatches``
like GitHub: it checks the token and the body, records the dispatch, and answers 204 — or,
when told, another status with ``Retry-After``. Like GitHub queuing a run, an accepted
dispatch is handed to ``on_dispatch`` (the test starts the job: a real agent process), unless
the fake was told to only record it (a job that never starts).

For a GitHub App (``app_id`` and ``app_public_key`` given) it serves what the reporter uses:
``GET /repos/{o}/{r}/installation`` and ``POST /app/installations/{id}/access_tokens`` take
the app's JSON web token, verified with the app's *public* key (RS256, ``iss`` the app id, at
most ten minutes long) and answer 401 "A JSON web token could not be decoded" otherwise; the
access token they hand out (one per request, counted) is then the only credential
``POST /repos/{o}/{r}/check-runs`` and ``PATCH /repos/{o}/{r}/check-runs/{id}`` take. Check
runs are recorded as GitHub would hold them (``check_runs``; a completed run's status and
conclusion cannot change: 422), every call in ``calls``; the
next check-run calls can be told to fail (``fail_checks``: e.g. a 403 secondary rate limit
with ``Retry-After``).
"""

from __future__ import annotations

import itertools
import json
import re
import secrets
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt

from tests.integration.runner.oidc_issuer import TlsFiles

_CHECK_RUNS = re.compile(r"/repos/([^/]+)/([^/]+)/check-runs(?:/([0-9]+))?")
_INSTALLATION = re.compile(r"/repos/([^/]+)/([^/]+)/installation")
_ACCESS_TOKENS = re.compile(r"/app/installations/([0-9]+)/access_tokens")


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


@dataclass(frozen=True)
class Call:
    """One request to the app's endpoints, as answered."""

    at: float
    method: str
    path: str
    status: int
    body: Any


@dataclass
class _State:
    dispatches: list[Dispatch] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    check_runs: dict[int, dict[str, Any]] = field(default_factory=dict)
    """Check run id → the run as GitHub holds it (name, head_sha, status, conclusion,
    external_id, details_url, output)."""
    tokens: dict[str, int] = field(default_factory=dict)
    """Installation access tokens handed out → their installation."""
    token_requests: int = 0
    check_failures: list[Failure] = field(default_factory=list)
    script: list[Mode | Failure] = field(default_factory=list)
    """What to do with the next dispatches, in order; then ``default``."""
    default: Mode | Failure = Mode.START
    lock: threading.Lock = field(default_factory=threading.Lock)


class FakeGithub:
    """``https://127.0.0.1:PORT`` accepting workflow dispatches made with ``token`` and, given
    an app id and public key, a GitHub App's token exchange and check runs."""

    def __init__(
        self,
        tls: TlsFiles,
        token: str,
        on_dispatch: Callable[[Dispatch], None],
        *,
        app_id: int | None = None,
        app_public_key: bytes | None = None,
        installation_id: int = 4242,
        token_lifetime_secs: float = 3600.0,
    ) -> None:
        self.token = token
        self.state = _State()
        self.app_id = app_id
        self.app_public_key = app_public_key
        self.installation_id = installation_id
        self.token_lifetime_secs = token_lifetime_secs
        self._ids = itertools.count(1000)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._app_request("GET", None)

            def do_PATCH(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                self._app_request("PATCH", json.loads(self.rfile.read(length) or b"null"))

            def _app_request(self, method: str, body: Any) -> None:
                status, answer, headers = outer._app(method, self.path, self.headers, body)
                with outer.state.lock:
                    outer.state.calls.append(Call(time.time(), method, self.path, status, body))
                self._answer(status, answer, headers)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                raw = self.rfile.read(length)
                if not self.path.endswith("/dispatches"):
                    self._app_request("POST", json.loads(raw or b"null"))
                    return
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

    # ---- the GitHub App's endpoints -----------------------------------------------------------
    def _app_jwt_ok(self, headers: Any) -> bool:
        auth = headers.get("Authorization", "")
        if self.app_public_key is None or not auth.startswith("Bearer "):
            return False
        try:
            claims = jwt.decode(
                auth.removeprefix("Bearer "),
                self.app_public_key,
                algorithms=["RS256"],
                options={"require": ["iat", "exp", "iss"]},
                leeway=60,
            )
        except jwt.PyJWTError:
            return False
        return str(claims["iss"]) == str(self.app_id) and claims["exp"] - claims["iat"] <= 600

    def _app(
        self, method: str, path: str, headers: Any, body: Any
    ) -> tuple[int, Any, dict[str, str]]:
        """GitHub's answer to one App request: (status, JSON body, headers)."""
        bad_jwt = {"message": "A JSON web token could not be decoded"}
        if method == "GET" and (m := _INSTALLATION.fullmatch(path)):
            if not self._app_jwt_ok(headers):
                return 401, bad_jwt, {}
            return 200, {"id": self.installation_id, "account": {"login": m.group(1)}}, {}
        if method == "POST" and (m := _ACCESS_TOKENS.fullmatch(path)):
            if not self._app_jwt_ok(headers):
                return 401, bad_jwt, {}
            if int(m.group(1)) != self.installation_id:
                return 404, {"message": "Not Found"}, {}
            token = f"ghs_{secrets.token_hex(16)}"
            expires = time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + self.token_lifetime_secs)
            )
            with self.state.lock:
                self.state.tokens[token] = self.installation_id
                self.state.token_requests += 1
            return (
                201,
                {"token": token, "expires_at": expires, "permissions": body.get("permissions")},
                {},
            )
        m = _CHECK_RUNS.fullmatch(path)
        if m is None:
            return 404, {"message": "Not Found"}, {}
        auth = headers.get("Authorization", "")
        with self.state.lock:
            if auth.removeprefix("Bearer ") not in self.state.tokens:
                return 401, {"message": "Bad credentials"}, {}
            if self.state.check_failures:
                failure = self.state.check_failures.pop(0)
                extra = {"Retry-After": failure.retry_after} if failure.retry_after else {}
                message = (
                    "You have exceeded a secondary rate limit. Please wait a few minutes."
                    if failure.status in (403, 429)
                    else "Server Error"
                )
                return failure.status, {"message": message}, extra
            run_id = m.group(3)
            if method == "POST" and run_id is None:
                if not isinstance(body.get("head_sha"), str) or not body.get("name"):
                    return 422, {"message": "Validation Failed"}, {}
                new_id = next(self._ids)
                run = {"id": new_id, "repository": f"{m.group(1)}/{m.group(2)}", **body}
                self.state.check_runs[new_id] = run
                return 201, run, {}
            if method == "PATCH" and run_id is not None:
                held = self.state.check_runs.get(int(run_id))
                if held is None:
                    return 404, {"message": "Not Found"}, {}
                # GitHub: a completed check run's status and conclusion are final
                if held["status"] == "completed" and (
                    body.get("status", "completed") != "completed"
                    or body.get("conclusion", held.get("conclusion")) != held.get("conclusion")
                ):
                    return 422, {"message": "a completed check run cannot be reopened"}, {}
                held.update(body)
                return 200, held, {}
        return 404, {"message": "Not Found"}, {}

    def fail_checks(self, *failures: Failure) -> None:
        """Answer the next check-run calls with these failures (then normally)."""
        with self.state.lock:
            self.state.check_failures.extend(failures)

    @property
    def check_runs(self) -> list[dict[str, Any]]:
        """Every check run, oldest first (copies)."""
        with self.state.lock:
            return [json.loads(json.dumps(r)) for r in self.state.check_runs.values()]

    def runs_named(self, name: str, head_sha: str | None = None) -> list[dict[str, Any]]:
        """The check runs of that name (on that commit), oldest first; GitHub shows the last."""
        return [
            r
            for r in self.check_runs
            if r["name"] == name and (head_sha is None or r["head_sha"] == head_sha)
        ]

    @property
    def calls(self) -> list[Call]:
        with self.state.lock:
            return list(self.state.calls)

    @property
    def token_requests(self) -> int:
        with self.state.lock:
            return self.state.token_requests

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
