"""GitHub check runs through a GitHub App.

The app authenticates with a JSON web token (RS256, signed with the app's private key: issued
a minute in the past against clock skew, valid nine minutes), exchanges it for an
installation access token (``POST /app/installations/{id}/access_tokens``, asking only for
``checks: write``), and creates (``POST /repos/{o}/{r}/check-runs``) and updates
(``PATCH /repos/{o}/{r}/check-runs/{id}``) check runs with that token. The installation id is
looked up from the repository (``GET /repos/{o}/{r}/installation``) when the project does not
give it. Tokens are cached until five minutes before they expire; one the API refuses (401) is
dropped and fetched anew once.

Plain httpx and PyJWT (both already dependencies) rather than an SDK: four calls, each of
whose failures must become a :class:`~bigtent.errors.ForgeFailed` that the outbox retries on
its own schedule (an SDK's retry would sleep inside the call).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import httpx
import jwt

from bigtent.errors import ForgeFailed
from bigtent.runner.autoscale.github import API_VERSION
from bigtent.runner.forge.http import call, make_client, read_credential
from bigtent.runner.forge.reporting import Check

JWT_BACKDATE_SECS = 60
JWT_LIFETIME_SECS = 540
"""GitHub accepts at most ten minutes; a little less keeps clock skew harmless."""
TOKEN_MARGIN_SECS = 300.0
"""An installation token is fetched anew this long before it expires (they last an hour)."""

_KEY_HINT = (
    "GitHub refused the app's JSON web token: check the project's github_app_id and "
    "github_app_key_file (the app's private key, PEM) and the runner's clock"
)


def app_jwt(app_id: int, key_pem: bytes, now: float) -> str:
    """The app's JSON web token at ``now`` (pure but for the signature)."""
    issued = int(now) - JWT_BACKDATE_SECS
    claims = {"iat": issued, "exp": issued + JWT_LIFETIME_SECS, "iss": str(app_id)}
    try:
        return jwt.encode(claims, key_pem, algorithm="RS256")
    except (ValueError, TypeError, jwt.PyJWTError) as exc:
        raise ForgeFailed(
            f"cannot sign the GitHub App's JSON web token with its key: {exc}"
        ) from None


def token_expiry(expires_at: Any, now: float) -> float:
    """An installation token's ``expires_at`` (ISO 8601) as epoch seconds; an hour from
    ``now`` when it is missing or unreadable (GitHub's tokens last an hour)."""
    if isinstance(expires_at, str):
        try:
            when = dt.datetime.fromisoformat(expires_at.replace("Z", "+00:00"))
        except ValueError:
            when = None
        if when is not None and when.tzinfo is not None:
            return when.timestamp()
    return now + 3600.0


def check_run_body(check: Check) -> dict[str, Any]:
    """The JSON of a check run create/update (without ``head_sha``)."""
    output: dict[str, str] = {"title": check.title, "summary": check.summary or check.title}
    if check.text:
        output["text"] = check.text
    body: dict[str, Any] = {
        "name": check.name,
        "external_id": check.external_id,
        "status": str(check.status),
        "output": output,
    }
    if check.conclusion is not None:
        body["conclusion"] = str(check.conclusion)
    if check.details_url.startswith(("https://", "http://")):
        body["details_url"] = check.details_url
    return body


def _repo_path(repository: str) -> str:
    owner, _, name = repository.partition("/")
    return f"/repos/{quote(owner, safe='')}/{quote(name, safe='')}"


class GithubApp:
    """One GitHub App on one API: its JWTs, its installations' tokens (cached) and the check
    runs it writes. ``transport`` replaces the network (tests)."""

    def __init__(
        self,
        api_url: str,
        app_id: int,
        key_file: str,
        *,
        ca_file: str | None = None,
        timeout_secs: float = 30.0,
        clock: Callable[[], float] = time.time,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self.app_id = app_id
        self.key_file = key_file
        self.timeout_secs = timeout_secs
        self.clock = clock
        self._client = make_client(
            ca_file=ca_file,
            what="the project's forge_ca_file",
            timeout_secs=timeout_secs,
            headers={"Accept": "application/vnd.github+json", "X-GitHub-Api-Version": API_VERSION},
            transport=transport,
        )
        self._installations: dict[str, int] = {}
        self._tokens: dict[int, tuple[str, float]] = {}
        self._lock = asyncio.Lock()
        self.token_requests = 0
        """Installation tokens fetched so far (the cache's effect, for tests and logs)."""

    async def aclose(self) -> None:
        await self._client.aclose()

    def _jwt(self) -> str:
        key = read_credential(self.key_file, "the GitHub App key file")
        return app_jwt(self.app_id, key, self.clock())

    async def _as_app(self, method: str, path: str, where: str, body: Any = None) -> Any:
        """A call as the app. Its failures are never permanent: they are about the app's
        credentials or installation, not about the check being sent, and an operator can fix
        them (a new key, installing the app) without any report changing."""
        try:
            return await call(
                self._client,
                method,
                self.api_url + path,
                where=where,
                now=self.clock(),
                headers={"Authorization": f"Bearer {self._jwt()}"},
                body=body,
                timeout_secs=self.timeout_secs,
                hints={401: _KEY_HINT, 404: "is the app installed on the repository?"},
            )
        except ForgeFailed as exc:
            exc.permanent = False
            raise

    async def installation_id(self, repository: str, configured: int | None = None) -> int:
        """The app's installation on ``repository`` (``configured`` when given)."""
        if configured is not None:
            return configured
        known = self._installations.get(repository)
        if known is not None:
            return known
        doc = await self._as_app(
            "GET",
            _repo_path(repository) + "/installation",
            f"GitHub App {self.app_id}: looking up its installation on {repository}",
        )
        if not isinstance(doc, dict) or not isinstance(doc.get("id"), int):
            raise ForgeFailed(f"GitHub: the installation of {repository} has no id")
        self._installations[repository] = doc["id"]
        return int(doc["id"])

    async def token(self, installation: int) -> str:
        """An installation access token, from the cache while it has five minutes left."""
        async with self._lock:
            cached = self._tokens.get(installation)
            now = self.clock()
            if cached is not None and cached[1] - TOKEN_MARGIN_SECS > now:
                return cached[0]
            try:
                doc = await self._as_app(
                    "POST",
                    f"/app/installations/{installation}/access_tokens",
                    f"GitHub App {self.app_id}: an access token for installation {installation}",
                    body={"permissions": {"checks": "write"}},
                )
            except ForgeFailed as exc:
                if exc.status == 404:  # uninstalled (or installed anew): look it up again
                    for repo in [r for r, i in self._installations.items() if i == installation]:
                        del self._installations[repo]
                raise
            if not isinstance(doc, dict) or not isinstance(doc.get("token"), str):
                raise ForgeFailed("GitHub: the access token answer has no token")
            self.token_requests += 1
            self._tokens[installation] = (doc["token"], token_expiry(doc.get("expires_at"), now))
            return str(doc["token"])

    def forget_token(self, installation: int) -> None:
        self._tokens.pop(installation, None)

    async def _as_installation(
        self, installation: int, method: str, path: str, where: str, body: Any
    ) -> Any:
        for attempt in (1, 2):
            token = await self.token(installation)
            try:
                return await call(
                    self._client,
                    method,
                    self.api_url + path,
                    where=where,
                    now=self.clock(),
                    headers={"Authorization": f"Bearer {token}"},
                    body=body,
                    timeout_secs=self.timeout_secs,
                    hints={
                        403: "the app needs the Checks permission (read and write)",
                        404: "is the app installed on the repository?",
                    },
                )
            except ForgeFailed as exc:
                if exc.status != 401 or attempt == 2:
                    raise
                self.forget_token(installation)  # revoked or expired early: fetch a new one
        raise AssertionError("unreachable")

    async def create_check_run(
        self, repository: str, installation: int, head_sha: str, check: Check
    ) -> int:
        """Create ``check`` on ``head_sha``; its id."""
        body = {**check_run_body(check), "head_sha": head_sha}
        doc = await self._as_installation(
            installation,
            "POST",
            _repo_path(repository) + "/check-runs",
            f"GitHub: creating check run {check.name!r} on {repository}@{head_sha[:12]}",
            body,
        )
        if not isinstance(doc, dict) or not isinstance(doc.get("id"), int):
            raise ForgeFailed(f"GitHub: the new check run {check.name!r} has no id")
        return int(doc["id"])

    async def update_check_run(
        self, repository: str, installation: int, run_id: int, check: Check
    ) -> None:
        await self._as_installation(
            installation,
            "PATCH",
            f"{_repo_path(repository)}/check-runs/{run_id}",
            f"GitHub: updating check run {check.name!r} ({run_id}) on {repository}",
            check_run_body(check),
        )
