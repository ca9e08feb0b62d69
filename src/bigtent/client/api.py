"""Typed async HTTP client for the runner's ``/api/v1`` (docs/api.md)."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterable, AsyncIterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import quote, urlsplit

import httpx
from pydantic import BaseModel, ValidationError

from bigtent.apimodels import (
    WAITED_HEADER,
    Agent,
    Agents,
    AttemptList,
    Build,
    Builder,
    Builders,
    BuildList,
    CreatedToken,
    Drained,
    Missing,
    RunnerStatus,
    Step,
    StepAttempt,
    StepList,
    TokenInfo,
    Tokens,
)
from bigtent.client.models import Launches, PinInfo, PinList, Uploaded
from bigtent.client.sse import LOG_STREAM_READ_SECS, LogEvent, SseParser
from bigtent.errors import (
    AuthError,
    BadRequest,
    BigtentError,
    Conflict,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    ProtocolError,
    RunnerUnreachable,
    StorageFull,
    TooManyAuthFailures,
    UsageError,
    describe,
    parse_error_body,
)
from bigtent.narbatch import CONTENT_TYPE
from bigtent.tlsctx import httpx_verify_for

log = logging.getLogger(__name__)

_M = TypeVar("_M", bound=BaseModel)

DEFAULT_TIMEOUT_SECS = 30.0
"""Connect/read timeout of ordinary API calls (uploads have no read/write deadline)."""

API_PREFIX = "/api/v1"


_STATUS_ERRORS: dict[int, type[BigtentError]] = {
    400: BadRequest,
    401: AuthError,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    507: StorageFull,
}


_LOCATIONS = frozenset({"body", "path", "query", "header"})


def validation_problems(detail: Any) -> list[str]:
    """The runner's reasons for refusing a malformed request (its ``detail`` list of
    ``{"loc", "msg"}``), each as ``priority: Input should be less than or equal to 1000``;
    [] when ``detail`` is not such a list."""
    if not isinstance(detail, list):
        return []
    problems = []
    for item in detail:
        if not isinstance(item, dict) or not isinstance(item.get("msg"), str):
            return []
        loc = item.get("loc")
        parts = [str(p) for p in loc] if isinstance(loc, list) else []
        if parts and parts[0] in _LOCATIONS:
            parts = parts[1:]
        where = ".".join(parts)
        problems.append(f"{where}: {item['msg']}" if where else item["msg"])
    return problems


def error_from_response(status: int, body: bytes, url: str) -> BigtentError:
    """The ``BigtentError`` for an error answer, carrying the runner's own message.

    The runner answers ``{"error": "...", "detail": ...}``; a body that is not that (a proxy's
    HTML page, say) still gives an error naming the status and URL. A request the runner found
    malformed (its ``detail`` lists why) is a ``UsageError`` (exit 2) with those reasons.
    """
    answer = parse_error_body(body)
    detail = answer.detail
    message = answer.message or ""
    if not message:
        text = answer.text.strip()
        message = f"HTTP {status} from {url}" + (f": {text[:200]}" if text else "")
    problems = validation_problems(detail) if status in (400, 422) else []
    if problems:
        return UsageError(f"{message}: {'; '.join(problems)}", detail=detail)
    if status == 429:
        retry = detail.get("retry_after_secs") if isinstance(detail, dict) else None
        return TooManyAuthFailures(
            message or "too many failed authentication attempts",
            retry_after_secs=retry if isinstance(retry, int) else 1,
        )
    cls = _STATUS_ERRORS.get(status)
    if cls is None:
        if status in (502, 503, 504):
            return RunnerUnreachable(
                f"runner at {url} is unavailable (HTTP {status}): {message}",
                detail={"status": status},
            )
        return BigtentError(f"runner error (HTTP {status}): {message}", detail=detail)
    return cls(message, detail=detail)


_NO_ROUTE = frozenset({404, 405})
"""How a runner older than a route answers it: no such path (404), or a path known only for
other methods (405)."""


async def _once(body: bytes) -> AsyncIterator[bytes]:
    """``body`` as the one chunk of a streamed request body (``_request`` sends a streamed
    body to one runner only; the upload's caller rides an outage out and sends it again)."""
    yield body


def checked_id(value: int | str, what: str) -> str:
    """A build or step id as given on the command line: a positive number, else a
    ``UsageError`` (exit 2) before anything is sent."""
    text = str(value).strip()
    if not (text.isascii() and text.isdigit()) or int(text) == 0:
        raise UsageError(f"{what} id must be a positive number (got {value!r})")
    return text


def runner_answered(exc: RunnerUnreachable) -> bool:
    """Whether the runner (or a proxy) answered with an HTTP status, so the request was not
    taken; False for a connection that failed or broke (the request may have been taken)."""
    return isinstance(exc.detail, dict) and isinstance(exc.detail.get("status"), int)


def not_sent(exc: BaseException) -> bool:
    """Whether the request never reached a runner (no connection could be opened)."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, httpx.ConnectError | httpx.ConnectTimeout):
            return True
        cause = cause.__cause__
    return False


def url_problem(url: str) -> str | None:
    """What is wrong with an http(s) URL (no host, a bad port, whitespace), or None (pure)."""
    if any(c.isspace() for c in url):
        return "it contains whitespace"
    try:
        host = urlsplit(url).hostname
        port = urlsplit(url).port
        httpx.URL(url)
    except (ValueError, httpx.InvalidURL) as exc:
        return str(exc) or "it cannot be parsed"
    if not host:
        return "it names no host"
    if port == 0:
        return "port 0"
    return None


def runner_urls(given: str | Sequence[str]) -> list[str]:
    """The runner URLs of ``--runner`` (repeatable) or ``BIGTENT_URL`` (comma-separated),
    in order, each checked; raises ``UsageError`` for none or a malformed one."""
    items = [given] if isinstance(given, str) else list(given)
    urls: list[str] = []
    for item in items:
        for part in item.split(","):
            url = part.strip().rstrip("/")
            if not url:
                continue
            if not url.startswith(("http://", "https://")):
                raise UsageError(
                    f"runner URL must start with http:// or https:// (got {part.strip()!r}); "
                    "set --runner or BIGTENT_URL"
                )
            problem = url_problem(url)
            if problem is not None:
                raise UsageError(
                    f"invalid runner URL {part.strip()!r}: {problem}; set --runner or BIGTENT_URL"
                )
            if url not in urls:
                urls.append(url)
    if not urls:
        raise UsageError("no runner URL given; set --runner or BIGTENT_URL")
    return urls


class RunnerClient:
    """One HTTP connection pool to one runner; use as ``async with RunnerClient(...) as c``.

    ``token`` goes in ``Authorization: Bearer``; ``ca_file`` replaces the system roots for a
    runner with a private CA; ``transport`` lets tests answer requests in-process.
    """

    def __init__(
        self,
        base_url: str | Sequence[str],
        *,
        token: str | None = None,
        ca_file: Path | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout_secs: float = DEFAULT_TIMEOUT_SECS,
        token_source: str | None = None,
    ) -> None:
        self.base_urls = runner_urls(base_url)
        self.base_url = self.base_urls[0]
        headers = {"User-Agent": "bigtent-client"}
        self.token_source = (token_source or "the command line") if token else None
        """Where the token came from (``BIGTENT_TOKEN``, ``--token-file FILE``), named when
        the runner refuses it; None without a token."""
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.batch_uploads = True
        """False once the runner answered that it has no batch upload route (an older
        runner): paths are then uploaded one by one."""
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            verify=httpx_verify_for(self.base_urls, ca_file, "CA file", os.environ),
            transport=transport,
            timeout=httpx.Timeout(timeout_secs),
            trust_env=transport is None,
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # ---- plumbing -----------------------------------------------------------------------
    async def _request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, str | int] | None = None,
        content: AsyncIterable[bytes] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: httpx.Timeout | None = None,
        answered: frozenset[int] = frozenset(),
    ) -> httpx.Response:
        """The runner's answer; an error status raises, unless it is one of ``answered``."""
        url = API_PREFIX + path
        extra: dict[str, Any] = {}
        if timeout is not None:
            extra["timeout"] = timeout
        # Several runners sharing one database: a runner that cannot answer (no connection,
        # 502/503/504) is passed over for the next one. A streamed body cannot be sent twice,
        # and a request whose connection broke may have been taken: those only move the next
        # request on.
        tries = len(self.base_urls) if content is None else 1
        failed: list[str] = []
        for tried in range(1, tries + 1):
            try:
                return await self._request_once(
                    method, url, json_body, params, content, headers, extra, answered
                )
            except RunnerUnreachable as exc:
                if len(self.base_urls) == 1:
                    raise
                failed.append(self.base_url)
                self._next_runner()
                log.warning("%s; trying %s", describe(exc), self.base_url)
                if tried == tries or not (runner_answered(exc) or not_sent(exc)):
                    raise RunnerUnreachable(
                        f"{exc} (runners tried: {', '.join(failed)})", detail=exc.detail
                    ) from exc
        raise AssertionError("unreachable")

    def _next_runner(self) -> None:
        at = self.base_urls.index(self.base_url)
        self.base_url = self.base_urls[(at + 1) % len(self.base_urls)]
        self._http.base_url = httpx.URL(self.base_url)

    async def _request_once(
        self,
        method: str,
        url: str,
        json_body: Any,
        params: Mapping[str, str | int] | None,
        content: AsyncIterable[bytes] | None,
        headers: Mapping[str, str] | None,
        extra: dict[str, Any],
        answered: frozenset[int] = frozenset(),
    ) -> httpx.Response:
        try:
            resp = await self._http.request(
                method,
                url,
                json=json_body,
                params=params,
                content=content,
                headers=headers,
                **extra,
            )
        except httpx.TimeoutException as exc:
            raise RunnerUnreachable(
                f"cannot reach runner at {self.base_url}: timed out ({type(exc).__name__})"
            ) from exc
        except httpx.UnsupportedProtocol as exc:
            raise UsageError(f"unsupported runner URL {self.base_url!r}: {exc}") from exc
        except httpx.TransportError as exc:
            reason = str(exc) or type(exc).__name__
            raise RunnerUnreachable(f"cannot reach runner at {self.base_url}: {reason}") from exc
        log.debug("%s %s -> %s", method, url, resp.status_code)
        if resp.status_code >= 400 and resp.status_code not in answered:
            error = error_from_response(resp.status_code, resp.content, f"{self.base_url}{url}")
            if resp.status_code == 401:
                error = AuthError(self._refused(error.message), detail=error.detail)
            raise error
        return resp

    def _refused(self, reason: str) -> str:
        """A 401's message: which runner refused which credential, and how to give one."""
        if self.token_source is None:
            return (
                f"the runner at {self.base_url} needs a client token ({reason}): set "
                "BIGTENT_TOKEN to the token or pass --token-file FILE"
            )
        return (
            f"the runner at {self.base_url} refused the token from {self.token_source} "
            f"({reason}): give a valid token in BIGTENT_TOKEN or with --token-file FILE"
        )

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._decoded(await self._request(method, path, **kwargs), method, path)

    @staticmethod
    def _decoded(resp: httpx.Response, method: str, path: str) -> Any:
        try:
            return resp.json()
        except ValueError as exc:
            raise ProtocolError(
                f"runner answered {method} {path} with invalid JSON (HTTP {resp.status_code})"
            ) from exc

    @staticmethod
    def _parse(model: type[_M], data: Any, what: str) -> _M:
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise ProtocolError(f"runner sent an unexpected {what}: {exc}") from exc

    # ---- endpoints ------------------------------------------------------------------------
    async def fetch_status(self) -> RunnerStatus:
        return self._parse(RunnerStatus, await self._json("GET", "/status"), "status")

    async def missing_paths(self, paths: Sequence[str]) -> list[str]:
        """The subset of ``paths`` the runner's cache lacks."""
        if not paths:
            return []
        data = await self._json("POST", "/paths/missing", json_body={"paths": list(paths)})
        return self._parse(Missing, data, "missing-paths answer").missing

    async def upload_path(
        self,
        path: str,
        nar: AsyncIterable[bytes],
        *,
        nar_hash: str,
        nar_size: int,
        references: Sequence[str],
    ) -> str:
        """Upload one store path's NAR (streamed); references are basenames.

        The body streams, so there is no deadline on the transfer as a whole, only on
        connecting and on each read.
        """
        basename = path.rsplit("/", 1)[-1]
        headers = {
            "Content-Type": "application/x-nix-nar",
            "Content-Length": str(nar_size),
            "X-Nar-Hash": nar_hash,
            "X-Nar-Size": str(nar_size),
            "X-Nar-References": " ".join(references),
        }
        timeout = httpx.Timeout(DEFAULT_TIMEOUT_SECS, write=None, read=None)
        data = await self._json(
            "PUT", f"/paths/{basename}", content=nar, headers=headers, timeout=timeout
        )
        return self._parse(Uploaded, data, "upload answer").path or path

    async def upload_paths(self, body: bytes) -> bool:
        """Upload many small paths in one batch body (``narbatch``: built by the caller, in
        dependency order); False when the runner has no batch route (an older runner answers
        404 or 405: upload each path with ``upload_path`` instead)."""
        headers = {"Content-Type": CONTENT_TYPE, "Content-Length": str(len(body))}
        timeout = httpx.Timeout(DEFAULT_TIMEOUT_SECS, write=None, read=None)
        resp = await self._request(
            "POST",
            "/paths/batch",
            content=_once(body),
            headers=headers,
            timeout=timeout,
            answered=_NO_ROUTE,
        )
        return resp.status_code not in _NO_ROUTE

    async def create_build(
        self,
        drvs: Sequence[str],
        *,
        priority: int = 0,
        repository: str | None = None,
        ref: str | None = None,
        trusted: bool = True,
        submission: str | None = None,
    ) -> Build:
        """Create a build; ``trusted`` asks for a trusted one, which the runner grants only
        to a trusted token and a ref that is no pull request (the answer says).
        ``submission``: the random key of this submission, the same on each retry of it (the
        runner answers the build the first attempt created, or replaces one whose admission
        a stop of the runner interrupted)."""
        body: dict[str, Any] = {"drvs": list(drvs), "priority": priority}
        if submission is not None:
            body["submission"] = submission
        if repository is not None:
            body["repository"] = repository
        if ref is not None:
            body["ref"] = ref
        if not trusted:
            body["trusted"] = False
        data = await self._json("POST", "/builds", json_body=body)
        return self._parse(Build, data, "build")

    async def fetch_build(self, build_id: int | str) -> Build:
        return self._parse(
            Build, await self._json("GET", f"/builds/{checked_id(build_id, 'build')}"), "build"
        )

    async def wait_for_build(
        self, build_id: int | str, *, wait_secs: float, seen: str
    ) -> tuple[Build, bool]:
        """The build once it is no longer as ``seen`` (its ``progress_token``, or its state
        alone) or after ``wait_secs``, and whether the runner waited (``WAITED_HEADER``): an
        older runner ignores the parameters and answers at once."""
        path = f"/builds/{checked_id(build_id, 'build')}"
        params: dict[str, str | int] = {"wait": f"{wait_secs:g}", "seen": seen}
        resp = await self._request("GET", path, params=params)
        build = self._parse(Build, self._decoded(resp, "GET", path), "build")
        return build, WAITED_HEADER in resp.headers

    async def fetch_builds(
        self,
        *,
        limit: int = 50,
        states: Sequence[str] = (),
        repository: str | None = None,
        ref: str | None = None,
        mine: bool = False,
    ) -> list[Build]:
        """The newest builds, newest first, filtered by the runner: in one of ``states``
        (any when empty), of ``repository``, of ``ref``, and (``mine``) created by this
        client's token."""
        params: dict[str, str | int] = {"limit": limit}
        if states:
            params["state"] = ",".join(states)
        if repository is not None:
            params["repository"] = repository
        if ref is not None:
            params["ref"] = ref
        if mine:
            params["mine"] = "true"
        data = await self._json("GET", "/builds", params=params)
        return self._parse(BuildList, data, "build list").builds

    async def fetch_steps(self, build_id: int | str) -> list[Step]:
        data = await self._json("GET", f"/builds/{checked_id(build_id, 'build')}/steps")
        return self._parse(StepList, data, "step list").steps

    async def fetch_attempts(
        self, build_id: int | str, *, after: int = 0, limit: int = 1000
    ) -> list[StepAttempt]:
        """The attempts of the build's steps with a record id above ``after``, oldest first,
        at most ``limit`` (ask again with the last id while answers come full)."""
        data = await self._json(
            "GET",
            f"/builds/{checked_id(build_id, 'build')}/attempts",
            params={"after": after, "limit": limit},
        )
        return self._parse(AttemptList, data, "attempt list").attempts

    async def fetch_step(self, step_id: int | str) -> Step:
        return self._parse(
            Step, await self._json("GET", f"/steps/{checked_id(step_id, 'step')}"), "step"
        )

    async def fetch_log(self, step_id: int | str) -> str:
        resp = await self._request("GET", f"/steps/{checked_id(step_id, 'step')}/log")
        return resp.text

    async def stream_step_log(
        self, step_id: int | str, *, start: int = 0
    ) -> AsyncIterator[LogEvent]:
        """The step's log from byte ``start`` on, as the runner streams it
        (``GET /steps/{id}/events``, server-sent events): ``log`` pieces while the step runs,
        then one ``end`` event with its final state. The stream may also end without one
        (this reader fell too far behind, or the connection ended): ask again from the last
        offset."""
        url = f"{API_PREFIX}/steps/{step_id}/events"
        timeout = httpx.Timeout(DEFAULT_TIMEOUT_SECS, read=LOG_STREAM_READ_SECS)
        try:
            async with self._http.stream(
                "GET", url, params={"from": start}, timeout=timeout
            ) as resp:
                if resp.status_code >= 400:
                    body = await resp.aread()
                    raise error_from_response(resp.status_code, body, f"{self.base_url}{url}")
                parser = SseParser()
                async for line in resp.aiter_lines():
                    event = parser.feed(line)
                    if event is not None:
                        yield event
        except httpx.TimeoutException as exc:
            raise RunnerUnreachable(
                f"cannot reach runner at {self.base_url}: timed out ({type(exc).__name__})"
            ) from exc
        except httpx.TransportError as exc:
            reason = str(exc) or type(exc).__name__
            raise RunnerUnreachable(f"cannot reach runner at {self.base_url}: {reason}") from exc

    async def fetch_agents(self) -> list[Agent]:
        return self._parse(Agents, await self._json("GET", "/agents"), "agent list").agents

    async def fetch_builders(self) -> list[Builder]:
        return self._parse(Builders, await self._json("GET", "/builders"), "builder list").builders

    async def cancel_build(self, build_id: int | str) -> Build:
        return self._parse(
            Build,
            await self._json("POST", f"/builds/{checked_id(build_id, 'build')}/cancel"),
            "build",
        )

    async def bump_build(self, build_id: int | str, *, priority: int | None = None) -> Build:
        body = {} if priority is None else {"priority": priority}
        data = await self._json(
            "POST", f"/builds/{checked_id(build_id, 'build')}/bump", json_body=body
        )
        return self._parse(Build, data, "build")

    async def restart_build(self, build_id: int | str) -> Build:
        """Rebuild the build's failed, dependency-failed and cancelled steps (clearing their
        cached failures)."""
        data = await self._json("POST", f"/builds/{checked_id(build_id, 'build')}/restart")
        return self._parse(Build, data, "build")

    async def drain_agent(self, name: str) -> str:
        """Tell a connected agent to finish its running steps and take no new ones (admin);
        returns the agent's name."""
        data = await self._json("POST", f"/agents/{quote(name, safe='')}/drain")
        return self._parse(Drained, data, "drain answer").drained

    async def create_token(
        self, role: str, *, name: str | None = None, trusted: bool = False
    ) -> CreatedToken:
        """Store a new token in the runner (admin token); the answer holds its secret."""
        body: dict[str, Any] = {"role": role, "trusted": trusted}
        if name is not None:
            body["name"] = name
        data = await self._json("POST", "/tokens", json_body=body)
        return self._parse(CreatedToken, data, "token")

    async def fetch_launches(self, *, limit: int = 100, pool: str | None = None) -> Launches:
        """The autoscaler's pools and its launches, newest first (admin token)."""
        params: dict[str, str | int] = {"limit": limit}
        if pool is not None:
            params["pool"] = pool
        data = await self._json("GET", "/launches", params=params)
        return self._parse(Launches, data, "launch list")

    async def add_pin(self, name: str, paths: Sequence[str], keep_days: float | None) -> PinInfo:
        """Create or replace pin ``name`` (admin token)."""
        body: dict[str, Any] = {"paths": list(paths), "keep_days": keep_days}
        data = await self._json("PUT", f"/pins/{quote(name, safe='')}", json_body=body)
        return self._parse(PinInfo, data, "pin")

    async def fetch_pins(self) -> list[PinInfo]:
        return self._parse(PinList, await self._json("GET", "/pins"), "pin list").pins

    async def remove_pin(self, name: str) -> None:
        await self._json("DELETE", f"/pins/{quote(name, safe='')}")

    async def collect_garbage(self, *, dry_run: bool) -> dict[str, Any]:
        """Run a collection of the runner's caches now (admin token); its report. No read
        deadline: a large cache takes a while."""
        timeout = httpx.Timeout(DEFAULT_TIMEOUT_SECS, read=None)
        data = await self._json("POST", "/gc", json_body={"dry_run": dry_run}, timeout=timeout)
        if not isinstance(data, dict):
            raise ProtocolError("runner sent an unexpected collection report")
        return data

    async def fetch_tokens(self) -> list[TokenInfo]:
        return self._parse(Tokens, await self._json("GET", "/tokens"), "token list").tokens

    async def revoke_token(self, name: str) -> TokenInfo:
        data = await self._json("DELETE", f"/tokens/{quote(name, safe='')}")
        return self._parse(TokenInfo, data, "token")

    # ---- Nix CI (docs/ci.md): plain JSON, shaped by the CLI ---------------------------------
    async def ci_json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """A CI route's JSON object (``/projects``, ``/evaluations``)."""
        data = await self._json(method, path, **kwargs)
        if not isinstance(data, dict):
            raise ProtocolError(f"runner answered {method} {path} with no JSON object")
        return data
