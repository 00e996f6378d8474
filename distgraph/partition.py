"""Partition strategies: pure functions ``(program, num_workers, cost) -> {node: worker}``.

* ``round_robin`` — the baseline: nodes dealt out in topological order.
* ``level`` — each level's nodes spread over the workers, balanced by estimated cost, for
  parallelism; backward nodes follow their forward node.
* ``mincut`` — as few bytes crossing workers as possible while each level stays balanced; a
  forward node and its backward nodes share a worker; a param sits with its consumers. When the
  cost model says one worker finishes sooner than several (a tiny graph), it uses one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ._util import gc_paused
from .cost import CostModel
from .errors import ConfigError
from .ops import LEAF_OPS
from .plan import node_bytes, node_seconds
from .program import Program

Placement = dict[str, int]
Strategy = Callable[[Program, int, CostModel], Placement]


def round_robin(program: Program, num_workers: int, cost: CostModel) -> Placement:
    """Deal nodes out in topological order (the baseline)."""
    return {n: i % num_workers for i, n in enumerate(program.order)}


def level(program: Program, num_workers: int, cost: CostModel) -> Placement:
    """Spread each forward level over the workers, heaviest nodes first onto the least loaded."""
    secs = node_seconds(program, cost)
    placement: Placement = {}
    for lv in program.levels:
        ops = [
            n
            for n in lv
            if program.nodes[n].phase == "forward" and program.nodes[n].op not in LEAF_OPS
        ]
        load = [0.0] * num_workers
        for n in sorted(ops, key=lambda n: -secs[n]):
            w = min(range(num_workers), key=lambda k: (load[k], k))
            placement[n] = w
            load[w] += secs[n]
    _place_leaves_and_backward(program, placement, cost)
    return placement


def mincut(
    program: Program, num_workers: int, cost: CostModel, imbalance: float = 0.1
) -> Placement:
    """Minimise bytes crossing workers under a per-level balance limit (see module doc)."""
    candidates: list[Placement] = []
    single = dict.fromkeys(program.order, 0)
    candidates.append(single)
    if num_workers > 1:
        placement = _balanced_greedy(program, num_workers, cost, imbalance)
        _refine_chains(program, placement, num_workers, cost, imbalance)
        _refine(program, placement, num_workers, cost, imbalance)
        _place_leaves_and_backward(program, placement, cost)
        candidates.append(placement)
    return min(candidates, key=lambda p: _estimate(program, p, cost))


def _estimate(program: Program, placement: Placement, cost: CostModel) -> float:
    """Makespan estimate without building the plan: busiest worker per level, plus one call
    per worker and one more each time a worker must wait for another's values, plus transfers."""
    nodes = program.nodes
    secs = node_seconds(program, cost)
    nbytes = node_bytes(program, cost)
    level = program.level
    total = 0.0
    for lv in program.levels:
        per: dict[int, float] = {}
        for n in lv:
            w = placement[n]
            per[w] = per.get(w, 0.0) + secs[n]
        total += max(per.values(), default=0.0)
    crossing: set[tuple[str, int]] = set()
    waits: set[tuple[int, int]] = set()
    for n in program.order:
        w = placement[n]
        for i in nodes[n].inputs:
            if placement[i] != w and nodes[i].op not in LEAF_OPS:
                crossing.add((i, w))
                waits.add((w, level[n]))
    busy = {placement[n] for n in program.order if nodes[n].op not in LEAF_OPS}
    calls = len(busy) + 2 * len(waits)
    moved = sum(nbytes[i] for i, _ in crossing)
    return total + calls * cost.call_overhead + cost.transfer_seconds(moved)


def _forward_ops(program: Program) -> list[str]:
    return [
        n
        for n in program.order
        if program.nodes[n].phase == "forward" and program.nodes[n].op not in LEAF_OPS
    ]


def _level_caps(
    program: Program, num_workers: int, secs: Mapping[str, float], imbalance: float
) -> dict[int, float]:
    caps: dict[int, float] = {}
    totals: dict[int, float] = {}
    biggest: dict[int, float] = {}
    for n in _forward_ops(program):
        lv = program.level[n]
        totals[lv] = totals.get(lv, 0.0) + secs[n]
        biggest[lv] = max(biggest.get(lv, 0.0), secs[n])
    for lv, total in totals.items():
        caps[lv] = max(total / num_workers * (1 + imbalance), biggest[lv])
    return caps


def _balanced_greedy(
    program: Program, num_workers: int, cost: CostModel, imbalance: float
) -> Placement:
    """Level by level, each node goes where most of its input bytes already are, within the cap."""
    nodes = program.nodes
    secs = node_seconds(program, cost)
    nbytes = node_bytes(program, cost)
    caps = _level_caps(program, num_workers, secs, imbalance)
    placement: Placement = {}
    fair: dict[int, float] = {}
    for n in _forward_ops(program):
        fair[program.level[n]] = fair.get(program.level[n], 0.0) + secs[n] / num_workers
    for lv_index, lv in enumerate(program.levels):
        ops = [n for n in lv if nodes[n].phase == "forward" and nodes[n].op not in LEAF_OPS]
        load = [0.0] * num_workers
        last = 0
        for n in ops:  # creation order: neighbours in the code tend to be neighbours in the graph
            affinity = [0.0] * num_workers
            for rank, i in enumerate(nodes[n].inputs):
                if i in placement:
                    # The tiny bonus for earlier inputs breaks ties toward the first operand's
                    # worker, so a chain's boundary does not drift level by level.
                    affinity[placement[i]] += nbytes[i] * (1 + 1e-6 / (rank + 1))
            fits = [
                w
                for w in range(num_workers)
                if load[w] + secs[n] <= caps.get(lv_index, 0.0) + 1e-15
            ]
            pool = fits or list(range(num_workers))
            if max(affinity) > 0:
                # The most-connected worker with room; among unconnected ones, the nearest by
                # index to the preferred worker, so an overflowing band spills into its neighbour.
                pref = max(range(num_workers), key=lambda k: (affinity[k], -k))
                w = max(pool, key=lambda k: (affinity[k], -abs(k - pref), -k))
            else:
                # No placed inputs: stay with the previous node of the level while it has room
                # below an even share, then move to the next worker, so nodes created together
                # (a band, a branch) stay together and every worker keeps some slack.
                share = fair.get(lv_index, 0.0)
                order = [(last + j) % num_workers for j in range(num_workers)]
                w = next(
                    (k for k in order if load[k] + secs[n] <= share + 1e-15),
                    min(pool, key=lambda k: load[k]),
                )
            last = w
            placement[n] = w
            load[w] += secs[n]
    return placement


def _refine(
    program: Program,
    placement: Placement,
    num_workers: int,
    cost: CostModel,
    imbalance: float,
    passes: int = 8,
) -> None:
    """Move single nodes to the worker holding most of their neighbours' bytes, within the caps."""
    nodes = program.nodes
    secs = node_seconds(program, cost)
    caps = _level_caps(program, num_workers, secs, imbalance)
    ops = _forward_ops(program)
    load: dict[tuple[int, int], float] = {}
    for n in ops:
        key = (program.level[n], placement[n])
        load[key] = load.get(key, 0.0) + secs[n]
    nbytes = node_bytes(program, cost)
    neighbours: dict[str, list[tuple[str, int]]] = {n: [] for n in ops}
    for n in ops:
        for i in nodes[n].inputs:
            if i in neighbours:
                neighbours[n].append((i, nbytes[i]))
                neighbours[i].append((n, nbytes[i]))
    for _ in range(passes):
        moved = 0
        for n in ops:
            here = placement[n]
            weight = [0.0] * num_workers
            for m, b in neighbours[n]:
                weight[placement[m]] += b
            lv = program.level[n]
            # The heaviest-connected worker that still has room on this level, if it gains.
            best = here
            for k in sorted(range(num_workers), key=lambda k: -weight[k]):
                if weight[k] <= weight[here]:
                    break
                if load.get((lv, k), 0.0) + secs[n] <= caps[lv] + 1e-15:
                    best = k
                    break
            if best == here:
                continue
            load[(lv, here)] -= secs[n]
            load[(lv, best)] = load.get((lv, best), 0.0) + secs[n]
            placement[n] = best
            moved += 1
        if not moved:
            break


def _chains(program: Program, ops: list[str]) -> dict[int, list[str]]:
    """Split forward ops into chains: a node continues the chain of its first operand when that
    operand is an op no other node continues yet (one step of coarsening, as in multilevel
    partitioners, so a whole column or layer stack can move at once)."""
    nodes = program.nodes
    chain: dict[str, int] = {}
    continued: set[str] = set()
    members: dict[int, list[str]] = {}
    for n in ops:
        ins = nodes[n].inputs
        first = ins[0] if ins else None
        if first in chain and first not in continued:
            continued.add(first)
            cid = chain[first]
        else:
            cid = len(members)
            members[cid] = []
        chain[n] = cid
        members[cid].append(n)
    return members


def _refine_chains(
    program: Program,
    placement: Placement,
    num_workers: int,
    cost: CostModel,
    imbalance: float,
    passes: int = 4,
) -> None:
    """Move whole chains to the worker most of their outside neighbours' bytes are on, when
    every level the chain touches has room there; breaks islands single-node moves cannot."""
    nodes = program.nodes
    secs = node_seconds(program, cost)
    nbytes = node_bytes(program, cost)
    caps = _level_caps(program, num_workers, secs, imbalance)
    ops = _forward_ops(program)
    members = _chains(program, ops)
    chain_of = {n: cid for cid, ns in members.items() for n in ns}
    load: dict[tuple[int, int], float] = {}
    for n in ops:
        key = (program.level[n], placement[n])
        load[key] = load.get(key, 0.0) + secs[n]
    outside: dict[int, list[tuple[str, int]]] = {cid: [] for cid in members}
    for n in ops:
        for i in nodes[n].inputs:
            if i in chain_of and chain_of[i] != chain_of[n]:
                outside[chain_of[n]].append((i, nbytes[i]))
                outside[chain_of[i]].append((n, nbytes[i]))
    for _ in range(passes):
        moved = 0
        for cid, ns in members.items():
            here = {placement[n] for n in ns}
            weight = [0.0] * num_workers
            for m, b in outside[cid]:
                weight[placement[m]] += b
            current = sum(weight[placement[n]] for n in ns[:1]) if len(here) == 1 else -1.0
            for k in sorted(range(num_workers), key=lambda k: -weight[k]):
                if weight[k] <= current:
                    break
                if all(
                    placement[n] == k
                    or load.get((program.level[n], k), 0.0) + secs[n]
                    <= caps[program.level[n]] + 1e-15
                    for n in ns
                ):
                    for n in ns:
                        if placement[n] != k:
                            load[(program.level[n], placement[n])] -= secs[n]
                            load[(program.level[n], k)] = (
                                load.get((program.level[n], k), 0.0) + secs[n]
                            )
                            placement[n] = k
                    moved += 1
                    break
        if not moved:
            break


def _place_leaves_and_backward(program: Program, placement: Placement, cost: CostModel) -> None:
    """Leaves go with their heaviest consumer; backward nodes go with the node they differentiate."""
    nodes = program.nodes
    for n in program.order:
        node = nodes[n]
        if node.op in LEAF_OPS and n not in placement:
            consumers = [c for c in program.consumers.get(n, []) if c in placement]
            placement[n] = placement[consumers[0]] if consumers else 0
    for n in program.order:
        node = nodes[n]
        if n in placement:
            continue
        origin = node.origin
        if origin is not None and origin in placement:
            placement[n] = placement[origin]
        else:  # no origin placed: follow the first input that is placed
            placement[n] = next((placement[i] for i in node.inputs if i in placement), 0)


STRATEGIES: dict[str, Strategy] = {"round_robin": round_robin, "level": level, "mincut": mincut}


@gc_paused
def partition(
    program: Any,
    num_workers: int,
    strategy: str | Strategy | Mapping[str, int] = "mincut",
    cost: CostModel | None = None,
) -> Placement:
    """Place every node of ``program`` (a Program or a Graph) on a worker in ``0..num_workers-1``.

    ``strategy`` is a name from ``STRATEGIES``, a callable ``(program, num_workers, cost) ->
    placement``, or an explicit ``{node: worker}`` dict (nodes it leaves out follow the
    ``mincut`` rules for leaves and backward nodes).
    """
    from .graph import Graph
    from .program import compile_program

    if isinstance(program, Graph):
        program = compile_program(program, grad=program.grad_of)
    if not isinstance(num_workers, int) or num_workers < 1:
        raise ConfigError(f"num_workers must be an int >= 1, got {num_workers!r}")
    cost = cost or CostModel()
    if isinstance(strategy, Mapping):
        placement = {n: w for n, w in strategy.items() if n in program.nodes}
        _place_leaves_and_backward(program, placement, cost)
    elif callable(strategy):
        placement = dict(strategy(program, num_workers, cost))
    elif strategy in STRATEGIES:
        placement = STRATEGIES[strategy](program, num_workers, cost)
    else:
        raise ConfigError(
            f"unknown partition strategy {strategy!r}; choose from {sorted(STRATEGIES)}, a callable or a dict"
        )
    missing = [n for n in program.order if n not in placement]
    if missing:
        raise ConfigError(f"strategy left nodes unplaced: {missing[:10]}")
    bad = {n: w for n, w in placement.items() if not (isinstance(w, int) and 0 <= w < num_workers)}
    if bad:
        raise ConfigError(
            f"strategy placed nodes outside workers 0..{num_workers - 1}: {dict(list(bad.items())[:10])}"
        )
    return placement
