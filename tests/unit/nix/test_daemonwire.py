"""The daemon worker protocol's ops (``nix/daemonwire.py``): bytes recorded from a real Nix 2.8
client (protocol 1.34) parse into the ops it sent, and every op's arguments round-trip."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bigtent.nix import daemonwire as wire
from bigtent.nix.daemonwire import Field, Op

DRV = b"/nix/store/znw7vhymjgd24d50fbi2r6083qinzfph-t.drv"

# Recorded between `nix build --store unix://… -f t.nix -o result` (Nix 2.8) and
# `nix-daemon --stdio` (tests/integration/nix/test_store_proxy.py records it again).
RECORDED_NIX_BUILD = bytes.fromhex(
    "6378696e00000000220100000000000000000000000000000000000000000000130000000000000000000000"
    "0000000000000000000000000000000000000000030000000000000001000000000000000000000000000000"
    "0100000000000000070000000000000000000000000000000000000000000000020000000000000001000000"
    "000000000200000000000000050000000000000073746f72650000001400000000000000756e69783a2f2f2f"
    "746d702f7265632f736f636b000000000c000000000000007375627374697475746572730000000000000000"
    "0000000007000000000000000900000000000000696e7075742e747874000000000000000b00000000000000"
    "746578743a736861323536000000000000000000000000000000000000000000050000000000000068656c6c"
    "6f000000000000000007000000000000000500000000000000742e6472760000000b00000000000000746578"
    "743a7368613235360000000000010000000000000035000000000000002f6e69782f73746f72652f66327138"
    "353066797264706a6c6c6d33626736356a78706962676672327739382d696e7075742e747874000000000000"
    "00000000005e01000000000000446572697665285b28226f7574222c222f6e69782f73746f72652f72333878"
    "6c396231736864637a6c373063356b77646d7a3567676434766270362d74222c22222c2222295d2c5b5d2c5b"
    "222f6e69782f73746f72652f66327138353066797264706a6c6c6d33626736356a7870696267667232773938"
    "2d696e7075742e747874225d2c227838365f36342d6c696e7578222c222f62696e2f7368222c5b222d63222c"
    "22636174202f6e69782f73746f72652f66327138353066797264706a6c6c6d33626736356a78706962676672"
    "327739382d696e7075742e747874203e20246f7574225d2c5b28226275696c646572222c222f62696e2f7368"
    "22292c28226e616d65222c227422292c28226f7574222c222f6e69782f73746f72652f723338786c39623173"
    "6864637a6c373063356b77646d7a3567676434766270362d7422292c282273797374656d222c227838365f36"
    "342d6c696e757822295d2900000000000000002e00000000000000010000000000000035000000000000002f"
    "6e69782f73746f72652f7a6e77377668796d6a6764323464353066626932723630383371696e7a6670682d74"
    "2e647276216f75740000000000000000000000"
)

RECORDED_OPS = [
    # (what `nix-build` sent, the op, its arguments)
    (
        "2800000000000000010000000000000035000000000000002f6e69782f73746f72652f7a6e7737766879"
        "6d6a6764323464353066626932723630383371696e7a6670682d742e647276216f7574000000",
        Op.QUERY_MISSING,
        ([DRV + b"!out"],),
    ),
    (
        "1a0000000000000031000000000000002f6e69782f73746f72652f7a6e77377668796d6a676432346435"
        "3066626932723630383371696e7a6670682d742e64727600000000000000",
        Op.QUERY_PATH_INFO,
        (DRV,),
    ),
    (
        "0900000000000000010000000000000035000000000000002f6e69782f73746f72652f7a6e7737766879"
        "6d6a6764323464353066626932723630383371696e7a6670682d742e647276216f75740000000000000000"
        "000000",
        Op.BUILD_PATHS,
        ([DRV + b"!out"], 0),
    ),
    (
        "2e00000000000000010000000000000035000000000000002f6e69782f73746f72652f7a6e7737766879"
        "6d6a6764323464353066626932723630383371696e7a6670682d742e647276216f75740000000000000000"
        "000000",
        Op.BUILD_PATHS_WITH_RESULTS,
        ([DRV + b"!out"], 0),
    ),
    (
        "07000000000000000900000000000000696e7075742e747874000000000000000b000000000000007465"
        "78743a736861323536000000000000000000000000000000000000000000",
        Op.ADD_TO_STORE,
        (b"input.txt", b"text:sha256", [], 0),
    ),
]


@pytest.mark.parametrize(("recorded", "op", "args"), RECORDED_OPS, ids=lambda v: str(v)[:20])
def test_recorded_ops_parse(recorded: str, op: Op, args: tuple[wire.Value, ...]) -> None:
    data = bytes.fromhex(recorded)
    request = wire.read_request(data, 34)
    assert (request.op, request.args, request.size) == (op, args, len(data))
    assert wire.request(op, args, 34) == data


def split_conversation(data: bytes, minor: int) -> list[wire.Request]:
    """Every op of a client's bytes after its handshake, framed sources skipped."""
    hello = wire.read_client_hello(data, (1 << 8) | minor)
    offset, requests = hello.size, []
    while offset < len(data):
        request = wire.read_request(data[offset:], minor)
        requests.append(request)
        reader = wire.Reader(data, offset + request.size)
        if request.framed:
            while size := reader.u64():
                reader.offset += size
        offset = reader.offset
    assert offset == len(data)
    return requests


def test_a_recorded_nix_build_splits_into_its_ops() -> None:
    hello = wire.read_client_hello(RECORDED_NIX_BUILD, (1 << 8) | 34)
    assert (hello.version, hello.size) == ((1 << 8) | 34, 32)
    ops = [r.op for r in split_conversation(RECORDED_NIX_BUILD, 34)]
    assert ops == [Op.SET_OPTIONS, Op.ADD_TO_STORE, Op.ADD_TO_STORE, Op.BUILD_PATHS_WITH_RESULTS]


def test_every_prefix_of_an_op_needs_more() -> None:
    data = bytes.fromhex(RECORDED_OPS[0][0])
    for end in range(len(data)):
        with pytest.raises(wire.NeedMore):
            wire.read_request(data[:end], 34)


@pytest.mark.parametrize(
    ("op", "minor"),
    [(Op.IMPORT_PATHS, 34), (Op.ADD_TO_STORE_NAR, 22), (Op.ADD_TO_STORE, 24), (99, 34)],
)
def test_ops_the_relay_cannot_delimit_are_refused(op: int, minor: int) -> None:
    with pytest.raises(wire.UnsupportedOp):
        wire.read_request(wire.u64(op) + b"\0" * 64, minor)


def test_handshake_bytes_depend_on_the_version() -> None:
    magic = wire.u64(wire.WORKER_MAGIC_1)
    # 1.34 with a CPU affinity: magic, version, 1, cpu, reserve-space
    hello = magic + wire.u64(0x122) + wire.u64(1) + wire.u64(3) + wire.u64(0)
    assert wire.read_client_hello(hello, 0x122).size == 40
    # 1.10: neither affinity nor reserve-space
    assert wire.read_client_hello(magic + wire.u64(0x10A), 0x122).size == 16
    with pytest.raises(wire.WireError):
        wire.read_client_hello(wire.u64(1) + wire.u64(0x122), 0x122)
    with pytest.raises(wire.WireError):
        wire.read_client_hello(magic + wire.u64(0x222), 0x122)


@pytest.mark.parametrize(
    ("client", "daemon", "minor"),
    [
        (0x122, 0x122, 34),
        (0x126, 0x122, 34),
        (0x122, 0x126, 34),
        (0x126, 0x126, 37),
        (0x126, 0x125, 37),
    ],
)
def test_negotiated_minor(client: int, daemon: int, minor: int) -> None:
    assert wire.negotiated_minor(client, daemon) == minor


@pytest.mark.parametrize(
    ("paths", "drvs"),
    [
        ([b"/nix/store/a-x.drv!out"], [("/nix/store/a-x.drv", ["out"])]),
        ([b"/nix/store/a-x.drv!*"], [("/nix/store/a-x.drv", [])]),
        ([b"/nix/store/a-x.drv!out,dev"], [("/nix/store/a-x.drv", ["out", "dev"])]),
        ([b"/nix/store/a-x.drv", b"/nix/store/b-src"], []),
    ],
)
def test_derived_drvs(paths: list[bytes], drvs: list[tuple[str, list[str]]]) -> None:
    assert wire.derived_drvs(paths) == drvs


@pytest.mark.parametrize("minor", [25, 26, 34])
def test_an_error_reads_back(minor: int) -> None:
    assert wire.read_error(wire.stderr_error("it failed\nlast lines", minor), minor) == (
        "it failed\nlast lines"
    )


def test_a_log_line_is_a_padded_string() -> None:
    assert (
        wire.stderr_next("hi\n") == wire.u64(wire.Stderr.NEXT) + wire.u64(3) + b"hi\n" + b"\0" * 5
    )


_bytes = st.binary(max_size=40)


def _tuples(n: int) -> st.SearchStrategy[tuple[bytes, ...]]:
    return st.lists(_bytes, min_size=n, max_size=n).map(tuple)


def _value(kind: Field) -> st.SearchStrategy[wire.Value]:
    match kind:
        case Field.U64:
            return st.integers(0, 2**64 - 1)
        case Field.STRING:
            return _bytes
        case Field.STRINGS:
            return st.lists(_bytes, max_size=4)
        case Field.PAIRS:
            return st.lists(_tuples(2), max_size=3)
        case Field.OUTPUTS:
            return st.lists(_tuples(4), max_size=3)


@st.composite
def requests(draw: st.DrawFn) -> tuple[Op, tuple[wire.Value, ...], int]:
    minor = draw(st.integers(wire.PROTOCOL_MIN_MINOR, wire.PROTOCOL_MAX & 0xFF))
    ops = []
    for op in Op:
        with contextlib.suppress(wire.UnsupportedOp):
            ops.append((op, wire.layout(op, minor)))
    op, shape = draw(st.sampled_from(ops))
    return op, tuple(draw(_value(kind)) for kind in shape.fields), minor


@given(requests(), st.binary(max_size=16))
def test_requests_round_trip(case: tuple[Op, tuple[wire.Value, ...], int], after: bytes) -> None:
    op, args, minor = case
    data = wire.request(op, args, minor)
    assert len(data) % 8 == 0
    parsed = wire.read_request(data + after, minor)
    assert (parsed.op, parsed.args, parsed.size) == (op, args, len(data))


@given(st.binary(max_size=300_000), st.integers(1, 70_000))
def test_framed_sources_end_with_an_empty_frame(data: bytes, chunk: int) -> None:
    framed = wire.framed(data, chunk)
    reader, pieces = wire.Reader(framed), []
    while size := reader.u64():
        pieces.append(framed[reader.offset : reader.offset + size])
        reader.offset += size
    assert b"".join(pieces) == data and reader.offset == len(framed)
