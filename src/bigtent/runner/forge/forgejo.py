"""Forgejo and Gitea commit statuses (``POST {api}/repos/{o}/{r}/statuses/{sha}``).

The API URL includes ``/api/v1``. The access token (a file, read at each call so a rotated
token is picked up) is sent as ``Authorization: token …``; it needs the repository's
"write:repository" scope. A status with the same context replaces the previous one on the
forge, so sending a status again is harmless.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from urllib.parse import quote

import httpx

from bigtent.runner.forge.http import call, make_client, read_credential
from bigtent.runner.forge.reporting import CommitStatus


def statuses_path(repository: str, sha: str) -> str:
    owner, _, name = repository.partition("/")
    return f"/repos/{quote(owner, safe='')}/{quote(name, safe='')}/statuses/{quote(sha, safe='')}"


class ForgejoStatuses:
    """Commit statuses on one Forgejo or Gitea API with one token. ``transport`` replaces the
    network (tests)."""

    def __init__(
        self,
        api_url: str,
        token_file: str,
        *,
        ca_file: str | None = None,
        timeout_secs: float = 30.0,
        clock: Callable[[], float] = time.time,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self.token_file = token_file
        self.timeout_secs = timeout_secs
        self.clock = clock
        self._client = make_client(
            ca_file=ca_file,
            what="the project's forge_ca_file",
            timeout_secs=timeout_secs,
            headers={"Accept": "application/json"},
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def set_status(self, repository: str, sha: str, status: CommitStatus) -> None:
        token = read_credential(self.token_file, "the forge token file").decode()
        await call(
            self._client,
            "POST",
            self.api_url + statuses_path(repository, sha),
            where=f"Forgejo: status {status.context!r} on {repository}@{sha[:12]}",
            now=self.clock(),
            headers={"Authorization": f"token {token}"},
            body=status.to_json(),
            timeout_secs=self.timeout_secs,
            hints={
                401: "check the project's forge_token_file",
                403: "the token needs write access to the repository",
                404: "check the project's repository and forge_api_url (with /api/v1)",
            },
        )
