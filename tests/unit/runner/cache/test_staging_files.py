"""Staging files: created new (``O_EXCL``) under names of the process's own, never an existing
file or a link, and cleared as leftovers when the storage starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from bigtent.runner.cache import storage
from bigtent.runner.cache.storage import STAGING_PREFIX, LocalStaged, LocalStorage, new_staging_file


def test_a_staging_file_never_opens_what_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage, "_staging_numbers", iter([1, 2, 3]))
    theirs = tmp_path / f"{STAGING_PREFIX}1.part"
    theirs.write_bytes(b"theirs")
    link = tmp_path / f"{STAGING_PREFIX}2.part"
    elsewhere = tmp_path / "elsewhere"
    link.symlink_to(elsewhere)  # dangling: following it would create `elsewhere`
    out, name = new_staging_file(tmp_path)
    with out:
        out.write(b"ours")
    assert name == str(tmp_path / f"{STAGING_PREFIX}3.part")
    assert Path(name).read_bytes() == b"ours"
    assert theirs.read_bytes() == b"theirs"
    assert not elsewhere.exists()
    assert Path(name).stat().st_mode & 0o777 == 0o600


def test_staging_files_are_distinct_and_cleared_as_leftovers(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    names = []
    for _ in range(3):
        out, staged = store.new_temp()
        out.close()
        assert isinstance(staged, LocalStaged)
        names.append(staged.path)
    assert len(set(names)) == 3
    assert all(Path(n).parent == tmp_path / "tmp" and n.endswith(".part") for n in names)
    LocalStorage(tmp_path)  # a restart: uploads cut short left their files
    assert list((tmp_path / "tmp").iterdir()) == []
