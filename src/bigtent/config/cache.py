"""``[cache]``: the runner's binary cache — signing keys, compression, upstreams, where NAR
files live (``[cache.s3]``) and what a collection keeps (``[cache.retention]``, docs/cache.md).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from bigtent.config.base import Section, web_url
from bigtent.nix.compression import Compression
from bigtent.secretfile import read_secret_file

_PREFIX_SEGMENT = re.compile(r"^[A-Za-z0-9!_.*'()-]+$")
"""Prefix segments: S3's "safe characters" only; ``.`` and ``..`` are refused separately."""
MAX_PREFIX_CHARS = 512


def normalize_prefix(prefix: str) -> str:
    """``""`` or ``a/b/`` (one trailing slash) from a configured prefix; raises ValueError for
    an absolute prefix, empty or dot segments, or characters outside S3's safe set."""
    text = prefix.strip()
    if not text:
        return ""
    if len(text) > MAX_PREFIX_CHARS:
        raise ValueError(f"prefix is longer than {MAX_PREFIX_CHARS} characters")
    if text.startswith("/"):
        raise ValueError("prefix must not start with '/'")
    segments = text.rstrip("/").split("/")
    for segment in segments:
        if segment in ("", ".", ".."):
            raise ValueError(f"prefix {prefix!r} has an empty, '.' or '..' segment")
        if not _PREFIX_SEGMENT.fullmatch(segment):
            raise ValueError(
                f"prefix segment {segment!r} may hold only letters, digits and !_.*'()-"
            )
    return "/".join(segments) + "/"


class Upstream(Section):
    url: str
    public_key: str


class S3Section(Section):
    """``[cache.s3]``: NAR files in an S3 bucket (AWS or any S3-compatible service).

    Credentials: ``access_key_id``/``secret_access_key`` (or their ``*_file`` forms, read
    once at start); with neither, boto3's usual chain (``AWS_*`` environment, profile,
    instance role) applies.
    """

    bucket: str = Field(min_length=3, max_length=63, pattern=r"^[a-z0-9][a-z0-9.-]+[a-z0-9]$")
    prefix: str = ""
    """Keys start with this (e.g. ``bigtent/``): ``<prefix>nar/...``, ``<prefix>incoming/...``."""
    region: str = "us-east-1"
    endpoint_url: str | None = None
    """``http(s)://host:port`` of an S3-compatible service; unset: AWS."""
    public_endpoint_url: str | None = None
    """The endpoint presigned URLs name, when agents and Nix clients reach the service by
    another address than the runner does; unset: ``endpoint_url``."""
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    """``path`` (``host/bucket/key``) for most self-hosted services; ``virtual``
    (``bucket.host/key``); ``auto`` lets boto3 choose."""
    access_key_id: str | None = None
    access_key_id_file: Path | None = None
    secret_access_key: SecretStr | None = None
    secret_access_key_file: Path | None = None
    serve: Literal["redirect", "proxy"] = "redirect"
    """``/cache/nar/...``: a 302 to a short-lived presigned GET (Nix follows it), or the
    runner streams the object itself (clients that cannot reach the bucket)."""
    presigned_get_secs: int = Field(default=300, ge=1, le=7 * 86400)
    presigned_put_secs: int = Field(default=120, ge=1, le=7 * 86400)
    """How long a presigned PUT URL may be used to start a request (S3 allows at most 7 days;
    the agent asks for it just before its PUT, and every retry asks for a fresh one)."""
    presigned_uploads: bool = True
    """Offer agents presigned PUTs straight to the bucket; false: agents PUT to the runner."""
    incoming_ttl_secs: float = Field(default=86400.0, gt=0)
    """Uploaded objects never completed (agent gone) are deleted after this long."""
    sweep_interval_secs: float = Field(default=3600.0, gt=0)
    max_connections: int = Field(default=32, ge=1, le=1024)
    """Connection pool size of the runner's S3 client (and its worker threads' concurrency)."""

    @field_validator("prefix")
    @classmethod
    def _clean_prefix(cls, v: str) -> str:
        try:
            return normalize_prefix(v)
        except ValueError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("endpoint_url", "public_endpoint_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is None or v == "":
            return None
        return web_url(v, ("http", "https")).rstrip("/")

    @model_validator(mode="after")
    def _one_credential_source(self) -> S3Section:
        for key in ("access_key_id", "secret_access_key"):
            if getattr(self, key) is not None and getattr(self, f"{key}_file") is not None:
                raise ValueError(f"set {key} or {key}_file, not both")
        given = [
            self.access_key_id is not None or self.access_key_id_file is not None,
            self.secret_access_key is not None or self.secret_access_key_file is not None,
        ]
        if any(given) and not all(given):
            raise ValueError("access_key_id and secret_access_key go together")
        return self

    def credentials(self) -> tuple[str, str] | None:
        """The configured key pair, ``*_file`` forms read now; None: boto3's default chain.
        Raises ConfigError naming the key when a file cannot be read."""
        key_id = self.access_key_id
        if self.access_key_id_file is not None:
            key_id = read_secret_file(self.access_key_id_file, "cache.s3.access_key_id_file")
        secret = self.secret_access_key.get_secret_value() if self.secret_access_key else None
        if self.secret_access_key_file is not None:
            secret = read_secret_file(
                self.secret_access_key_file, "cache.s3.secret_access_key_file"
            )
        if key_id is None or secret is None:
            return None
        return key_id, secret


class RetentionPolicySection(Section):
    max_idle_days: float = Field(default=30.0, ge=0)
    """Paths not used (narinfo or NAR asked for) nor published for this long, and kept by no
    root, are deleted. 0: never for being idle (only the quota deletes)."""
    quota_high_bytes: int | None = Field(default=None, gt=0)
    """Above this many bytes of NAR files a collection evicts unrooted paths, least recently
    used first. None: no quota."""
    quota_low_bytes: int | None = Field(default=None, gt=0)
    """What eviction brings the cache down to (default: ``quota_high_bytes``)."""

    @model_validator(mode="after")
    def _watermarks(self) -> RetentionPolicySection:
        if self.quota_low_bytes is not None:
            if self.quota_high_bytes is None:
                raise ValueError("quota_low_bytes needs quota_high_bytes")
            if self.quota_low_bytes > self.quota_high_bytes:
                raise ValueError("quota_low_bytes must not exceed quota_high_bytes")
        return self


class UntrustedRetentionSection(RetentionPolicySection):
    max_idle_days: float = Field(default=7.0, ge=0)


class RetentionSection(RetentionPolicySection):
    """``[cache.retention]``: what the runner's cache keeps (docs/cache.md)."""

    enabled: bool = True
    """Collect on a schedule (``bigtent gc`` works either way)."""
    interval_secs: float = Field(default=3600.0, gt=0)
    """Time between scheduled collections (the first one after this long)."""
    keep_builds: int = Field(default=3, ge=0, le=10_000)
    """Outputs of this many latest succeeded builds per repository/ref are roots."""
    grace_secs: float = Field(default=3600.0, ge=0)
    """Paths published or used this recently are never deleted."""
    sweep_batch: int = Field(default=500, ge=1, le=10_000)
    """Paths deleted per transaction (and NAR files per look at the storage)."""
    usage_flush_secs: float = Field(default=60.0, gt=0, le=3600)
    """How often the last uses of paths are written to the database (in one batch)."""
    untrusted: UntrustedRetentionSection = UntrustedRetentionSection()
    """``[cache.retention.untrusted]``: the untrusted cache's own idle limit and quota."""


class CacheSection(Section):
    signing_key_file: Path | None = None
    """Default ``STATE_DIR/cache.sk``; generated by ``bigtent up`` and ``bigtent keys generate``."""
    untrusted_signing_key_file: Path | None = None
    """Key of the untrusted cache (``/cache/untrusted``, outputs of untrusted builds); default
    ``<signing key>-untrusted.sk`` beside the main key, generated at start when missing."""
    storage: Literal["local", "s3"] = "local"
    """Where NAR files live: ``STATE_DIR/cache``, or the ``[cache.s3]`` bucket."""
    s3: S3Section | None = None
    max_nar_bytes: int = Field(default=32 * 1024**3, gt=0)
    compression: Compression = Compression.ZSTD
    compression_level: int = Field(default=3, ge=0, le=22)
    """zstd: 1-19 (0: zstd's default, 3); xz: the preset 0-9 (higher values mean 9)."""
    priority: int = Field(default=30, ge=0)
    """``Priority`` in nix-cache-info (lower is preferred by Nix clients)."""
    upstreams: list[Upstream] = []
    upstream_max_in_flight: int = Field(default=16, ge=1)
    upstream_timeout_secs: float = Field(default=10.0, gt=0)
    retention: RetentionSection = RetentionSection()

    @model_validator(mode="after")
    def _s3_configured(self) -> CacheSection:
        if self.storage == "s3" and self.s3 is None:
            raise ValueError('storage = "s3" needs a [cache.s3] section (at least bucket)')
        return self
