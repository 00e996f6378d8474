"""Numerical gradient checking, shipped with the package so users can test their own graphs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .errors import GradientCheckError
from .graph import Graph
from .runtime.local import LocalExecutor


def check_grads(
    graph: Graph,
    feeds: Mapping[str, Any],
    of: str | None = None,
    wrt: Sequence[str] | None = None,
    eps: float = 1e-6,
    rtol: float = 1e-5,
    atol: float = 1e-7,
) -> None:
    """Compare autodiff gradients with central finite differences; raise on disagreement.

    The message names the first disagreeing element: the output, the input or param, its index,
    the ops that consume it, and both values. Use float64 feeds and params.
    """
    of = of or (graph.outputs[0] if graph.outputs else None)
    if of is None:
        raise GradientCheckError("check_grads needs `of` or a graph with an output")
    ex = LocalExecutor()
    res = ex.run(graph, feeds, outputs=[of], grad=of)
    names = list(wrt) if wrt is not None else list(res.grads)
    base_feeds = {
        k: np.array(v, dtype=np.float64) if np.asarray(v).dtype.kind == "f" else np.asarray(v)
        for k, v in feeds.items()
    }
    params = graph._params

    def total(feeds_: Mapping[str, Any]) -> float:
        return float(np.sum(ex.run(graph, feeds_, outputs=[of]).values[of]))

    for name in names:
        analytic = np.asarray(res.grads[name], dtype=np.float64)
        is_param = name in params
        original = params[name].copy() if is_param else base_feeds[name]
        numeric = np.zeros(original.shape, dtype=np.float64)
        for idx in np.ndindex(*original.shape) if original.shape else [()]:
            vals = []
            for sign in (1, -1):
                bumped = original.astype(np.float64, copy=True)
                bumped[idx] += sign * eps
                if is_param:
                    params[name] = bumped.astype(original.dtype)
                    vals.append(total(base_feeds))
                else:
                    vals.append(total({**base_feeds, name: bumped}))
            if is_param:
                params[name] = original
            numeric[idx] = (vals[0] - vals[1]) / (2 * eps)
        bad = ~np.isclose(analytic, numeric, rtol=rtol, atol=atol)
        if bad.any():
            idx = tuple(int(i) for i in np.argwhere(bad)[0]) if analytic.ndim else ()
            consumers = sorted({n.op for n in graph.nodes if name in n.inputs})
            raise GradientCheckError(
                f"gradient of {of!r} with respect to {name!r}{list(idx) if idx else ''} "
                f"(consumed by ops {consumers}): autodiff gives {analytic[idx]!r}, "
                f"finite differences give {numeric[idx]!r}"
            )
