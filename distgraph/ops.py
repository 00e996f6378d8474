"""The op registry: each op's forward and its vector-Jacobian products side by side.

A row reads ``defop(name, forward, vjp_for_input_0, vjp_for_input_1, ...)``. A VJP receives the
upstream gradient ``g``, the forward output ``out`` and the forward inputs, and returns the
gradient for its input *before* un-broadcasting: :func:`unbroadcast` is applied once, by
:func:`run_vjp`, for every op. ``None`` in a VJP slot marks an input that takes no gradient
(labels, conditions). Variadic ops (``concat``, ``add_n``) give one VJP that also receives
the input's index.

Everything here is numpy on plain arguments: attributes are JSON values, so the same table runs
in the driver, in the reference executor and inside Ray workers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import UnknownOpError

Array = np.ndarray
VJP = Callable[..., Any]


@dataclass(frozen=True)
class Op:
    """One registry row: forward, per-input VJPs, and facts the compiler needs."""

    name: str
    forward: Callable[..., Any]
    vjps: tuple[VJP | None, ...] = ()
    #: For variadic ops: ``vjp_n(i, g, out, *inputs, **attrs)``.
    vjp_n: VJP | None = None
    arity: int | None = None  # None: variadic
    uses_out: bool = False  # whether the VJPs read the forward output
    elementwise: bool = False  # output shape = broadcast of input shapes
    differentiable: bool = True
    #: Rough floating-point operations per output element, for the cost model.
    flops_per_element: float = 1.0

    def has_vjp(self, argnum: int) -> bool:
        """Whether gradient flows into input ``argnum``."""
        if not self.differentiable:
            return False
        if self.arity is None:
            return self.vjp_n is not None
        return argnum < len(self.vjps) and self.vjps[argnum] is not None


OPS: dict[str, Op] = {}

#: Leaves: their values come from feeds, the parameter store and the constant table.
LEAF_OPS = frozenset({"input", "param", "const"})


def defop(
    name: str,
    forward: Callable[..., Any],
    *vjps: VJP | None,
    arity: int | None = -1,
    **facts: Any,
) -> Op:
    """Register an op; the number of VJPs gives the arity unless ``arity`` says otherwise."""
    if name in OPS or name in LEAF_OPS:
        raise ValueError(f"op {name!r} is already registered")
    op = Op(name, forward, tuple(vjps), arity=len(vjps) if arity == -1 else arity, **facts)
    OPS[name] = op
    return op


def get_op(name: str) -> Op:
    """Look up an op, with an error listing what exists when the name is unknown."""
    try:
        return OPS[name]
    except KeyError:
        raise UnknownOpError(
            f"unknown op {name!r}; registered ops: {', '.join(sorted(OPS))}"
        ) from None


def unbroadcast(grad: Any, shape: tuple[int, ...]) -> Any:
    """Sum ``grad`` down to ``shape``: the one place broadcasting is undone."""
    grad_shape = np.shape(grad)
    if grad_shape == tuple(shape):
        return grad
    extra = len(grad_shape) - len(shape)
    if extra > 0:
        grad = np.sum(grad, axis=tuple(range(extra)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and np.shape(grad)[i] != 1)
    if axes:
        grad = np.sum(grad, axis=axes, keepdims=True)
    return np.reshape(grad, shape)


def run_vjp(op_name: str, argnum: int, g: Any, out: Any, inputs: Sequence[Any], attrs: dict) -> Any:
    """Gradient of ``op_name``'s input ``argnum``, un-broadcast to that input's shape."""
    op = get_op(op_name)
    if op.arity is None:
        assert op.vjp_n is not None
        grad = op.vjp_n(argnum, g, out, *inputs, **attrs)
    else:
        vjp = op.vjps[argnum]
        assert vjp is not None, f"{op_name} input {argnum} takes no gradient"
        grad = vjp(g, out, *inputs, **attrs)
    x = inputs[argnum]
    grad = unbroadcast(grad, np.shape(x))
    dtype = getattr(x, "dtype", None)
    if dtype is not None and dtype.kind == "f" and getattr(grad, "dtype", dtype) != dtype:
        grad = np.asarray(grad, dtype=dtype)
    return grad


# --- helpers used by several rows -------------------------------------------------------------


def _axes(axis: int | Sequence[int] | None, ndim: int) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, int):
        axis = (axis,)
    return tuple(a % ndim if ndim else a for a in axis)


def _expand_reduced(g: Any, x: Any, axis: Any, keepdims: bool) -> Any:
    """Give a reduction's gradient back its reduced axes so it broadcasts against ``x``."""
    if keepdims:
        return g
    return np.expand_dims(g, _axes(axis, np.ndim(x))) if np.ndim(x) else g


def _count(x: Any, axis: Any) -> int:
    shape = np.shape(x)
    return int(np.prod([shape[a] for a in _axes(axis, len(shape))], dtype=np.int64))


def _sigmoid(x: Any) -> Any:
    # Two branches so neither exp overflows.
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


def _softplus(x: Any) -> Any:
    return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0)


def _log_softmax(x: Any, axis: int = -1) -> Any:
    shifted = x - np.max(x, axis=axis, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def _softmax(x: Any, axis: int = -1) -> Any:
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def _matmul_promoted(g: Any, a: Any, b: Any) -> tuple[Any, Any, Any]:
    """Operands and gradient with 1-D operands promoted the way ``np.matmul`` promotes them."""
    a2 = a[None, :] if np.ndim(a) == 1 else a
    b2 = b[:, None] if np.ndim(b) == 1 else b
    g2 = g
    if np.ndim(b) == 1:
        g2 = np.expand_dims(g2, -1)
    if np.ndim(a) == 1:
        g2 = np.expand_dims(g2, -2)
    return g2, a2, b2


def _matmul_vjp_a(g: Any, out: Any, a: Any, b: Any) -> Any:
    g2, a2, b2 = _matmul_promoted(g, a, b)
    ga = np.matmul(g2, np.swapaxes(b2, -1, -2))
    if np.ndim(a) == 1:
        ga = unbroadcast(ga, (1,) * (ga.ndim - 2) + a2.shape)[..., 0, :].reshape(a.shape)
    return ga


def _matmul_vjp_b(g: Any, out: Any, a: Any, b: Any) -> Any:
    g2, a2, b2 = _matmul_promoted(g, a, b)
    gb = np.matmul(np.swapaxes(a2, -1, -2), g2)
    if np.ndim(b) == 1:
        gb = unbroadcast(gb, (1,) * (gb.ndim - 2) + b2.shape)[..., :, 0].reshape(b.shape)
    return gb


def _index_key(index: Sequence[Any]) -> tuple[Any, ...]:
    """Decode the JSON form of an index: ints, [start, stop, step] slices, None, '...', lists."""
    key: list[Any] = []
    for item in index:
        if isinstance(item, dict) and "slice" in item:
            key.append(slice(*item["slice"]))
        elif item == "...":
            key.append(Ellipsis)
        elif isinstance(item, list):
            key.append(np.asarray(item, dtype=np.int64))
        else:
            key.append(item)  # int or None (new axis)
    return tuple(key)


def _index_vjp(g: Any, out: Any, x: Any, index: Sequence[Any]) -> Any:
    grad = np.zeros(np.shape(x), dtype=np.result_type(g, x))
    np.add.at(grad, _index_key(index), g)  # add.at: repeated indices accumulate
    return grad


def _concat_vjp(i: int, g: Any, out: Any, *xs: Any, axis: int = 0) -> Any:
    # ``out`` is not passed (concat does not use it): ``g`` has the output's shape.
    ax = axis % np.ndim(g)
    start = sum(np.shape(x)[ax] for x in xs[:i])
    sl = [slice(None)] * np.ndim(g)
    sl[ax] = slice(start, start + np.shape(xs[i])[ax])
    return g[tuple(sl)]


def _max_vjp(g: Any, out: Any, x: Any, axis: Any = None, keepdims: bool = False) -> Any:
    g = _expand_reduced(g, x, axis, keepdims)
    m = _expand_reduced(out, x, axis, keepdims)
    hit = x == m
    # Ties share the gradient equally, so the VJP is the average of the subgradients.
    return g * hit / np.sum(hit, axis=_axes(axis, np.ndim(x)), keepdims=True)


def _check_labels(logits: Any, labels: Any) -> None:
    """Class indices must lie in [0, classes): numpy would wrap -1 to the last class."""
    classes = np.shape(logits)[-1] if np.ndim(logits) else 0
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        bad = (labels < 0) | (labels >= classes)
        idx = np.unravel_index(int(np.argmax(bad)), labels.shape) if labels.ndim else ()
        raise ValueError(
            f"integer labels must be class indices in [0, {classes}); found {labels[idx].item()}"
            + (f" at index {list(map(int, idx))}" if labels.ndim else "")
            + f" ({int(np.count_nonzero(bad))} out of range)"
        )


def _cross_entropy(logits: Any, labels: Any) -> Any:
    logp = _log_softmax(logits, axis=-1)
    if np.issubdtype(np.asarray(labels).dtype, np.integer):
        _check_labels(logits, labels)
        picked = np.take_along_axis(logp, np.expand_dims(labels, -1), axis=-1)[..., 0]
        return -np.mean(picked)
    return -np.mean(np.sum(labels * logp, axis=-1))


def _ce_target(logits: Any, labels: Any) -> Any:
    """Labels as a distribution: integer classes become one-hot rows."""
    if np.issubdtype(np.asarray(labels).dtype, np.integer):
        _check_labels(logits, labels)
        onehot = np.zeros(np.shape(logits), dtype=logits.dtype)
        np.put_along_axis(onehot, np.expand_dims(labels, -1), 1, axis=-1)
        return onehot
    return labels


def _mse_vjp(g: Any, pred: Any, target: Any) -> Any:
    diff = pred - target
    return g * 2 * diff / np.size(diff)


def _rows(x: Any) -> int:
    return int(np.prod(np.shape(x)[:-1], dtype=np.int64))


def _zeros_like_grad(g: Any, out: Any, *xs: Any, **attrs: Any) -> Any:
    return np.zeros_like(out)


# --- the table --------------------------------------------------------------------------------
# fmt: off

# Elementwise arithmetic (numpy broadcasting; run_vjp un-broadcasts)
defop("add", lambda a, b: a + b,
      lambda g, out, a, b: g,
      lambda g, out, a, b: g, elementwise=True)
defop("sub", lambda a, b: a - b,
      lambda g, out, a, b: g,
      lambda g, out, a, b: -g, elementwise=True)
defop("mul", lambda a, b: a * b,
      lambda g, out, a, b: g * b,
      lambda g, out, a, b: g * a, elementwise=True)
defop("div", lambda a, b: a / b,
      lambda g, out, a, b: g / b,
      lambda g, out, a, b: -g * a / (b * b), elementwise=True)
defop("neg", lambda a: -a,
      lambda g, out, a: -g, elementwise=True)
defop("pow", lambda a, exponent: a ** exponent,
      lambda g, out, a, exponent: g * exponent * a ** (exponent - 1),
      elementwise=True, flops_per_element=10)
defop("maximum", np.maximum,
      lambda g, out, a, b: g * (a >= b),
      lambda g, out, a, b: g * (a < b), elementwise=True)
defop("minimum", np.minimum,
      lambda g, out, a, b: g * (a <= b),
      lambda g, out, a, b: g * (a > b), elementwise=True)

# Elementwise functions
defop("exp", np.exp,
      lambda g, out, a: g * out, uses_out=True, elementwise=True, flops_per_element=10)
defop("log", np.log,
      lambda g, out, a: g / a, elementwise=True, flops_per_element=10)
defop("sqrt", np.sqrt,
      lambda g, out, a: g / (2 * out), uses_out=True, elementwise=True, flops_per_element=4)
defop("abs", np.abs,
      lambda g, out, a: g * np.sign(a), elementwise=True)
defop("relu", lambda a: np.maximum(a, 0),
      lambda g, out, a: g * (a > 0), elementwise=True)
defop("sigmoid", _sigmoid,
      lambda g, out, a: g * out * (1 - out), uses_out=True, elementwise=True,
      flops_per_element=10)
defop("tanh", np.tanh,
      lambda g, out, a: g * (1 - out * out), uses_out=True, elementwise=True,
      flops_per_element=10)
defop("softplus", _softplus,
      lambda g, out, a: g * _sigmoid(a), elementwise=True, flops_per_element=20)
defop("where", lambda cond, a, b: np.where(cond, a, b),
      None,
      lambda g, out, cond, a, b: np.where(cond, g, 0),
      lambda g, out, cond, a, b: np.where(cond, 0, g), elementwise=True)
defop("stop_gradient", lambda a: a,
      None, elementwise=True)
defop("identity", lambda a: a,
      lambda g, out, a: g, elementwise=True)
defop("cast", lambda a, dtype: np.asarray(a).astype(dtype),
      lambda g, out, a, dtype: np.asarray(g).astype(np.asarray(a).dtype), elementwise=True)

# Linear algebra
defop("matmul", np.matmul,
      _matmul_vjp_a,
      _matmul_vjp_b)

# Reductions (axis: int, list of ints or None)
defop("sum", lambda a, axis=None, keepdims=False: np.sum(a, axis=_tuple(axis), keepdims=keepdims),
      lambda g, out, a, axis=None, keepdims=False:
          np.broadcast_to(_expand_reduced(g, a, axis, keepdims), np.shape(a)))
defop("mean", lambda a, axis=None, keepdims=False: np.mean(a, axis=_tuple(axis), keepdims=keepdims),
      lambda g, out, a, axis=None, keepdims=False:
          np.broadcast_to(_expand_reduced(g, a, axis, keepdims), np.shape(a)) / _count(a, axis))
defop("max", lambda a, axis=None, keepdims=False: np.max(a, axis=_tuple(axis), keepdims=keepdims),
      _max_vjp, uses_out=True)

# Shape manipulation
defop("reshape", lambda a, shape: np.reshape(a, shape),
      lambda g, out, a, shape: np.reshape(g, np.shape(a)), flops_per_element=0)
defop("transpose", lambda a, axes=None: np.transpose(a, axes),
      lambda g, out, a, axes=None:
          np.transpose(g, None if axes is None else np.argsort(axes)), flops_per_element=0)
defop("broadcast_to", lambda a, shape: np.broadcast_to(a, shape),
      lambda g, out, a, shape: g, flops_per_element=0)
defop("index", lambda a, index: a[_index_key(index)],
      _index_vjp, flops_per_element=0)
defop("concat", lambda *xs, axis=0: np.concatenate(xs, axis=axis),
      vjp_n=_concat_vjp, arity=None, flops_per_element=0)

# Softmax family and losses
defop("softmax", _softmax,
      lambda g, out, a, axis=-1: out * (g - np.sum(g * out, axis=axis, keepdims=True)),
      uses_out=True, flops_per_element=15)
defop("log_softmax", _log_softmax,
      lambda g, out, a, axis=-1: g - np.exp(out) * np.sum(g, axis=axis, keepdims=True),
      uses_out=True, flops_per_element=15)
defop("mse", lambda pred, target: np.mean((pred - target) ** 2),
      lambda g, out, pred, target: _mse_vjp(g, pred, target),
      lambda g, out, pred, target: -_mse_vjp(g, pred, target), flops_per_element=3)
defop("cross_entropy", _cross_entropy,
      lambda g, out, logits, labels:
          g * (_softmax(logits, -1) - _ce_target(logits, labels)) / _rows(logits),
      lambda g, out, logits, labels: -g * _log_softmax(logits, -1) / _rows(logits),
      flops_per_element=20)

# Gradient plumbing that autodiff inserts
defop("ones_like", lambda a: np.ones_like(a),
      _zeros_like_grad, flops_per_element=0, differentiable=False)
defop("zeros_like", lambda a: np.zeros_like(a),
      _zeros_like_grad, flops_per_element=0, differentiable=False)
defop("add_n", lambda *xs: _add_n(xs),
      vjp_n=lambda i, g, out, *xs: g, arity=None, differentiable=False)

# fmt: on


def _tuple(axis: Any) -> Any:
    """JSON has no tuples: axis lists come back as lists, numpy wants a tuple."""
    return tuple(axis) if isinstance(axis, list) else axis


def _add_n(xs: Sequence[Any]) -> Any:
    total = xs[0]
    for x in xs[1:]:
        total = total + x  # left to right, so accumulation order is the input order
    return total


def run_op(op_name: str, inputs: Sequence[Any], attrs: dict) -> Any:
    """Apply a registered op's forward (``vjp`` nodes are dispatched to :func:`run_vjp`)."""
    if op_name == "vjp":
        g, rest = inputs[0], inputs[1:]
        op = get_op(attrs["op"])
        out, fwd_inputs = (rest[0], rest[1:]) if op.uses_out else (None, rest)
        return run_vjp(attrs["op"], attrs["argnum"], g, out, fwd_inputs, attrs.get("attrs", {}))
    return get_op(op_name).forward(*inputs, **attrs)


#: The ops distgraph itself defines (custom ops registered later are not in this set).
BUILTIN_OPS = frozenset(OPS)
