"""Simulated compute: ops that hold a node for a set time without using a core.

For measuring what the runtime itself costs (call overhead, transfers, scheduling gaps,
pipeline bubbles) at more workers than this machine has cores: a kernel that sleeps leaves the
CPU to the other workers, so 32 worker actors can "compute" on 2 cores. Values stay tiny and
the gradients are exact, so results can still be checked against ``LocalExecutor``.

Registered through the public custom-op API (:func:`distgraph.ops.defop`) when this module is
imported. Ray workers must import it too: ``RayExecutor(ops_modules=["distgraph.simops"])``.

* ``sim_layer(x, w, f_ms=..., b_ms=...)``: ``x * w`` (elementwise, broadcasting), whose
  forward sleeps ``f_ms`` milliseconds and whose backward sleeps ``b_ms`` in all, split evenly
  between the gradients of ``x`` and ``w`` (a request that needs only one of them sleeps half).
* :func:`sim_chain` builds ``k`` such layers in a row, with a mean loss.
* :class:`SimCostModel` tells the partitioner and predictor the sleeps, so plans balance them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .cost import CostModel
from .dataparallel import declare_rowwise
from .functional import mean
from .graph import Graph, Node
from .ops import OPS, VJP_NAME, Attr, defop
from .spec import NodeSpec

#: The op's name in graphs and specs.
SIM_LAYER = "sim_layer"

_MS = Attr("float", default=0.0, low=0.0, high=60_000.0, doc="milliseconds to sleep")


def _sleep_ms(ms: float) -> None:
    if ms > 0:
        time.sleep(ms / 1000.0)


def _sim_layer(x: Any, w: Any, f_ms: float = 0.0, b_ms: float = 0.0) -> Any:
    _sleep_ms(f_ms)
    return np.multiply(x, w)


def _sim_layer_dx(g: Any, out: Any, x: Any, w: Any, f_ms: float = 0.0, b_ms: float = 0.0) -> Any:
    _sleep_ms(b_ms / 2)
    return np.multiply(g, w)


def _sim_layer_dw(g: Any, out: Any, x: Any, w: Any, f_ms: float = 0.0, b_ms: float = 0.0) -> Any:
    _sleep_ms(b_ms / 2)
    return np.multiply(g, x)  # summed down to w's shape by the VJP machinery


if SIM_LAYER not in OPS:  # importing twice (a worker, a reload) must not register twice
    defop(
        SIM_LAYER,
        _sim_layer,
        _sim_layer_dx,
        _sim_layer_dw,
        attrs={"f_ms": _MS, "b_ms": _MS},
        elementwise=True,
    )
# x * w row by row: a batch may be split into shards or micro-batches through it.
declare_rowwise(SIM_LAYER)


def sim_layer(x: Any, w: Any, f_ms: float = 0.0, b_ms: float = 0.0, name: str | None = None):
    """``x * w`` whose forward sleeps ``f_ms`` ms and backward ``b_ms`` ms (nodes of a Graph)."""
    graph = x.graph if isinstance(x, Node) else w.graph
    return graph.apply(SIM_LAYER, x, w, name=name, f_ms=float(f_ms), b_ms=float(b_ms))


def sim_chain(
    layers: int,
    f_ms: float | Sequence[float] = 0.0,
    b_ms: float | Sequence[float] = 0.0,
    width: int = 1,
    weights: Sequence[float] | None = None,
) -> Graph:
    """``layers`` sim layers in a row: input ``x`` of shape ``(None, width)``, params ``w0``..
    (shape ``(width,)``, default 1.0 each), outputs ``y`` and ``loss = mean(y)``.

    ``f_ms``/``b_ms`` are one time for every layer or one per layer.
    """
    if not isinstance(layers, int) or layers < 1:
        raise ValueError(f"layers must be an int >= 1, got {layers!r}")
    fs = _per_layer(f_ms, layers, "f_ms")
    bs = _per_layer(b_ms, layers, "b_ms")
    ws = [1.0] * layers if weights is None else [float(v) for v in weights]
    if len(ws) != layers:
        raise ValueError(f"weights needs one value per layer ({layers}), got {len(ws)}")
    g = Graph()
    h = g.input("x", shape=(None, width), dtype="float64")
    for i in range(layers):
        w = g.param(f"w{i}", np.full(width, ws[i]))
        h = sim_layer(h, w, fs[i], bs[i], name=f"layer{i}")
    g.output("y", h)
    g.output("loss", mean(h))
    return g


def _per_layer(v: float | Sequence[float], n: int, name: str) -> list[float]:
    vals = [float(v)] * n if isinstance(v, (int, float)) else [float(x) for x in v]
    if len(vals) != n:
        raise ValueError(f"{name} needs one time per layer ({n}), got {len(vals)}")
    return vals


@dataclass(frozen=True)
class SimCostModel(CostModel):
    """The stock cost model, except that sim layers cost exactly their sleeps."""

    def seconds(self, node: NodeSpec, inputs: list[NodeSpec]) -> float:
        """Estimated run time of a node: a sim layer's sleep plus the node overhead."""
        if node.op == SIM_LAYER:
            return self.node_overhead + float(node.attrs.get("f_ms", 0.0)) / 1000.0
        if node.op == VJP_NAME and node.attrs.get("op") == SIM_LAYER:
            b_ms = float(node.attrs.get("attrs", {}).get("b_ms", 0.0))
            return self.node_overhead + b_ms / 2000.0
        return super().seconds(node, inputs)
