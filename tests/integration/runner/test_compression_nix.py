"""Each ``[cache] compression`` (zstd, xz, none) with local storage: the narinfo says what the
file is, and a real Nix client substitutes it into a fresh store."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.runner.conftest import (
    Drvs,
    MakeRunner,
    Nix,
    nix_copy_from,
    upload_closure,
    verify_signed,
)

pytestmark = pytest.mark.nix


@pytest.mark.parametrize(
    ("compression", "suffix"), [("zstd", ".nar.zst"), ("xz", ".nar.xz"), ("none", ".nar")]
)
async def test_nix_substitutes_each_compression(
    make_runner: MakeRunner, nix: Nix, drvs: Drvs, tmp_path: Path, compression: str, suffix: str
) -> None:
    runner = await make_runner(
        serve=True, cache={"compression": compression, "compression_level": 6}
    )
    await upload_closure(runner, nix, drvs.closure)
    for path in drvs.closure:
        info = verify_signed(runner, (await runner.narinfo(path)).text)
        assert info.compression == compression and info.url.endswith(suffix), info
        local = runner.comps.cache.storage.local_path(info.url)
        assert local is not None and local.stat().st_size == info.file_size
    code, output = await nix_copy_from(runner, [drvs.top], tmp_path / "fresh")
    assert code == 0, output
    for path in drvs.closure:
        copied = tmp_path / "fresh" / path.lstrip("/")
        assert copied.read_bytes() == Path(path).read_bytes()
