"""Hypothesis file trees for NAR tests, and writing them to disk: one definition for the unit
tests of our NAR code and the tests that compare it with the real `nix-store --dump`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

Tree = tuple[Any, ...]
"""("file", contents, executable) | ("symlink", target) | ("dir", {name: Tree})."""

names = st.binary(min_size=1, max_size=12).filter(
    lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b"..")
)


def trees(max_file_bytes: int) -> st.SearchStrategy[Tree]:
    """Trees of files (executable or not), symlinks and directories with odd byte names."""
    leaves = st.one_of(
        st.tuples(st.just("file"), st.binary(max_size=max_file_bytes), st.booleans()),
        st.tuples(
            st.just("symlink"),
            st.binary(min_size=1, max_size=30).filter(lambda b: b"\0" not in b),
        ),
    )
    return st.recursive(
        leaves,
        lambda children: st.builds(
            lambda d: ("dir", d), st.dictionaries(names, children, max_size=4)
        ),
        max_leaves=12,
    )


def write_tree(path: Path, tree: Tree) -> None:
    """Create `tree` at `path`; byte names and targets go through os.fsdecode (surrogateescape),
    so names that are not UTF-8 survive."""
    kind = tree[0]
    if kind == "file":
        path.write_bytes(tree[1])
        path.chmod(0o755 if tree[2] else 0o644)
    elif kind == "symlink":
        path.symlink_to(os.fsdecode(tree[1]))
    else:
        path.mkdir()
        for name, child in tree[1].items():
            write_tree(path / os.fsdecode(name), child)
