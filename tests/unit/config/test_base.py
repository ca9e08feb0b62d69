from __future__ import annotations

import re

import pytest

from bigtent.config.base import GIT_REF, NAME, REPOSITORY, comma_free_names, web_url


@pytest.mark.parametrize(
    ("url", "schemes", "why", "problem"),
    [
        ("https://issuer.example", ("https",), "", None),
        ("https://api.example/v3/", ("https",), "", None),
        ("http://minio:9000", ("http", "https"), "", None),
        ("http://issuer.example", ("https",), "", "must be an https:// URL with a host"),
        ("https:///path", ("https",), "", "must be an https:// URL with a host"),
        ("ftp://x", ("http", "https"), "", "must be an http:// or https:// URL with a host"),
        ("http://x", ("https",), "tokens travel in it", "with a host: tokens travel in it"),
        ("https://x/?a=1", ("https",), "", "must not carry a query, fragment or credentials"),
        ("https://x/#f", ("https",), "", "must not carry a query"),
        ("https://u:p@x/", ("https",), "", "must not carry a query, fragment or credentials"),
    ],
)
def test_web_url(url: str, schemes: tuple[str, ...], why: str, problem: str | None) -> None:
    if problem is None:
        assert web_url(url, schemes, why=why) == url  # as given: callers strip if they want
    else:
        with pytest.raises(ValueError, match=problem):
            web_url(url, schemes, why=why)


@pytest.mark.parametrize(
    ("items", "bad"),
    [
        (["x86_64-linux", "kvm", "big-parallel"], None),
        ([], None),
        ([""], ""),
        (["a,b"], "a,b"),
        (["ok", "has space"], "has space"),
        (["tab\there"], "tab\there"),
    ],
)
def test_comma_free_names(items: list[str], bad: str | None) -> None:
    if bad is None:
        assert comma_free_names(items) == items
    else:
        with pytest.raises(ValueError, match="without commas or whitespace") as info:
            comma_free_names(items)
        assert repr(bad) in str(info.value)


@pytest.mark.parametrize(
    ("pattern", "good", "bad"),
    [
        (NAME, ["nixpkgs", "a", "my-pool.v2_x", "x" * 64], ["", "-x", "a/b", "a b", "x" * 65]),
        (REPOSITORY, ["owner/repo", "o.rg/re_po-1"], ["owner", "a/b/c", "a b/c", "/repo"]),
        (GIT_REF, ["main", "release/1.0", "v1.2.3"], ["", "a b", "a:b", "a~1", "a^", "a*"]),
    ],
)
def test_the_shared_patterns(pattern: re.Pattern[str], good: list[str], bad: list[str]) -> None:
    assert all(pattern.fullmatch(g) for g in good)
    assert not any(pattern.fullmatch(b) for b in bad)
