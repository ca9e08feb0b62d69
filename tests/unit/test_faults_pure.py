"""The pure parts of the storage and database fault handling: error reasons that are never
empty, the database-outage mapping, runner URL lists and failover, riding out an outage,
507 on the client, and judging a stored NAR file."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable

import asyncpg.exceptions
import httpx
import pytest
import sqlalchemy.exc

from bigtent.client.api import RunnerClient, error_from_response, runner_urls
from bigtent.client.observer import SilentObserver
from bigtent.client.outage import riding_out
from bigtent.errors import (
    DatabaseError,
    RunnerUnreachable,
    StorageFull,
    UsageError,
    describe,
)
from bigtent.nix import base32
from bigtent.nix.narinfo import NarInfo
from bigtent.runner.cache.verify import judge_file
from bigtent.runner.db.migrate import database_unavailable


# ---- describe -------------------------------------------------------------------------------
def test_describe_never_leaves_the_reason_empty() -> None:
    assert describe(httpx.WriteError("")) == "WriteError"
    assert describe(ValueError("bad")) == "bad"


def test_describe_adds_the_cause_of_an_empty_error() -> None:
    try:
        try:
            raise OSError(28, "No space left on device")
        except OSError as inner:
            raise httpx.WriteError("") from inner
    except httpx.WriteError as exc:
        assert describe(exc) == "WriteError ([Errno 28] No space left on device)"


# ---- database outage ------------------------------------------------------------------------
def _dbapi(cls: type[sqlalchemy.exc.DBAPIError], orig: Exception) -> sqlalchemy.exc.DBAPIError:
    return cls("SELECT 1", {}, orig)


def _caused_by(cause: BaseException) -> Exception:
    """A driver-adapted error whose cause is ``cause`` (as SQLAlchemy's asyncpg adapter makes)."""
    wrapper = Exception("terminating connection due to administrator command")
    wrapper.__cause__ = cause
    return wrapper


@pytest.mark.parametrize(
    "exc",
    [
        _dbapi(sqlalchemy.exc.OperationalError, Exception("server closed the connection")),
        _dbapi(sqlalchemy.exc.InterfaceError, Exception("connection is closed")),
        sqlalchemy.exc.TimeoutError("QueuePool limit"),
        ConnectionRefusedError(111, "Connect call failed"),
        asyncpg.exceptions.CannotConnectNowError("the database system is starting up"),
        _dbapi(sqlalchemy.exc.DBAPIError, _caused_by(asyncpg.exceptions.AdminShutdownError())),
    ],
)
def test_connection_failures_are_503(exc: Exception) -> None:
    failure = database_unavailable(exc)
    assert isinstance(failure, DatabaseError) and failure.http_status == 503
    assert failure.message.startswith("the database is unavailable: ")


@pytest.mark.parametrize(
    "exc",
    [
        _dbapi(sqlalchemy.exc.IntegrityError, Exception("duplicate key")),
        _dbapi(sqlalchemy.exc.ProgrammingError, Exception("syntax error")),
        ValueError("not the database"),
    ],
)
def test_other_database_errors_stay_bugs(exc: Exception) -> None:
    assert database_unavailable(exc) is None


# ---- runner URLs and failover ---------------------------------------------------------------
def test_runner_urls_from_flags_and_commas() -> None:
    assert runner_urls("http://a:1, https://b:2/,http://a:1") == ["http://a:1", "https://b:2"]
    assert runner_urls(["http://a:1", "http://b:2,http://c:3"]) == [
        "http://a:1",
        "http://b:2",
        "http://c:3",
    ]
    with pytest.raises(UsageError, match="http:// or https://"):
        runner_urls("http://a:1,ftp://b")
    with pytest.raises(UsageError, match="no runner URL"):
        runner_urls(" , ")


async def test_client_fails_over_on_503_and_stays_with_the_runner_that_answered() -> None:
    asked: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.host)
        if request.url.host == "a":
            return httpx.Response(503, json={"error": "the database is unavailable: x"})
        return httpx.Response(200, json={"version": "1"})

    transport = httpx.MockTransport(handler)
    async with RunnerClient("http://a:1,http://b:1", transport=transport) as client:
        assert (await client.fetch_status()).version == "1"
        assert (await client.fetch_status()).version == "1"
        assert client.base_url == "http://b:1"
    assert asked == ["a", "b", "b"]


async def test_client_names_every_runner_when_none_answers() -> None:
    transport = httpx.MockTransport(lambda r: httpx.Response(503, json={"error": "down"}))
    async with RunnerClient("http://a:1,http://b:1", transport=transport) as client:
        with pytest.raises(RunnerUnreachable, match="runners tried: http://a:1, http://b:1"):
            await client.fetch_status()


async def test_a_request_whose_connection_broke_is_not_sent_to_the_next_runner() -> None:
    asked: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.host)
        if request.url.host == "a":
            raise httpx.RemoteProtocolError("peer closed")  # the build may have been made
        return httpx.Response(201, json={})

    transport = httpx.MockTransport(handler)
    async with RunnerClient("http://a:1,http://b:1", transport=transport) as client:
        with pytest.raises(RunnerUnreachable, match="runners tried: http://a:1"):
            await client.create_build(["/nix/store/" + "a" * 32 + "-x.drv"])
        assert client.base_url == "http://b:1"  # the next request goes there
    assert asked == ["a"]


async def test_a_refused_connection_is_sent_to_the_next_runner() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "a":
            raise httpx.ConnectError("connection refused")
        return httpx.Response(200, json={"version": "2"})

    transport = httpx.MockTransport(handler)
    async with RunnerClient("http://a:1,http://b:1", transport=transport) as client:
        assert (await client.fetch_status()).version == "2"


def test_507_is_storage_full_with_the_cause() -> None:
    err = error_from_response(507, b'{"error": "the runner\'s NAR storage is full"}', "u")
    assert isinstance(err, StorageFull) and "storage is full" in err.message


# ---- riding out an outage -------------------------------------------------------------------
class _Phases(SilentObserver):
    def __init__(self) -> None:
        self.phases: list[str] = []

    def on_phase(self, message: str) -> None:
        self.phases.append(message)


def _failing(times: int, exc: RunnerUnreachable) -> Callable[[], Awaitable[str]]:
    calls = 0

    async def request() -> str:
        nonlocal calls
        calls += 1
        if calls <= times:
            raise exc
        return "ok"

    return request


async def test_riding_out_retries_with_one_visible_line() -> None:
    observer = _Phases()
    exc = RunnerUnreachable("runner at u is unavailable (HTTP 503): db", detail={"status": 503})
    assert await riding_out(_failing(2, exc), observer) == "ok"
    assert observer.phases == [f"runner unavailable, retrying: {exc}"]


async def test_riding_out_gives_up_after_its_bound() -> None:
    exc = RunnerUnreachable("cannot reach runner at u: refused")
    with pytest.raises(RunnerUnreachable):
        await riding_out(_failing(100, exc), _Phases(), grace_secs=0.0)


async def test_a_request_sent_once_is_not_repeated_after_a_broken_connection() -> None:
    broken = RunnerUnreachable("cannot reach runner at u: peer closed")
    with pytest.raises(RunnerUnreachable):
        await riding_out(_failing(1, broken), _Phases(), sent_once=True)
    refused = RunnerUnreachable("unavailable (HTTP 503)", detail={"status": 503})
    assert await riding_out(_failing(1, refused), _Phases(), sent_once=True) == "ok"


# ---- a stored NAR file against its narinfo ----------------------------------------------------
def _info(data: bytes) -> NarInfo:
    digest = base32.format_hash("sha256", hashlib.sha256(data).digest())
    return NarInfo(
        store_path="/nix/store/" + "a" * 32 + "-x",
        url="nar/x.nar.zst",
        compression="zstd",
        file_hash=digest,
        file_size=len(data),
        nar_hash=digest,
        nar_size=len(data),
        references=(),
        deriver=None,
        sigs=(),
        ca=None,
    )


def test_judge_file() -> None:
    info = _info(b"hello")
    assert judge_file(info, 5, hashlib.sha256(b"hello").digest()) is None
    assert "has 4 bytes" in (judge_file(info, 4, hashlib.sha256(b"hell").digest()) or "")
    assert "hashes to" in (judge_file(info, 5, hashlib.sha256(b"jello").digest()) or "")
