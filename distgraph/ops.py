"""The op registry: each op's forward and its vector-Jacobian products side by side.

A row reads ``defop(name, forward, vjp_for_input_0, vjp_for_input_1, ..., attrs={...})``. A VJP
receives the upstream gradient ``g``, the forward output ``out`` and the forward inputs, and
returns the gradient for its input *before* un-broadcasting: :func:`unbroadcast` is applied
once, by :func:`run_vjp`, for every op. ``None`` in a VJP slot marks an input that takes no gradient
(labels, conditions). Variadic ops (``concat``, ``add_n``) give one VJP that also receives
the input's index.

``attrs`` declares every attribute the op takes (:class:`Attr`: kind, required or default,
allowed values or range). Nodes are checked against it when they are built, from the API or
from a spec file, so a kernel only ever receives declared attributes of the declared kinds:
an undeclared name (numpy's ``where=`` or ``out=``, say) never reaches numpy.

Everything here is numpy on plain arguments: attributes are JSON values, so the same table runs
in the driver, in the reference executor and inside Ray workers.
"""

from __future__ import annotations

import functools
import math
import numbers
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import GraphError, SpecError, UnknownOpError

Array = np.ndarray
VJP = Callable[..., Any]


#: Attribute kinds an op can declare, and what a value of each kind must be.
ATTR_KINDS = {
    "bool": "true or false",
    "int": "an integer",
    "float": "a finite number",
    "str": "a string",
    "dtype": "a dtype name such as 'float32'",
    "axis": "an integer axis within the input's rank",
    "axes": "an axis or a list of distinct axes within the input's rank",
    "perm": "a list of axes: a permutation of the input's axes",
    "shape": "a list of non-negative integers",
    "reshape": "a list of integers >= -1 with at most one -1",
    "index": "a list of ints, null, '...', {'slice': [start, stop, step]} or int lists",
}
#: Most dimensions an array may have (numpy's limit).
MAX_DIMS = 64
#: Most elements a shape attribute may describe (more cannot be addressed).
MAX_ELEMENTS = 2**62


@dataclass(frozen=True)
class Attr:
    """One declared attribute of an op.

    ``kind`` is a key of :data:`ATTR_KINDS`. An attribute is optional unless ``required``;
    ``default`` documents the value the kernel uses when it is absent (``None`` as default also
    allows an explicit ``null``). ``choices`` restricts values to a set; ``low``/``high`` bound
    ``int``/``float`` kinds (inclusive). ``check(value, input_shapes)`` may return a problem
    (a string) for rules the kinds cannot say.
    """

    kind: str
    required: bool = False
    default: Any = None
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    check: Callable[[Any, Sequence[Any]], str | None] | None = None
    doc: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ATTR_KINDS:
            raise ValueError(f"unknown attribute kind {self.kind!r}; kinds: {sorted(ATTR_KINDS)}")

    def describe(self) -> str:
        """The kind, bounds and default in words (for error messages and docs)."""
        text = ATTR_KINDS[self.kind]
        if self.choices is not None:
            text += f" in {list(self.choices)}"
        if self.low is not None or self.high is not None:
            text += f" in [{self.low if self.low is not None else '-inf'}, "
            text += f"{self.high if self.high is not None else 'inf'}]"
        return text + (", required" if self.required else f", default {self.default!r}")

    def problem(self, value: Any, shapes: Sequence[Any]) -> str | None:
        """What is wrong with ``value`` for inputs of ``shapes`` (None when it is fine)."""
        if value is None:
            if self.default is None and not self.required:
                return None
            return f"must be {ATTR_KINDS[self.kind]}, got null"
        rank = len(shapes[0]) if shapes and shapes[0] is not None else None
        why = _KIND_CHECKS[self.kind](value, rank)
        if why is None and self.choices is not None and value not in self.choices:
            why = f"must be one of {list(self.choices)}"
        if why is None and _out_of_range(value, self.low, self.high):
            why = f"is out of range [{self.low}, {self.high}]"
        if why is None and self.check is not None:
            why = self.check(value, shapes)
        return why


def _out_of_range(value: Any, low: float | None, high: float | None) -> bool:
    return (low is not None and value < low) or (high is not None and value > high)


def _is_int(v: Any) -> bool:
    # bool is a subclass of int in Python: True must not pass for an axis or a dimension.
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _check_bool(v: Any, rank: int | None) -> str | None:
    return None if isinstance(v, (bool, np.bool_)) else "must be true or false"


def _check_int(v: Any, rank: int | None) -> str | None:
    return None if _is_int(v) else "must be an integer"


def _check_float(v: Any, rank: int | None) -> str | None:
    if not isinstance(v, numbers.Real) or isinstance(v, (bool, np.bool_)):
        return "must be a number"
    return None if math.isfinite(v) else "must be finite"


def _check_str(v: Any, rank: int | None) -> str | None:
    return None if isinstance(v, str) else "must be a string"


def _check_dtype(v: Any, rank: int | None) -> str | None:
    if not isinstance(v, str):
        return "must be a dtype name (a string)"
    try:
        dt = np.dtype(v)
    except Exception:  # numpy raises TypeError, ValueError or SyntaxError for odd names
        return "is not a dtype name"
    if dt.names is not None or dt.subdtype is not None:
        return "names a structured or subarray dtype"  # would change the value's shape
    # Allowed dtypes are checked on the op's result, where an unsupported one is a DTypeError.
    return None


def _check_axis(v: Any, rank: int | None) -> str | None:
    if not _is_int(v):
        return "must be an integer axis"
    if rank is not None and not -rank <= v < rank:
        return f"is out of range for an input of rank {rank} (allowed: {-rank}..{rank - 1})"
    return None


def _check_axes(v: Any, rank: int | None) -> str | None:
    if _is_int(v):
        return _check_axis(v, rank)
    if not isinstance(v, list) or len(v) > MAX_DIMS:
        return "must be an axis, a list of axes or null"
    for a in v:
        if (why := _check_axis(a, rank)) is not None:
            return f"entry {a!r} {why}"
    if rank is not None and len({a % rank for a in v}) != len(v):
        return "names an axis twice"
    return None


def _check_perm(v: Any, rank: int | None) -> str | None:
    if not isinstance(v, list) or len(v) > MAX_DIMS or not all(map(_is_int, v)):
        return "must be a list of axes or null"
    n = len(v) if rank is None else rank
    if len(v) != n or sorted(a % n if n else a for a in v) != list(range(n)):
        return f"must be a permutation of the {n} axes of the input"
    if any(not -n <= a < n for a in v):
        return f"has an axis out of range for an input of rank {n}"
    return None


def _check_dims(v: Any, low: int) -> str | None:
    if not isinstance(v, list) or not all(map(_is_int, v)):
        return "must be a list of integers"
    if len(v) > MAX_DIMS:
        return f"has {len(v)} dimensions, more than {MAX_DIMS}"
    bad = [d for d in v if d < low]
    if bad:
        return f"has dimension {bad[0]} (dimensions must be >= {low})"
    if math.prod(d for d in v if d > 0) > MAX_ELEMENTS:
        return f"describes more than {MAX_ELEMENTS} elements"
    return None


def _check_shape(v: Any, rank: int | None) -> str | None:
    return _check_dims(v, 0)


def _check_reshape(v: Any, rank: int | None) -> str | None:
    why = _check_dims(v, -1)
    if why is None and v.count(-1) > 1:
        return "has more than one -1"
    return why


def _check_int_list(v: Any, depth: int = 0) -> bool:
    if depth > MAX_DIMS:
        return False
    return all(_is_int(x) or (isinstance(x, list) and _check_int_list(x, depth + 1)) for x in v)


def _check_index(v: Any, rank: int | None) -> str | None:
    if not isinstance(v, list) or len(v) > MAX_DIMS:
        return f"must be a list of at most {MAX_DIMS} index items"
    ellipses = 0
    for item in v:
        if item is None or _is_int(item):
            continue
        if item == "...":
            ellipses += 1
            continue
        if isinstance(item, dict):
            part = item.get("slice")
            if (
                set(item) != {"slice"}
                or not isinstance(part, list)
                or len(part) != 3
                or not all(p is None or _is_int(p) for p in part)
            ):
                return f"item {item!r} must be {{'slice': [start, stop, step]}} of ints or nulls"
            if part[2] == 0:
                return "has a slice with step 0"
            continue
        if isinstance(item, list):
            if not _check_int_list(item):
                return f"item {_short(item)} must be a (nested) list of integers"
            try:
                np.asarray(item, dtype=np.int64)
            except (ValueError, OverflowError):
                return f"item {_short(item)} is ragged or out of the int64 range"
            continue
        return f"item {_short(item)} is not an int, null, '...', a slice or an int list"
    if ellipses > 1:
        return "has more than one '...'"
    return None


_KIND_CHECKS: dict[str, Callable[[Any, int | None], str | None]] = {
    "bool": _check_bool,
    "int": _check_int,
    "float": _check_float,
    "str": _check_str,
    "dtype": _check_dtype,
    "axis": _check_axis,
    "axes": _check_axes,
    "perm": _check_perm,
    "shape": _check_shape,
    "reshape": _check_reshape,
    "index": _check_index,
}


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_attrs(op: Op, attrs: Mapping[str, Any], shapes: Sequence[Any], node: object) -> None:
    """Refuse attributes ``op`` does not declare, and values of the wrong kind or range.

    ``shapes`` are the input shapes (None when unknown; axes are checked against the first
    input's rank when it is known). Raises :class:`SpecError` naming ``node`` and the attribute.
    """
    declared = op.attrs
    if not isinstance(attrs, Mapping):
        raise SpecError(
            f"node {node!r} (op {op.name}): attrs must be an object, got {_short(attrs)}"
        )
    for key, value in attrs.items():
        decl = declared.get(key) if isinstance(key, str) else None
        if decl is None:
            takes = ", ".join(sorted(declared)) if declared else "no attributes"
            raise SpecError(
                f"node {node!r} (op {op.name}): attribute {key!r} is not declared by {op.name} "
                f"(it takes {takes})"
            )
        why = decl.problem(value, shapes)
        if why is not None:
            raise SpecError(
                f"node {node!r} (op {op.name}): attribute {key!r} = {_short(value)} {why} "
                f"(expected {decl.describe()})"
            )
    for key in op.required_attrs:
        if key not in attrs:
            raise SpecError(
                f"node {node!r} (op {op.name}): attribute {key!r} is required "
                f"({declared[key].describe()})"
            )


#: The op of the gradient nodes autodiff inserts (see :data:`VJP_ROW`).
VJP_NAME = "vjp"
#: The attributes of a ``vjp`` node (the gradient of input ``argnum`` of a node of ``op``).
VJP_ATTRS = frozenset({"op", "argnum", "attrs"})


@dataclass(frozen=True)
class Op:
    """One registry row: forward, per-input VJPs, and facts the compiler needs."""

    name: str
    forward: Callable[..., Any]
    vjps: tuple[VJP | None, ...] = ()
    #: The module that registered the row (tells distgraph's own ops from custom ones).
    module: str = ""
    #: For variadic ops: ``vjp_n(i, g, out, *inputs, **attrs)``.
    vjp_n: VJP | None = None
    arity: int | None = None  # None: variadic
    uses_out: bool = False  # whether the VJPs read the forward output
    elementwise: bool = False  # output shape = broadcast of input shapes
    differentiable: bool = True
    #: Rough floating-point operations per output element, for the cost model.
    flops_per_element: float = 1.0
    #: Only moves elements (its result's shape can be found on zero-byte stand-ins).
    movement: bool = False
    #: Declared attributes: name -> Attr. Nodes may carry only these (see check_attrs).
    attrs: Mapping[str, Attr] = field(default_factory=dict)
    #: VJPs that are ordinary forward ops on the cotangent alone: ``vjp_as_op(input_shapes,
    #: input_dtypes, out_dtype, attrs)`` returns, per input, ``(op, attrs)`` or None (then the
    #: generic ``vjp`` node, which reads every input, is used); or None for all inputs.
    vjp_as_op: Callable[..., list[tuple[str, dict[str, Any]] | None] | None] | None = None
    #: For rows whose cost depends on their attrs (vjp): ``cost_rule(attrs)`` gives the op
    #: whose rate and flops rule apply, a factor on the rate, and where its operands start
    #: among the node's inputs.
    cost_rule: Callable[[Mapping[str, Any]], tuple[str, float, int]] | None = None
    #: For rows whose result has the shape and dtype of one input (vjp): ``result_like(attrs)``
    #: gives that input's index; the node is then checked by ``check_node`` instead of being
    #: inferred, and takes that input's (declared) shape and dtype.
    result_like: Callable[[Mapping[str, Any]], int] | None = None
    #: ``check_node(name, inputs, attrs, input_shapes)``: a row's own check of a node read from
    #: a spec, replacing :func:`check_attrs` (vjp: its attrs name another op's row).
    check_node: Callable[[str, Sequence[str], Mapping[str, Any], Sequence[Any]], None] | None = None
    #: The phase of every node of this op (None: the node's own).
    phase: str | None = None
    #: How a node of this op is named in messages and traces (default: the op's name).
    label: Callable[[Mapping[str, Any]], str] | None = None

    def node_label(self, attrs: Mapping[str, Any]) -> str:
        """What messages and traces call a node of this op with ``attrs``."""
        return self.name if self.label is None else self.label(attrs)

    #: Shape and dtype rule ``infer(shapes, dtypes, attrs, node) -> (shape, dtype)`` (None in
    #: either for unknown), raising ShapeError/DTypeError; None: found by running the op on
    #: stand-in values (which cannot work for ops that need, say, 4-D inputs or integer ids).
    infer: Callable[..., tuple[Any, Any]] | None = None
    #: Cost rule ``flops(out_shape, input_shapes, attrs, argnum)``: operations of the forward
    #: (argnum None) or of input ``argnum``'s VJP, on concrete shapes; None: per element.
    flops: Callable[..., float] | None = None

    @functools.cached_property
    def required_attrs(self) -> tuple[str, ...]:
        """Names of the attributes every node of this op must carry."""
        return tuple(k for k, a in self.attrs.items() if a.required)

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
    attrs: Mapping[str, Attr] | None = None,
    **facts: Any,
) -> Op:
    """Register an op; the number of VJPs gives the arity unless ``arity`` says otherwise.

    ``attrs`` declares the op's attributes, e.g. ``{"scale": Attr("float", default=1.0)}``;
    an op that declares none accepts none.
    """
    if name in OPS or name in LEAF_OPS or name == VJP_NAME:
        raise ValueError(f"op {name!r} is already registered")
    declared = dict(attrs or {})
    for key, decl in declared.items():
        if not isinstance(key, str) or not isinstance(decl, Attr):
            raise TypeError(f"op {name!r}: attrs must map names to Attr, got {key!r}: {decl!r}")
    op = Op(
        name,
        forward,
        tuple(vjps),
        module=sys._getframe(1).f_globals.get("__name__", ""),
        arity=len(vjps) if arity == -1 else arity,
        attrs=declared,
        **facts,
    )
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


def node_op(name: str) -> Op:
    """The row of a node's op: a registered op, or :data:`VJP_ROW` (which the graph API cannot
    build, so it is not in ``OPS``); raises :class:`UnknownOpError` like :func:`get_op`."""
    return VJP_ROW if name == VJP_NAME else get_op(name)


def find_op(name: str) -> Op | None:
    """:func:`node_op`, or None for an unknown op (cost estimates tolerate one)."""
    return VJP_ROW if name == VJP_NAME else OPS.get(name)


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


def _transposed(x: Any) -> Any:
    """``x`` with its last two axes swapped, as an operand of matmul: BLAS reads a transposed
    2-D view in place, but numpy's batched matmul on a transposed view is ~2.5x slower than
    a copy followed by the matmul (measured at attention sizes)."""
    t = np.swapaxes(x, -1, -2)
    return np.ascontiguousarray(t) if np.ndim(t) > 2 else t


def _matmul_vjp_a(g: Any, out: Any, a: Any, b: Any) -> Any:
    if np.ndim(b) == 2 and np.ndim(a) > 2 and np.ndim(g) == np.ndim(a):
        # A linear layer on N-D rows: one GEMM over all rows (numpy would loop over the batch).
        return (np.reshape(g, (-1, g.shape[-1])) @ b.T).reshape(*g.shape[:-1], b.shape[0])
    g2, a2, b2 = _matmul_promoted(g, a, b)
    ga = np.matmul(g2, _transposed(b2))
    if np.ndim(a) == 1:
        ga = unbroadcast(ga, (1,) * (ga.ndim - 2) + a2.shape)[..., 0, :].reshape(a.shape)
    return ga


def _matmul_vjp_b(g: Any, out: Any, a: Any, b: Any) -> Any:
    if np.ndim(b) == 2 and np.ndim(a) > 2 and np.ndim(g) == np.ndim(a):
        # The weight of a linear layer on N-D rows: one GEMM contracting every row, instead of
        # a batch of products summed afterwards.
        return np.reshape(a, (-1, a.shape[-1])).T @ np.reshape(g, (-1, g.shape[-1]))
    g2, a2, b2 = _matmul_promoted(g, a, b)
    gb = np.matmul(_transposed(a2), g2)
    if np.ndim(b) == 1:
        gb = unbroadcast(gb, (1,) * (gb.ndim - 2) + b2.shape)[..., :, 0].reshape(b.shape)
    return gb


def encode_index(key: Any) -> list[Any]:
    """An indexing key as JSON: ints, {'slice': [start, stop, step]}, None, '...', int lists."""
    if not isinstance(key, tuple):
        key = (key,)
    out: list[Any] = []
    for k in key:
        if isinstance(k, slice):
            out.append({"slice": [k.start, k.stop, k.step]})
        elif k is Ellipsis:
            out.append("...")
        elif k is None or (isinstance(k, (int, np.integer)) and not isinstance(k, bool)):
            out.append(None if k is None else int(k))
        elif isinstance(k, (list, np.ndarray)) and np.asarray(k).dtype.kind in "iu":
            out.append(np.asarray(k).tolist())
        else:
            raise GraphError(f"unsupported index {k!r}: use ints, slices, None, ... or int lists")
    return out


def _matmul_flops(out: Any, ins: Sequence[Any], attrs: dict, argnum: int | None) -> float:
    """2*M*N*K per batch entry, plus writing the result: small batched products (attention's
    T x d by d x T) are bound by memory, not by BLAS's peak (see nnops.MOVE_FLOPS)."""
    from .nnops import MOVE_FLOPS

    k = ins[0][-1] if ins[0] else 1
    written = math.prod(out) if argnum is None else math.prod(ins[argnum])
    return 2.0 * math.prod(out) * k + MOVE_FLOPS * written


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


def _concat_vjp_as_op(
    shapes: Sequence[Any], dtypes: Sequence[Any], out_dtype: Any, attrs: dict
) -> list[tuple[str, dict[str, Any]] | None] | None:
    """Each input's share of concat's cotangent as an ``index`` node that reads only the
    cotangent: generic vjp nodes would each read all N inputs (O(N^2) for a long concat).

    An input gets one when the bounds of its slice are known from the shapes (counted from
    the start or from the end) and its dtype is the output's (else the generic VJP casts)."""
    if any(s is None for s in shapes) or not shapes[0]:
        return None
    axis = attrs.get("axis", 0) % len(shapes[0])
    sizes = [s[axis] for s in shapes]
    starts: list[int | None] = []  # elements before each input, when known
    total: int | None = 0
    for d in sizes:
        starts.append(total)
        total = None if total is None or d is None else total + d
    ends: list[int | None] = []  # elements after each input, when known
    total = 0
    for d in reversed(sizes):
        ends.append(total)
        total = None if total is None or d is None else total + d
    ends.reverse()
    rules: list[tuple[str, dict[str, Any]] | None] = []
    for size, start, end, dtype in zip(sizes, starts, ends, dtypes):
        if dtype != out_dtype:
            bounds = None
        elif start is not None and size is not None:
            bounds = [start, start + size]
        elif end is not None and size is not None:
            bounds = [-(end + size), -end if end else None]
        elif start is not None and end is not None:
            bounds = [start, -end if end else None]
        else:  # batch-sized inputs on both sides: only the generic VJP knows where it starts
            bounds = None
        if bounds is None:
            rules.append(None)
            continue
        index: list[Any] = [{"slice": [None, None, None]} for _ in range(axis)]
        index.append({"slice": [*bounds, None]})
        rules.append(("index", {"index": index}))
    return rules


#: Attributes of the reductions.
_REDUCE = {"axis": Attr("axes", default=None), "keepdims": Attr("bool", default=False)}


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
      attrs={"exponent": Attr("float", required=True)},
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
      lambda g, out, a, dtype: np.asarray(g).astype(np.asarray(a).dtype),
      attrs={"dtype": Attr("dtype", required=True)}, elementwise=True)

# Linear algebra
defop("matmul", np.matmul,
      _matmul_vjp_a,
      _matmul_vjp_b, flops=_matmul_flops)

# Reductions (axis: int, list of ints or None)
defop("sum", lambda a, axis=None, keepdims=False: np.sum(a, axis=_tuple(axis), keepdims=keepdims),
      lambda g, out, a, axis=None, keepdims=False:
          np.broadcast_to(_expand_reduced(g, a, axis, keepdims), np.shape(a)),
      attrs=_REDUCE)
defop("mean", lambda a, axis=None, keepdims=False: np.mean(a, axis=_tuple(axis), keepdims=keepdims),
      lambda g, out, a, axis=None, keepdims=False:
          np.broadcast_to(_expand_reduced(g, a, axis, keepdims), np.shape(a)) / _count(a, axis),
      attrs=_REDUCE)
defop("max", lambda a, axis=None, keepdims=False: np.max(a, axis=_tuple(axis), keepdims=keepdims),
      _max_vjp, attrs=_REDUCE, uses_out=True)

# Shape manipulation
defop("reshape", lambda a, shape: np.reshape(a, shape),
      lambda g, out, a, shape: np.reshape(g, np.shape(a)),
      attrs={"shape": Attr("reshape", required=True)}, flops_per_element=0, movement=True)
defop("transpose", lambda a, axes=None: np.transpose(a, axes),
      lambda g, out, a, axes=None:
          np.transpose(g, None if axes is None else np.argsort(axes)),
      attrs={"axes": Attr("perm", default=None)}, flops_per_element=0, movement=True)
defop("broadcast_to", lambda a, shape: np.broadcast_to(a, shape),
      lambda g, out, a, shape: g,
      attrs={"shape": Attr("shape", required=True)}, flops_per_element=0, movement=True)
defop("index", lambda a, index: a[_index_key(index)],
      _index_vjp,
      attrs={"index": Attr("index", required=True)}, flops_per_element=0, movement=True)
defop("concat", lambda *xs, axis=0: np.concatenate(xs, axis=axis),
      vjp_n=_concat_vjp, vjp_as_op=_concat_vjp_as_op, arity=None,
      attrs={"axis": Attr("axis", default=0)}, flops_per_element=0)

# Softmax family and losses
defop("softmax", _softmax,
      lambda g, out, a, axis=-1: out * (g - np.sum(g * out, axis=axis, keepdims=True)),
      attrs={"axis": Attr("axis", default=-1)}, uses_out=True, flops_per_element=15)
defop("log_softmax", _log_softmax,
      lambda g, out, a, axis=-1: g - np.exp(out) * np.sum(g, axis=axis, keepdims=True),
      attrs={"axis": Attr("axis", default=-1)}, uses_out=True, flops_per_element=15)
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
    """Apply a node's op (a registered op's forward, or a ``vjp`` node's gradient)."""
    return node_op(op_name).forward(*inputs, **attrs)


# --- the row of the gradient nodes autodiff inserts -------------------------------------------
# A ``vjp`` node computes input ``argnum``'s share of the gradient of a node of op ``op`` (with
# forward attrs ``attrs``). Its inputs: the cotangent, the forward output when that op's VJPs
# read it, then the forward inputs. Autodiff builds these nodes; specs carry them; the graph
# API cannot (``apply`` looks ops up in ``OPS``, which does not hold this row).


def _vjp_forward(g: Any, *rest: Any, op: str, argnum: int, attrs: dict | None = None) -> Any:
    fwd = get_op(op)
    out, inputs = (rest[0], rest[1:]) if fwd.uses_out else (None, rest)
    return run_vjp(op, argnum, g, out, inputs, attrs or {})


def _vjp_offset(attrs: Mapping[str, Any]) -> int:
    """Where the forward inputs start among a vjp node's inputs."""
    fwd = OPS.get(attrs.get("op"))  # type: ignore[arg-type]
    return 1 + int(fwd is not None and fwd.uses_out)


def _vjp_result_like(attrs: Mapping[str, Any]) -> int:
    return _vjp_offset(attrs) + int(attrs["argnum"])


def _vjp_cost_rule(attrs: Mapping[str, Any]) -> tuple[str, float, int]:
    # A VJP costs about twice its forward per element; a matmul's VJP is a matmul.
    return attrs.get("op"), 2.0, _vjp_offset(attrs)  # type: ignore[return-value]


def _vjp_check_node(
    name: str, inputs: Sequence[str], attrs: Mapping[str, Any], shapes: Sequence[Any]
) -> None:
    """A vjp node from a spec: its attrs name a registered op and a differentiable input of
    it, it has that op's inputs, and the forward attrs are valid for that op."""
    argnum = attrs.get("argnum")
    if (
        not isinstance(attrs.get("op"), str)
        or not isinstance(argnum, int)
        or isinstance(argnum, bool)
        or argnum < 0
    ):
        raise SpecError(
            f"nodes.{name}.attrs: a vjp node needs 'op' (a name) and 'argnum' "
            f"(an int >= 0), got op={attrs.get('op')!r}, argnum={argnum!r}"
        )
    if not isinstance(attrs.get("attrs", {}), dict):
        raise SpecError(f"nodes.{name}.attrs.attrs: must be an object")
    extra = sorted(set(attrs) - VJP_ATTRS)
    if extra:
        raise SpecError(
            f"node {name!r} (op vjp): attribute {extra[0]!r} is not declared "
            f"(a vjp node takes {', '.join(sorted(VJP_ATTRS))})"
        )
    try:
        op = get_op(attrs["op"])
    except UnknownOpError as e:
        raise SpecError(f"nodes.{name}.attrs.op: {e}") from None
    if not op.has_vjp(argnum):
        raise SpecError(f"nodes.{name}.attrs: {attrs['op']} input {argnum} has no gradient")
    fwd = shapes[1 + int(op.uses_out) :]
    if (op.arity is not None and len(fwd) != op.arity) or argnum >= len(fwd):
        raise SpecError(
            f"nodes.{name}.inputs: a vjp of {attrs['op']} input {argnum} "
            f"takes {1 + int(op.uses_out)} + {op.arity or 'the forward'} inputs, "
            f"got {len(inputs)}"
        )
    check_attrs(op, attrs.get("attrs", {}), fwd, name)


#: The ``vjp`` row: not in ``OPS`` (see above); :func:`node_op` finds it.
VJP_ROW = Op(
    VJP_NAME,
    _vjp_forward,
    arity=None,
    differentiable=False,
    cost_rule=_vjp_cost_rule,
    result_like=_vjp_result_like,
    check_node=_vjp_check_node,
    phase="backward",
    label=lambda attrs: f"vjp({attrs['op']}, {attrs['argnum']})",
)


#: Modules whose rows are distgraph's own: this one and the neural-network rows (conv2d,
#: layer_norm, einsum, ...) of ``nnops.py``, which builds on it and is imported by the package.
BUILTIN_MODULES = ("distgraph.ops", "distgraph.nnops")


def builtin_ops() -> frozenset[str]:
    """The ops distgraph itself defines (not custom ops, whenever they were registered)."""
    return frozenset(name for name, op in OPS.items() if op.module in BUILTIN_MODULES)


def __getattr__(name: str) -> Any:
    # BUILTIN_OPS reads the table when asked, so the rows nnops.py adds are in it; a module
    # attribute because that is how callers have always read it.
    if name == "BUILTIN_OPS":
        return builtin_ops()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
