"""Dependency graphs, pure: the one dependencies-first (topological) order.

Derivations are built after their input derivations, store paths are uploaded after the paths
they reference, and a plan's steps are written after the steps they wait for. All of them ask
for the same thing: the nodes of a graph, each after its dependencies, in an order that is the
same every time for the same graph.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypeVar

Node = TypeVar("Node", str, int)


class CycleError(ValueError):
    """The graph has a cycle: ``nodes`` are the nodes of one, sorted."""

    def __init__(self, nodes: list[Node]) -> None:
        super().__init__(f"dependency cycle among {len(nodes)} node(s)")
        self.nodes: list[str | int] = list(nodes)


def dependencies_first(deps: Mapping[Node, Iterable[Node]]) -> list[Node]:
    """The keys of ``deps`` (node -> its dependencies), each after its dependencies.

    Only dependencies that are keys themselves count; a node's dependence on itself is
    ignored. The order depends only on the graph: a depth-first walk from each node in name
    order, visiting dependencies in name order (O(V + E log E), no recursion). Raises
    ``CycleError`` when the dependencies go round in a circle.
    """
    order: list[Node] = []
    done: set[Node] = set()
    path: list[Node] = []  # the nodes being expanded, outermost first
    on_path: set[Node] = set()
    for start in sorted(deps):
        if start in done:
            continue
        stack: list[tuple[Node, bool]] = [(start, False)]
        while stack:
            node, expanded = stack.pop()
            if expanded:
                order.append(node)
                done.add(node)
                path.pop()
                on_path.discard(node)
                continue
            if node in done:
                continue
            path.append(node)
            on_path.add(node)
            stack.append((node, True))
            later: list[tuple[Node, bool]] = []
            for d in sorted(set(deps[node]), reverse=True):
                if d == node or d in done or d not in deps:
                    continue
                if d in on_path:
                    raise CycleError(sorted(path[path.index(d) :]))
                later.append((d, False))
            stack.extend(later)
    return order
