"""Partition strategies: pure functions ``(program, num_workers, cost) -> {node: worker}``.

* ``round_robin`` — the baseline: nodes dealt out in topological order.
* ``level`` — each level's nodes spread over the workers, balanced by estimated cost, for
  parallelism; backward nodes follow their forward node.
* ``mincut`` — as few bytes crossing workers as possible while each level stays balanced; a
  forward node and its backward nodes share a worker; a param sits with its consumers. When the
  cost model says one worker finishes sooner than several (a tiny graph), it uses one.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping

import numpy as np

from ._util import gc_paused
from .cost import CostModel, bytes_array, node_seconds, seconds_array
from .errors import ConfigError
from .graph import Graph
from .ops import LEAF_OPS
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
    """Minimise bytes crossing workers under a per-level balance limit (see module doc).

    Works on integer arrays: forward ops get an initial split from median sweeps over the
    levels (``_sweep``), then boundary moves and Fiduccia-Mattheyses passes that respect each
    level's cap (``_refine_boundary``); leaves and backward nodes follow (``_complete``). The
    result is kept only if the makespan estimate beats running everything on one worker.
    """
    arrays = _arrays(program)
    secs = seconds_array(program, cost)
    nbytes = bytes_array(program, cost)
    single = np.zeros(len(program.order), dtype=np.int64)
    best = single
    if num_workers > 1 and len(arrays.fwd):
        part = _split_forward(arrays, secs, nbytes, num_workers, imbalance)
        spread = _complete(arrays, part, num_workers)
        if _estimate(arrays, spread, secs, nbytes, cost, num_workers) < _estimate(
            arrays, single, secs, nbytes, cost, 1
        ):
            best = spread
    return dict(zip(program.order, best.tolist()))


class _Arrays:
    """A program as integer arrays (node ids are positions in ``program.order``)."""

    def __init__(self, program: Program):
        cache = program.cache
        #: Every input edge, grouped by consumer in order: ``src[e] -> dst[e]``.
        self.src, self.dst = cache.edges
        self.level = cache.level_array
        self.leaf = cache.leaf_mask
        self.origin = cache.origin_index
        #: Forward ops (the nodes mincut places itself), in order.
        self.fwd = cache.forward_ops
        self.n = len(program.order)


def _arrays(program: Program) -> _Arrays:
    return _Arrays(program)  # every array is cached in program.cache


def _estimate(
    arrays: _Arrays,
    part: np.ndarray,
    secs: np.ndarray,
    nbytes: np.ndarray,
    cost: CostModel,
    num_workers: int,
) -> float:
    """Makespan estimate without building the plan: busiest worker per level, plus one call
    per worker and one more each time a worker must wait for another's values, plus transfers."""
    levels = int(arrays.level.max()) + 1 if arrays.n else 0
    per = np.bincount(
        arrays.level * num_workers + part, weights=secs, minlength=levels * num_workers
    )
    total = float(per.reshape(levels, num_workers).max(axis=1).sum()) if levels else 0.0
    src, dst = arrays.src, arrays.dst
    cross = (part[src] != part[dst]) & ~arrays.leaf[src]
    s, d = src[cross], dst[cross]
    moved_values = np.unique(s * num_workers + part[d])
    moved = int(nbytes[moved_values // num_workers].sum())
    waits = len(np.unique(arrays.level[d] * num_workers + part[d]))
    busy = len(np.unique(part[~arrays.leaf]))
    calls = busy + 2 * waits
    return total + calls * cost.call_overhead + cost.transfer_seconds(moved)


#: Leaves read by at most this many forward ops are placed (and moved) with them; wider ones
#: (a shared constant) just go where most of their consumers are.
_FREE_LEAF_FANOUT = 16


def _split_forward(
    arrays: _Arrays, secs: np.ndarray, nbytes: np.ndarray, k: int, imbalance: float
) -> np.ndarray:
    """Worker of each forward op and of each narrow forward leaf (-1 for other nodes)."""
    fwd = arrays.fwd
    m = len(fwd)
    local = np.full(arrays.n, -1, dtype=np.int64)
    local[fwd] = np.arange(m)
    src, dst = arrays.src, arrays.dst
    ls, ld = local[src], local[dst]
    keep = (ls >= 0) & (ld >= 0) & (ls != ld)
    es, ed = ls[keep], ld[keep]
    ew = nbytes[src[keep]].astype(np.float64)
    # Levels renumbered 0..L-1 over the levels that hold forward ops.
    uniq, lv = np.unique(arrays.level[fwd], return_inverse=True)
    n_levels = len(uniq)
    sec = secs[fwd]
    totals = np.bincount(lv, weights=sec, minlength=n_levels)
    biggest = np.zeros(n_levels)
    np.maximum.at(biggest, lv, sec)
    caps = np.maximum(totals / k * (1 + imbalance), biggest) + 1e-15
    part = _sweep(m, lv, n_levels, es, ed, ew, sec, caps, k)

    # Narrow leaves join the refinement as free nodes (no cost, a level of their own), starting
    # on the worker most of their consumers are on.
    to_op = arrays.leaf[src] & (ld >= 0)
    fanout = np.bincount(src[to_op], minlength=arrays.n)
    leaves = np.flatnonzero(arrays.leaf & (fanout > 0) & (fanout <= _FREE_LEAF_FANOUT))
    local[leaves] = m + np.arange(len(leaves))
    sel = to_op & (local[src] >= 0)
    ps, pd = local[src[sel]], ld[sel]
    votes = np.bincount((ps - m) * k + part[pd], minlength=len(leaves) * k)
    part = np.r_[part, votes.reshape(len(leaves), k).argmax(axis=1)]
    es, ed = np.r_[es, ps], np.r_[ed, pd]
    ew = np.r_[ew, nbytes[src[sel]].astype(np.float64)]
    lv = np.r_[lv, np.full(len(leaves), n_levels)]
    sec = np.r_[sec, np.zeros(len(leaves))]
    caps = np.r_[caps, np.inf]
    _refine_boundary(part, lv, n_levels + 1, es, ed, ew, sec, caps, k)
    # A consumer may have moved away from its leaf: such a leaf rejoins most of them.
    votes = np.bincount((ps - m) * k + part[pd], minlength=len(leaves) * k).reshape(-1, k)
    alone = votes[np.arange(len(leaves)), part[m:]] == 0
    part[m:][alone] = votes[alone].argmax(axis=1)

    out = np.full(arrays.n, -1, dtype=np.int64)
    out[fwd] = part[:m]
    out[leaves] = part[m:]
    return out


def _sweep(
    m: int,
    lv: np.ndarray,
    n_levels: int,
    es: np.ndarray,
    ed: np.ndarray,
    ew: np.ndarray,
    sec: np.ndarray,
    caps: np.ndarray,
    k: int,
    rounds: int = 2,
) -> np.ndarray:
    """Initial split: give every op a coordinate in [0, 1) and cut each level into k runs of
    equal cost along it. As in layered graph drawing, sweeps down and up the levels move each
    op to the weighted median of its neighbours (inputs and consumers), renumbered by rank
    within the level; so runs line up from level to level and the workers get bands."""
    by_level = np.argsort(lv, kind="stable")
    level_start = np.searchsorted(lv[by_level], np.arange(n_levels + 1))
    members_of = [by_level[level_start[i] : level_start[i + 1]] for i in range(n_levels)]
    # To start, ops sit in creation order within their level.
    coord = np.zeros(m)
    for members in members_of:
        coord[members] = (np.arange(len(members)) + 0.5) / max(len(members), 1)
    # Each op looks at its inputs, then its consumers.
    edges = _sweep_edges(lv, n_levels, np.r_[ed, es], np.r_[es, ed], np.r_[ew, ew] + 1.0)
    for r in range(2 * rounds + 1):
        levels = range(n_levels) if r % 2 == 0 else range(n_levels - 1, -1, -1)
        for L in levels:
            _place_level(coord, members_of[L], edges[L])
    part = np.zeros(m, dtype=np.int64)
    for members in members_of:
        size = len(members)
        ordered = members[np.argsort(coord[members], kind="stable")]
        cum = np.cumsum(sec[ordered])
        total = cum[-1] if size else 0.0
        # Each op goes to the run holding the middle of its share of the level's cost.
        mid = (cum - sec[ordered] / 2) / total if total > 0 else (np.arange(size) + 0.5) / size
        runs = np.minimum((mid * k).astype(np.int64), k - 1)
        cap = caps[lv[members[0]]] if size else 0.0
        if size and np.bincount(runs, weights=sec[ordered], minlength=k).max() > cap:
            runs = _fill_runs(sec[ordered].tolist(), mid.tolist(), cap, k)
        part[ordered] = runs
    return part


def _fill_runs(sec: list[float], mid: list[float], cap: float, k: int) -> np.ndarray:
    """Runs along a level that respect the cap where the even split does not (a few uneven
    ops): each run ends at its share of the cost or before it would pass the cap; what no run
    takes goes to the least loaded worker."""
    load = [0.0] * k
    runs = []
    j = 0
    for s, x in zip(sec, mid):
        while j < k - 1 and (x * k >= j + 1 or load[j] + s > cap):
            j += 1
        w = j if load[j] + s <= cap else min(range(k), key=load.__getitem__)
        runs.append(w)
        load[w] += s
    return np.array(runs, dtype=np.int64)


def _sweep_edges(
    lv: np.ndarray, n_levels: int, to: np.ndarray, frm: np.ndarray, w: np.ndarray
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Per level: (receiving ops, start of each one's edges, neighbour of each edge, weight),
    with each op's edges in input (or consumer) order."""
    order = np.lexsort((to, lv[to]))
    to, frm, w = to[order], frm[order], w[order]
    bounds = np.searchsorted(lv[to], np.arange(n_levels + 1))
    out = []
    for L in range(n_levels):
        a, b = bounds[L], bounds[L + 1]
        t = to[a:b]
        starts = np.flatnonzero(np.r_[True, t[1:] != t[:-1]]) if b > a else np.zeros(0, int)
        out.append((t[starts], starts, frm[a:b], w[a:b]))
    return out


def _place_level(
    coord: np.ndarray,
    members: np.ndarray,
    edges: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
) -> None:
    """New coordinates for one level's ops from their neighbours', renormalised to ranks."""
    heads, starts, nbr, w = edges
    size = len(members)
    if not size:
        return
    if len(heads):
        # The weighted (lower) median of the neighbours' coordinates: unlike the mean it never
        # lands between two groups of neighbours (cutting both), and a strand of ops placed
        # apart from its surroundings is pulled back to them.
        seg = np.repeat(np.arange(len(heads)), np.diff(np.r_[starts, len(nbr)]))
        cs = coord[nbr]
        o = np.lexsort((cs, seg))
        cs, ws = cs[o], w[o]
        cw = np.cumsum(ws)
        half = cw[starts] - ws[starts] + np.add.reduceat(ws, starts) / 2
        coord[heads] = cs[np.searchsorted(cw, half)]
    ordered = members[np.argsort(coord[members], kind="stable")]
    coord[ordered] = (np.arange(size) + 0.5) / size


def _refine_boundary(
    part: np.ndarray,
    lv: np.ndarray,
    n_levels: int,
    es: np.ndarray,
    ed: np.ndarray,
    ew: np.ndarray,
    sec: np.ndarray,
    caps: np.ndarray,
    k: int,
    passes: int = 8,
    fm_passes: int = 3,
) -> None:
    """Boundary refinement: move an op to the worker holding more of its neighbours' bytes when
    that worker has room on the op's level. Candidates are found with array ops; only they are
    visited one by one (so a move sees the moves before it). Then a few FM passes."""
    m = len(part)
    u = np.concatenate([es, ed])
    v = np.concatenate([ed, es])
    w = np.concatenate([ew, ew])
    order = np.argsort(u, kind="stable")
    u, v, w = u[order], v[order], w[order]
    ptr = np.searchsorted(u, np.arange(m + 1)).tolist()
    nbr, wt = v.tolist(), w.tolist()
    # float64, as bincount with weights returns (numpy's stub says intp whatever the weights).
    load: np.ndarray = np.bincount(lv * k + part, weights=sec, minlength=n_levels * k).reshape(
        n_levels, k
    )
    load_l = load.tolist()
    caps_l = caps.tolist()
    sec_l = sec.tolist()
    lv_l = lv.tolist()
    for _ in range(passes):
        conn = np.bincount(u * k + part[v], weights=w, minlength=m * k).reshape(m, k)
        own = conn[np.arange(m), part]
        candidates = np.flatnonzero(conn.max(axis=1) > own)
        if not len(candidates):
            break
        part_l = part.tolist()
        moved = 0
        for n in candidates.tolist():
            here = part_l[n]
            gain = [0.0] * k
            for j in range(ptr[n], ptr[n + 1]):
                gain[part_l[nbr[j]]] += wt[j]
            row = load_l[lv_l[n]]
            cap = caps_l[lv_l[n]]
            s = sec_l[n]
            best, best_gain = here, gain[here]
            for t in range(k):
                if gain[t] > best_gain and row[t] + s <= cap:
                    best, best_gain = t, gain[t]
            if best != here:
                row[here] -= s
                row[best] += s
                part_l[n] = best
                moved += 1
        part[:] = part_l
        if not moved:
            break
    part_l = part.tolist()
    for _ in range(fm_passes):
        # Boundary ops: an endpoint of an edge between workers.
        cut = part[u] != part[v]
        boundary = np.unique(u[cut]).tolist()
        if (
            not boundary
            or _fm_pass(part_l, boundary, ptr, nbr, wt, lv_l, sec_l, load_l, caps_l, k) <= 0
        ):
            break
        part[:] = part_l


def _fm_pass(
    part: list[int],
    boundary: list[int],
    ptr: list[int],
    nbr: list[int],
    wt: list[float],
    lv: list[int],
    sec: list[float],
    load: list[list[float]],
    caps: list[float],
    k: int,
    patience: int = 300,
) -> float:
    """One Fiduccia-Mattheyses pass: move boundary ops best gain first, each at most once, also
    through moves that lose (to climb out of local minima), then undo the moves after the best
    point reached. Returns the bytes saved."""
    neg_inf = float("-inf")

    def best_move(n: int) -> tuple[float, int]:
        here = part[n]
        conn = [0.0] * k
        for j in range(ptr[n], ptr[n + 1]):
            conn[part[nbr[j]]] += wt[j]
        row, cap, s = load[lv[n]], caps[lv[n]], sec[n]
        best_g, best_t = neg_inf, -1
        for t in range(k):
            if t != here and conn[t] > 0 and row[t] + s <= cap and conn[t] - conn[here] > best_g:
                best_g, best_t = conn[t] - conn[here], t
        return best_g, best_t

    heap: list[tuple[float, int, int]] = []
    for n in boundary:
        g, t = best_move(n)
        if t >= 0:
            heap.append((-g, n, t))
    heapq.heapify(heap)
    moved: set[int] = set()
    log: list[tuple[int, int]] = []
    total = best_total = 0.0
    best_len = stall = 0
    while heap and stall < patience:
        neg_g, n, t = heapq.heappop(heap)
        if n in moved:
            continue
        g, t2 = best_move(n)
        if t2 < 0:
            continue
        if t2 != t or g != -neg_g:  # stale entry: requeue with the current gain
            heapq.heappush(heap, (-g, n, t2))
            continue
        here = part[n]
        row = load[lv[n]]
        row[here] -= sec[n]
        row[t] += sec[n]
        part[n] = t
        moved.add(n)
        log.append((n, here))
        total += g
        if total > best_total + 1e-9:
            best_total, best_len, stall = total, len(log), 0
        else:
            stall += 1
        for j in range(ptr[n], ptr[n + 1]):
            m = nbr[j]
            if m not in moved:
                gm, tm = best_move(m)
                if tm >= 0:
                    heapq.heappush(heap, (-gm, m, tm))
    for n, here in reversed(log[best_len:]):
        row = load[lv[n]]
        row[part[n]] -= sec[n]
        row[here] += sec[n]
        part[n] = here
    return best_total


def _complete(arrays: _Arrays, part: np.ndarray, k: int) -> np.ndarray:
    """Worker of every node not placed yet: leaves with most of their forward consumers (else
    the first consumer placed later), backward nodes with their origin (else their first
    input)."""
    n = arrays.n
    part = part.copy()
    src, dst = arrays.src, arrays.dst
    leaves = np.flatnonzero(arrays.leaf & (part < 0))
    if len(leaves):
        slot = np.full(n, -1, dtype=np.int64)
        slot[leaves] = np.arange(len(leaves))
        sel = (slot[src] >= 0) & (part[dst] >= 0)
        votes = np.bincount(slot[src[sel]] * k + part[dst[sel]], minlength=len(leaves) * k).reshape(
            len(leaves), k
        )
        has = votes.max(axis=1) > 0
        part[leaves[has]] = votes[has].argmax(axis=1)
    rest = np.flatnonzero(part < 0)
    origin = arrays.origin[rest]
    ok = origin >= 0
    ok[ok] = part[origin[ok]] >= 0
    part[rest[ok]] = part[origin[ok]]
    left = rest[~ok]
    if len(left):
        # Rare: nodes without a placed origin, in order, follow a placed input or origin.
        starts = np.searchsorted(dst, left)
        ends = np.searchsorted(dst, left, side="right")
        src_l = src.tolist()
        part_l = part.tolist()
        origin_l = arrays.origin.tolist()
        for i, a, b in zip(left.tolist(), starts.tolist(), ends.tolist()):
            o = origin_l[i]
            if o >= 0 and part_l[o] >= 0:
                part_l[i] = part_l[o]
                continue
            placed = [part_l[src_l[e]] for e in range(a, b) if part_l[src_l[e]] >= 0]
            part_l[i] = placed[0] if placed else -1
        part = np.array(part_l, dtype=np.int64)
        # Leaves with no forward consumer: with their first consumer.
        if (part < 0).any():
            for i in np.flatnonzero(part < 0).tolist():
                cons = dst[src == i]
                placed = part[cons][part[cons] >= 0]
                part[i] = placed[0] if len(placed) else 0
    return part


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


def _pipeline(program: Program, num_workers: int, cost: CostModel) -> Placement:
    """Contiguous stages, one per worker (see :func:`distgraph.pipeline.pipeline`)."""
    from .pipeline import pipeline

    return pipeline(program, num_workers, cost)


STRATEGIES: dict[str, Strategy] = {
    "round_robin": round_robin,
    "level": level,
    "mincut": mincut,
    "pipeline": _pipeline,
}
_BUILTIN = tuple(STRATEGIES.values())


@gc_paused
def partition(
    program: Program | Graph,
    num_workers: int,
    strategy: str | Strategy | Mapping[str, int] = "mincut",
    cost: CostModel | None = None,
) -> Placement:
    """Place every node of ``program`` (a Program or a Graph) on a worker in ``0..num_workers-1``.

    ``strategy`` is a name from ``STRATEGIES``, a callable ``(program, num_workers, cost) ->
    placement``, or an explicit ``{node: worker}`` dict (nodes it leaves out follow the
    ``mincut`` rules for leaves and backward nodes).
    """
    if not isinstance(program, Program):
        # dg.partition(graph, ...): the graph's program (its own backward pass included),
        # compiled where plans compile theirs.
        from .plan import program_of  # plan builds on this module

        program = program_of(program, grad=program.grad_of)
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
        if STRATEGIES[strategy] in _BUILTIN:
            return placement  # complete and in range by construction
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
