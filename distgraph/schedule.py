"""Topological order, levels and cycle finding; all iterative, so deep graphs never recurse."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

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


def edge_arrays(
    order: Sequence[str], inputs_lists: Sequence[Sequence[str]]
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Input edges as integer arrays ``(src, dst)`` over positions in ``order``, grouped by
    consumer in order, each consumer's inputs in input order; and ``{name: position}``."""
    index = dict(zip(order, range(len(order))))
    counts = np.fromiter(map(len, inputs_lists), dtype=np.int64, count=len(order))
    total = int(counts.sum())
    src = np.fromiter(
        map(index.__getitem__, itertools.chain.from_iterable(inputs_lists)),
        dtype=np.int64,
        count=total,
    )
    dst = np.repeat(np.arange(len(order), dtype=np.int64), counts)
    return src, dst, index


def level_array(n: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Levels as in :func:`node_levels` for an acyclic edge list, one wave per level (Kahn's
    algorithm on arrays: a node's level is the wave in which its last input is done)."""
    by_src = np.argsort(src, kind="stable")
    out = dst[by_src]
    ptr = np.searchsorted(src[by_src], np.arange(n + 1))
    waiting = np.bincount(dst, minlength=n)
    level = np.zeros(n, dtype=np.int64)
    frontier = np.flatnonzero(waiting == 0)
    wave = 0
    while len(frontier):
        level[frontier] = wave
        starts, ends = ptr[frontier], ptr[frontier + 1]
        lens = ends - starts
        total = int(lens.sum())
        if not total:
            break
        # Positions of every out-edge of the frontier, concatenated.
        offsets = np.cumsum(lens) - lens
        idx = np.arange(total) - np.repeat(offsets - starts, lens)
        # Each target's count in one sort (cheaper than ``subtract.at`` plus ``unique``).
        targets = np.sort(out[idx])
        first = np.empty(total, dtype=bool)
        first[0] = True
        np.not_equal(targets[1:], targets[:-1], out=first[1:])
        at = np.flatnonzero(first)
        touched = targets[at]
        waiting[touched] -= np.diff(np.append(at, total))
        frontier = touched[waiting[touched] == 0]
        wave += 1
    return level


def group_by_level(
    names: Sequence[str], level_of: np.ndarray, keep: np.ndarray | None = None
) -> list[list[str]]:
    """``names`` (or those at positions ``keep``) grouped by level, in order within a level;
    levels left empty by ``keep`` are dropped."""
    if keep is None:
        by_level = np.argsort(level_of, kind="stable")
    else:
        by_level = keep[np.argsort(level_of[keep], kind="stable")]
    bounds = np.searchsorted(level_of[by_level], np.arange(int(level_of.max(initial=-1)) + 2))
    named = list(map(names.__getitem__, by_level.tolist()))
    groups = [named[a:b] for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist())]
    return [g for g in groups if g]
