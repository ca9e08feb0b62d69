"""Storage faults under a running runner: NAR storage full (a small tmpfs: 507 with the cause,
counted, nothing stored, the same upload accepted once there is room), and NAR storage lost
(the cache notices on serve and on ``/paths/missing``; ``bigtent cache verify`` finds missing
and damaged files and, with ``--repair``, forgets them)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from bigtent.client.api import RunnerClient
from bigtent.config import Role
from bigtent.errors import StorageFull
from bigtent.runner.cache.verify import cache_tables, verify_cache
from bigtent.runner.components import open_storage
from tests.integration.runner.conftest import (
    Drvs,
    MakeRunner,
    Nix,
    RunnerHarness,
    upload_closure,
    upload_path,
)

pytestmark = pytest.mark.nix


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on ``where`` (root only), unmounted afterwards."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _remount(where: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True)


def _random_source(tmp_path: Path, size: int) -> str:
    """A source path of ``size`` incompressible bytes in the host store."""
    blob = tmp_path / f"blob-{os.urandom(4).hex()}"
    blob.write_bytes(os.urandom(size))
    out = subprocess.run(
        ["nix-store", "--add", str(blob)], capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


async def test_full_nar_storage_answers_507_and_the_upload_succeeds_once_there_is_room(
    make_runner: MakeRunner, nix: Nix, tmp_path: Path
) -> None:
    runner = await make_runner()
    root = runner.state_dir / "cache"
    with small_tmpfs(root, "1m"):
        (root / "nar").mkdir()
        (root / "tmp").mkdir()
        up = nix.upload(_random_source(tmp_path, 2 * 1024 * 1024))
        client = runner.client(Role.CLIENT)

        resp = await upload_path(client, up)

        assert resp.status_code == 507, resp.text
        err = resp.json()["error"]
        assert "storage is full" in err and "No space left on device" in err, err
        assert runner.comps.metrics.storage_full._value.get() == 1
        assert runner.temp_files() == [] and runner.nar_files() == []
        assert await runner.present([up.path]) == set()
        metrics = await runner.client(Role.ADMIN).get("/metrics")
        assert "bigtent_storage_full_total 1.0" in metrics.text
        overview = (await runner.client(None).get("/")).text
        assert "NAR storage full: 1 upload(s) refused" in overview
        assert "No space left on device" in overview

        _remount(root, "8m")  # room made
        again = await upload_path(client, up)
        assert again.status_code == 201, again.text
        assert (await runner.narinfo(up.path)).status_code == 200


async def _lose_storage(runner: RunnerHarness) -> None:
    shutil.rmtree(runner.state_dir / "cache" / "nar")


async def test_lost_nar_storage_is_noticed_on_serve_and_the_paths_are_uploaded_again(
    make_runner: MakeRunner, nix: Nix, drvs: Drvs
) -> None:
    runner = await make_runner()
    await upload_closure(runner, nix, drvs.closure)
    client = runner.client(Role.CLIENT)
    first = drvs.closure[0]
    assert (await runner.narinfo(first)).status_code == 200  # remembered in memory now

    await _lose_storage(runner)

    assert (await runner.narinfo(first)).status_code == 404
    missing = await client.post("/api/v1/paths/missing", json={"paths": list(drvs.closure)})
    assert missing.status_code == 200
    assert sorted(missing.json()["missing"]) == sorted(drvs.closure)
    assert runner.comps.metrics.nars_forgotten._value.get() == len(drvs.closure)
    # Forgotten, so the client uploads them again, and the cache serves them again.
    await upload_closure(runner, nix, drvs.closure)
    for path in drvs.closure:
        served = await runner.narinfo(path)
        assert served.status_code == 200
        url = served.text.split("URL: ", 1)[1].split("\n", 1)[0]
        assert (await runner.client(None).get(f"/cache/{url}")).status_code == 200


async def test_cache_verify_finds_missing_and_damaged_files_and_repair_forgets_them(
    make_runner: MakeRunner, nix: Nix, drvs: Drvs
) -> None:
    runner = await make_runner()
    await upload_closure(runner, nix, drvs.closure)
    comps = runner.comps
    storage = await open_storage(comps.config)
    infos = {p: await comps.cache.fetch_narinfo(p) for p in drvs.closure}
    damaged, deleted, *good = drvs.closure
    damaged_info, deleted_info = infos[damaged], infos[deleted]
    assert damaged_info is not None and deleted_info is not None
    damaged_file = runner.state_dir / "cache" / damaged_info.url
    data = bytearray(damaged_file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, another hash
    damaged_file.write_bytes(bytes(data))
    (runner.state_dir / "cache" / deleted_info.url).unlink()

    report = await verify_cache(comps.engine, storage, cache_tables(), repair=False)

    assert report.checked == len(drvs.closure)
    reasons = {b.path: b.reason for b in report.bad}
    assert set(reasons) == {damaged, deleted}
    assert "hashes to" in reasons[damaged] and "is missing" in reasons[deleted]
    assert report.forgotten == 0

    repaired = await verify_cache(comps.engine, storage, cache_tables(), repair=True)

    assert repaired.forgotten == 2
    assert not damaged_file.exists()  # deleted, so a runner remembering it finds it gone
    assert await runner.present(list(drvs.closure)) == set(good)
    after = await verify_cache(comps.engine, storage, cache_tables(), repair=False)
    assert after.bad == [] and after.checked == len(good)


async def test_cache_verify_command_reports_json_and_exit_status(
    make_runner: MakeRunner, nix: Nix, drvs: Drvs, tmp_path: Path
) -> None:
    runner = await make_runner()
    await upload_closure(runner, nix, drvs.closure)
    config = runner.comps.config
    toml = tmp_path / "runner.toml"
    toml.write_text(
        f'[runner]\nstate_dir = "{config.runner.state_dir}"\n'
        f'[database]\nurl = "{config.database_url()}"\n'
        f'[cache]\nsigning_key_file = "{config.cache.signing_key_file}"\n'
    )
    await _lose_storage(runner)

    async def verify(*flags: str) -> tuple[int, dict[str, object]]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bigtent",
            "cache",
            "verify",
            "--config",
            str(toml),
            "--json",
            *flags,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        assert out, err.decode()
        return proc.returncode, json.loads(out)

    code, report = await verify()
    assert code == 1
    assert report["checked"] == len(drvs.closure) and report["forgotten"] == 0
    assert isinstance(report["bad"], list) and len(report["bad"]) == len(drvs.closure)
    code, report = await verify("--repair")
    assert code == 0 and report["forgotten"] == len(drvs.closure)
    code, report = await verify()
    assert code == 0 and report == {"checked": 0, "bad": [], "forgotten": 0}


async def test_a_client_streaming_into_full_storage_is_told_why(
    make_runner: MakeRunner, nix: Nix, tmp_path: Path
) -> None:
    runner = await make_runner(serve=True)
    assert runner.url is not None
    root = runner.state_dir / "cache"
    with small_tmpfs(root, "1m"):
        (root / "nar").mkdir()
        (root / "tmp").mkdir()
        up = nix.upload(_random_source(tmp_path, 4 * 1024 * 1024))

        async def chunks() -> AsyncIterator[bytes]:
            for at in range(0, len(up.nar), 64 * 1024):
                yield up.nar[at : at + 64 * 1024]

        async with RunnerClient(runner.url, token=runner.tokens[Role.CLIENT]) as client:
            with pytest.raises(StorageFull, match="No space left on device"):
                await client.upload_path(
                    up.path,
                    chunks(),
                    nar_hash=up.nar_hash,
                    nar_size=len(up.nar),
                    references=[],
                )
