"""Tests for the ATerm .drv parser."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bigtent.nix.drv import (
    Derivation,
    DerivationOutput,
    DrvError,
    UnresolvedInput,
    input_paths,
    parse_drv,
)

OUT = "/nix/store/2k1m3w21csh3an1jbwlhglh9ixc9mi3a-x"
DEP = "/nix/store/mf4lhp3dh6hd4n8d91pnz56n9q463rqr-dep.drv"
SRC = "/nix/store/draf2pm7skqzj8g3kv0bamg214p6sd70-a"

# Written by nix-instantiate 2.8 (with an input drv and source added by hand).
REAL = (
    f'Derive([("out","{OUT}","","")],[("{DEP}",["dev","out"])],["{SRC}"],"x86_64-linux",'
    '"/bin/sh",["-c","echo hi > $out"],[("builder","/bin/sh"),("name","x"),'
    f'("out","{OUT}"),("requiredSystemFeatures","kvm big-parallel"),("system","x86_64-linux")])'
)


def _quote(s: str) -> str:
    escaped = (
        s.replace("\\", "\\\\")
        .replace('"', '\\"')
        .replace("\n", "\\n")
        .replace("\r", "\\r")
        .replace("\t", "\\t")
    )
    return f'"{escaped}"'


def _list(items: list[str]) -> str:
    return "[" + ",".join(items) + "]"


def render(drv: Derivation) -> str:
    """ATerm as Nix's unparse writes it, for round-trip tests."""
    outputs = _list(
        [
            f"({_quote(n)},{_quote(o.path)},{_quote(o.hash_algo)},{_quote(o.hash)})"
            for n, o in drv.outputs.items()
        ]
    )
    inputs = _list(
        [f"({_quote(p)},{_list([_quote(o) for o in outs])})" for p, outs in drv.input_drvs.items()]
    )
    env = _list([f"({_quote(k)},{_quote(v)})" for k, v in drv.env.items()])
    return (
        f"Derive({outputs},{inputs},{_list([_quote(s) for s in drv.input_srcs])},"
        f"{_quote(drv.system)},{_quote(drv.builder)},{_list([_quote(a) for a in drv.args])},{env})"
    )


def test_parse_real_drv() -> None:
    drv = parse_drv(REAL)
    assert drv.outputs == {"out": DerivationOutput(OUT, "", "")}
    assert drv.output_paths == {"out": OUT}
    assert drv.input_drvs == {DEP: ("dev", "out")}
    assert drv.input_srcs == (SRC,)
    assert drv.system == "x86_64-linux"
    assert drv.builder == "/bin/sh"
    assert drv.args == ("-c", "echo hi > $out")
    assert drv.env["name"] == drv.name == "x"
    assert drv.required_features == {"kvm", "big-parallel"}
    assert not drv.prefer_local_build
    assert drv.references == (SRC, DEP)
    assert not drv.is_fixed_output
    assert render(drv) == REAL


def test_escapes() -> None:
    text = REAL.replace('"echo hi > $out"', r'"a\"b\\c\nd\re\tf\qg"')
    assert parse_drv(text).args == ("-c", 'a"b\\c\nd\re\tf' + "qg")


def test_fixed_output_and_flags() -> None:
    text = (
        f'Derive([("out","{OUT}","r:sha256","{"0" * 64}")],[],[],"builtin","builtin:fetchurl",[],'
        '[("preferLocalBuild","1")])'
    )
    drv = parse_drv(text)
    assert drv.is_fixed_output
    assert drv.prefer_local_build
    assert drv.required_features == frozenset()
    assert drv.references == ()


def test_floating_ca_needs_feature() -> None:
    text = 'Derive([("out","","r:sha256","")],[],[],"x86_64-linux","/bin/sh",[],[])'
    drv = parse_drv(text)
    assert drv.output_paths == {"out": ""}
    assert drv.required_features == {"ca-derivations"}
    assert not drv.is_fixed_output


def test_structured_attrs() -> None:
    attrs = {"requiredSystemFeatures": ["kvm", "nixos-test"], "preferLocalBuild": True}
    env = f'[("__json",{_quote(json.dumps(attrs))}),("out","{OUT}")]'
    drv = parse_drv(f'Derive([("out","{OUT}","","")],[],[],"x86_64-linux","/bin/sh",[],{env})')
    assert drv.required_features == {"kvm", "nixos-test"}
    assert drv.prefer_local_build
    for bad_attrs, message in [
        ('{"requiredSystemFeatures": 3}', "requiredSystemFeatures"),
        ("[1]", "not an object"),
        ("{", "invalid __json"),
    ]:
        bad = f'[("__json",{_quote(bad_attrs)})]'
        text = f'Derive([("out","{OUT}","","")],[],[],"x86_64-linux","/bin/sh",[],{bad})'
        with pytest.raises(DrvError, match=message):
            _ = parse_drv(text).required_features


def test_dynamic_derivation_form() -> None:
    body = REAL.removeprefix("Derive(")
    plain = f'DrvWithVersion("xp-dyn-drv",{body}'
    assert parse_drv(plain) == parse_drv(REAL)
    node = plain.replace('["dev","out"]', '(["dev","out"],[])')
    assert parse_drv(node) == parse_drv(REAL)
    nested = plain.replace('["dev","out"]', '(["out"],[("out",["lib"])])')
    with pytest.raises(DrvError, match="dynamic derivations are not supported"):
        parse_drv(nested)
    with pytest.raises(DrvError, match="version"):
        parse_drv(plain.replace("xp-dyn-drv", "xp-other"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "expected 'Derive\\('"),
        ("Derive(", "expected '\\['"),
        (REAL[:-1], "expected '\\)'"),
        (REAL + "x", "trailing data"),
        (REAL.replace('"x86_64-linux",', "x86_64-linux,", 1), "expected '\"'"),
        (REAL[: REAL.index("echo")] + "echo", "unterminated string"),
        (REAL[: REAL.index("echo")] + "echo\\", "unterminated string"),
        (REAL.replace(f'"{SRC}"', '"/tmp/src"'), "not in /nix/store"),
        (REAL.replace(DEP, SRC), "not a .drv store path"),
        (
            REAL.replace(f'("out","{OUT}","","")', f'("out","{OUT}","",""),("out","","","")'),
            "duplicate output",
        ),
        (REAL.replace('("name","x")', '("name","x"),("name","y")'), "duplicate environment"),
        ('Derive([],[],[],"s","b",[],[])', "no outputs"),
        (REAL.replace('["-c"', '["-c",]'), "expected '\"'"),
    ],
)
def test_rejects(text: str, message: str) -> None:
    with pytest.raises(DrvError, match=message):
        parse_drv(text)


def test_error_position() -> None:
    text = REAL.replace("x86_64-linux", "\n", 1).replace('"/bin/sh",', "/bin/sh,", 1)
    with pytest.raises(DrvError, match=r"offset \d+ \(line 2, col 3\)"):
        parse_drv(text)


def _parse_secs(escapes: int) -> float:
    big = '\\\\\\"' * escapes + "x" * (2 * escapes)
    text = REAL.replace('("name","x")', f'("big","{big}"),("name","x")')
    best = float("inf")
    for _ in range(5):
        start = time.process_time()
        drv = parse_drv(text)
        best = min(best, time.process_time() - start)
    assert len(drv.env["big"]) == 4 * escapes
    return best


def test_large_drv_parses_in_linear_time() -> None:
    """Four times the input costs about four times the time (a quadratic parser: sixteen).
    A ratio within one run of this process's CPU time, best of five, so a loaded machine
    (other processes taking the CPU) does not fail it."""
    small, large = _parse_secs(100_000), _parse_secs(400_000)
    assert large < 9 * small


strings = st.text(st.characters(blacklist_categories=["Cs"]), max_size=20)
paths = st.from_regex(r"/nix/store/[0-9a-df-np-sv-z]{32}-[a-z][a-z0-9.\-]{0,10}", fullmatch=True)


@given(
    st.builds(
        Derivation,
        outputs=st.dictionaries(
            strings,
            st.builds(DerivationOutput, st.just("") | paths, strings, strings),
            min_size=1,
            max_size=3,
        ),
        input_drvs=st.dictionaries(
            paths.map(lambda p: p + ".drv"), st.lists(strings, max_size=3).map(tuple), max_size=3
        ),
        input_srcs=st.lists(paths, max_size=3).map(tuple),
        system=strings,
        builder=strings,
        args=st.lists(strings, max_size=4).map(tuple),
        env=st.dictionaries(strings, strings, max_size=5),
    )
)
def test_roundtrip(drv: Derivation) -> None:
    assert parse_drv(render(drv)) == drv


_IN = "/nix/store/" + "a" * 32 + "-in.drv"
_OUTS = {_IN: {"out": "/nix/store/" + "b" * 32 + "-in", "dev": ""}}


def test_input_paths_are_the_sources_and_the_wanted_outputs() -> None:
    src = "/nix/store/" + "c" * 32 + "-src"
    assert input_paths([src], {_IN: ["out"]}, _OUTS) == {src, _OUTS[_IN]["out"]}
    assert input_paths([], {}, {}) == set()


def test_an_input_output_without_a_path_is_named() -> None:
    with pytest.raises(UnresolvedInput) as floating:
        input_paths([], {_IN: ["dev"]}, _OUTS)
    assert floating.value.floating and "floating" in str(floating.value)
    with pytest.raises(UnresolvedInput) as missing:
        input_paths([], {_IN: ["lib"]}, _OUTS)
    assert not missing.value.floating and str(missing.value) == f"{_IN} has no output 'lib'"
    with pytest.raises(KeyError):
        input_paths([], {_IN: ["out"]}, {})
