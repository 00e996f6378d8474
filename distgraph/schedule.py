"""Topological order, levels and cycle finding; all iterative, so deep graphs never recurse."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from .errors import CycleError, GraphError


def toposort(inputs_of: Mapping[str, Sequence[str]]) -> list[str]:
    """Kahn's algorithm; ties keep the mapping's order so results are deterministic."""
    indegree = {name: 0 for name in inputs_of}
    consumers: dict[str, list[str]] = {name: [] for name in inputs_of}
    for name, inputs in inputs_of.items():
        for src in inputs:
            if src not in indegree:
                raise GraphError(f"node {name!r} reads {src!r}, which is not a node of the graph")
            indegree[name] += 1
            consumers[src].append(name)
    ready = [name for name, d in indegree.items() if d == 0]
    ready.reverse()  # a stack popped from the end: visit in mapping order
    order: list[str] = []
    while ready:
        name = ready.pop()
        order.append(name)
        for c in reversed(consumers[name]):
            indegree[c] -= 1
            if indegree[c] == 0:
                ready.append(c)
    if len(order) != len(inputs_of):
        left = [n for n, d in indegree.items() if d > 0]
        raise CycleError(find_cycle(inputs_of, start=left) or left)
    return order


def find_cycle(
    inputs_of: Mapping[str, Sequence[str]], start: Iterable[str] | None = None
) -> list[str] | None:
    """Return one cycle as a path ``[a, b, ..., a]`` along data flow, or ``None``."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
    for root in start if start is not None else inputs_of:
        if state.get(root):
            continue
        path: list[str] = [root]
        iters = [iter(inputs_of.get(root, ()))]
        state[root] = 1
        while iters:
            nxt = next(iters[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                iters.pop()
            elif state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt]
                return cycle[::-1]  # we walked against the edges; report along them
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                iters.append(iter(inputs_of.get(nxt, ())))
    return None


def node_levels(order: Sequence[str], inputs_of: Mapping[str, Sequence[str]]) -> dict[str, int]:
    """Level of each node: 0 for nodes without inputs, else one more than its deepest input."""
    level: dict[str, int] = {}
    get = level.__getitem__
    for name in order:
        ins = inputs_of[name]
        level[name] = 1 + max(map(get, ins)) if ins else 0
    return level


def group_levels(order: Sequence[str], level: Mapping[str, int]) -> list[list[str]]:
    """Nodes grouped by level, each group in topological order."""
    if not order:
        return []
    groups: list[list[str]] = [[] for _ in range(max(level[n] for n in order) + 1)]
    for name in order:
        groups[level[name]].append(name)
    return groups
