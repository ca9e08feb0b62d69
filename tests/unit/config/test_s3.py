"""``[cache] storage = "s3"`` and ``[cache.s3]``: what is accepted, and the errors for the rest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bigtent.config import load_runner_config
from bigtent.errors import ConfigError
from bigtent.nix.compression import Compression


def _load(tmp_path: Path, **cache: Any) -> Any:
    return load_runner_config(None, runner={"state_dir": str(tmp_path)}, cache=cache)


def test_defaults(tmp_path: Path) -> None:
    cfg = _load(tmp_path)
    assert cfg.cache.storage == "local" and cfg.cache.s3 is None
    assert cfg.cache.compression is Compression.ZSTD and cfg.cache.compression_level == 3
    s3 = _load(tmp_path, storage="s3", s3={"bucket": "nars"}).cache.s3
    assert (s3.prefix, s3.region, s3.serve, s3.addressing_style) == (
        "",
        "us-east-1",
        "redirect",
        "auto",
    )
    assert s3.presigned_uploads is True and s3.credentials() is None


@pytest.mark.parametrize(
    ("cache", "says"),
    [
        ({"storage": "s3"}, "needs a [cache.s3] section"),
        ({"storage": "gcs"}, "cache.storage"),
        ({"storage": "s3", "s3": {}}, "cache.s3.bucket"),
        ({"storage": "s3", "s3": {"bucket": "Bad_Bucket"}}, "cache.s3.bucket"),
        ({"storage": "s3", "s3": {"bucket": "b12", "prefix": "../x"}}, "'..' segment"),
        ({"storage": "s3", "s3": {"bucket": "b12", "prefix": "/abs"}}, "must not start with '/'"),
        ({"storage": "s3", "s3": {"bucket": "b12", "serve": "push"}}, "cache.s3.serve"),
        (
            {"storage": "s3", "s3": {"bucket": "b12", "endpoint_url": "ftp://x"}},
            "http:// or https://",
        ),
        ({"storage": "s3", "s3": {"bucket": "b12", "endpoint_url": "http://u:p@x"}}, "credentials"),
        ({"storage": "s3", "s3": {"bucket": "b12", "access_key_id": "AK"}}, "go together"),
        ({"storage": "s3", "s3": {"bucket": "b12", "presigned_get_secs": 0}}, "presigned_get_secs"),
        ({"compression": "gzip"}, "cache.compression"),
        ({"compression_level": 23}, "cache.compression_level"),
    ],
)
def test_mistakes_name_the_key(tmp_path: Path, cache: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigError, match="invalid configuration") as err:
        _load(tmp_path, **cache)
    assert says in str(err.value)


def test_credentials_inline_or_from_files(tmp_path: Path) -> None:
    (tmp_path / "id").write_text("AKID\n")
    (tmp_path / "secret").write_text("s3cr3t\n")
    inline = _load(
        tmp_path,
        storage="s3",
        s3={"bucket": "b12", "access_key_id": "AKID", "secret_access_key": "s3cr3t"},
    ).cache.s3
    assert inline.credentials() == ("AKID", "s3cr3t")
    assert "s3cr3t" not in repr(inline) and "s3cr3t" not in str(inline.model_dump())
    files = _load(
        tmp_path,
        storage="s3",
        s3={
            "bucket": "b12",
            "access_key_id_file": str(tmp_path / "id"),
            "secret_access_key_file": str(tmp_path / "secret"),
        },
    ).cache.s3
    assert files.credentials() == ("AKID", "s3cr3t")
    with pytest.raises(ConfigError, match="not both"):
        _load(
            tmp_path,
            storage="s3",
            s3={"bucket": "b12", "secret_access_key": "x", "access_key_id": "y",
                "secret_access_key_file": str(tmp_path / "secret")},
        )  # fmt: skip
    missing = _load(
        tmp_path,
        storage="s3",
        s3={"bucket": "b12", "access_key_id": "y", "secret_access_key_file": str(tmp_path / "no")},
    ).cache.s3
    with pytest.raises(ConfigError, match=r"cannot read cache\.s3\.secret_access_key_file "):
        missing.credentials()


def test_environment_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BIGTENT_CACHE__STORAGE", "s3")
    monkeypatch.setenv("BIGTENT_CACHE__S3__BUCKET", "from-env")
    monkeypatch.setenv("BIGTENT_CACHE__S3__SERVE", "proxy")
    cfg = _load(tmp_path)
    assert cfg.cache.storage == "s3"
    assert cfg.cache.s3 is not None
    assert (cfg.cache.s3.bucket, cfg.cache.s3.serve) == ("from-env", "proxy")
