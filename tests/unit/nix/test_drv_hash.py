"""Tests for the exact ATerm unparse and Nix's derivation hashes (hashDerivationModulo and
the output paths made from it), on derivations written by nix-instantiate 2.8."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest

from bigtent.nix import base32
from bigtent.nix.drv import (
    Derivation,
    DerivationOutput,
    DrvError,
    OutputKind,
    derivation_kind,
    expected_output_paths,
    fixed_output_path,
    hash_derivation_modulo,
    output_path_name,
    output_paths_for,
    parse_drv,
    unparse_drv,
)

S = "/nix/store/"
FOD_DRV = S + "yp3ajzmgyy82qml46z0v5v2va5yqfgrp-fod.drv"
FLAT_DRV = S + "hf2sw0v9ipgi6mj8pjgnawk9ji739kk1-flat.drv"
DEP_DRV = S + "az0k7yi7ng1sq0ph9x5xmd4zqz42n68h-dep.drv"
FOD_OUT = S + "8py5mw1vip97ddabbk58hwl0wnajy0n1-fod"
FLAT_OUT = S + "vs29zk8jyy78bplgc924hwk8gqywl593-flat"
DEP_OUT = S + "4pqhjihp692k5xqci8100brzd3srlj3c-dep"
DEP_DEV = S + "ci6pg1h279c5vpb5ag2pyb1zls6vb1cx-dep-dev"
TOP_OUT = S + "na6gn111lc95jn85325yiiszwvmp2q8m-top"
ONES = "1" * 64
TWOS = "2" * 40

# Written by nix-instantiate 2.8 for:
#   fod = derivation { name = "fod"; system = "x86_64-linux"; builder = "/bin/sh";
#     outputHashMode = "recursive"; outputHashAlgo = "sha256"; outputHash = "111...1"; };
#   flat = derivation { name = "flat"; ...; outputHashAlgo = "sha1"; outputHash = "222...2"; };
#   dep = derivation { name = "dep"; ...; outputs = ["out" "dev"]; src = fod; };
#   top = derivation { name = "top"; ...; args = ["-c" "${dep.dev} ${dep} ${flat}"];
#     e = "q\"b\\s\nn\tt\rr"; };
FOD = (
    f'Derive([("out","{FOD_OUT}","r:sha256","{ONES}")],[],[],"x86_64-linux","/bin/sh",[],'
    f'[("builder","/bin/sh"),("name","fod"),("out","{FOD_OUT}"),("outputHash","{ONES}"),'
    '("outputHashAlgo","sha256"),("outputHashMode","recursive"),("system","x86_64-linux")])'
)
FLAT = (
    f'Derive([("out","{FLAT_OUT}","sha1","{TWOS}")],[],[],"x86_64-linux","/bin/sh",[],'
    f'[("builder","/bin/sh"),("name","flat"),("out","{FLAT_OUT}"),("outputHash","{TWOS}"),'
    '("outputHashAlgo","sha1"),("system","x86_64-linux")])'
)
DEP = (
    f'Derive([("dev","{DEP_DEV}","",""),("out","{DEP_OUT}","","")],[("{FOD_DRV}",["out"])],'
    f'[],"x86_64-linux","/bin/sh",[],[("builder","/bin/sh"),("dev","{DEP_DEV}"),'
    f'("name","dep"),("out","{DEP_OUT}"),("outputs","out dev"),("src","{FOD_OUT}"),'
    '("system","x86_64-linux")])'
)
TOP = (
    f'Derive([("out","{TOP_OUT}","","")],[("{DEP_DRV}",["dev","out"]),("{FLAT_DRV}",["out"])],'
    f'[],"x86_64-linux","/bin/sh",["-c","{DEP_DEV} {DEP_OUT} {FLAT_OUT}"],'
    '[("builder","/bin/sh"),("e","q\\"b\\\\s\\nn\\tt\\rr"),("name","top"),'
    f'("out","{TOP_OUT}"),("system","x86_64-linux")])'
)


def _hashes() -> dict[str, bytes]:
    """Hashes modulo of the graph, dependencies first, as a dependent needs them."""
    hashes: dict[str, bytes] = {}
    for path, text, name in [
        (FOD_DRV, FOD, "fod"),
        (FLAT_DRV, FLAT, "flat"),
        (DEP_DRV, DEP, "dep"),
    ]:
        hashes[path] = hash_derivation_modulo(parse_drv(text), hashes, drv_name=name)
    return hashes


@pytest.mark.parametrize("text", [FOD, FLAT, DEP, TOP], ids=["fod", "flat", "dep", "top"])
def test_unparse_is_byte_identical(text: str) -> None:
    assert unparse_drv(parse_drv(text)) == text


def test_escapes_only_where_nix_does() -> None:
    drv = parse_drv(TOP)
    assert drv.env["e"] == 'q"b\\s\nn\tt\rr'
    # printString for builder, args and env; names, paths and the system are written raw
    # (printUnquotedString), so a backslash in the system stays one backslash.
    odd = replace(drv, system="a\\b", builder='sh "x"', args=("\t",))
    text = unparse_drv(odd)
    assert ',"a\\b","sh \\"x\\"",["\\t"],' in text


def test_unparse_sorts_and_deduplicates_like_nix_maps() -> None:
    drv = parse_drv(TOP)
    shuffled = Derivation(
        outputs={"z": DerivationOutput("", "", ""), "a": DerivationOutput("", "", "")},
        input_drvs={DEP_DRV: ("out", "dev", "out"), FLAT_DRV: ("out",)},
        input_srcs=(FLAT_OUT, FOD_OUT, FLAT_OUT),
        system=drv.system,
        builder=drv.builder,
        args=("b", "a"),
        env={"b": "2", "a": "1", "é": "3", "Z": "0"},
    )
    assert unparse_drv(shuffled) == (
        'Derive([("a","","",""),("z","","","")],'
        f'[("{DEP_DRV}",["dev","out"]),("{FLAT_DRV}",["out"])],["{FOD_OUT}","{FLAT_OUT}"],'
        '"x86_64-linux","/bin/sh",["b","a"],[("Z","0"),("a","1"),("b","2"),("é","3")])'
    )


def test_mask_outputs_blanks_paths_and_their_variables() -> None:
    masked = unparse_drv(parse_drv(DEP), mask_outputs=True)
    assert DEP_OUT not in masked and DEP_DEV not in masked
    assert '("dev","","",""),("out","","","")' in masked
    assert '("dev",""),' in masked and '("out",""),' in masked
    assert f'("src","{FOD_OUT}")' in masked  # not an output name: kept
    fod = unparse_drv(parse_drv(FOD), mask_outputs=True)
    assert f'("out","","r:sha256","{ONES}")' in fod


def test_input_drvs_override() -> None:
    text = unparse_drv(parse_drv(TOP), input_drvs_override={"ab": ["out", "dev"], "01": []})
    assert '],[("01",[]),("ab",["dev","out"])],[],' in text


def test_fixed_output_hash_modulo_is_its_fixed_fingerprint() -> None:
    got = hash_derivation_modulo(parse_drv(FOD), {}, drv_name="fod")
    assert got == hashlib.sha256(f"fixed:out:r:sha256:{ONES}:{FOD_OUT}".encode()).digest()
    flat = hash_derivation_modulo(parse_drv(FLAT), {}, drv_name="flat")
    assert flat == hashlib.sha256(f"fixed:out:sha1:{TWOS}:{FLAT_OUT}".encode()).digest()
    # Masking does not change it: a fixed output's hash depends only on what it produces.
    masked = hash_derivation_modulo(parse_drv(FOD), {}, drv_name="fod", mask_outputs=True)
    assert masked == got


def test_output_paths_match_nix() -> None:
    hashes = _hashes()
    assert expected_output_paths(parse_drv(FOD), "fod", {}) == {"out": FOD_OUT}
    assert expected_output_paths(parse_drv(FLAT), "flat", {}) == {"out": FLAT_OUT}
    assert expected_output_paths(parse_drv(DEP), "dep", hashes) == {"out": DEP_OUT, "dev": DEP_DEV}
    assert expected_output_paths(parse_drv(TOP), "top", hashes) == {"out": TOP_OUT}


def test_output_paths_come_from_the_masked_hash() -> None:
    drv = parse_drv(TOP)
    hashes = _hashes()
    full = hash_derivation_modulo(drv, hashes, drv_name="top")
    masked = hash_derivation_modulo(drv, hashes, drv_name="top", mask_outputs=True)
    assert full != masked
    assert output_paths_for(drv, "top", masked) == {"out": TOP_OUT}
    assert output_paths_for(drv, "top", full) != {"out": TOP_OUT}


def test_dependents_see_the_full_hash_of_inputs() -> None:
    """Any change to an input derivation, even only in its claimed output path, changes its
    hash modulo and with it the output paths of everything that depends on it."""
    hashes = _hashes()
    forged_dep = parse_drv(DEP.replace(DEP_OUT, FLAT_OUT))
    forged = dict(hashes, **{DEP_DRV: hash_derivation_modulo(forged_dep, hashes, drv_name="dep")})
    assert forged[DEP_DRV] != hashes[DEP_DRV]
    assert expected_output_paths(parse_drv(TOP), "top", forged) != {"out": TOP_OUT}
    # The forged dep's own outputs are not what it claims.
    assert expected_output_paths(forged_dep, "dep", hashes)["out"] != FLAT_OUT


def test_drv_name_comes_from_the_store_path() -> None:
    drv = parse_drv(DEP)
    other = expected_output_paths(drv, "renamed", _hashes())
    assert other["out"].endswith("-renamed") and other["dev"].endswith("-renamed-dev")
    assert fixed_output_path(parse_drv(FOD), "other") != FOD_OUT
    assert output_path_name("x", "out") == "x"
    assert output_path_name("x", "lib") == "x-lib"


def test_fixed_hash_in_other_encodings_is_read_as_nix_does() -> None:
    digest = bytes.fromhex(ONES)
    for spelling in (base32.encode(digest), ONES.upper()):
        drv = parse_drv(FOD.replace(f'"r:sha256","{ONES}"', f'"r:sha256","{spelling}"'))
        assert unparse_drv(drv) == FOD  # Nix writes it back in hex
        assert hash_derivation_modulo(drv, {}, drv_name="fod") == hash_derivation_modulo(
            parse_drv(FOD), {}, drv_name="fod"
        )
    bad = parse_drv(FOD.replace(ONES, "0" * 63))
    with pytest.raises(DrvError, match="bad fixed-output hash"):
        hash_derivation_modulo(bad, {}, drv_name="fod")


def test_hash_without_algorithm_is_ignored_as_nix_does() -> None:
    drv = parse_drv(DEP.replace(f'("out","{DEP_OUT}","","")', f'("out","{DEP_OUT}","","junk")'))
    assert not drv.is_fixed_output
    assert unparse_drv(drv) == DEP


def test_inputs_with_equal_hashes_merge_their_outputs() -> None:
    same = b"\x01" * 32
    drv = parse_drv(TOP)
    merged = hash_derivation_modulo(drv, {DEP_DRV: same, FLAT_DRV: same}, drv_name="top")
    override = {same.hex(): ["dev", "out"]}
    assert (
        merged == hashlib.sha256(unparse_drv(drv, input_drvs_override=override).encode()).digest()
    )


def test_unknown_input_hash() -> None:
    with pytest.raises(DrvError, match=f"input derivation {FLAT_DRV} is not known"):
        hash_derivation_modulo(parse_drv(TOP), {DEP_DRV: b"\0" * 32})


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        ({"out": ("", "", ""), "dev": (DEP_DEV, "", "")}, "can't mix"),
        ({"out": (FOD_OUT, "sha256", ONES), "dev": (DEP_DEV, "", "")}, "can't mix"),
        ({"out": (FOD_OUT, "sha256", ONES), "dev": (FOD_OUT, "sha256", ONES)}, "only one fixed"),
        ({"lib": (FOD_OUT, "sha256", ONES)}, 'named "out"'),
        ({"out": (FOD_OUT, "sha3", ONES)}, "unknown hash algorithm"),
        ({"out": ("", "sha256", ONES)}, "must have a path"),
        ({"out": (FOD_OUT, "r:sha256", "")}, "must not have a path"),
    ],
)
def test_derivation_kind_rejects_what_nix_rejects(
    outputs: dict[str, tuple[str, str, str]], message: str
) -> None:
    drv = replace(parse_drv(DEP), outputs={k: DerivationOutput(*v) for k, v in outputs.items()})
    with pytest.raises(DrvError, match=message):
        derivation_kind(drv)


@pytest.mark.parametrize(
    ("output", "kind"),
    [
        (DerivationOutput("", "r:sha256", ""), OutputKind.FLOATING),
        (DerivationOutput("", "", ""), OutputKind.DEFERRED),
        (DerivationOutput("", "r:sha256", "impure"), OutputKind.IMPURE),
    ],
)
def test_outputs_without_known_paths(output: DerivationOutput, kind: OutputKind) -> None:
    drv = replace(parse_drv(FOD), outputs={"out": output})
    assert derivation_kind(drv) is kind
    with pytest.raises(DrvError, match="no path known"):
        output_paths_for(drv, "fod", b"\0" * 32)
