"""The seed's computational graph z = x * w + b, run forward and backward level by level.

    python examples/seed_graph.py            # x=2, w=3, b=1: z = 7, dz/dx = 3, dz/dw = 2, dz/db = 1
    python examples/seed_graph.py --x 5 --w -1

Each level's nodes only wait for nodes of earlier levels, so the nodes of one level could run in
parallel; the backward pass runs the appended gradient nodes the same way, starting from
dz/dz = 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import distgraph as dg

SYMBOLS = {"add": "+", "sub": "-", "mul": "*", "div": "/", "matmul": "@"}


def build_graph(w: float = 3.0, b: float = 1.0) -> dg.Graph:
    """z = x * w + b with params w and b."""
    g = dg.Graph()
    x = g.input("x")
    wn = g.param("w", w)
    bn = g.param("b", b)
    g.output("z", x * wn + bn)
    return g


def _describe(node: dg.NodeSpec, nodes: dict[str, dg.NodeSpec], of: str = "z") -> str:
    """How a node computes its value, in the words of the seed."""
    if node.op in SYMBOLS and len(node.inputs) == 2:
        return f"{node.inputs[0]} {SYMBOLS[node.op]} {node.inputs[1]}"
    if node.op == "ones_like":
        return f"d{of}/d{of}"
    if node.op == "vjp":  # one input's share of the gradient, by the chain rule
        fwd = nodes[node.origin]
        target = fwd.inputs[node.attrs["argnum"]]
        return f"d{of}/d{target} via {fwd.name} = {_describe(fwd, nodes, of)}"
    if node.op == "add_n":  # a node read twice sums its shares
        return " + ".join(node.inputs)
    return f"{node.op}({', '.join(node.inputs)})"


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the seed graph, print both passes level by level, and return what was printed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--x", type=float, default=2.0, help="input x (default 2)")
    parser.add_argument("--w", type=float, default=3.0, help="weight w (default 3)")
    parser.add_argument("--b", type=float, default=1.0, help="bias b (default 1)")
    args = parser.parse_args(argv)

    g = build_graph(args.w, args.b)
    full = dg.grad(g, of="z")  # forward nodes plus the appended backward nodes
    nodes = {n.name: n for n in full.nodes}
    res = dg.LocalExecutor().run(full, {"x": args.x}, outputs=list(nodes))
    forward = g.levels()
    backward = full.levels(phase="backward")

    print(f"z = x * w + b  with x = {_fmt(args.x)}, w = {_fmt(args.w)}, b = {_fmt(args.b)}\n")
    print("Forward pass: each level waits for the one before, then runs its nodes")
    for i, level in enumerate(forward):
        parts = []
        for name in level:
            node = nodes[name]
            how = "" if node.op in ("input", "param") else f" = {_describe(node, nodes)}"
            parts.append(f"{name}{how} = {_fmt(res.values[name])}")
        print(f"  level {i}: " + ";  ".join(parts))
    print("\nBackward pass: gradients flow from z back to the leaves")
    for i, level in enumerate(backward):
        parts = [f"{n} ({_describe(nodes[n], nodes)}) = {_fmt(res.values[n])}" for n in level]
        print(f"  step {i}: " + ";  ".join(parts))
    print("\nGradients: " + ", ".join(f"dz/d{k} = {_fmt(v)}" for k, v in res.grads.items()))
    return {
        "values": {n: res.values[n] for lv in forward for n in lv},
        "grads": dict(res.grads),
        "levels": forward,
        "backward_levels": backward,
        "backward_values": {n: res.values[n] for lv in backward for n in lv},
    }


if __name__ == "__main__":
    main(sys.argv[1:])
