"""Storage names are checked by their parts, without the file system (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bigtent.runner.cache.storage import MAX_NAME_BYTES, LocalStorage, checked_name


@pytest.mark.parametrize(
    "name",
    ["nar/abc.nar", "nar/abc.nar.zst", "nar/sub/abc.nar", "nar/" + "x" * MAX_NAME_BYTES],
)
def test_a_storage_name_is_taken(name: str) -> None:
    assert checked_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "nar",
        "nar/",
        "tmp/abc.nar",
        "/etc/passwd",
        "nar/../secret.key",
        "nar/../../etc/passwd",
        "nar/./abc.nar",
        "nar//abc.nar",
        "nar/abc.nar/",
        "nar/a\0b",
        "nar/" + "x" * (MAX_NAME_BYTES + 1),
        "../nar/abc.nar",
    ],
)
def test_a_name_that_is_not_a_storage_name_is_refused(name: str) -> None:
    with pytest.raises(ValueError):
        checked_name(name)


def test_the_target_of_a_name_is_under_the_root(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    assert storage.target("nar/abc.nar") == tmp_path / "nar" / "abc.nar"
    with pytest.raises(ValueError):
        storage.target("nar/../../x")
    assert storage.local_path("nar/../../x") is None
    assert storage.local_path("nar/missing.nar") is None
