"""Our pure Nix format code against the real Nix tools: NAR dumps, hashes, store paths, keys
and derivations must agree byte for byte."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Any, Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bigtent.nix import base32
from bigtent.nix.drv import parse_drv
from bigtent.nix.keys import generate_key, parse_public_key, parse_secret_key
from bigtent.nix.nar import ReferenceScanner, dump_path, validate
from bigtent.nix.narinfo import fingerprint
from bigtent.nix.store_path import (
    StorePath,
    make_fixed_output_path,
    make_source_path,
    make_text_path,
)
from tests import nar_trees
from tests.conftest import HOST_TOOLS_OPTION
from tests.nar_trees import Tree, write_tree

if shutil.which("nix-store") is None:
    pytest.skip("nix-store is not on PATH", allow_module_level=True)

pytestmark = pytest.mark.nix

NO_NETWORK = ["--option", "substituters", ""]
NIX_COMMAND = ["--extra-experimental-features", "nix-command"]
SUBPROCESS_SETTINGS = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def run(*argv: str, stdin: bytes | None = None) -> bytes:
    result = subprocess.run(argv, input=stdin, capture_output=True, check=False)
    if result.returncode != 0:
        raise AssertionError(f"{argv} failed: {result.stderr.decode(errors='replace')}")
    return result.stdout


def run_text(*argv: str) -> str:
    return run(*argv).decode().strip()


# ----------------------------------------------------------------------------- trees

trees = nar_trees.trees(max_file_bytes=300)


# ----------------------------------------------------------------------------- NAR and hashes


@SUBPROCESS_SETTINGS
@given(trees)
def test_dump_path_equals_nix_store_dump(tree: Tree) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        write_tree(root, tree)
        ours = b"".join(dump_path(root, chunk_size=100))
        assert ours == run("nix-store", "--dump", str(root))
        assert validate([ours]).nar_size == len(ours)
        nar_hash = run_text("nix-hash", "--type", "sha256", "--base32", str(root))
        assert base32.encode(hashlib.sha256(ours).digest()) == nar_hash


@SUBPROCESS_SETTINGS
@given(st.binary(max_size=2000))
def test_flat_hash_equals_nix_hash(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "f"
        file.write_bytes(data)
        flat = run_text("nix-hash", "--type", "sha256", "--flat", "--base32", str(file))
        assert base32.encode(hashlib.sha256(data).digest()) == flat
        hex_digest = hashlib.sha256(data).hexdigest()
        assert run_text("nix-hash", "--type", "sha256", "--to-base32", hex_digest) == flat
        assert base32.parse_hash(f"sha256:{flat}") == hashlib.sha256(data).digest()


# ----------------------------------------------------------------------------- store paths

store_names = st.from_regex(r"[A-Za-z0-9+\-_?=][A-Za-z0-9+\-._?=]{0,30}", fullmatch=True)
contents = st.text(
    st.characters(blacklist_categories=["Cs"], blacklist_characters="\0"), max_size=80
)


def to_file(expr: str, **args: str) -> str:
    argv = ["nix-instantiate", *NO_NETWORK, "--read-write-mode", "--eval", "-E", expr]
    for key, value in args.items():
        argv += ["--argstr", key, value]
    return str(json.loads(run_text(*argv)))


@SUBPROCESS_SETTINGS
@given(store_names, contents)
def test_make_text_path_equals_to_file(name: str, content: str) -> None:
    path = to_file("{ n, c }: builtins.toFile n c", n=name, c=content)
    assert make_text_path(name, hashlib.sha256(content.encode()).digest(), []) == path
    # A text file referring to another store path.
    ref = to_file('{ c }: builtins.toFile "ref" c', c=content)
    with_ref = to_file(
        '{ n, c }: builtins.toFile n "see ${builtins.toFile "ref" c}"', n=name, c=content
    )
    digest = hashlib.sha256(f"see {ref}".encode()).digest()
    assert make_text_path(name, digest, [ref]) == with_ref


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees)
def test_make_source_path_equals_nix_store_add(tree: Tree) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "src-tree"
        write_tree(root, tree)
        nar_sha256 = hashlib.sha256(b"".join(dump_path(root))).digest()
        assert make_source_path("src-tree", nar_sha256) == run_text(
            "nix-store", *NO_NETWORK, "--add", str(root)
        )


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=500), st.sampled_from(["sha1", "sha256", "sha512"]), st.booleans())
def test_make_fixed_output_path_equals_add_fixed(data: bytes, algo: str, recursive: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "fixed"
        file.write_bytes(data)
        hashed = b"".join(dump_path(file)) if recursive else data
        digest = hashlib.new(algo, hashed).digest()
        flags = ["--recursive"] if recursive else []
        expected = run_text("nix-store", *NO_NETWORK, "--add-fixed", *flags, algo, str(file))
        method: Literal["flat", "recursive"] = "recursive" if recursive else "flat"
        assert make_fixed_output_path("fixed", method, algo, digest) == expected


# ----------------------------------------------------------------------------- keys


def path_info(path: str) -> dict[str, Any]:
    out = run("nix", *NIX_COMMAND, "path-info", *NO_NETWORK, "--json", "--sigs", path)
    info: dict[str, Any] = json.loads(out)[0]
    return info


def fresh_store_path() -> tuple[str, bytes]:
    """Build a new input-addressed path with one reference (Nix treats content-addressed paths
    as trusted without signatures), and return it with its fingerprint as Nix sees it."""
    expr = (
        '{ c }: derivation { name = "signed"; system = builtins.currentSystem; '
        'builder = "/bin/sh"; args = ["-c" "echo ${builtins.toFile "dep" c} > $out"]; }'
    )
    path = run_text(
        "nix-build",
        *NO_NETWORK,
        *HOST_TOOLS_OPTION,
        "--no-out-link",
        "-E",
        expr,
        "--argstr",
        "c",
        uuid.uuid4().hex,
    )
    info = path_info(path)
    assert len(info["references"]) == 1
    return path, fingerprint(path, info["narHash"], info["narSize"], info["references"])


def test_reference_scanner_agrees_with_nix() -> None:
    path, _ = fresh_store_path()
    references = path_info(path)["references"]
    candidates = [StorePath.parse(p).hash_part for p in references]
    candidates.append(StorePath.parse(path).hash_part)  # not self-referencing
    candidates.append(base32.encode(hashlib.sha1(b"absent").digest()))
    scanner = ReferenceScanner(candidates)
    for chunk in dump_path(path, chunk_size=7):
        scanner.feed(chunk)
    assert scanner.found == {StorePath.parse(p).hash_part for p in references}


def test_nix_generated_key(tmp_path: Path) -> None:
    sk_file, pk_file = tmp_path / "sk", tmp_path / "pk"
    run("nix-store", "--generate-binary-cache-key", "nix-made-1", str(sk_file), str(pk_file))
    secret = parse_secret_key(sk_file.read_text())
    public = parse_public_key(pk_file.read_text())
    assert secret.public_key() == public
    assert secret.to_text() == sk_file.read_text().strip()
    assert public.to_text() == pk_file.read_text().strip()

    path, fp = fresh_store_path()
    run("nix", *NIX_COMMAND, "store", "sign", *NO_NETWORK, "--key-file", str(sk_file), path)
    nix_sigs = [s for s in path_info(path)["signatures"] if s.startswith("nix-made-1:")]
    assert nix_sigs == [secret.sign(fp)]  # Ed25519 is deterministic
    assert public.verify(fp, nix_sigs[0])
    assert not public.verify(fp + b"x", nix_sigs[0])


def test_our_key_is_accepted_by_nix(tmp_path: Path) -> None:
    secret = generate_key("bigtent-made-1")
    sk_file = tmp_path / "sk"
    sk_file.write_text(secret.to_text())
    path, fp = fresh_store_path()
    run("nix", *NIX_COMMAND, "store", "sign", *NO_NETWORK, "--key-file", str(sk_file), path)
    nix_sigs = [s for s in path_info(path)["signatures"] if s.startswith("bigtent-made-1:")]
    assert nix_sigs == [secret.sign(fp)]
    public_text = secret.public_key().to_text()
    verify = ["nix", *NIX_COMMAND, "store", "verify", *NO_NETWORK, "--no-contents"]
    run(*verify, "--sigs-needed", "1", "--option", "trusted-public-keys", public_text, path)
    other = generate_key("bigtent-made-1").public_key().to_text()
    result = subprocess.run(
        [*verify, "--sigs-needed", "1", "--option", "trusted-public-keys", other, path],
        capture_output=True,
        check=False,
    )
    assert result.returncode != 0


# ----------------------------------------------------------------------------- derivations


SIMPLE_DRV = (
    'derivation { name = "x"; system = builtins.currentSystem; builder = "/bin/sh"; '
    'args = ["-c" "echo hi > $out"]; requiredSystemFeatures = ["kvm"]; }'
)
RICH_DRV = (
    'let dep = derivation { name = "dep"; system = builtins.currentSystem; builder = "/bin/sh"; '
    'outputs = ["out" "dev"]; args = ["-c" "echo > $out; echo > $dev"]; }; in '
    'derivation { name = "rich"; system = builtins.currentSystem; builder = "/bin/sh"; '
    'args = ["-c" "echo ${dep.dev} ${builtins.toFile "src" "s"} > $out"]; '
    'requiredSystemFeatures = ["kvm" "big-parallel"]; preferLocalBuild = true; '
    'escapes = "quote \\" backslash \\\\ newline \\n tab \\t return \\r"; }'
)


@pytest.mark.parametrize("expr", [SIMPLE_DRV, RICH_DRV], ids=["simple", "rich"])
def test_parse_drv_matches_show_derivation(expr: str) -> None:
    drv_path = run_text("nix-instantiate", *NO_NETWORK, "--no-gc-warning", "-E", expr)
    drv = parse_drv(Path(drv_path).read_text())
    shown = json.loads(run("nix", *NIX_COMMAND, "show-derivation", *NO_NETWORK, drv_path))
    expected = shown[drv_path]
    assert drv.output_paths == {name: o["path"] for name, o in expected["outputs"].items()}
    assert drv.required_features == set(expected["env"]["requiredSystemFeatures"].split())
    assert "kvm" in drv.required_features
    assert drv.env == expected["env"]
    assert list(drv.args) == expected["args"]
    assert drv.builder == expected["builder"]
    assert drv.system == expected.get("platform", expected.get("system"))
    assert list(drv.input_srcs) == expected["inputSrcs"]
    assert {k: list(v) for k, v in drv.input_drvs.items()} == expected["inputDrvs"]
    assert drv.references == tuple(sorted([*expected["inputSrcs"], *expected["inputDrvs"]]))
    assert not drv.is_fixed_output
    if expr == RICH_DRV:
        assert drv.prefer_local_build
        assert len(drv.input_drvs) == 1 and len(drv.input_srcs) == 1
        assert drv.env["escapes"] == 'quote " backslash \\ newline \n tab \t return \r'
