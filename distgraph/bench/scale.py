"""`scale`: the graph compiler on a 100,000-node random DAG, and mincut's cut against METIS.

The DAG is layered and banded (each node reads its own column and a near neighbour of the level
before; every 50th node is a fresh parameter); the last level is summed by a balanced tree of
adds into the scalar ``loss`` so autodiff reaches the whole graph. Timed phases:
build (``dg.Graph`` checks every node as it is added), ``dg.grad``, levels, and
``dg.partition(graph, 8, "mincut")`` of the differentiated graph. The cut is compared with
pymetis on the undirected forward graph: both partitions are scored with the same metric (unique
undirected edges whose endpoints land on different workers) and pymetis is allowed the balance
that mincut reached.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._harness import Record, log, timed

NAME = "scale"
PARTS = 8
#: label -> (comparison, bound) of every target this benchmark checks.
TARGETS = {"total_s": ("<=", 5.0), "cut_vs_metis": ("<=", 1.25)}
#: Packages of the ``bench`` extra this benchmark needs (METIS, the cut's yardstick).
PEERS: tuple[str, ...] = ("pymetis",)
_UNARY = ("tanh", "neg")
_BINARY = ("add", "mul", "sub")


def make_structure(levels: int, width: int, seed: int = 0) -> list[tuple]:
    """Abstract DAG as (op, parent indices) rows in creation order; leaves are ("param", ()).

    Node ``i`` of level ``l`` reads node ``i`` of level ``l - 1`` and, for binary ops, a
    neighbour up to 8 places away (wrapping): a banded, layered graph with locality, like the
    unrolled programs a partitioner meets. Every node but the last level's has a consumer.
    """
    rng = np.random.default_rng(seed)
    offsets = rng.integers(1, 9, size=(levels, width)) * rng.choice([-1, 1], size=(levels, width))
    kinds = rng.random((levels, width))
    rows: list[tuple] = [("param", ())] * width
    for lvl in range(1, levels):
        base = (lvl - 1) * width
        for i in range(width):
            a, b = base + i, base + (i + int(offsets[lvl, i])) % width
            if (lvl * width + i) % 50 == 0:
                rows.append(("param", ()))
            elif kinds[lvl, i] < 0.3:
                rows.append((_UNARY[i % 2], (a,)))
            else:
                rows.append((_BINARY[i % 3], (a, b)))
    return rows


def _sinks(rows: list[tuple]) -> list[int]:
    used = np.zeros(len(rows), dtype=bool)
    for _, parents in rows:
        used[list(parents)] = True
    return [int(i) for i in np.flatnonzero(~used)]


def sized_structure(n: int, seed: int = 0) -> list[tuple]:
    """A structure whose body plus its reduction tree has about ``n`` nodes."""
    width = max(10, int(3 * np.sqrt(n)))
    return make_structure(max(2, n // width - 1), width, seed)


def build_graph(rows: list[tuple], dim: int = 4, seed: int = 0) -> Any:
    """The structure as a dg.Graph with scalar output ``loss``."""
    import distgraph as dg

    rng = np.random.default_rng(seed)
    g = dg.Graph()
    nodes: list[Any] = []
    for i, (op, parents) in enumerate(rows):
        if op == "param":
            nodes.append(g.param(f"p{i}", rng.standard_normal(dim)))
        elif op == "tanh":
            nodes.append(dg.tanh(nodes[parents[0]]))
        elif op == "neg":
            nodes.append(-nodes[parents[0]])
        elif op == "add":
            nodes.append(nodes[parents[0]] + nodes[parents[1]])
        elif op == "mul":
            nodes.append(nodes[parents[0]] * nodes[parents[1]])
        else:
            nodes.append(nodes[parents[0]] - nodes[parents[1]])
    level = [nodes[i] for i in _sinks(rows)]
    while len(level) > 1:  # a balanced tree keeps the graph's depth low
        pairs = [level[j] + level[j + 1] for j in range(0, len(level) - 1, 2)]
        level = pairs + ([level[-1]] if len(level) % 2 else [])
    g.output("loss", dg.sum(level[0]))
    return g


def forward_edges(spec: Any) -> tuple[list[str], np.ndarray]:
    """Forward node names and their unique undirected edges as an (m, 2) index array."""
    names = [n.name for n in spec.nodes if n.phase == "forward"]
    index = {name: i for i, name in enumerate(names)}
    edges = set()
    for n in spec.nodes:
        if n.phase != "forward":
            continue
        for src in n.inputs:
            a, b = index[src], index[n.name]
            if a != b:
                edges.add((min(a, b), max(a, b)))
    return names, np.array(sorted(edges), dtype=np.int64).reshape(-1, 2)


def cut_and_balance(parts: np.ndarray, edges: np.ndarray, k: int) -> tuple[int, float]:
    """Edges whose endpoints differ, and max part size over the mean part size."""
    cut = int(np.count_nonzero(parts[edges[:, 0]] != parts[edges[:, 1]]))
    sizes = np.bincount(parts, minlength=k)
    return cut, float(sizes.max() * k / len(parts))


def metis_parts(n_nodes: int, edges: np.ndarray, k: int, imbalance: float) -> np.ndarray:
    """pymetis partition of the undirected graph allowing ``imbalance`` (max/mean part size)."""
    import pymetis

    both = np.concatenate([edges, edges[:, ::-1]])
    order = np.lexsort((both[:, 1], both[:, 0]))
    both = both[order]
    starts = np.searchsorted(both[:, 0], np.arange(n_nodes + 1))
    # METIS's ufactor is the allowed imbalance in thousandths; 30 (1.03) is its default.
    ufactor = max(1, round((imbalance - 1.0) * 1000))
    result = pymetis.part_graph(
        k,
        adjacency=pymetis.CSRAdjacency(starts, both[:, 1]),
        options=pymetis.Options(ufactor=ufactor),
    )
    return np.asarray(result.vertex_part, dtype=np.int64)


def bench(rec: Record, quick: bool = False, progress: bool = False) -> None:
    """Time the compiler phases and score mincut's cut against pymetis's."""
    import distgraph as dg
    from distgraph.cost import CostModel
    from distgraph.partition import partition

    n = 2_000 if quick else 100_000
    rows = sized_structure(n)

    log(progress, NAME, f"build ({n} nodes)")
    g, build_s = timed(lambda: build_graph(rows))
    rec.figure("build_s", build_s)
    log(progress, NAME, "grad")
    gg, grad_s = timed(lambda: dg.grad(g, of="loss"))
    rec.figure("grad_s", grad_s)
    log(progress, NAME, "levels")
    levels, levels_s = timed(gg.levels)
    rec.figure("levels_s", levels_s)
    log(progress, NAME, f"mincut partition into {PARTS}")
    # partition() compiles the graph into the program the executors run, so that is timed too.
    # A cost model in which compute dominates call overhead, as it would for real tensors: the
    # default one rightly keeps 4-element nodes on one worker, which leaves nothing to compare.
    split_cost = CostModel(node_overhead=1e-3, call_overhead=1e-6)
    placement, part_s = timed(lambda: partition(gg, PARTS, "mincut", split_cost))
    rec.figure("partition_s", part_s)
    total = rec.figure("total_s", build_s + grad_s + levels_s + part_s)
    rec.figure("forward_nodes", len(g))
    rec.figure("nodes_with_backward", len(gg))
    rec.figure("levels", len(levels))

    log(progress, NAME, "cut vs pymetis")
    names, edges = forward_edges(g.spec)
    mincut = np.array([placement[name] for name in names], dtype=np.int64)
    cut, balance = cut_and_balance(mincut, edges, PARTS)
    metis, metis_s = timed(lambda: metis_parts(len(names), edges, PARTS, balance))
    metis_cut, metis_balance = cut_and_balance(metis, edges, PARTS)
    rec.figure("forward_edges", len(edges))
    rec.figure("mincut_cut_edges", cut)
    rec.figure("mincut_balance", balance)
    rec.figure("metis_cut_edges", metis_cut)
    rec.figure("metis_balance", metis_balance)
    rec.figure("metis_s", metis_s)

    rec.target("total_s", total)
    rec.note(
        "Layered banded random DAG (each node reads its column and a near neighbour), 4-element "
        "float64 values. The cut is scored on the forward graph's placement taken from the "
        "partition of the differentiated graph; pymetis (ufactor set to mincut's balance) gets "
        "the same forward graph."
    )
    used = rec.figure("mincut_parts_used", len(np.unique(mincut)))
    ratio = rec.ratio("cut_vs_metis", cut, metis_cut)
    if used < PARTS:
        # Fewer workers is mincut's call when its cost model prefers it, but then there is no
        # 8-way partition to score: the cut target stays unmeasured rather than trivially met.
        rec.note(
            f"mincut used {used:g} of {PARTS} workers (its cost model judged fewer faster), so "
            "its cut is not comparable with an 8-way METIS partition; cut target not judged."
        )
        ratio = rec.ratio("cut_vs_metis", None, metis_cut)  # NaN: not judged
    rec.target("cut_vs_metis", ratio)
