"""Numerical gradient checking, shipped with the package so users can test their own graphs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .errors import GradientCheckError
from .graph import Graph
from .interpret import prepare_feeds, run_nodes
from .program import Program, compile_program, feed_signature


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
    params = dict(graph.param_values)  # bumped copies are evaluated; the graph is never changed
    backward = compile_program(graph, [of], grad=of, fed=feed_signature(graph, feeds))
    grads = backward.grads
    env = _evaluate(backward, feeds, params)
    res = {leaf: env[node] for leaf, node in grads.items()}
    names = list(wrt) if wrt is not None else list(res)
    base_feeds = {
        k: np.array(v, dtype=np.float64) if np.asarray(v).dtype.kind == "f" else np.asarray(v)
        for k, v in feeds.items()
    }
    forward = compile_program(graph, [of], fed=feed_signature(graph, base_feeds))

    def total(feeds_: Mapping[str, Any], params_: Mapping[str, np.ndarray]) -> float:
        return float(np.sum(_evaluate(forward, feeds_, params_)[forward.outputs[0]]))

    for name in names:
        analytic = np.asarray(res[name], dtype=np.float64)
        is_param = name in params
        original = params[name] if is_param else base_feeds[name]
        numeric = np.zeros(original.shape, dtype=np.float64)
        for idx in np.ndindex(*original.shape) if original.shape else [()]:
            vals = []
            for sign in (1, -1):
                bumped = original.astype(np.float64, copy=True)
                bumped[idx] += sign * eps
                if is_param:
                    vals.append(total(base_feeds, {**params, name: bumped.astype(original.dtype)}))
                else:
                    vals.append(total({**base_feeds, name: bumped}, params))
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


def _evaluate(
    program: Program, feeds: Mapping[str, Any], params: Mapping[str, np.ndarray]
) -> dict[str, Any]:
    """Every value of one run of ``program`` (the reference interpreter, no executor)."""
    env: dict[str, Any] = dict(prepare_feeds(program, feeds))
    env.update({p: params[p] for p in program.params})
    env.update(program.constants)
    run_nodes(program, program.order, env)
    return env
