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


# --- neural-network ops (rows in distgraph/nnops.py) -----------------------------------------


def _pair(v: int | Sequence[int]) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(d) for d in v]


def conv2d(
    x: Node,
    w: Any,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    name: str | None = None,
) -> Node:
    """2-D cross-correlation of an NCHW input with an OIHW weight (no bias: add one)."""
    return _graph_of(x, w).apply(
        "conv2d",
        x,
        w,
        name=name,
        stride=_pair(stride),
        padding=_pair(padding),
        dilation=_pair(dilation),
    )


def max_pool2d(
    x: Node, kernel: int | Sequence[int], stride: int | Sequence[int] | None = None
) -> Node:
    """Maximum over each window of an NCHW input (stride defaults to the kernel)."""
    attrs: dict[str, Any] = {"kernel": _pair(kernel)}
    if stride is not None:
        attrs["stride"] = _pair(stride)
    return _fn("max_pool2d", x, **attrs)


def avg_pool2d(
    x: Node, kernel: int | Sequence[int], stride: int | Sequence[int] | None = None
) -> Node:
    """Mean over each window of an NCHW input (stride defaults to the kernel)."""
    attrs: dict[str, Any] = {"kernel": _pair(kernel)}
    if stride is not None:
        attrs["stride"] = _pair(stride)
    return _fn("avg_pool2d", x, **attrs)


def layer_norm(x: Node, weight: Any, bias: Any, eps: float = 1e-5) -> Node:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last axis (one fused node)."""
    return _fn("layer_norm", x, weight, bias, eps=eps)


def embedding(ids: Node, table: Any) -> Node:
    """Rows ``table[ids]``: integer ids of any shape pick rows of a (rows, ...) table."""
    return _fn("embedding", ids, table)


def dropout(x: Node, p: float, seed: int = 0, name: str | None = None) -> Node:
    """Zero each element with probability ``p`` and scale the rest by 1 / (1 - p), in training
    steps only (identity elsewhere). The mask is a function of (seed, step id, node name)."""
    g = _graph_of(x)
    if name is None:
        k = 0
        while f"dropout_{k}" in g:
            k += 1
        name = f"dropout_{k}"
    return g.apply("dropout", x, name=name, p=float(p), key=name, seed=int(seed))


def gelu(x: Node) -> Node:
    """GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x**3)))."""
    return _fn("gelu", x)


def einsum(subscripts: str, *xs: Any) -> Node:
    """Einstein summation with explicit output, e.g. ``einsum('bhqd,bhkd->bhqk', q, k)``."""
    return _fn("einsum", *xs, subscripts=subscripts)


def split(x: Node, sections: int | Sequence[int], axis: int = 0) -> list[Node]:
    """Pieces of ``x`` along ``axis``: ``sections`` equal pieces, or pieces of these sizes."""
    if isinstance(sections, int):
        size = x.shape[axis] if x.shape is not None else None
        if size is None:
            raise GraphError(
                f"split of {x.name!r} into {sections} equal pieces needs axis {axis}'s size "
                "known; pass the piece sizes instead"
            )
        if sections < 1 or size % sections:
            raise GraphError(
                f"split of {x.name!r}: axis {axis} has {size} elements, which do not divide "
                f"into {sections} equal pieces"
            )
        sizes = [size // sections] * sections
    else:
        sizes = [int(s) for s in sections]
    return [_fn("split", x, sizes=sizes, index=i, axis=axis) for i in range(len(sizes))]


def stack(xs: Sequence[Any], axis: int = 0) -> Node:
    """Stack same-shaped values along a new axis."""
    return _fn("stack", *xs, axis=axis)


def causal_mask(scores: Node, fill: float = -1e9) -> Node:
    """Scores (..., queries, keys) with every key after its query replaced by ``fill``."""
    return _fn("causal_mask", scores, fill=fill)
