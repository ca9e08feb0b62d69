"""Which requests the hot path takes (``routes.HOT``) and which it leaves to FastAPI."""

from __future__ import annotations

from typing import Any

import pytest

from bigtent.runner.http.routes import HOT
from bigtent.runner.http.routes.builds import hot_get_build
from bigtent.runner.http.routes.cache import (
    hot_nar,
    hot_narinfo,
    hot_untrusted_nar,
    hot_untrusted_narinfo,
)
from bigtent.runner.http.routes.paths import hot_upload_output, hot_upload_path

HASH = "a" * 32


def scope(method: str, path: str, headers: list[tuple[bytes, bytes]] | None = None) -> Any:
    return {"type": "http", "method": method, "path": path, "headers": headers or []}


@pytest.mark.parametrize(
    ("method", "path", "endpoint", "params"),
    [
        ("GET", f"/cache/{HASH}.narinfo", hot_narinfo, {"hash_part": HASH}),
        ("HEAD", f"/cache/{HASH}.narinfo", hot_narinfo, {"hash_part": HASH}),
        ("GET", "/cache/untrusted.narinfo", hot_narinfo, {"hash_part": "untrusted"}),
        ("GET", "/cache/nar/x.nar.zst", hot_nar, {"file_name": "x.nar.zst"}),
        ("HEAD", "/cache/nar/x.nar", hot_nar, {"file_name": "x.nar"}),
        ("GET", f"/cache/untrusted/{HASH}.narinfo", hot_untrusted_narinfo, {"hash_part": HASH}),
        ("GET", "/cache/untrusted/nar/y.nar", hot_untrusted_nar, {"file_name": "y.nar"}),
        ("GET", "/api/v1/builds/42", hot_get_build, {"build_id": "42"}),
        ("GET", "/api/v1/builds/007", hot_get_build, {"build_id": "007"}),
        ("PUT", "/api/v1/paths/x-a.drv", hot_upload_path, {"basename": "x-a.drv"}),
        (
            "PUT",
            "/api/v1/agent/upload/L1/out",
            hot_upload_output,
            {"lease_id": "L1", "output_name": "out"},
        ),
    ],
)
def test_taken(method: str, path: str, endpoint: Any, params: dict[str, str]) -> None:
    matched = HOT.match(scope(method, path))
    assert matched is not None
    assert matched.endpoint is endpoint
    assert matched.params == params


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", f"/cache/{HASH}.narinfo"),  # 405: FastAPI's
        ("PUT", "/cache/nar/x.nar"),
        ("GET", "/cache/nix-cache-info"),
        ("GET", "/cache/untrusted/nix-cache-info"),
        ("GET", "/cache/nar/a/b.nar"),
        ("GET", "/cache/nar/"),
        ("GET", f"/cache/{HASH}.narinfo/"),
        ("GET", "/api/v1/builds"),
        ("GET", "/api/v1/builds/x1"),  # FastAPI refuses it as an integer
        ("GET", "/api/v1/builds/-1"),
        ("GET", "/api/v1/builds/" + "1" * 19),  # longer than any id: FastAPI's
        ("GET", "/api/v1/builds/1/steps"),
        ("HEAD", "/api/v1/builds/1"),
        ("GET", "/api/v1/agent/upload/L1/out"),
        ("PUT", "/api/v1/agent/upload/L1/out/presign"),
        ("POST", "/api/v1/agent/upload/L1/out/presign"),
        ("POST", "/api/v1/paths/missing"),
        ("PUT", "/api/v1/paths/a/b"),
    ],
)
def test_left_to_fastapi(method: str, path: str) -> None:
    assert HOT.match(scope(method, path)) is None


def test_a_get_with_a_body_is_left_to_fastapi() -> None:
    path = f"/cache/{HASH}.narinfo"
    assert HOT.match(scope("GET", path, [(b"content-length", b"0")])) is not None
    assert HOT.match(scope("GET", path, [(b"content-length", b"5")])) is None
    assert HOT.match(scope("GET", path, [(b"transfer-encoding", b"chunked")])) is None
    # An upload has its body, of course.
    upload = scope("PUT", "/api/v1/agent/upload/L/out", [(b"content-length", b"5")])
    assert HOT.match(upload) is not None


def test_a_root_path_is_left_to_fastapi() -> None:
    s = scope("GET", f"/cache/{HASH}.narinfo") | {"root_path": "/prefix"}
    assert HOT.match(s) is None
