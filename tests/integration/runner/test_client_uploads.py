"""``PUT /api/v1/paths/{basename}``: clients may only add content-addressed paths whose content,
size, hash and references are what they claim; anything else is refused and stores nothing."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from bigtent.config import Role
from bigtent.nix import base32
from bigtent.nix.drv import hash_derivation_modulo, parse_drv
from bigtent.nix.nar import dump_path
from bigtent.nix.store_path import StorePath, make_text_path
from bigtent.runner.cache.service import Cache
from bigtent.runner.db import queries
from bigtent.runner.db.tables import derivations
from tests.integration.runner.conftest import (
    Drvs,
    MakeRunner,
    Nix,
    RunnerHarness,
    Upload,
    nothing_stored,
    statements,
    upload_closure,
    upload_path,
    verify_signed,
)

pytestmark = pytest.mark.nix


def _nar_hash(data: bytes) -> str:
    return base32.format_hash("sha256", hashlib.sha256(data).digest())


async def _assert_refused(
    runner: RunnerHarness,
    up: Upload,
    status: int,
    *,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    basename: str | None = None,
    says: str = "",
) -> None:
    """The upload is refused with ``status`` and a JSON error, and nothing is stored."""
    client = runner.client(Role.CLIENT)
    before = await runner.present([up.path])
    with nothing_stored(runner):
        resp = await upload_path(client, up, body=body, headers=headers, basename=basename)
    assert resp.status_code == status, resp.text
    err = resp.json()
    assert set(err) == {"error", "detail"}
    assert says.lower() in err["error"].lower(), err
    assert await runner.present([up.path]) == before
    if not before:
        assert (await runner.narinfo(up.path)).status_code == 404


async def test_valid_closure_is_accepted_signed_and_served(
    make_runner: MakeRunner, nix: Nix, drvs: Drvs
) -> None:
    runner = await make_runner()
    client = runner.client(Role.CLIENT)
    missing = await client.post("/api/v1/paths/missing", json={"paths": list(drvs.closure)})
    assert missing.json() == {"missing": list(drvs.closure)}
    for path in drvs.closure:
        up = nix.upload(path)
        resp = await upload_path(client, up)
        assert resp.status_code == 201, resp.text
        assert resp.json() == {"path": path}
        served = await runner.narinfo(path)
        assert served.status_code == 200
        info = verify_signed(runner, served.text)
        assert info.store_path == path
        assert info.nar_hash == up.nar_hash
        assert info.nar_size == len(up.nar)
        assert info.references == tuple(StorePath.parse(r).basename for r in up.references)
        assert info.ca is not None and info.ca.startswith("text:sha256:")
        nar = await client.get(f"/cache/{info.url}")
        assert nar.status_code == 200 and nar.content  # compressed, as the narinfo says
    missing = await client.post("/api/v1/paths/missing", json={"paths": list(drvs.closure)})
    assert missing.json() == {"missing": []}
    # Uploading a path again is harmless: 200, nothing new.
    with nothing_stored(runner):
        again = await upload_path(client, nix.upload(drvs.top))
    assert again.status_code == 200
    assert runner.temp_files() == []


async def test_built_output_is_not_content_addressed(
    make_runner: MakeRunner, nix: Nix, drvs: Drvs
) -> None:
    runner = await make_runner()
    await upload_closure(runner, nix, drvs.closure)
    (out,) = nix.realise(drvs.dep)
    await _assert_refused(runner, nix.upload(out), 400, says="does not match its content")


async def test_drv_with_one_byte_changed(make_runner: MakeRunner, nix: Nix, drvs: Drvs) -> None:
    runner = await make_runner()
    await upload_closure(runner, nix, drvs.closure[:-1])
    up = nix.upload(drvs.top)
    tampered = up.nar.replace(b"echo $x", b"echo $y", 1)
    assert tampered != up.nar and len(tampered) == len(up.nar)
    await _assert_refused(
        runner,
        up,
        400,
        body=tampered,
        headers={"X-Nar-Hash": _nar_hash(tampered)},
        says="does not match its content",
    )


async def test_executable_drv_is_refused(
    make_runner: MakeRunner, nix: Nix, drvs: Drvs, tmp_path: Path
) -> None:
    """A text path is a plain file: the same content with the executable bit is another NAR
    for the same store path, and must not be able to take the path's place in the cache."""
    runner = await make_runner()
    await upload_closure(runner, nix, drvs.closure[:-1])
    copy = tmp_path / "top.drv"
    copy.write_bytes(Path(drvs.top).read_bytes())
    copy.chmod(0o755)
    nar = b"".join(dump_path(copy))
    up = Upload(drvs.top, nar, ())
    await _assert_refused(runner, up, 400, says="executable")


async def test_content_addressed_but_not_a_derivation(
    make_runner: MakeRunner, tmp_path: Path
) -> None:
    runner = await make_runner()
    content = b"Derive(this is not ATerm"
    path = make_text_path("evil.drv", hashlib.sha256(content).digest(), [])
    f = tmp_path / "evil"
    f.write_bytes(content)
    up = Upload(path, b"".join(dump_path(f)), ())
    await _assert_refused(runner, up, 400, says="not a valid derivation")


async def test_source_with_false_references(make_runner: MakeRunner, nix: Nix, drvs: Drvs) -> None:
    runner = await make_runner()
    await upload_closure(runner, nix, drvs.closure)
    fresh = await make_runner()
    up = nix.upload(drvs.source)
    # The path's hash covers its references: claiming one it does not have is a mismatch.
    other = StorePath.parse(drvs.dep).basename
    await _assert_refused(
        fresh, up, 400, headers={"X-Nar-References": other}, says="does not match"
    )
    await _assert_refused(
        fresh, up, 400, headers={"X-Nar-References": "not/a path"}, says="bad reference"
    )


async def test_nar_longer_than_declared(make_runner: MakeRunner, nix: Nix, drvs: Drvs) -> None:
    runner = await make_runner()
    up = nix.upload(drvs.source)
    await _assert_refused(runner, up, 413, body=up.nar + b"\0" * 8, says="longer")


async def test_nar_shorter_than_declared(make_runner: MakeRunner, nix: Nix, drvs: Drvs) -> None:
    runner = await make_runner()
    up = nix.upload(drvs.source)
    await _assert_refused(runner, up, 400, body=up.nar[:-8], says="shorter")


async def test_wrong_declared_hash(make_runner: MakeRunner, nix: Nix, drvs: Drvs) -> None:
    runner = await make_runner()
    up = nix.upload(drvs.source)
    wrong = _nar_hash(b"something else")
    await _assert_refused(runner, up, 400, headers={"X-Nar-Hash": wrong}, says="hash mismatch")
    await _assert_refused(
        runner, up, 400, headers={"X-Nar-Hash": "sha256:zzz"}, says="bad X-Nar-Hash"
    )
    await _assert_refused(
        runner, up, 400, headers={"X-Nar-Hash": "md5:" + "0" * 32}, says="bad X-Nar-Hash"
    )


async def test_malformed_nar(make_runner: MakeRunner, nix: Nix, drvs: Drvs) -> None:
    runner = await make_runner()
    up = nix.upload(drvs.source)
    garbage = b"this is not a NAR at all!"
    await _assert_refused(
        runner,
        up,
        400,
        body=garbage,
        headers={"X-Nar-Hash": _nar_hash(garbage), "X-Nar-Size": str(len(garbage))},
        says="malformed NAR",
    )
    # A well-formed NAR followed by a second one is not one NAR.
    double = up.nar + up.nar
    await _assert_refused(
        runner,
        up,
        400,
        body=double,
        headers={"X-Nar-Hash": _nar_hash(double), "X-Nar-Size": str(len(double))},
        says="malformed NAR",
    )


@pytest.mark.parametrize("header", ["X-Nar-Hash", "X-Nar-Size"])
async def test_missing_headers(make_runner: MakeRunner, nix: Nix, drvs: Drvs, header: str) -> None:
    runner = await make_runner()
    await _assert_refused(
        runner, nix.upload(drvs.source), 400, headers={header: "-"}, says="X-Nar-Size"
    )


@pytest.mark.parametrize("size", ["-1", "1e3", "0x10", "\u00b2", "9" * 5000, ""])
async def test_bad_declared_size(make_runner: MakeRunner, nix: Nix, drvs: Drvs, size: str) -> None:
    runner = await make_runner()
    up = nix.upload(drvs.source)
    await _assert_refused(runner, up, 400, headers={"X-Nar-Size": size or "-"}, says="X-Nar-Size")


async def test_references_must_be_uploaded_first(
    make_runner: MakeRunner, nix: Nix, drvs: Drvs
) -> None:
    runner = await make_runner()
    await _assert_refused(runner, nix.upload(drvs.top), 400, says="not in the cache yet")
    await upload_closure(runner, nix, (drvs.source,))
    await _assert_refused(runner, nix.upload(drvs.top), 400, says=drvs.dep)
    # In dependency order it goes in, and the derivation is then known to builds.
    await upload_closure(runner, nix, (drvs.dep, drvs.top))


@pytest.mark.parametrize(
    "basename",
    [
        "%2E%2E",
        "..",
        "x.drv",
        "abc-x.drv",
        "0" * 31 + "-x.drv",
        "0" * 33 + "-x.drv",
        "e" * 32 + "-x.drv",  # 'e' is not a nix-base32 digit
        "0" * 32 + "-.hidden",
        "0" * 32 + "-has space",
        "0" * 32 + "-",
    ],
)
async def test_bad_basename(make_runner: MakeRunner, nix: Nix, drvs: Drvs, basename: str) -> None:
    runner = await make_runner()
    up = nix.upload(drvs.source)
    client = runner.client(Role.CLIENT)
    with nothing_stored(runner):
        resp = await upload_path(client, up, basename=basename)
    # ".." is resolved away by the HTTP client, leaving a route that does not take PUT.
    assert resp.status_code in ((404, 405) if basename == ".." else (400,)), resp.text
    assert set(resp.json()) == {"error", "detail"}
    assert await runner.present([up.path]) == set()


async def test_declared_size_over_max_nar_bytes(
    make_runner: MakeRunner, nix: Nix, drvs: Drvs
) -> None:
    runner = await make_runner(cache={"max_nar_bytes": 100})
    up = nix.upload(drvs.source)
    assert len(up.nar) > 100
    await _assert_refused(runner, up, 413, says="max_nar_bytes")
    # Declaring less than the cap but sending more is caught while streaming.
    small = await make_runner(cache={"max_nar_bytes": 100})
    await _assert_refused(small, up, 413, headers={"X-Nar-Size": "100"}, says="longer")


# ---- the output paths inside a .drv -------------------------------------------------------
def _drv_upload(tmp_path: Path, text: str, name: str) -> Upload:
    """A .drv with ``text`` at the path its content and references give it, so the text-hash
    check passes and only what is inside the derivation can be refused."""
    drv = parse_drv(text)
    path = make_text_path(name, hashlib.sha256(text.encode()).digest(), drv.references)
    f = tmp_path / f"{uuid.uuid4().hex}.drv"
    f.write_bytes(text.encode())
    return Upload(path, b"".join(dump_path(f)), drv.references)


def _read(path: str) -> str:
    return Path(path).read_bytes().decode()


async def _hash_modulo(runner: RunnerHarness, path: str) -> str | None:
    async with runner.comps.engine.connect() as conn:
        return (await queries.fetch_derivations(conn, [path]))[path].hash_modulo


_TARGET = "/nix/store/" + "1" * 32 + "-openssl-3.0.7"
"""A path the cache might serve later, which a forged .drv claims as its output."""


@pytest.mark.parametrize("which", ["dep", "top"])
async def test_drv_claiming_another_output_path_is_refused(
    make_runner: MakeRunner, nix: Nix, drvs: Drvs, tmp_path: Path, which: str
) -> None:
    runner = await make_runner()
    await upload_closure(runner, nix, drvs.closure[:-1])
    path = drvs.dep if which == "dep" else drvs.top
    honest = _read(path)
    (out,) = parse_drv(honest).output_paths.values()
    forged = _drv_upload(tmp_path, honest.replace(out, _TARGET), StorePath.parse(path).name)
    assert forged.path != path
    await _assert_refused(runner, forged, 400, says=f"but Nix computes {out}")
    resp = await upload_path(runner.client(Role.CLIENT), forged)
    assert resp.json()["detail"] == {"output": "out", "claimed": _TARGET, "expected": out}
    # The same name, the same output path claimed, but in the outputs only: still refused.
    only_output = honest.replace(f'"{out}","",""', f'"{_TARGET}","",""')
    up = _drv_upload(tmp_path, only_output, StorePath.parse(path).name)
    await _assert_refused(runner, up, 400, says="but Nix computes")
    # The right output path with another $out for the builder is refused as Nix would.
    wrong_env = honest.replace(f'("out","{out}")', f'("out","{_TARGET}")')
    up = _drv_upload(tmp_path, wrong_env, StorePath.parse(path).name)
    await _assert_refused(runner, up, 400, says="environment variable 'out' must be")


async def test_drv_not_in_nix_form_is_refused(
    make_runner: MakeRunner, nix: Nix, drvs: Drvs, tmp_path: Path
) -> None:
    """The same derivation as Nix reads it, written in another order: Nix never writes that,
    and bigtent reads it no differently, but it is refused rather than second-guessed."""
    runner = await make_runner()
    await upload_closure(runner, nix, drvs.closure[:-1])
    honest = _read(drvs.top)
    drv = parse_drv(honest)
    env = "[" + ",".join(f'("{k}","{drv.env[k]}")' for k in sorted(drv.env, reverse=True)) + "]"
    start = honest.index(',[("builder"')
    reordered = honest[:start] + "," + env + ")"
    assert parse_drv(reordered) == parse_drv(honest)
    up = _drv_upload(tmp_path, reordered, StorePath.parse(drvs.top).name)
    await _assert_refused(runner, up, 400, says="not in the form Nix writes")


def _expr(body: str) -> str:
    return f'let nonce = "{uuid.uuid4().hex}"; system = builtins.currentSystem; in {body}'


async def test_drv_with_too_many_outputs_is_refused(
    make_runner: MakeRunner, nix: Nix, tmp_path: Path
) -> None:
    runner = await make_runner()
    path = nix.instantiate(
        _expr(
            'derivation { name = "many"; inherit system nonce; builder = "/bin/sh"; '
            'outputs = [ "out" ] ++ builtins.genList (i: "o${toString i}") 299; }'
        ),
        tmp_path,
    )
    assert len(parse_drv(_read(path)).outputs) == 300
    await _assert_refused(runner, nix.upload(path), 400, says="300 outputs; at most 256")


@pytest.mark.parametrize(
    ("attrs", "says"),
    [
        ('requiredSystemFeatures = builtins.genList (i: "f${toString i}") 300;', "features"),
        (f'requiredSystemFeatures = ["{"f" * 300}"];', "system feature of 300 characters"),
    ],
)
async def test_drv_over_the_agent_protocol_limits_is_refused(
    make_runner: MakeRunner, nix: Nix, tmp_path: Path, attrs: str, says: str
) -> None:
    runner = await make_runner()
    path = nix.instantiate(
        _expr(f'derivation {{ name = "big"; inherit system nonce; builder = "/bin/sh"; {attrs} }}'),
        tmp_path,
    )
    await _assert_refused(runner, nix.upload(path), 400, says=says)


async def test_drv_with_long_system_is_refused(
    make_runner: MakeRunner, nix: Nix, tmp_path: Path
) -> None:
    runner = await make_runner()
    path = nix.instantiate(
        f'derivation {{ name = "long"; system = "{"s" * 300}"; builder = "/bin/sh"; '
        f'nonce = "{uuid.uuid4().hex}"; }}',
        tmp_path,
    )
    await _assert_refused(runner, nix.upload(path), 400, says="system of 300 characters")


_RICH_GRAPH = """
  derivation {
    name = "top"; inherit system nonce; builder = "/bin/sh";
    args = [ "-c" "${lib.dev} ${lib} ${recursive} ${flat}" ];
  }
"""


def _rich(nix: Nix, tmp_path: Path) -> tuple[str, tuple[str, ...]]:
    """A closure with fixed-output (recursive and flat) and multi-output derivations."""
    expr = _expr(f"""
let
  recursive = derivation {{
    name = "fetched"; inherit system; builder = "/bin/sh"; outputHashMode = "recursive";
    outputHashAlgo = "sha256"; outputHash = builtins.hashString "sha256" nonce;
  }};
  flat = derivation {{
    name = "tarball"; inherit system; builder = "/bin/sh";
    outputHashAlgo = "sha1"; outputHash = builtins.hashString "sha1" nonce;
  }};
  lib = derivation {{
    name = "lib"; inherit system nonce; builder = "/bin/sh"; outputs = [ "out" "dev" "doc" ];
    src = recursive; escapes = "quote \\" backslash \\\\ newline \\n tab \\t return \\r";
  }};
in {_RICH_GRAPH}""")
    top = nix.instantiate(expr, tmp_path)
    return top, nix.closure(top)


async def test_honest_closures_with_fixed_and_multi_output_drvs_are_accepted(
    make_runner: MakeRunner, nix: Nix, tmp_path: Path
) -> None:
    runner = await make_runner()
    top, closure = _rich(nix, tmp_path)
    assert len(closure) == 4
    await upload_closure(runner, nix, closure)
    assert await runner.present(list(closure)) == set(closure)
    hashes: dict[str, bytes] = {}
    for path in closure:
        drv = parse_drv(_read(path))
        name = StorePath.parse(path).name.removesuffix(".drv")
        hashes[path] = hash_derivation_modulo(drv, hashes, drv_name=name)
        assert await _hash_modulo(runner, path) == hashes[path].hex()
    recorded = await runner.comps.cache.derivations([top])
    assert recorded[top].outputs == nix.outputs(top)
    # Each .drv's text is recorded as uploaded, escapes and all (sent with assignments).
    async with runner.comps.engine.connect() as conn:
        found = await queries.assignment_derivations(conn, list(closure))
    assert {p: d.text for p, d in found.drvs.items()} == {p: _read(p) for p in closure}


async def test_uploaded_derivations_are_remembered_as_recorded(
    make_runner: MakeRunner, nix: Nix, tmp_path: Path
) -> None:
    """A derivation just uploaded is looked up again at once (the next .drv's inputs, its
    output's upload): memory answers, exactly as the database would."""
    runner = await make_runner()
    _, closure = _rich(nix, tmp_path)
    await upload_closure(runner, nix, closure)
    with statements(runner.comps.engine) as seen:
        remembered = await runner.comps.cache.derivations(list(closure))
    assert seen == []
    async with runner.comps.engine.connect() as conn:
        assert remembered == await queries.fetch_derivations(conn, list(closure))


@pytest.mark.parametrize(
    ("compression", "storage"),
    [("zstd", "local"), ("xz", "local"), ("none", "local"), ("zstd", "s3"), ("xz", "s3")],
)
async def test_inputs_recorded_before_hashes_were_stored(
    make_runner: MakeRunner,
    nix: Nix,
    tmp_path: Path,
    compression: str,
    storage: str,
    request: pytest.FixtureRequest,
) -> None:
    """Derivations recorded before migration 0002 have no hash modulo: it is computed from
    their .drv files in the cache storage (inputs first; read back from the bucket with S3
    storage) when a new derivation needs it, and kept."""
    cache: dict[str, Any] = {"compression": compression}
    if storage == "s3":
        cache.update(storage="s3", s3=request.getfixturevalue("s3_bucket").config())
    runner = await make_runner(cache=cache)
    for _ in range(50):
        top, closure = _rich(nix, tmp_path)
        lib = next(p for p in closure if p.endswith("-lib.drv"))
        fetched = next(p for p in closure if p.endswith("-fetched.drv"))
        # A diamond (top needs lib and fetched, lib needs fetched) whose inputs are visited
        # lib first, so fetched is needed before its own turn.
        if lib > fetched:
            break
    await upload_closure(runner, nix, closure[:-1])
    drv_paths = [p for p in closure[:-1] if p.endswith(".drv")]
    expected = {p: await _hash_modulo(runner, p) for p in drv_paths}
    async with runner.comps.engine.begin() as conn:
        await conn.execute(update(derivations).values(hash_modulo=None))
    # As after a restart into the new schema: the cache remembers no derivation records.
    old = runner.comps.cache
    runner.comps.cache = Cache(
        old.engine, old.storage, old.key, old.config, old.url.removesuffix("/cache")
    )
    await upload_closure(runner, nix, (top,))
    assert {p: await _hash_modulo(runner, p) for p in drv_paths} == expected
