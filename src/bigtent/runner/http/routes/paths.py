"""What the cache has and what enters it over ``/api/v1``: client paths (``/paths``) and agents'
outputs (``/agent/upload``, direct or presigned)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from bigtent import protocol as p
from bigtent.apimodels import Missing
from bigtent.narbatch import parse_batch
from bigtent.runner.cache.closureingest import ingest_client_batch
from bigtent.runner.cache.ingest import ingest_client_path
from bigtent.runner.cache.outputs import ingest_output
from bigtent.runner.cache.presigned import record_json
from bigtent.runner.http.deps import (
    BATCH_BODY_BYTES,
    LIST_BODY_BYTES,
    STREAMED_BODY,
    AgentCredential,
    ClientAuth,
    Comps,
    request_body,
)

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
    created = await ingest_client_path(
        comps.cache,
        comps.engine,
        basename,
        request_body(request),
        nar_hash=x_nar_hash,
        nar_size=x_nar_size,
        references=x_nar_references,
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
    info = await ingest_output(
        comps.cache,
        comps.upstreams,
        comps.scheduler,
        lease_id,
        output_name,
        request_body(request),
        nar_hash=x_nar_hash,
        nar_size=x_nar_size,
        untrusted=comps.untrusted_cache,
    )
    return record_json(info)


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
