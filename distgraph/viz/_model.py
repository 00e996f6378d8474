"""Shared facts about a graph for the pictures: node kinds, levels, tensor bytes, colours."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from .. import schedule
from ..errors import CycleError
from ..spec import GraphSpec, NodeSpec

#: Leaf ops: the seed calls these "variables" (inputs, parameters) and constants join them.
VARIABLE_OPS = frozenset({"input", "param", "const"})

#: Fill / stroke per kind: green variables, teal operations, purple outputs (the seed's palette),
#: amber for backward-phase operations so the forward kinds stay distinguishable.
KIND_FILL = {
    "variable": "#16a34a",
    "operation": "#0d9488",
    "output": "#7c3aed",
    "backward": "#d97706",
}
KIND_STROKE = {
    "variable": "#166534",
    "operation": "#115e59",
    "output": "#5b21b6",
    "backward": "#92400e",
}
KIND_LABEL = {
    "variable": "Variables (inputs / params)",
    "operation": "Operations",
    "output": "Outputs",
    "backward": "Backward ops (gradients)",
}
#: Worker badge colours, cycled when there are more workers than colours.
WORKER_COLOURS = (
    "#2563eb",
    "#db2777",
    "#ea580c",
    "#4b5563",
    "#0891b2",
    "#65a30d",
    "#9333ea",
    "#b45309",
)
#: Short symbols shown under an operation's name, like the seed's "*" and "+" nodes.
OP_SYMBOLS = {
    "add": "+",
    "sub": "−",
    "mul": "×",
    "div": "÷",
    "matmul": "@",
    "pow": "^",
    "neg": "−x",
}


def worker_colour(worker: int) -> str:
    """The badge colour of a worker."""
    return WORKER_COLOURS[worker % len(WORKER_COLOURS)]


def node_kind(spec: GraphSpec, node: NodeSpec) -> str:
    """One of "variable", "operation", "output" (the three kinds of the seed picture)."""
    if node.name in spec.outputs:
        return "output"
    if node.op in VARIABLE_OPS:
        return "variable"
    return "operation"


def node_style(spec: GraphSpec, node: NodeSpec) -> str:
    """The colour key: the kind, or "backward" for a backward-phase operation."""
    kind = node_kind(spec, node)
    if kind == "operation" and node.phase == "backward":
        return "backward"
    return kind


def node_levels(spec: GraphSpec) -> dict[str, int]:
    """Topological level of every node (leaves 0, else 1 + deepest input); inputs that name no
    node of the spec are ignored, so a partial spec still draws."""
    names = {n.name for n in spec.nodes}
    preds = {n.name: [i for i in dict.fromkeys(n.inputs) if i in names] for n in spec.nodes}
    try:
        order = schedule.toposort(preds)
    except CycleError as e:
        raise ValueError(f"graph has a cycle: {' -> '.join(e.cycle)}") from None
    return schedule.node_levels(order, preds)


def itemsize(dtype: str | None) -> int:
    """Bytes per element; an unknown dtype counts as float64, the library's default."""
    return np.dtype(dtype or "float64").itemsize


def tensor_bytes(node: NodeSpec, batch_size: int = 1) -> int:
    """Size of a node's value: prod(shape, None -> batch_size) * itemsize; no shape = scalar."""
    count = 1
    for dim in node.shape or []:
        count *= batch_size if dim is None else int(dim)
    return count * itemsize(node.dtype)


def format_bytes(n: int) -> str:
    """Human-readable byte count: 8 B, 6.1 KiB, 3.0 MiB."""
    if n < 1024:
        return f"{n} B"
    size = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}"
    raise AssertionError("unreachable")


def format_shape(node: NodeSpec) -> str:
    """Shape and dtype as a short string: "f64 [None, 784]" or "f64 scalar"."""
    dt = (node.dtype or "float64").replace("float", "f").replace("uint", "u").replace("int", "i")
    if not node.shape:
        return f"{dt} scalar"
    dims = ", ".join("N" if d is None else str(d) for d in node.shape)
    return f"{dt} [{dims}]"


@dataclass(frozen=True)
class Edge:
    """One drawn edge: producer, consumer, and the bytes when it crosses workers."""

    src: str
    dst: str
    cross: bool
    nbytes: int


def graph_edges(
    spec: GraphSpec, placement: dict[str, int] | None, batch_size: int = 1
) -> list[Edge]:
    """Unique producer->consumer edges; ``cross`` when both ends have different workers."""
    by_name = {n.name: n for n in spec.nodes}
    edges = []
    for node in spec.nodes:
        for src in dict.fromkeys(node.inputs):
            if src not in by_name:
                continue
            cross = bool(
                placement
                and src in placement
                and node.name in placement
                and placement[src] != placement[node.name]
            )
            edges.append(Edge(src, node.name, cross, tensor_bytes(by_name[src], batch_size)))
    return edges


def order_columns(spec: GraphSpec, levels: dict[str, int]) -> list[list[str]]:
    """Nodes per level, ordered by the barycentre of their neighbours to cut edge crossings."""
    depth = max(levels.values(), default=-1) + 1
    columns: list[list[str]] = [[] for _ in range(depth)]
    for node in spec.nodes:
        columns[levels[node.name]].append(node.name)
    preds = {n.name: [i for i in n.inputs if i in levels] for n in spec.nodes}
    succs: dict[str, list[str]] = {name: [] for name in levels}
    for name, ins in preds.items():
        for i in ins:
            succs[i].append(name)

    def sort_by(column: list[str], neighbours: dict[str, list[str]], pos: dict[str, float]) -> None:
        def key(name: str) -> float:
            near = [pos[n] for n in neighbours[name] if n in pos]
            return sum(near) / len(near) if near else math.inf

        keyed = {name: (key(name), i) for i, name in enumerate(column)}
        column.sort(key=keyed.__getitem__)

    def positions(cols: Iterable[list[str]]) -> dict[str, float]:
        # Centred row positions, matching the drawing where every column is centred vertically.
        return {name: i - (len(col) - 1) / 2 for col in cols for i, name in enumerate(col)}

    # Two sweeps (down, up, down) are enough for readable pictures of layered nets.
    for _ in range(2):
        for k in range(1, depth):
            sort_by(columns[k], preds, positions(columns[:k]))
        for k in range(depth - 2, -1, -1):
            sort_by(columns[k], succs, positions(columns[k + 1 :]))
    for k in range(1, depth):
        sort_by(columns[k], preds, positions(columns[:k]))
    return columns
