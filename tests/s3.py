"""A real S3 HTTP API on loopback for tests: moto's threaded server (NIX-TESTING.md), one per
test process, with a fresh bucket (and credentials) per test."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import boto3
import botocore.config
import pytest

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

ACCESS_KEY_ID = "bigtent-test-key"
SECRET_ACCESS_KEY = "bigtent-test-secret"


@dataclass
class Bucket:
    """One test's bucket on the loopback S3 server, and a client to look inside it."""

    endpoint_url: str
    name: str
    client: S3Client

    def config(self, **overrides: Any) -> dict[str, Any]:
        """The ``[cache.s3]`` section for a runner using this bucket."""
        return {
            "bucket": self.name,
            "endpoint_url": self.endpoint_url,
            "region": "us-east-1",
            "addressing_style": "path",
            "access_key_id": ACCESS_KEY_ID,
            "secret_access_key": SECRET_ACCESS_KEY,
            **overrides,
        }

    def toml(self, **overrides: Any) -> str:
        lines = ["[cache.s3]"]
        for key, value in self.config(**overrides).items():
            shown = str(value).lower() if isinstance(value, bool) else f'"{value}"'
            if isinstance(value, int | float) and not isinstance(value, bool):
                shown = str(value)
            lines.append(f"{key} = {shown}")
        return "\n".join(lines) + "\n"

    def list_keys(self, prefix: str = "") -> list[str]:
        out: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.name, Prefix=prefix
        ):
            out.extend(o.get("Key", "") for o in page.get("Contents", []))
        return sorted(out)

    def read(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.name, Key=key)["Body"].read()

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.name, Key=key, Body=data)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    # The server logs every request through werkzeug: keep test output readable.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> Bucket:
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id=ACCESS_KEY_ID,
        aws_secret_access_key=SECRET_ACCESS_KEY,
        config=botocore.config.Config(
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )
    name = f"bigtent-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return Bucket(s3_endpoint, name, client)
