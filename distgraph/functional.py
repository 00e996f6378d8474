"""Functional forms of the ops (``dg.tanh(x)``, ``dg.mse(pred, y)``): each adds one node.

Kept apart from ``graph.py`` because several names (``sum``, ``max``, ``abs``) mirror numpy's
and would shadow Python's builtins there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .errors import GraphError
from .graph import Graph, Node


def _graph_of(*xs: Any) -> Graph:
    for x in xs:
        if isinstance(x, Node):
            return x.graph
        if isinstance(x, (list, tuple)):
            for y in x:
                if isinstance(y, Node):
                    return y.graph
    raise GraphError("at least one operand must be a graph node")


def _fn(op: str, *xs: Any, **attrs: Any) -> Node:
    return _graph_of(*xs).apply(op, *xs, **attrs)


def exp(x: Node) -> Node:
    """Elementwise e**x."""
    return _fn("exp", x)


def log(x: Node) -> Node:
    """Elementwise natural logarithm."""
    return _fn("log", x)


def sqrt(x: Node) -> Node:
    """Elementwise square root."""
    return _fn("sqrt", x)


def abs(x: Node) -> Node:
    """Elementwise absolute value."""
    return _fn("abs", x)


def relu(x: Node) -> Node:
    """max(x, 0)."""
    return _fn("relu", x)


def sigmoid(x: Node) -> Node:
    """1 / (1 + e**-x), computed without overflow."""
    return _fn("sigmoid", x)


def tanh(x: Node) -> Node:
    """Hyperbolic tangent."""
    return _fn("tanh", x)


def softplus(x: Node) -> Node:
    """log(1 + e**x), computed without overflow."""
    return _fn("softplus", x)


def maximum(a: Any, b: Any) -> Node:
    """Elementwise maximum (ties send the gradient to ``a``)."""
    return _fn("maximum", a, b)


def minimum(a: Any, b: Any) -> Node:
    """Elementwise minimum (ties send the gradient to ``a``)."""
    return _fn("minimum", a, b)


def matmul(a: Any, b: Any) -> Node:
    """Matrix product with numpy's rules (2-D, batched, 1-D operands)."""
    return _fn("matmul", a, b)


def sum(x: Node, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Node:
    """Sum over ``axis``."""
    return x.sum(axis, keepdims)


def mean(x: Node, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Node:
    """Mean over ``axis``."""
    return x.mean(axis, keepdims)


def max(x: Node, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Node:
    """Maximum over ``axis`` (ties share the gradient)."""
    return x.max(axis, keepdims)


def reshape(x: Node, shape: Sequence[int]) -> Node:
    """Reshape to ``shape``."""
    return x.reshape(tuple(shape))


def transpose(x: Node, axes: Sequence[int] | None = None) -> Node:
    """Permute axes."""
    return x.transpose(*(axes or ()))


def broadcast_to(x: Node, shape: Sequence[int]) -> Node:
    """Broadcast to ``shape``."""
    return _fn("broadcast_to", x, shape=[int(d) for d in shape])


def concat(xs: Sequence[Any], axis: int = 0) -> Node:
    """Join along an existing axis."""
    return _graph_of(list(xs)).apply("concat", *xs, axis=axis)


def where(cond: Any, a: Any, b: Any) -> Node:
    """``a`` where ``cond`` else ``b``; the condition takes no gradient."""
    return _fn("where", cond, a, b)


def softmax(x: Node, axis: int = -1) -> Node:
    """Softmax over ``axis``."""
    return _fn("softmax", x, axis=axis)


def log_softmax(x: Node, axis: int = -1) -> Node:
    """Log of softmax over ``axis``, computed stably."""
    return _fn("log_softmax", x, axis=axis)


def mse(pred: Any, target: Any) -> Node:
    """Mean squared error, a scalar."""
    return _fn("mse", pred, target)


def cross_entropy(logits: Any, labels: Any) -> Node:
    """Mean softmax cross-entropy; ``labels`` are class indices or probability rows."""
    return _fn("cross_entropy", logits, labels)


def stop_gradient(x: Node) -> Node:
    """Identity forward, no gradient backward."""
    return _fn("stop_gradient", x)
