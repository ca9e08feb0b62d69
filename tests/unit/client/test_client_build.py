"""The build flow's pure decisions, and the flow itself against a fake store and MockTransport."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bigtent.apimodels import Build, RunnerStatus, StepCounts
from bigtent.client.api import RunnerClient
from bigtent.client.build import BuildOptions, run_build, submit_build
from bigtent.client.follow import BuildTracker, follow_build
from bigtent.client.observer import SilentObserver
from bigtent.client.outputs import (
    ResultLink,
    _sequential,
    download_outputs,
    result_links,
    substituter_options,
)
from bigtent.client.reports import build_report, build_succeeded, failed_roots, summarize_progress
from bigtent.client.upload import (
    _nar_chunks,
    nar_hash_to_nix32,
    upload_closure,
    upload_jobs,
    upload_order,
)
from bigtent.errors import BigtentError, NixError, RunnerUnreachable
from bigtent.narbatch import parse_batch
from bigtent.nix.nar import dump_path
from bigtent.nix.store import NixStore, PathInfo, RealiseResult, RealiseStatus

URL = "http://runner.test"
S = "/nix/store/"


def info(name: str, refs: Sequence[str] = (), size: int = 8) -> PathInfo:
    return PathInfo(
        path=S + name,
        nar_hash="sha256-CkMIecJm+LV/QJKg+TXPP6zUi7zN5XYNR0jKQFFx6Wk=",
        nar_size=size,
        references=tuple(S + r for r in refs),
    )


# ---- pure decisions -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "spelling",
    [
        "sha256-CkMIecJm+LV/QJKg+TXPP6zUi7zN5XYNR0jKQFFx6Wk=",
        "sha256:0sg9f58l1jj88w6pdrfdpj5x9b1zrwszk84j81zvby36q9whhhqa",
        "sha256:0a430879c266f8b57f4092a0f935cf3facd48bbccde5760d4748ca405171e969",
    ],
)
def test_nar_hash_to_nix32_matches_nix(spelling: str) -> None:
    # Expected value from `nix hash to-base32` of the SRI form.
    assert nar_hash_to_nix32(spelling) == (
        "sha256:0sg9f58l1jj88w6pdrfdpj5x9b1zrwszk84j81zvby36q9whhhqa"
    )


def test_nar_hash_to_nix32_rejects_garbage() -> None:
    with pytest.raises(NixError, match="unexpected NAR hash"):
        nar_hash_to_nix32("md5-abc")


def _names(order: Sequence[PathInfo]) -> list[str]:
    return [i.path.removeprefix(S) for i in order]


def test_upload_order_references_first() -> None:
    infos = [info("c.drv", ["b.drv", "src"]), info("b.drv", ["a.drv"]), info("a.drv"), info("src")]
    order = upload_order(infos, [i.path for i in infos])
    names = _names(order)
    assert names.index("a.drv") < names.index("b.drv") < names.index("c.drv")
    assert names.index("src") < names.index("c.drv")
    assert names == ["a.drv", "b.drv", "src", "c.drv"]  # ties broken by path


def test_upload_order_only_missing_and_ignores_self_references() -> None:
    infos = [info("b", ["a", "b"]), info("a")]
    assert _names(upload_order(infos, [S + "b"])) == ["b"]


def test_upload_order_rejects_paths_outside_closure() -> None:
    with pytest.raises(BigtentError, match="outside the closure"):
        upload_order([info("a")], [S + "zzz"])


def test_upload_order_detects_cycles() -> None:
    with pytest.raises(BigtentError, match="cycle"):
        upload_order([info("a", ["b"]), info("b", ["a"])], [S + "a", S + "b"])


@given(st.lists(st.lists(st.integers(0, 30), max_size=4), min_size=1, max_size=30))
def test_upload_order_property(edges: list[list[int]]) -> None:
    # Path i may only reference paths j < i: a random DAG.
    infos = [
        info(f"p{i:02d}", [f"p{j:02d}" for j in refs if j < i]) for i, refs in enumerate(edges)
    ]
    order = upload_order(infos, [i.path for i in infos])
    position = {i.path: n for n, i in enumerate(order)}
    assert len(order) == len(infos)
    for i in infos:
        assert all(position[r] < position[i.path] for r in i.references)


@pytest.mark.parametrize(
    ("out_link", "outputs", "expected"),
    [
        ("result", [{"out": "/o1"}], [("result", "/o1")]),
        ("result", [{"out": "/o1"}, {"out": "/o2"}], [("result", "/o1"), ("result-2", "/o2")]),
        (
            "result",
            [{"dev": "/d1", "out": "/o1"}, {"out": "/o2", "lib": "/l2"}],
            [
                ("result", "/o1"),
                ("result-dev", "/d1"),
                ("result-2", "/o2"),
                ("result-2-lib", "/l2"),
            ],
        ),
        ("r", [{"bin": "/b"}], [("r-bin", "/b")]),
        ("/tmp/x", [{}, {"out": "/o2"}], [("/tmp/x-2", "/o2")]),
    ],
)
def test_result_links_like_nix_build(
    out_link: str, outputs: list[dict[str, str]], expected: list[tuple[str, str]]
) -> None:
    assert result_links(out_link, outputs) == [ResultLink(a, b) for a, b in expected]


def test_sequential_naming_detection() -> None:
    assert _sequential("r", result_links("r", [{"out": "/a"}, {"out": "/b"}]))
    assert not _sequential("r", result_links("r", [{"out": "/a", "dev": "/d"}]))
    assert not _sequential("r", result_links("r", [{"out": "/a"}, {"out": "/a"}]))


@pytest.mark.parametrize(
    ("counts", "text"),
    [
        (
            {"total": 10, "waiting": 3, "runnable": 2, "running": 2, "succeeded": 3},
            "3/10 steps done, 2 running, 5 waiting",
        ),
        (
            {"total": 4, "succeeded": 2, "failed": 1, "cancelled": 1},
            "4/4 steps done, 1 failed, 1 cancelled",
        ),
        ({}, "0/0 steps done"),
    ],
)
def test_summarize_progress(counts: dict[str, int], text: str) -> None:
    assert summarize_progress(StepCounts(**counts)) == text


def _build(state: str, **extra: Any) -> Build:
    return Build.model_validate({"id": "1", "state": state, **extra})


def test_build_succeeded_needs_every_root() -> None:
    roots_ok = [
        {"drv_path": "/a.drv", "state": "succeeded"},
        {"drv_path": "/c.drv", "state": "cached"},
    ]
    roots_bad = [*roots_ok, {"drv_path": "/b.drv", "state": "dependency_failed"}]
    assert build_succeeded(_build("succeeded", roots=roots_ok))
    assert not build_succeeded(_build("succeeded", roots=roots_bad))
    assert not build_succeeded(_build("failed", roots=roots_ok))
    assert not build_succeeded(_build("cancelled"))
    assert [r.drv_path for r in failed_roots(_build("failed", roots=roots_bad))] == ["/b.drv"]


def test_build_report_shape() -> None:
    b = _build(
        "failed",
        roots=[{"drv_path": "/a.drv", "outputs": {"out": "/a"}, "state": "failed"}],
        failed_steps=[
            {
                "id": 4,
                "drv_path": "/a.drv",
                "state": "failed",
                "outcome": "build_failure",
                "error": "exit 1",
                "log_tail": "boom",
            }
        ],
    )
    doc = build_report(b)
    assert doc["build_id"] == "1" and doc["state"] == "failed" and doc["succeeded"] is False
    assert doc["outputs"] == {"/a.drv": {"out": "/a"}}
    assert doc["failed_steps"][0]["log_tail"] == "boom"
    json.dumps(doc)


def test_substituter_options() -> None:
    status = RunnerStatus.model_validate(
        {
            "cache_url": "/cache",
            "cache_public_key": "me-1:x",
            "upstreams": [{"url": "https://up", "public_key": "up-1:y"}],
        }
    )
    opts = substituter_options(status, "http://r:1/")
    assert opts["substituters"] == "http://r:1/cache https://up"
    assert opts["trusted-public-keys"] == "me-1:x up-1:y"


def test_only_an_untrusted_builds_download_trusts_the_untrusted_cache() -> None:
    status = RunnerStatus.model_validate(
        {
            "cache_url": "/cache",
            "cache_public_key": "me-1:x",
            "untrusted_cache_url": "http://r:1/cache/untrusted",
            "untrusted_cache_public_key": "me-untrusted-1:z",
            "upstreams": [{"url": "https://up", "public_key": "up-1:y"}],
        }
    )
    trusted = substituter_options(status, "http://r:1")
    assert "untrusted" not in trusted["substituters"] + trusted["trusted-public-keys"]
    opts = substituter_options(status, "http://r:1", untrusted=True)
    assert opts["substituters"] == "http://r:1/cache http://r:1/cache/untrusted https://up"
    assert opts["trusted-public-keys"] == "me-1:x me-untrusted-1:z up-1:y"
    old = RunnerStatus.model_validate({"cache_url": "/cache", "cache_public_key": "me-1:x"})
    with pytest.raises(BigtentError, match="no untrusted cache"):
        substituter_options(old, "http://r:1", untrusted=True)


# ---- the flow against fakes ------------------------------------------------------------------


class FakeStore(NixStore):
    """Serves path_info from a table and store paths from a directory; records realise calls."""

    def __init__(self, root: Path, infos: Sequence[PathInfo]) -> None:
        super().__init__()
        self.root = root
        self.infos = list(infos)
        self.path_info_calls: list[tuple[list[str], bool]] = []
        self.dumped: list[str] = []
        self.realised: list[tuple[list[str], str | None, dict[str, str]]] = []
        for i in infos:
            p = self.real_path(i.path)
            if not p.exists():
                p.write_text(f"content of {i.path}\n")

    async def path_info(
        self, paths: Sequence[str], *, recursive: bool = False, derivation: bool = True
    ) -> list[PathInfo]:
        self.path_info_calls.append((list(paths), recursive))
        return self.infos

    def real_path(self, store_path: str) -> Path:
        return self.root / store_path.rsplit("/", 1)[-1]

    async def dump(self, path: str, chunk_size: int = 1) -> AsyncIterator[bytes]:
        self.dumped.append(path)
        yield b"from nix-store --dump"

    async def realise(
        self,
        paths: Sequence[str],
        *,
        options: Mapping[str, str] | None = None,
        add_root: str | None = None,
        **kw: Any,
    ) -> RealiseResult:
        self.realised.append((list(paths), add_root, dict(options or {})))
        return RealiseResult(RealiseStatus.SUCCESS, 0, list(paths))


class FakeRunner:
    """Answers the API like the runner: missing paths, uploads (checking order), builds."""

    def __init__(
        self, missing: Sequence[str], infos: Sequence[PathInfo], builds: Sequence[dict[str, Any]]
    ) -> None:
        self.missing = list(missing)
        self.refs = {i.path: i.references for i in infos}
        self.cached: set[str] = {i.path for i in infos} - set(missing)
        self.uploads: list[tuple[str, dict[str, str], bytes]] = []
        self.builds = list(builds)
        self.created: list[Any] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.hold: set[str] = set()
        self.expect_in_flight = 2
        self.overlapped = asyncio.Event()
        self.attempts: list[dict[str, Any]] | None = []
        """The build's attempt records; None: a runner without the attempts route."""
        self.attempt_queries: list[tuple[int, int]] = []
        """(after, limit) of each attempts request."""
        self.batch_route = True
        """False: a runner without ``POST /paths/batch`` (405, as an older one answers)."""
        self.batches: list[list[str]] = []
        """The paths of each batch upload, in the body's order."""

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/api/v1/paths/missing":
            asked = json.loads(request.content)["paths"]
            return httpx.Response(200, json={"missing": [p for p in asked if p in self.missing]})
        if path == "/api/v1/paths/batch" and request.method == "POST":
            if not self.batch_route:
                return httpx.Response(405, json={"error": "Method Not Allowed"})
            return self._batch(await request.aread())
        if path.startswith("/api/v1/paths/"):
            store_path = S + path.rsplit("/", 1)[-1]
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            if self.max_in_flight >= self.expect_in_flight:
                self.overlapped.set()
            body = await request.aread()
            if store_path in self.hold:  # wait (bounded) for a concurrent upload to arrive
                await asyncio.wait_for(self.overlapped.wait(), timeout=5)
            self.in_flight -= 1
            for ref in self.refs[store_path]:
                if ref != store_path and ref not in self.cached:
                    return httpx.Response(400, json={"error": f"reference {ref} missing"})
            self.cached.add(store_path)
            self.uploads.append((store_path, dict(request.headers), body))
            return httpx.Response(201, json={"path": store_path})
        if path == "/api/v1/builds":
            self.created.append(json.loads(request.content))
            return httpx.Response(201, json=self.builds[0])
        if path.startswith("/api/v1/builds/") and path.endswith("/attempts"):
            if self.attempts is None:
                return httpx.Response(404, json={"error": f"no route {path}"})
            after, limit = int(request.url.params["after"]), int(request.url.params["limit"])
            self.attempt_queries.append((after, limit))
            page = [a for a in self.attempts if a["id"] > after][:limit]
            return httpx.Response(200, json={"attempts": page})
        if path.startswith("/api/v1/builds/"):
            b = self.builds.pop(0) if len(self.builds) > 1 else self.builds[0]
            return httpx.Response(200, json=b)
        if path == "/api/v1/status":
            return httpx.Response(
                200, json={"cache_url": f"{URL}/cache", "cache_public_key": "bt-1:k"}
            )
        return httpx.Response(404, json={"error": f"no route {path}"})

    def _batch(self, body: bytes) -> httpx.Response:
        entries = parse_batch(body)
        for entry in entries:
            store_path = S + entry.path
            for ref in self.refs[store_path]:
                if ref != store_path and ref not in self.cached:
                    return httpx.Response(400, json={"error": f"{store_path}: {ref} missing"})
            self.cached.add(store_path)
            headers = {
                "x-nar-hash": entry.nar_hash,
                "x-nar-size": str(entry.nar_size),
                "x-nar-references": " ".join(entry.references),
            }
            self.uploads.append((store_path, headers, entry.nar))
        self.batches.append([S + e.path for e in entries])
        return httpx.Response(201, json={"paths": len(entries), "created": len(entries)})


def _client(runner: FakeRunner) -> RunnerClient:
    return RunnerClient(URL, transport=httpx.MockTransport(runner))


DIAMOND = [
    info("top.drv", ["left.drv", "right.drv"]),
    info("left.drv", ["base.drv"]),
    info("right.drv", ["base.drv", "src.txt"]),
    info("base.drv"),
    info("src.txt"),
]


async def test_upload_closure_path_by_path_without_the_batch_route(tmp_path: Path) -> None:
    """An older runner (no batch route): every path its own PUT, concurrently where the
    references allow, dependencies first."""
    store = FakeStore(tmp_path, DIAMOND)
    runner = FakeRunner([i.path for i in DIAMOND if i.path != S + "src.txt"], DIAMOND, [])
    runner.batch_route = False
    runner.hold = {S + "left.drv", S + "right.drv"}  # both must be in flight at once
    async with _client(runner) as client:
        n = await upload_closure(client, store, [S + "top.drv"], SilentObserver(), concurrency=3)
    assert n == 4
    assert store.path_info_calls == [([S + "top.drv"], True)]  # one Nix call for the closure
    uploaded = [u[0] for u in runner.uploads]
    assert uploaded[-1] == S + "top.drv" and uploaded[0] == S + "base.drv"
    assert runner.max_in_flight >= 2  # left and right go up together
    _path, headers, body = next(u for u in runner.uploads if u[0] == S + "right.drv")
    assert headers["x-nar-hash"] == "sha256:0sg9f58l1jj88w6pdrfdpj5x9b1zrwszk84j81zvby36q9whhhqa"
    assert headers["x-nar-size"] == "8"
    assert headers["x-nar-references"] == "base.drv src.txt"
    assert body == b"".join(dump_path(tmp_path / "right.drv"))
    assert runner.batches == []


async def test_upload_closure_in_one_batch(tmp_path: Path) -> None:
    store = FakeStore(tmp_path, DIAMOND)
    runner = FakeRunner([i.path for i in DIAMOND if i.path != S + "src.txt"], DIAMOND, [])
    async with _client(runner) as client:
        n = await upload_closure(client, store, [S + "top.drv"], SilentObserver())
        assert client.batch_uploads
    assert n == 4
    [batch] = runner.batches
    assert batch[0] == S + "base.drv" and batch[-1] == S + "top.drv"
    assert sorted(batch) == sorted(S + n for n in ("base.drv", "left.drv", "right.drv", "top.drv"))
    _path, headers, body = next(u for u in runner.uploads if u[0] == S + "right.drv")
    assert headers["x-nar-hash"] == "sha256:0sg9f58l1jj88w6pdrfdpj5x9b1zrwszk84j81zvby36q9whhhqa"
    assert headers["x-nar-references"] == "base.drv src.txt"
    assert body == b"".join(dump_path(tmp_path / "right.drv"))
    assert headers["x-nar-size"] == str(len(body))  # the NAR read, framed by its length


async def test_upload_closure_falls_back_once_per_client(tmp_path: Path) -> None:
    """The first 405 for the batch route turns batches off for the client's later uploads."""
    store = FakeStore(tmp_path, DIAMOND)
    runner = FakeRunner([i.path for i in DIAMOND if i.path != S + "src.txt"], DIAMOND, [])
    runner.batch_route = False
    seen: list[tuple[int, int]] = []

    class Observer(SilentObserver):
        def on_upload(self, done: int, total: int) -> None:
            seen.append((done, total))

    async with _client(runner) as client:
        assert await upload_closure(client, store, [S + "top.drv"], Observer()) == 4
        assert not client.batch_uploads
    assert sorted(u[0] for u in runner.uploads) == sorted(
        batch_free := runner.cached - {S + "src.txt"}
    )
    assert len(batch_free) == 4
    assert seen[-1] == (4, 4)


def test_upload_jobs_batches_small_paths_and_keeps_large_ones_alone() -> None:
    order = [
        info("a", size=10),
        info("b", ["a"], size=10),
        info("big", ["b"], size=1000),
        info("c", ["big"], size=10),
        info("d", size=10),
        info("e", size=10),
    ]
    jobs = upload_jobs(order, max_paths=2, max_bytes=1000, path_bytes=100)
    assert [([p.path.removeprefix(S) for p in j.paths], j.batched) for j in jobs] == [
        (["a", "b"], True),
        (["big"], False),
        (["c", "d"], True),
        (["e"], True),
    ]
    by_bytes = upload_jobs(order[:2] + order[3:], max_paths=10, max_bytes=25, path_bytes=100)
    assert [len(j.paths) for j in by_bytes] == [2, 2, 1]


@given(st.lists(st.lists(st.integers(0, 30), max_size=4), min_size=1, max_size=30), st.data())
def test_upload_jobs_property(edges: list[list[int]], data: st.DataObject) -> None:
    """Every path once, in order, and every reference in the same job or an earlier one."""
    infos = [
        info(f"p{i}", [f"p{j}" for j in refs if j < i], size=data.draw(st.integers(1, 50)))
        for i, refs in enumerate(edges)
    ]
    jobs = upload_jobs(infos, max_paths=3, max_bytes=60, path_bytes=40)
    assert [p for j in jobs for p in j.paths] == infos
    job_of = {p.path: k for k, j in enumerate(jobs) for p in j.paths}
    for k, job in enumerate(jobs):
        assert len(job.paths) <= 3
        if job.batched:
            assert sum(p.nar_size for p in job.paths) <= 60
            assert all(p.nar_size <= 40 for p in job.paths)
        else:
            assert len(job.paths) == 1 and job.paths[0].nar_size > 40
        for p in job.paths:
            assert all(job_of[r] <= k for r in p.references)


async def test_upload_closure_nothing_missing(tmp_path: Path) -> None:
    store = FakeStore(tmp_path, DIAMOND)
    runner = FakeRunner([], DIAMOND, [])
    async with _client(runner) as client:
        assert await upload_closure(client, store, [S + "top.drv"], SilentObserver()) == 0
    assert runner.uploads == []


async def test_unreadable_paths_fall_back_to_nix_store_dump(tmp_path: Path) -> None:
    store = FakeStore(tmp_path, [info("x")])
    (tmp_path / "x").unlink()
    chunks = [c async for c in _nar_chunks(store, S + "x")]
    assert chunks == [b"from nix-store --dump"]
    assert store.dumped == [S + "x"]


ROOT = {"drv_path": S + "top.drv", "outputs": {"out": S + "top"}, "step_id": "9"}


def _wire_build(state: str, **counts: int) -> dict[str, Any]:
    return {
        "id": 5,
        "state": state,
        "roots": [{**ROOT, "state": state}],
        "counts": {"total": 3, **counts},
    }


async def test_follow_build_polls_until_final() -> None:
    builds = [
        _wire_build("queued"),
        _wire_build("running", running=1),
        _wire_build("succeeded", succeeded=3),
    ]
    runner = FakeRunner([], [], builds)
    seen: list[str] = []

    class Observer(SilentObserver):
        def on_progress(self, build: Build) -> None:
            seen.append(build.state.value)

    async with _client(runner) as client:
        final = await follow_build(client, 5, Observer(), interval_secs=0)
    assert final.state.value == "succeeded"
    assert seen == ["queued", "running", "succeeded"]


async def test_run_build_uploads_builds_and_downloads(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.chdir(tmp_path)
    store = FakeStore(tmp_path, DIAMOND)
    runner = FakeRunner(
        [S + "top.drv"], DIAMOND, [_wire_build("queued"), _wire_build("succeeded", succeeded=3)]
    )
    tracker = BuildTracker()
    async with _client(runner) as client:
        result = await run_build(
            client,
            store,
            [S + "top.drv"],
            BuildOptions(priority=3, poll_interval_secs=0),
            SilentObserver(),
            tracker,
        )
    assert result.succeeded and tracker.build_id == 5
    [created] = runner.created
    assert len(created.pop("submission")) >= 16
    assert created == {"drvs": [S + "top.drv"], "priority": 3}
    assert result.links == [ResultLink(str(tmp_path / "result"), S + "top")]
    [(paths, root, options)] = store.realised
    assert paths == [S + "top"] and root == str(tmp_path / "result")
    assert options["substituters"] == f"{URL}/cache"
    assert options["trusted-public-keys"] == "bt-1:k"


async def test_failed_build_downloads_nothing(tmp_path: Path) -> None:
    store = FakeStore(tmp_path, DIAMOND)
    runner = FakeRunner([], DIAMOND, [_wire_build("failed", failed=1)])
    async with _client(runner) as client:
        result = await run_build(
            client, store, [S + "top.drv"], BuildOptions(poll_interval_secs=0), SilentObserver()
        )
    assert not result.succeeded
    assert store.realised == []


async def test_download_multi_output_links_each_output(tmp_path: Path) -> None:
    store = FakeStore(tmp_path, [])
    build = _build(
        "succeeded",
        roots=[{"drv_path": "/a.drv", "outputs": {"out": "/o", "dev": "/d"}, "state": "succeeded"}],
    )
    status = RunnerStatus(cache_url="http://r/cache", cache_public_key="k:1")
    links = await download_outputs(
        store, status, build, str(tmp_path / "res"), runner_url="http://r"
    )
    assert [link.link for link in links] == [str(tmp_path / "res"), str(tmp_path / "res-dev")]
    # One substitution for all outputs, then one root per link.
    assert store.realised[0][:2] == (["/o", "/d"], None)
    assert sorted((r[0][0], r[1]) for r in store.realised[1:]) == [
        ("/d", str(tmp_path / "res-dev")),
        ("/o", str(tmp_path / "res")),
    ]


async def test_download_without_links(tmp_path: Path) -> None:
    store = FakeStore(tmp_path, [])
    build = _build("succeeded", roots=[{"drv_path": "/a.drv", "outputs": {"out": "/o"}}])
    links = await download_outputs(store, RunnerStatus(), build, None, runner_url="http://r")
    assert links == []
    assert store.realised == [(["/o"], None, store.realised[0][2])]
    assert store.realised[0][2]["substituters"] == "http://r/cache"


async def test_a_submission_is_retried_with_one_key_while_the_runner_is_unreachable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The runner dies while admitting (the connection drops), then answers: the retry
    carries the same submission key, so the runner can find or replace the first attempt."""
    monkeypatch.setattr("bigtent.client.outage.RETRY_FIRST_SECS", 0)
    bodies: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        if len(bodies) < 3:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        return httpx.Response(201, json=_wire_build("queued"))

    phases: list[str] = []

    class Observer(SilentObserver):
        def on_phase(self, text: str) -> None:
            phases.append(text)

    async with RunnerClient(URL, transport=httpx.MockTransport(handler)) as client:
        build = await submit_build(client, [S + "top.drv"], BuildOptions(), Observer())
    assert build.id == 5
    assert len(bodies) == 3 and len({b["submission"] for b in bodies}) == 1
    assert len(phases) == 1 and phases[0].startswith("runner unavailable, retrying")

    # Another submission gets another key; an outage past the grace is the error it was.
    def down(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        raise httpx.ConnectError("connection refused")

    async with RunnerClient(URL, transport=httpx.MockTransport(down)) as client:
        with pytest.raises(RunnerUnreachable):
            await submit_build(
                client, [S + "top.drv"], BuildOptions(), Observer(), unreachable_grace_secs=0
            )
    assert bodies[-1]["submission"] != bodies[0]["submission"]
