"""Upstream cache lookups: signed answers count, unsigned ones do not, errors are errors."""

from __future__ import annotations

import httpx
import pytest

from bigtent.config import Upstream
from bigtent.errors import ConfigError, UpstreamUnavailable
from bigtent.nix.keys import generate_key, sign_narinfo
from bigtent.nix.narinfo import NarInfo, render
from bigtent.runner.cache.upstreams import Upstreams

PATH = "/nix/store/" + "a" * 32 + "-hello"
KEY = generate_key("up-1")
OTHER = generate_key("evil-1")


def _narinfo(key: object) -> str:
    info = NarInfo(
        store_path=PATH,
        url="nar/x.nar",
        compression="none",
        file_hash=None,
        file_size=None,
        nar_hash="sha256:" + "1" * 52,
        nar_size=8,
        references=(),
        deriver=None,
        sigs=(),
    )
    return render(sign_narinfo(info, key))  # type: ignore[arg-type]


def _upstreams(handler: httpx.MockTransport) -> Upstreams:
    up = Upstream(url="http://upstream.test", public_key=KEY.public_key().to_text())
    return Upstreams([up], max_in_flight=4, timeout_secs=1, transport=handler)


async def test_signed_narinfo_counts_and_is_remembered() -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(str(request.url))
        return httpx.Response(200, text=_narinfo(KEY))

    ups = _upstreams(httpx.MockTransport(handler))
    info = await ups.lookup(PATH)
    assert info is not None and info.store_path == PATH
    assert await ups.lookup(PATH) is info
    assert calls == [f"http://upstream.test/{'a' * 32}.narinfo"]
    assert await ups.have_all([PATH])


@pytest.mark.parametrize("status", [404, 403])
async def test_absent_paths_are_none_and_not_remembered(status: int) -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(str(request.url))
        return httpx.Response(status)

    ups = _upstreams(httpx.MockTransport(handler))
    assert await ups.lookup(PATH) is None
    assert await ups.lookup(PATH) is None
    assert len(calls) == 2
    assert not await ups.have_all([PATH])


async def test_narinfo_signed_by_another_key_does_not_count() -> None:
    ups = _upstreams(httpx.MockTransport(lambda r: httpx.Response(200, text=_narinfo(OTHER))))
    assert await ups.lookup(PATH) is None


@pytest.mark.parametrize(
    "handler",
    [
        lambda r: httpx.Response(502),
        lambda r: httpx.Response(500),
        lambda r: (_ for _ in ()).throw(httpx.ConnectTimeout("slow", request=r)),
    ],
)
async def test_an_upstream_that_does_not_answer_is_an_error_not_an_absence(handler: object) -> None:
    ups = _upstreams(httpx.MockTransport(handler))  # type: ignore[arg-type]
    with pytest.raises(UpstreamUnavailable):
        await ups.lookup(PATH)
    with pytest.raises(UpstreamUnavailable):
        await ups.have_all([PATH])


def test_a_bad_upstream_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="upstreams"):
        Upstreams([Upstream(url="http://x", public_key="nonsense")], 1, 1)
