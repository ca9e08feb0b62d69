"""The serve protocol's framing, without Nix: round trips, padding, version-dependent fields."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bigtent.nix.drv import parse_drv
from bigtent.nix.serve import (
    CLIENT_MINOR,
    SERVE_MAGIC_2,
    BasicDerivation,
    BuildOptions,
    BuildResult,
    BuildStatus,
    Cursor,
    NeedMore,
    ServeProtocolError,
    decode_build_result,
    decode_path_set,
    decode_server_hello,
    encode_basic_derivation,
    encode_build_derivation,
    encode_build_options,
    encode_build_result,
    encode_query_valid_paths,
    negotiated_minor,
    put_int,
    put_str,
    put_strs,
)

u64 = st.integers(min_value=0, max_value=(1 << 64) - 1)
texts = st.text(max_size=40)
minors = st.integers(min_value=0, max_value=CLIENT_MINOR)


def ints(data: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(data) // 8}Q", data))


@given(u64)
def test_int_round_trip(n: int) -> None:
    data = put_int(n)
    assert len(data) == 8 and data == n.to_bytes(8, "little")
    assert Cursor(data).u64() == n


@given(st.binary(max_size=100))
def test_strings_are_padded_to_eight(data: bytes) -> None:
    wire = put_str(data)
    assert len(wire) % 8 == 0
    assert len(wire) == 8 + len(data) + (-len(data) % 8)
    assert wire[8 + len(data) :] == b"\0" * (-len(data) % 8)
    cur = Cursor(wire)
    assert cur.blob() == data and cur.pos == len(wire)


@given(st.lists(texts, max_size=10))
def test_string_lists_round_trip(items: list[str]) -> None:
    cur = Cursor(put_strs(items))
    assert cur.strs() == items


def test_nonzero_padding_is_refused() -> None:
    with pytest.raises(ServeProtocolError, match="padding"):
        Cursor(put_int(1) + b"a\x01\0\0\0\0\0\0").blob()


@given(st.binary(max_size=40), st.data())
def test_truncated_input_needs_more(data: bytes, draw: st.DataObject) -> None:
    wire = put_str(data)
    cut = draw.draw(st.integers(min_value=0, max_value=len(wire) - 1))
    with pytest.raises(NeedMore):
        Cursor(wire[:cut]).blob()


def test_server_hello() -> None:
    wire = put_int(SERVE_MAGIC_2) + put_int(0x207) + b"rest"
    assert decode_server_hello(wire) == (0x207, 16)
    assert negotiated_minor(0x207) == 7
    assert negotiated_minor(0x205) == 5
    assert negotiated_minor(0x2FF) == CLIENT_MINOR
    with pytest.raises(NeedMore):
        decode_server_hello(wire[:12])
    with pytest.raises(ServeProtocolError, match="mismatch"):
        decode_server_hello(put_int(1) + put_int(0x207))
    with pytest.raises(ServeProtocolError, match="unsupported"):
        decode_server_hello(put_int(SERVE_MAGIC_2) + put_int(0x307))
    with pytest.raises(ServeProtocolError, match="unsupported"):
        decode_server_hello(put_int(SERVE_MAGIC_2) + put_int(0x201))


@given(
    st.integers(min_value=0, max_value=1 << 32),
    st.integers(min_value=0, max_value=1 << 32),
    st.integers(min_value=0, max_value=1 << 40),
    st.booleans(),
)
def test_build_options_by_version(silent: int, timeout: int, log: int, keep: bool) -> None:
    options = BuildOptions(silent, timeout, log, keep)
    assert ints(encode_build_options(options, 1)) == [silent, timeout]
    assert ints(encode_build_options(options, 2)) == [silent, timeout, log]
    # 2.3: repeats 0, enforce determinism 0
    assert ints(encode_build_options(options, 3)) == [silent, timeout, log, 0, 0]
    assert ints(encode_build_options(options, 6)) == [silent, timeout, log, 0, 0]
    assert ints(encode_build_options(options, 7)) == [silent, timeout, log, 0, 0, int(keep)]


def test_query_valid_paths() -> None:
    wire = encode_query_valid_paths(["/nix/store/b", "/nix/store/a", "/nix/store/a"])
    cur = Cursor(wire)
    assert [cur.u64(), cur.u64(), cur.u64()] == [1, 0, 1]  # cmd, lock, substitute
    assert cur.strs() == ["/nix/store/a", "/nix/store/b"]
    assert cur.pos == len(wire)
    paths, used = decode_path_set(put_strs(["/nix/store/x"]) + b"more")
    assert paths == {"/nix/store/x"} and used == 8 + 8 + 16


DRV = (
    'Derive([("out","/nix/store/9krlzvny65gdc8s7kpb6lkx8cd02c25c-hello","","")],'
    '[("/nix/store/0c0cpvvp4h5xmmnc2ymbiqzlp2ihh7gk-dep.drv",["out"])],'
    '["/nix/store/1b9p07z77phvv2hf6gm9f28syp39f1ag-src"],"x86_64-linux","/bin/sh",'
    '["-c","echo hi > $out"],[("b","2"),("a","1"),'
    '("out","/nix/store/9krlzvny65gdc8s7kpb6lkx8cd02c25c-hello")])'
)


def test_basic_derivation_wire_format() -> None:
    drv = parse_drv(DRV)
    dep_out = "/nix/store/2c0cpvvp4h5xmmnc2ymbiqzlp2ihh7gk-dep"
    basic = BasicDerivation.of(drv, [dep_out])
    assert basic.input_srcs == {"/nix/store/1b9p07z77phvv2hf6gm9f28syp39f1ag-src", dep_out}
    cur = Cursor(encode_build_derivation("/nix/store/x-hello.drv", basic, BuildOptions(1, 2, 3), 7))
    assert cur.u64() == 8  # cmdBuildDerivation
    assert cur.text() == "/nix/store/x-hello.drv"
    assert cur.u64() == 1
    assert [cur.text() for _ in range(4)] == [
        "out",
        "/nix/store/9krlzvny65gdc8s7kpb6lkx8cd02c25c-hello",
        "",
        "",
    ]
    assert cur.strs() == sorted(basic.input_srcs)
    assert (cur.text(), cur.text()) == ("x86_64-linux", "/bin/sh")
    assert cur.strs() == ["-c", "echo hi > $out"]
    assert cur.u64() == 3
    env = [(cur.text(), cur.text()) for _ in range(3)]
    assert env == sorted(drv.env.items())
    assert [cur.u64() for _ in range(6)] == [1, 2, 3, 0, 0, 0]
    assert cur.pos == len(cur.data)


@given(
    st.dictionaries(texts, st.tuples(texts, texts, texts), min_size=1, max_size=3),
    st.frozensets(texts, max_size=4),
    texts,
    texts,
    st.lists(texts, max_size=4),
    st.dictionaries(texts, texts, max_size=4),
)
def test_basic_derivation_round_trip(
    outputs: dict[str, tuple[str, str, str]],
    srcs: frozenset[str],
    platform: str,
    builder: str,
    args: list[str],
    env: dict[str, str],
) -> None:
    basic = BasicDerivation(outputs, srcs, platform, builder, tuple(args), env)
    wire = encode_basic_derivation(basic)
    assert len(wire) % 8 == 0
    cur = Cursor(wire)
    got_outputs = {}
    for _ in range(cur.u64()):
        name = cur.text()
        got_outputs[name] = (cur.text(), cur.text(), cur.text())
    got_srcs = frozenset(cur.strs())
    got_platform, got_builder = cur.text(), cur.text()
    got_args = tuple(cur.strs())
    got_env = {}
    for _ in range(cur.u64()):
        key = cur.text()
        got_env[key] = cur.text()
    assert cur.pos == len(wire)
    assert BasicDerivation(got_outputs, got_srcs, got_platform, got_builder, got_args, got_env) == (
        basic
    )


results = st.builds(
    BuildResult,
    status=st.sampled_from(list(BuildStatus)) | st.integers(min_value=15, max_value=99),
    error_msg=texts,
    times_built=st.integers(min_value=0, max_value=100),
    is_non_deterministic=st.booleans(),
    start_time=st.integers(min_value=0, max_value=1 << 40),
    stop_time=st.integers(min_value=0, max_value=1 << 40),
    built_outputs=st.dictionaries(texts, texts, max_size=3),
)


@given(results, minors)
def test_build_result_round_trip_by_version(result: BuildResult, minor: int) -> None:
    wire = encode_build_result(result, minor)
    got, used = decode_build_result(wire + b"next reply", minor)
    assert used == len(wire)
    assert got.status == result.status and got.error_msg == result.error_msg
    if minor >= 3:
        assert (got.times_built, got.is_non_deterministic, got.start_time, got.stop_time) == (
            result.times_built,
            result.is_non_deterministic,
            result.start_time,
            result.stop_time,
        )
    else:
        assert (got.times_built, got.start_time) == (0, 0)
    assert got.built_outputs == (result.built_outputs if minor >= 6 else {})
    for cut in range(0, len(wire), 8):
        with pytest.raises(NeedMore):
            decode_build_result(wire[:cut], minor)


def test_build_result_fields_per_version() -> None:
    result = BuildResult(BuildStatus.PERMANENT_FAILURE, "boom", 1, False, 10, 20, {"k": "v"})
    assert len(encode_build_result(result, 2)) == 8 + 16
    assert len(encode_build_result(result, 3)) == 8 + 16 + 32
    assert len(encode_build_result(result, 6)) == 8 + 16 + 32 + 8 + 16 + 16
    assert not BuildStatus.PERMANENT_FAILURE.success
    assert BuildStatus.ALREADY_VALID.success
