"""Which modules start processes, and what they start: Nix only from ``bigtent.nix.store``
(every Nix command there runs with the configured store and options)."""

from __future__ import annotations

import re
from pathlib import Path

import bigtent

SRC = Path(bigtent.__file__).parent
SPAWN = re.compile(
    r"create_subprocess_(?:exec|shell)\(|subprocess\.(?:run|Popen|call|check_call|check_output)\("
    r"|os\.(?:exec\w*|spawn\w*|posix_spawn\w*)\("
)
NIX_PROGRAM = re.compile(r"""["'](?:nix|nix-store|nix-instantiate|nix-build|nix-env)["']""")

SPAWNS_OTHER_PROGRAMS = {
    "client/hookhandover.py": "the helper (bigtent nix-helper)",
    "runner/ci/evaluator.py": "git",
    "runner/venues/sshcheck.py": "ssh (nix-store --serve runs on the builder)",
    "up/children.py": "the runner and agents (python -m bigtent)",
}


def spawning_modules() -> set[str]:
    return {
        str(path.relative_to(SRC))
        for path in SRC.rglob("*.py")
        if SPAWN.search(path.read_text(encoding="utf-8"))
    }


def test_only_the_store_package_and_the_listed_modules_start_processes() -> None:
    outside = {m for m in spawning_modules() if not m.startswith("nix/store/")}
    assert outside == set(SPAWNS_OTHER_PROGRAMS)


def test_nix_programs_are_started_only_by_the_store_package() -> None:
    for module in SPAWNS_OTHER_PROGRAMS:
        text = (SRC / module).read_text(encoding="utf-8")
        named = NIX_PROGRAM.findall(text)
        if module == "runner/venues/sshcheck.py":  # the remote program, run by ssh on the builder
            assert named == ['"nix-store"']
        else:
            assert named == [], module


def test_the_store_package_starts_nix() -> None:
    assert {m for m in spawning_modules() if m.startswith("nix/store/")} == {
        "nix/store/bounded.py",
        "nix/store/nixstore.py",
    }
