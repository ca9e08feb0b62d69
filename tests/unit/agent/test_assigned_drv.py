"""The serve way with the .drv in the assignment: its text is checked against its path before
anything runs; a text that is not the path's fails the step without a build or a fetch."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from bigtent.agent.build import ServeBuild, build
from bigtent.agent.drvfetch import DrvCache, DrvFetchError, drv_from_text
from bigtent.agent.servepool import ServePool
from bigtent.agent.stepstore import CacheSettings
from bigtent.nix.store import NixStore, RealiseStatus
from bigtent.protocol import Assign, LeaseId, Log, StepId
from tests.unit.agent.test_drvfetch import DRV_PATH, TEXT

OUT = "/nix/store/9krlzvny65gdc8s7kpb6lkx8cd02c25c-hello"


def test_drv_from_text_checks_the_path() -> None:
    drv = drv_from_text(DRV_PATH, TEXT.encode(), "the assignment's text")
    assert drv.builder == "/bin/sh" and drv.output_paths == {"out": OUT}
    other = TEXT.replace("echo hi", "echo ho")
    with pytest.raises(DrvFetchError, match="the assignment's text are those of /nix/store/"):
        drv_from_text(DRV_PATH, other.encode(), "the assignment's text")
    with pytest.raises(DrvFetchError, match=DRV_PATH):
        drv_from_text(DRV_PATH, b"Derive(", "the assignment's text")


def _assign(text: str, outputs: dict[str, str] | None = None) -> Assign:
    return Assign(
        step_id=StepId(7),
        lease_id=LeaseId("lease-7"),
        drv_path=DRV_PATH,
        outputs={"out": OUT} if outputs is None else outputs,
        upload_urls={"out": "/upload/7/out"},
        timeout_secs=60,
        max_silent_secs=60,
        max_log_bytes=1 << 20,
        drv_text=text,
        inputs=["/nix/store/1b9p07z77phvv2hf6gm9f28syp39f1ag-src"],
    )


@pytest.mark.parametrize(
    ("text", "outputs", "error"),
    [
        (TEXT.replace("echo hi", "echo ho"), None, "the assignment's text are those of"),
        (TEXT, {"out": OUT + "x"}, "the assignment {'out'"),
    ],
)
async def test_a_text_that_is_not_the_path_fails_the_step_unbuilt(
    text: str, outputs: dict[str, str] | None, error: str
) -> None:
    requests: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(str(request.url))
        return httpx.Response(404)

    pool = ServePool()
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        drvs = DrvCache(http)
        step = ServeBuild(
            assign=_assign(text, outputs),
            cache=CacheSettings("http://runner.invalid/cache", "key:AAAA"),
            store=NixStore(store="local?root=/nonexistent/bigtent-test"),
            slot=0,
            pool=pool,
            drvs=drvs,
            roots=None,
            abort=asyncio.Event(),
        )

        async def send_log(message: Log) -> bool:
            return True

        built = await build(step.assign, send_log, step)
    assert built.realised.status is RealiseStatus.OTHER_FAILURE
    assert error in built.realised.error and DRV_PATH in built.realised.error
    assert built.build_started is None and built.fetched is None
    assert requests == [] and drvs.fetches == 0
    assert pool.processes == []
