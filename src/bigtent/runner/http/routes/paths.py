"""What the cache has and what enters it over ``/api/v1``: client paths (``/paths``) and agents'
outputs (``/agent/upload``, direct or presigned)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from bigtent import protocol as p
from bigtent.apimodels import Missing
from bigtent.config import Role
from bigtent.narbatch import parse_batch
from bigtent.runner.cache.closureingest import ingest_client_batch
from bigtent.runner.cache.ingest import ingest_client_path
from bigtent.runner.cache.outputs import ingest_output
from bigtent.runner.cache.presigned import record_json
from bigtent.runner.components import Components
from bigtent.runner.http.deps import (
    BATCH_BODY_BYTES,
    LIST_BODY_BYTES,
    STREAMED_BODY,
    AgentCredential,
    ClientAuth,
    Comps,
    agent_credential,
    caller,
    request_body,
)
from bigtent.runner.http.hotpath import HotTable

router = APIRouter()


class PathsBody(BaseModel):
    paths: list[str] = Field(max_length=1_000_000)


@router.post("/paths/missing", max_body_size=LIST_BODY_BYTES)
async def missing_paths(body: PathsBody, comps: Comps, _: ClientAuth) -> Missing:
    present = await comps.cache.present(body.paths)
    return Missing(missing=[x for x in body.paths if x not in present])


@router.put("/paths/{basename}", status_code=201, max_body_size=STREAMED_BODY)
async def upload_path(
    basename: str,
    request: Request,
    comps: Comps,
    _: ClientAuth,
    x_nar_hash: Annotated[str | None, Header()] = None,
    x_nar_size: Annotated[str | None, Header()] = None,
    x_nar_references: Annotated[str | None, Header()] = None,
) -> JSONResponse:
    return await _client_path(comps, request, basename, x_nar_hash, x_nar_size, x_nar_references)


async def _client_path(
    comps: Components,
    request: Request,
    basename: str,
    nar_hash: str | None,
    nar_size: str | None,
    references: str | None,
) -> JSONResponse:
    created = await ingest_client_path(
        comps.cache,
        comps.engine,
        basename,
        request_body(request),
        nar_hash=nar_hash,
        nar_size=nar_size,
        references=references,
    )
    return JSONResponse({"path": f"/nix/store/{basename}"}, status_code=201 if created else 200)


@router.post("/paths/batch", status_code=201, max_body_size=BATCH_BODY_BYTES)
async def upload_paths(request: Request, comps: Comps, _: ClientAuth) -> JSONResponse:
    """Many small paths in one body (``narbatch``), each checked as ``upload_path`` checks
    it, published together or refused together (docs/api.md, "Batch uploads")."""
    entries = parse_batch(await request.body())
    created = await ingest_client_batch(comps.cache, comps.engine, entries)
    return JSONResponse(
        {"paths": len(entries), "created": created}, status_code=201 if created else 200
    )


async def hot_upload_path(comps: Components, request: Request, params: dict[str, str]) -> Response:
    """``upload_path`` for ``HotRoutes`` (runner/http/hotpath.py): a client's credential here,
    every check of the path in ``ingest_client_path``, the same answer."""
    await caller(comps, request.headers.get("authorization"), Role.CLIENT)
    headers = request.headers
    return await _client_path(
        comps,
        request,
        params["basename"],
        headers.get("x-nar-hash"),
        headers.get("x-nar-size"),
        headers.get("x-nar-references"),
    )


@router.put("/agent/upload/{lease_id}/{output_name}", max_body_size=STREAMED_BODY)
async def upload_output(
    lease_id: str,
    output_name: str,
    request: Request,
    comps: Comps,
    _: AgentCredential,
    x_nar_hash: Annotated[str | None, Header()] = None,
    x_nar_size: Annotated[str | None, Header()] = None,
) -> dict[str, Any]:
    return await _output(comps, request, lease_id, output_name, x_nar_hash, x_nar_size)


async def _output(
    comps: Components,
    request: Request,
    lease_id: str,
    output_name: str,
    nar_hash: str | None,
    nar_size: str | None,
) -> dict[str, Any]:
    info = await ingest_output(
        comps.cache,
        comps.upstreams,
        comps.scheduler,
        lease_id,
        output_name,
        request_body(request),
        nar_hash=nar_hash,
        nar_size=nar_size,
        untrusted=comps.untrusted_cache,
    )
    return record_json(info)


async def hot_upload_output(
    comps: Components, request: Request, params: dict[str, str]
) -> Response:
    """``upload_output`` for ``HotRoutes`` (runner/http/hotpath.py): the same checks (the
    agent's credential here, the lease and the NAR in ``ingest_output``), the same answer."""
    await agent_credential(comps, request)
    headers = request.headers
    record = await _output(
        comps,
        request,
        params["lease_id"],
        params["output_name"],
        headers.get("x-nar-hash"),
        headers.get("x-nar-size"),
    )
    return JSONResponse(record)


@router.post("/agent/upload/{lease_id}/{output_name}" + p.PRESIGN_SUFFIX)
async def presign_output(
    lease_id: str,
    output_name: str,
    body: p.UploadDeclaration,
    comps: Comps,
    _: AgentCredential,
) -> dict[str, Any]:
    """A presigned upload of one output file to the bucket, or "PUT it to the runner"."""
    plan = await comps.presigned.presign(lease_id, output_name, body)
    return plan.model_dump(mode="json")


@router.post("/agent/upload/{lease_id}/{output_name}" + p.COMPLETE_SUFFIX)
async def complete_output(
    lease_id: str,
    output_name: str,
    body: p.UploadDeclaration,
    comps: Comps,
    _: AgentCredential,
) -> dict[str, Any]:
    """Verify a presigned upload and publish it (answers as the direct PUT does)."""
    return record_json(await comps.presigned.complete(lease_id, output_name, body))


HOT_PATHS: HotTable = {
    "/api/v1/paths/{basename}": (("PUT",), hot_upload_path),
    "/api/v1/agent/upload/{lease_id}/{output_name}": (("PUT",), hot_upload_output),
}
"""A client's path uploads (one per ``.drv`` of a build) and the agents' output uploads,
answered by ``HotRoutes`` (runner/http/hotpath.py)."""
