"""Pure core: graph helpers over a pipeline's `needs` (stage -> the stages it needs)."""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence

from verlyard_shared.spec import PipelineSpec
from verlyard_shared.validation import find_cycle

__all__ = ["CycleError", "ancestors", "dependents", "descendants", "find_cycle", "needs_of", "topological_order"]


class CycleError(ValueError):
    def __init__(self, cycle: list[str]) -> None:
        super().__init__(f"dependency cycle: {' -> '.join(cycle)}")
        self.cycle = cycle


Needs = Mapping[str, Sequence[str]]


def needs_of(spec: PipelineSpec) -> dict[str, tuple[str, ...]]:
    return {name: stage.needs for name, stage in spec.stages.items()}


def dependents(needs: Needs) -> dict[str, tuple[str, ...]]:
    """The reverse graph: stage -> the stages that need it (in declaration order)."""
    users: dict[str, list[str]] = {name: [] for name in needs}
    for name, deps in needs.items():
        for dep in deps:
            if dep in users:
                users[dep].append(name)
    return {name: tuple(u) for name, u in users.items()}


def topological_order(needs: Needs) -> list[str]:
    """Every stage after all the stages it needs; ties keep declaration order. Raises CycleError.

    Kahn's algorithm with a heap keyed by declaration index: O((stages + edges) log stages).
    """
    index = {name: i for i, name in enumerate(needs)}
    missing = {name: sum(1 for d in set(deps) if d in needs) for name, deps in needs.items()}
    users = dependents(needs)
    heap = [index[n] for n, count in missing.items() if count == 0]
    heapq.heapify(heap)
    names = list(needs)
    order: list[str] = []
    while heap:
        name = names[heapq.heappop(heap)]
        order.append(name)
        for user in set(users[name]):
            missing[user] -= 1
            if missing[user] == 0:
                heapq.heappush(heap, index[user])
    if len(order) != len(names):
        rest = [n for n in names if missing[n] > 0]
        raise CycleError(find_cycle({n: needs[n] for n in rest}) or rest)
    return order


def _closure(graph: Mapping[str, Sequence[str]], roots: Iterable[str]) -> frozenset[str]:
    seen: set[str] = set()
    stack = [r for r in roots if r in graph]
    while stack:
        for nxt in graph[stack.pop()]:
            if nxt in graph and nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return frozenset(seen)


def descendants(needs: Needs, roots: Iterable[str]) -> frozenset[str]:
    """Stages that (transitively) need any of `roots`; the roots themselves only if on a cycle."""
    return _closure(dependents(needs), roots)


def ancestors(needs: Needs, roots: Iterable[str]) -> frozenset[str]:
    """Stages that any of `roots` (transitively) needs."""
    return _closure(needs, roots)
