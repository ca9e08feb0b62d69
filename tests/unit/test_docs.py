"""The repository is self-contained: docs/architecture.md is the design of record.

Code comments and docs cite its contract sections as "architecture §N"; every such citation
must name a section that exists, and nothing may point at documents outside the repository.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("src", "tests", "docs", "bench", "examples", "scripts", ".ci", "README.md", "Makefile")
SUFFIXES = {".py", ".md", ".toml", ".nix", ".sh", ".txt", ""}


def _texts() -> list[tuple[Path, str]]:
    found: list[tuple[Path, str]] = []
    for name in SCANNED:
        top = ROOT / name
        paths = [top] if top.is_file() else sorted(top.rglob("*")) if top.is_dir() else []
        for path in paths:
            if path.is_file() and path.suffix in SUFFIXES and "__pycache__" not in path.parts:
                if path == Path(__file__).resolve():
                    continue
                found.append((path, path.read_text(errors="replace")))
    return found


def test_nothing_points_outside_the_repository() -> None:
    outside = re.compile(r"DESIGN(\.md)?\b|\.\./shared|shared design folder")
    offenders = [
        f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
        for path, text in _texts()
        for m in outside.finditer(text)
    ]
    assert offenders == []


def test_every_architecture_citation_names_a_section_that_exists() -> None:
    architecture = (ROOT / "docs" / "architecture.md").read_text()
    sections = set(re.findall(r"^### §(\d+) ", architecture, flags=re.MULTILINE))
    assert sections >= {"1", "2", "3", "4", "5", "6", "7"}
    cited = {
        (str(path.relative_to(ROOT)), number)
        for path, text in _texts()
        for number in re.findall(r"architecture(?:\.md)? §(\d+)", text)
    }
    assert cited, "the code cites the design contract"
    assert {(where, n) for where, n in cited if n not in sections} == set()
