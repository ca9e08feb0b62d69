"""``POST /api/v1/paths/batch``: many small client paths in one request, each checked as a
single upload is, published together or refused together with the failing path named; and
the client's use of it (batches where the runner has the route, path by path where not)."""

from __future__ import annotations

import httpx
import pytest
from sqlalchemy import select

from bigtent.client.api import RunnerClient
from bigtent.client.observer import SilentObserver
from bigtent.client.upload import upload_closure
from bigtent.config import Role
from bigtent.narbatch import CONTENT_TYPE, LENGTH_BYTES, entry_header
from bigtent.nix.store import NixStore
from bigtent.nix.store_path import StorePath
from bigtent.runner.db.tables import derivations
from bigtent.runner.http.deps import BATCH_BODY_BYTES
from tests.integration.runner.conftest import (
    Drvs,
    MakeRunner,
    Nix,
    RunnerHarness,
    Upload,
    nothing_stored,
    verify_signed,
)

pytestmark = pytest.mark.nix


def _entry(up: Upload, nar: bytes | None = None) -> bytes:
    """``up`` as a batch entry; ``nar``: other bytes sent under ``up``'s declared hash."""
    refs = [StorePath.parse(r).basename for r in up.references]
    body = up.nar if nar is None else nar
    return entry_header(up.basename, up.nar_hash, len(body), refs) + body


async def _post(
    runner: RunnerHarness, body: bytes, role: Role | None = Role.CLIENT
) -> httpx.Response:
    return await runner.client(role).post(
        "/api/v1/paths/batch", content=body, headers={"Content-Type": CONTENT_TYPE}
    )


async def test_a_batch_lands_every_path_signed_with_its_derivations(
    make_runner: MakeRunner, nix: Nix, drvs: Drvs
) -> None:
    runner = await make_runner()
    ups = [nix.upload(p) for p in drvs.closure]
    resp = await _post(runner, b"".join(_entry(up) for up in ups))
    assert resp.status_code == 201, resp.text
    assert resp.json() == {"paths": len(ups), "created": len(ups)}
    for up in ups:
        served = await runner.narinfo(up.path)
        assert served.status_code == 200
        info = verify_signed(runner, served.text)
        assert info.store_path == up.path
        assert info.nar_hash == up.nar_hash and info.nar_size == len(up.nar)
        assert info.references == tuple(StorePath.parse(r).basename for r in up.references)
        assert info.ca is not None and info.ca.startswith("text:sha256:")
    # The .drv files are known to builds (top's input dep was checked within the batch).
    async with runner.comps.engine.connect() as conn:
        rows = (await conn.execute(select(derivations.c.drv_path))).scalars().all()
    assert sorted(rows) == sorted(p for p in drvs.closure if p.endswith(".drv"))
    built = await runner.client(Role.CLIENT).post("/api/v1/builds", json={"drvs": [drvs.top]})
    assert built.status_code == 201, built.text
    # Sent again: nothing new, nothing stored.
    with nothing_stored(runner):
        again = await _post(runner, b"".join(_entry(up) for up in ups))
    assert again.status_code == 200 and again.json() == {"paths": len(ups), "created": 0}
    assert runner.temp_files() == []


async def test_a_batch_may_reference_paths_of_earlier_requests(
    make_runner: MakeRunner, nix: Nix, drvs: Drvs
) -> None:
    runner = await make_runner()
    *inputs, top = [nix.upload(p) for p in drvs.closure]
    first = await _post(runner, b"".join(_entry(up) for up in inputs))
    assert first.status_code == 201, first.text
    second = await _post(runner, _entry(top))
    assert second.status_code == 201, second.text
    assert await runner.present(list(drvs.closure)) == set(drvs.closure)


async def test_a_lying_nar_refuses_the_whole_batch_naming_its_path(
    make_runner: MakeRunner, nix: Nix, drvs: Drvs
) -> None:
    runner = await make_runner()
    ups = [nix.upload(p) for p in drvs.closure]
    top = ups[-1]
    assert top.path == drvs.top
    tampered = top.nar.replace(b"echo $x", b"echo $y", 1)
    assert tampered != top.nar and len(tampered) == len(top.nar)
    body = b"".join(_entry(up) for up in ups[:-1]) + _entry(top, tampered)
    with nothing_stored(runner):
        resp = await _post(runner, body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error.startswith(f"{drvs.top}: NAR hash mismatch"), error
    assert await runner.present(list(drvs.closure)) == set()


async def test_a_batch_out_of_dependency_order_is_refused(
    make_runner: MakeRunner, nix: Nix, drvs: Drvs
) -> None:
    runner = await make_runner()
    ups = [nix.upload(p) for p in reversed(drvs.closure)]
    with nothing_stored(runner):
        resp = await _post(runner, b"".join(_entry(up) for up in ups))
    assert resp.status_code == 400, resp.text
    assert drvs.top in resp.json()["error"]
    assert await runner.present(list(drvs.closure)) == set()


async def test_a_bad_declaration_names_its_path(
    make_runner: MakeRunner, nix: Nix, drvs: Drvs
) -> None:
    runner = await make_runner()
    up = nix.upload(drvs.source)
    header = entry_header(up.basename, "sha256:nonsense", len(up.nar), [])
    resp = await _post(runner, header + up.nar)
    assert resp.status_code == 400
    assert resp.json()["error"].startswith(f"{drvs.source}: bad nar_hash")
    cut = _entry(up)[: LENGTH_BYTES + 10]
    resp = await _post(runner, cut)
    assert resp.status_code == 400
    assert "entry 0 is truncated in its header" in resp.json()["error"]


async def test_a_declared_size_over_the_limit_is_refused(
    make_runner: MakeRunner, nix: Nix, drvs: Drvs
) -> None:
    up = nix.upload(drvs.source)
    runner = await make_runner(cache={"max_nar_bytes": len(up.nar) - 1})
    with nothing_stored(runner):
        resp = await _post(runner, _entry(up))
    assert resp.status_code == 413
    assert "max_nar_bytes" in resp.json()["error"]


async def test_a_path_sent_twice_or_a_body_over_the_limit_is_refused(
    make_runner: MakeRunner, nix: Nix, drvs: Drvs
) -> None:
    runner = await make_runner()
    up = nix.upload(drvs.source)
    refs: list[str] = []
    again = entry_header(up.path, up.nar_hash, len(up.nar), refs) + up.nar
    with nothing_stored(runner):
        resp = await _post(runner, _entry(up) + again)
        assert resp.status_code == 400
        assert resp.json()["error"] == f"batch upload: {drvs.source} is sent twice"
        resp = await _post(runner, _entry(up) + _entry(up))  # the same name twice
        assert resp.status_code == 400
        assert resp.json()["error"] == f"batch upload: {drvs.source} is sent twice"
        resp = await _post(runner, _entry(up) + bytes(BATCH_BODY_BYTES))
        assert resp.status_code == 413
    assert await runner.present([drvs.source]) == set()


async def test_only_clients_may_send_a_batch(make_runner: MakeRunner, nix: Nix, drvs: Drvs) -> None:
    runner = await make_runner()
    body = _entry(nix.upload(drvs.source))
    with nothing_stored(runner):
        assert (await _post(runner, body, role=None)).status_code == 401
        assert (await _post(runner, body, role=Role.AGENT)).status_code == 403
    assert await runner.present([drvs.source]) == set()


class _Recording(httpx.AsyncBaseTransport):
    """The runner's app over ASGI, each request's method and path noted. ``older``: the
    batch route answered as a runner without it does (405, its route taken for ``PUT
    /paths/{basename}``)."""

    def __init__(self, runner: RunnerHarness, *, older: bool) -> None:
        self.inner = httpx.ASGITransport(app=runner.app)
        self.older = older
        self.requests: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(f"{request.method} {request.url.path}")
        if self.older and request.url.path == "/api/v1/paths/batch":
            return httpx.Response(405, json={"error": "Method Not Allowed", "detail": None})
        return await self.inner.handle_async_request(request)


async def _client_upload(runner: RunnerHarness, drvs: Drvs, *, older: bool = False) -> list[str]:
    transport = _Recording(runner, older=older)
    async with RunnerClient(
        "http://runner.test", token=runner.tokens[Role.CLIENT], transport=transport
    ) as client:
        n = await upload_closure(client, NixStore(), [drvs.top], SilentObserver())
    assert n == len(drvs.closure)
    assert await runner.present(list(drvs.closure)) == set(drvs.closure)
    return [r for r in transport.requests if r != "POST /api/v1/paths/missing"]


async def test_the_client_sends_one_batch(make_runner: MakeRunner, drvs: Drvs) -> None:
    runner = await make_runner()
    assert await _client_upload(runner, drvs) == ["POST /api/v1/paths/batch"]


async def test_the_client_falls_back_to_single_uploads(make_runner: MakeRunner, drvs: Drvs) -> None:
    """A runner without the batch route (an older one): 405, then one PUT per path."""
    runner = await make_runner()
    sent = await _client_upload(runner, drvs, older=True)
    puts = [f"PUT /api/v1/paths/{StorePath.parse(p).basename}" for p in drvs.closure]
    assert sent[0] == "POST /api/v1/paths/batch"
    assert sorted(sent[1:]) == sorted(puts) and sent[-1] == puts[-1]
