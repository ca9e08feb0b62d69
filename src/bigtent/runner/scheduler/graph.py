"""Orders of a step graph: dependents first, dependencies first (pure)."""

from __future__ import annotations

from bigtent.runner.scheduler.steps import StepNode


def dependents_first(nodes: dict[int, StepNode]) -> list[int]:
    """Kahn's order over ``dependents``: a step comes after every step that depends on it."""
    pending = {sid: sum(1 for d in n.dependents if d in nodes) for sid, n in nodes.items()}
    ready = [sid for sid, c in pending.items() if c == 0]
    order: list[int] = []
    while ready:
        sid = ready.pop()
        order.append(sid)
        for dep in nodes[sid].deps:
            if dep in pending:
                pending[dep] -= 1
                if pending[dep] == 0:
                    ready.append(dep)
    return order


def dependencies_first(deps: dict[str, list[str]]) -> list[str]:
    """The keys of ``deps`` (node -> its dependencies among the keys), each after its
    dependencies; ties in name order, so the order is deterministic."""
    order: list[str] = []
    seen: set[str] = set()
    for start in sorted(deps):
        stack: list[tuple[str, bool]] = [(start, False)]
        while stack:
            name, expanded = stack.pop()
            if expanded:
                order.append(name)
                continue
            if name in seen:
                continue
            seen.add(name)
            stack.append((name, True))
            stack.extend((d, False) for d in sorted(deps[name], reverse=True) if d not in seen)
    return order
