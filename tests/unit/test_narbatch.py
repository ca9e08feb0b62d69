"""The batch upload body (``narbatch``): what the client encodes is what the runner parses, and
every malformed body is refused before anything is read past what it declared."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bigtent.errors import BadRequest
from bigtent.narbatch import (
    LENGTH_BYTES,
    MAX_HEADER_BYTES,
    BatchEntry,
    entry_header,
    parse_batch,
)
from bigtent.protocol import MAX_REFERENCES

H = "sha256:0sg9f58l1jj88w6pdrfdpj5x9b1zrwszk84j81zvby36q9whhhqa"


def _entry(path: str, nar: bytes, refs: list[str] | None = None) -> bytes:
    return entry_header(path, H, len(nar), refs or []) + nar


def _raw(header: object, nar: bytes = b"") -> bytes:
    """An entry with any header, framed as the format says."""
    text = json.dumps(header).encode()
    return len(text).to_bytes(LENGTH_BYTES, "big") + text + nar


def test_two_entries_in_order() -> None:
    body = _entry("aaa-x.drv", b"NAR1", ["bbb-y"]) + _entry("bbb-y", b"")
    assert parse_batch(body) == [
        BatchEntry("aaa-x.drv", H, 4, ("bbb-y",), b"NAR1"),
        BatchEntry("bbb-y", H, 0, (), b""),
    ]
    assert parse_batch(b"") == []


_GOOD = {"path": "p", "nar_hash": H, "nar_size": 3}


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"\x00\x00", "entry 0 is truncated in its header length"),
        (b"\x00\x00\x00\x00", "declares a header of 0 bytes"),
        ((MAX_HEADER_BYTES + 1).to_bytes(4, "big") + b"{}", "declares a header of"),
        (b"\x00\x00\x00\x10{}", "entry 0 is truncated in its header"),
        (_raw(_GOOD, b"abc") + b"\x00", "entry 1 is truncated in its header length"),
        (_raw(_GOOD, b"ab"), "p declares a NAR of 3 bytes but only 2 are left"),
        (_raw({**_GOOD, "nar_size": 2**62}, b"abc"), "declares a NAR of"),
        (_raw(_GOOD, b"abcd"), "entry 1 is truncated in its header length"),
        (b"\x00\x00\x00\x02\xff\xfe", "entry 0 has a malformed header"),
        (b"\x00\x00\x00\x03{x}", "entry 0 has a malformed header"),
        (_raw([1, 2]), "entry 0's header is not a JSON object"),
        (_raw({"nar_hash": H, "nar_size": 0}), "entry 0's header has no path"),
        (_raw({"path": "", "nar_hash": H, "nar_size": 0}), "has no path"),
        (_raw({"path": "p", "nar_size": 0}), "p: the header has no nar_hash"),
        (_raw({**_GOOD, "nar_size": -1}), "p: nar_size must be"),
        (_raw({**_GOOD, "nar_size": "3"}, b"abc"), "p: nar_size must be"),
        (_raw({**_GOOD, "nar_size": True}, b"a"), "p: nar_size must be"),
        (_raw({**_GOOD, "references": "q"}, b"abc"), "references must be a list"),
        (_raw({**_GOOD, "references": [1]}, b"abc"), "references must be a list"),
        (
            _raw({**_GOOD, "references": ["r"] * (MAX_REFERENCES + 1)}, b"abc"),
            f"more than {MAX_REFERENCES} references",
        ),
    ],
)
def test_malformed_bodies_are_refused(body: bytes, says: str) -> None:
    with pytest.raises(BadRequest, match="batch upload") as err:
        parse_batch(body)
    assert says in str(err.value)


def test_unknown_header_fields_are_ignored() -> None:
    [entry] = parse_batch(_raw({**_GOOD, "later": {"x": 1}}, b"abc"))
    assert entry.nar == b"abc" and entry.references == ()


def test_too_many_paths() -> None:
    body = b"".join(_entry(f"p{i}", b"") for i in range(4))
    assert len(parse_batch(body, max_paths=4)) == 4
    with pytest.raises(BadRequest, match="more than 3 paths"):
        parse_batch(body, max_paths=3)


def test_overlong_header_is_not_encoded() -> None:
    with pytest.raises(ValueError, match="batch header"):
        entry_header("p", H, 0, ["r" * 300] * MAX_REFERENCES)


_names = st.text(st.characters(codec="utf-8"), min_size=1)


@given(
    st.dictionaries(
        _names,
        st.tuples(st.binary(max_size=64), st.lists(_names, max_size=4)),
        max_size=8,
    )
)
def test_round_trip(paths: dict[str, tuple[bytes, list[str]]]) -> None:
    body = b"".join(_entry(p, nar, refs) for p, (nar, refs) in paths.items())
    assert parse_batch(body) == [
        BatchEntry(p, H, len(nar), tuple(refs), nar) for p, (nar, refs) in paths.items()
    ]


@given(
    st.lists(st.tuples(st.binary(max_size=16), st.lists(_names, max_size=2)), max_size=4),
    st.data(),
)
def test_every_cut_body_is_refused(
    entries: list[tuple[bytes, list[str]]], data: st.DataObject
) -> None:
    """A body cut anywhere inside an entry is refused (never parsed as fewer entries)."""
    parts = [_entry(f"p{i}", nar, refs) for i, (nar, refs) in enumerate(entries)]
    body = b"".join(parts)
    ends = {sum(len(p) for p in parts[:k]) for k in range(len(parts) + 1)}
    cut = data.draw(st.integers(0, len(body)))
    if cut in ends:
        assert len(parse_batch(body[:cut])) == sorted(ends).index(cut)
    else:
        with pytest.raises(BadRequest, match=r"truncated|declares a NAR"):
            parse_batch(body[:cut])
