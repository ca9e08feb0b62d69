"""Absent optional modules fail to import at once; installed ones are left alone."""

from __future__ import annotations

import importlib
import importlib.util
import sys

import pytest

from bigtent.importguard import ABSENT_OPTIONAL, block_absent

ABSENT = "bigtent_test_no_such_module"


@pytest.fixture
def clean_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    # monkeypatch restores sys.modules' entries it was told about.
    monkeypatch.delitem(sys.modules, ABSENT, raising=False)
    monkeypatch.delitem(sys.modules, "json", raising=False)
    monkeypatch.setitem(sys.modules, "json", importlib.import_module("json"))


def test_an_absent_module_is_blocked_and_still_fails_to_import(clean_modules: None) -> None:
    assert block_absent([ABSENT]) == [ABSENT]
    assert sys.modules[ABSENT] is None
    with pytest.raises(ImportError):
        importlib.import_module(ABSENT)
    del sys.modules[ABSENT]


@pytest.mark.parametrize(
    ("name", "imported", "spec_found", "blocked"),
    [
        (ABSENT, False, False, True),
        (ABSENT, False, True, False),  # installed: left alone
        ("json", True, False, False),  # already imported: left alone
    ],
)
def test_what_is_blocked(
    clean_modules: None, name: str, imported: bool, spec_found: bool, blocked: bool
) -> None:
    assert (name in sys.modules) is imported
    looked: list[str] = []

    def find_spec(n: str) -> object:
        looked.append(n)
        return object() if spec_found else None

    got = block_absent([name], find_spec=find_spec)  # type: ignore[arg-type]
    assert got == ([name] if blocked else [])
    assert (sys.modules.get(name, "unset") is None) is blocked
    sys.modules.pop(ABSENT, None)


async def test_httpcore_still_finds_asyncio_with_sniffio_blocked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from httpcore._synchronization import current_async_library

    for name in ABSENT_OPTIONAL:
        if importlib.util.find_spec(name) is None:
            monkeypatch.setitem(sys.modules, name, None)
    assert current_async_library() == "asyncio"
