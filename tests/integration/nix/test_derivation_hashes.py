"""Our unparse and derivation hashes against nix-instantiate: every .drv Nix writes must
unparse back to the same bytes, and the output paths in it must be the ones we compute from
its inputs (hashDerivationModulo, makeOutputPath, makeFixedOutputPath)."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bigtent.nix import base32
from bigtent.nix.drv import (
    Derivation,
    expected_output_paths,
    hash_derivation_modulo,
    parse_drv,
    unparse_drv,
)
from bigtent.nix.store_path import StorePath

if shutil.which("nix-instantiate") is None:
    pytest.skip("nix-instantiate is not on PATH", allow_module_level=True)

pytestmark = pytest.mark.nix

NO_NETWORK = ["--option", "substituters", ""]

# Each spec entry is one derivation; `deps` refer to outputs of earlier entries, so the last
# entries can have a chain of input derivations (fixed-output ones among them).
GRAPH = """
{ spec }:
let
  specs = builtins.fromJSON spec;
  mk = d: derivation (
    {
      inherit (d) name system builder args;
      deps = map (dep: (builtins.elemAt drvs dep.index).${dep.output}) d.deps;
    }
    // (if d.fixed == null then { outputs = d.outputs; } else {
      outputHashMode = d.fixed.mode;
      outputHashAlgo = d.fixed.algo;
      outputHash = d.fixed.hash;
    })
    // (if d.src == null then { } else { src = builtins.toFile "src" d.src; })
    // (if d.structured then { __structuredAttrs = true; } else { })
    // d.env
  );
  drvs = map mk specs;
in drvs
"""

text = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\0"), max_size=30)
odd_text = st.one_of(
    text, st.lists(st.sampled_from(['"', "\\", "\n", "\r", "\t", "é", "$", "a"])).map("".join)
)
drv_names = st.from_regex(r"[A-Za-z0-9+\-_?=][A-Za-z0-9+\-._?=]{0,20}", fullmatch=True)
output_names = st.from_regex(r"[a-z][a-z0-9]{0,5}", fullmatch=True).filter(lambda n: n != "drv")
# The system is written without escapes (printUnquotedString): Nix itself could not read
# back a system with a quote or backslash, so none is generated.
systems = st.text(
    st.characters(blacklist_categories=["Cs"], blacklist_characters='\0"\\'),
    min_size=1,
    max_size=12,
)


@st.composite
def fixed_outputs(draw: st.DrawFn) -> dict[str, str]:
    algo = draw(st.sampled_from(["sha1", "sha256", "sha512"]))
    digest = draw(st.binary(min_size=base32.HASH_SIZES[algo], max_size=base32.HASH_SIZES[algo]))
    spelling = draw(st.sampled_from(["hex", "nix32", "sri"]))
    if spelling == "hex":
        hash_ = digest.hex()
    elif spelling == "nix32":
        hash_ = base32.encode(digest)
    else:
        hash_ = f"{algo}-{base64.b64encode(digest).decode()}"
    return {"mode": draw(st.sampled_from(["flat", "recursive"])), "algo": algo, "hash": hash_}


@st.composite
def graphs(draw: st.DrawFn) -> list[dict[str, Any]]:
    specs: list[dict[str, Any]] = []
    for index in range(draw(st.integers(1, 4))):
        fixed = draw(st.none() | fixed_outputs())
        outputs = (
            ["out"] if fixed else draw(st.lists(output_names, min_size=1, max_size=3, unique=True))
        )
        deps = []
        for earlier, spec in enumerate(specs):
            for output in spec["outputs"]:
                if draw(st.booleans()):
                    deps.append({"index": earlier, "output": output})
        specs.append(
            {
                "name": draw(drv_names),
                "system": draw(systems),
                "builder": "/" + draw(odd_text),
                "args": draw(st.lists(odd_text, max_size=3)),
                "outputs": outputs,
                "fixed": fixed,
                "deps": deps,
                "src": draw(st.none() | odd_text),
                # Fixed-output derivations with structured attrs are fine too, but keep the
                # combinations small.
                "structured": draw(st.booleans()),
                "env": draw(st.dictionaries(odd_text.map(lambda k: "v" + k), odd_text, max_size=4)),
                "index": index,
            }
        )
    return specs


def instantiate(specs: list[dict[str, Any]], tmp: Path) -> list[str]:
    expr = tmp / "graph.nix"
    expr.write_text(GRAPH)
    argv = ["nix-instantiate", *NO_NETWORK, "--no-gc-warning", str(expr)]
    result = subprocess.run(
        [*argv, "--argstr", "spec", json.dumps(specs)], capture_output=True, check=False
    )
    if result.returncode != 0:
        raise AssertionError(f"nix-instantiate failed: {result.stderr.decode(errors='replace')}")
    # A derivation whose first output is not `out` is printed as `<drv>!<output>`.
    return [line.split("!")[0] for line in result.stdout.decode().split()]


def check_drv(path: str, hashes: dict[str, bytes]) -> None:
    """Check ``path`` (after its inputs) and record its hash modulo in ``hashes``."""
    if path in hashes:
        return
    text = Path(path).read_bytes().decode()
    drv: Derivation = parse_drv(text)
    for input_drv in sorted(drv.input_drvs):
        check_drv(input_drv, hashes)
    assert unparse_drv(drv) == text
    name = StorePath.parse(path).name.removesuffix(".drv")
    assert expected_output_paths(drv, name, hashes) == drv.output_paths
    for output, out_path in drv.output_paths.items():
        assert drv.env[output] == out_path
    hashes[path] = hash_derivation_modulo(drv, hashes, drv_name=name)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=graphs())
def test_drvs_written_by_nix(
    specs: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> None:
    paths = instantiate(specs, tmp_path_factory.mktemp("graph"))
    assert len(paths) == len(specs)
    hashes: dict[str, bytes] = {}
    for path in paths:
        check_drv(path, hashes)
    for path, spec in zip(paths, specs, strict=True):
        drv = parse_drv(Path(path).read_bytes().decode())
        assert drv.is_fixed_output == (spec["fixed"] is not None)
        assert set(drv.outputs) == set(spec["outputs"])


def test_hash_modulo_reaches_through_a_chain() -> None:
    """A change deep in the graph changes the output paths of everything above it, exactly
    as Nix's do (the spec is fixed so the test is the same every run)."""
    base: list[dict[str, Any]] = []
    for index in range(3):
        base.append(
            {
                "name": f"chain{index}",
                "system": "x86_64-linux",
                "builder": "/bin/sh",
                "args": [],
                "outputs": ["out", "lib"],
                "fixed": None,
                "deps": [{"index": index - 1, "output": "lib"}] if index else [],
                "src": None,
                "structured": False,
                "env": {"vnonce": hashlib.sha256(b"chain").hexdigest()},
                "index": index,
            }
        )
    changed = json.loads(json.dumps(base))
    changed[0]["env"]["vnonce"] = "other"
    with tempfile.TemporaryDirectory() as tmp:
        one = instantiate(base, Path(tmp))
        two = instantiate(changed, Path(tmp))
    hashes: dict[str, bytes] = {}
    for path in [*one, *two]:
        check_drv(path, hashes)
    assert (
        parse_drv(Path(one[2]).read_bytes().decode()).output_paths
        != parse_drv(Path(two[2]).read_bytes().decode()).output_paths
    )
