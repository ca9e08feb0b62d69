"""A stand-in for GitHub Actions' ID token service on loopback, for tests.

A job with ``permissions: id-token: write`` gets ``ACTIONS_ID_TOKEN_REQUEST_URL`` (with a query
string already) and ``ACTIONS_ID_TOKEN_REQUEST_TOKEN``; ``GET URL&audience=AUD`` with
``Authorization: bearer TOKEN`` answers ``{"value": "<JWT>"}``. This endpoint does the same,
minting real RS256 tokens with the loopback OIDC issuer's key (tests/integration/runner/
oidc_issuer.py), so a real runner configured with that issuer accepts them. It counts the
requests, records the audiences asked for and every token handed out (to check none leaks),
and can be told to fail.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.integration.runner.oidc_issuer import LocalIssuer, SigningKey, mint

REPOSITORY = "acme/widgets"
SUBJECT = "repo:acme/widgets:ref:refs/heads/main"
WORKFLOW_REF = "acme/bigtent-agents/.github/workflows/bigtent-agent.yml@refs/heads/main"
PATH = "/_apis/distributedtask/hubs/Actions/plans/p1/jobs/j1/idtoken"


@dataclass
class EndpointState:
    requests: int = 0
    issued: list[str] = field(default_factory=list)
    audiences: list[str] = field(default_factory=list)
    refused: int = 0
    fail_next: list[int] = field(default_factory=list)
    """HTTP statuses to answer the next requests with, in order."""
    lock: threading.Lock = field(default_factory=threading.Lock)


class ActionsTokenEndpoint:
    """``http://127.0.0.1:PORT`` answering ID token requests like GitHub Actions (a thread)."""

    def __init__(
        self,
        issuer: LocalIssuer,
        key: SigningKey,
        *,
        claims: dict[str, Any] | None = None,
        lifetime_secs: int = 300,
    ) -> None:
        self.request_token = "ghs_" + secrets.token_urlsafe(24)
        self.state = EndpointState()
        self.lifetime_secs = lifetime_secs
        base_claims = {
            "iss": issuer.url,
            "sub": SUBJECT,
            "repository": REPOSITORY,
            "ref": "refs/heads/main",
            "job_workflow_ref": WORKFLOW_REF,
            "workflow_ref": WORKFLOW_REF,
            "run_id": "4242",
            **(claims or {}),
        }
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urlsplit(self.path)
                query = parse_qs(url.query)
                state = outer.state
                with state.lock:
                    state.requests += 1
                    failure = state.fail_next.pop(0) if state.fail_next else None
                    if url.path != PATH or query.get("api-version") != ["2.0"]:
                        self._answer(404, {"message": "not found"})
                        return
                    auth = self.headers.get("Authorization", "")
                    scheme, _, value = auth.partition(" ")
                    if scheme.lower() != "bearer" or value != outer.request_token:
                        state.refused += 1
                        self._answer(401, {"message": "bad request token"})
                        return
                    if failure is not None:
                        self._answer(failure, {"message": "try again"})
                        return
                    audiences = query.get("audience", [])
                    if len(audiences) != 1:
                        self._answer(400, {"message": "one audience"})
                        return
                    now = int(time.time())
                    token = mint(
                        key,
                        base_claims
                        | {
                            "aud": audiences[0],
                            "iat": now,
                            "nbf": now,
                            "exp": now + outer.lifetime_secs,
                        },
                    )
                    state.audiences.append(audiences[0])
                    state.issued.append(token)
                self._answer(200, {"count": 1, "value": token})

            def _answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self.request_url = f"http://127.0.0.1:{self.port}{PATH}?api-version=2.0"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self._thread.start()

    def env(self) -> dict[str, str]:
        """The variables a job with ``id-token: write`` has."""
        return {
            "ACTIONS_ID_TOKEN_REQUEST_URL": self.request_url,
            "ACTIONS_ID_TOKEN_REQUEST_TOKEN": self.request_token,
        }

    @property
    def requests(self) -> int:
        with self.state.lock:
            return self.state.requests

    @property
    def issued(self) -> list[str]:
        with self.state.lock:
            return list(self.state.issued)

    @property
    def audiences(self) -> list[str]:
        with self.state.lock:
            return list(self.state.audiences)

    def fail_next(self, *statuses: int) -> None:
        with self.state.lock:
            self.state.fail_next.extend(statuses)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def running_endpoint(
    issuer: LocalIssuer, key: SigningKey, **kwargs: Any
) -> Iterator[ActionsTokenEndpoint]:
    endpoint = ActionsTokenEndpoint(issuer, key, **kwargs)
    try:
        yield endpoint
    finally:
        endpoint.stop()
