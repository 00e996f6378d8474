"""Shape and dtype inference: what a node's value will be, found while the graph is built.

Elementwise ops broadcast, matmul aligns; other ops are run on stand-ins (zero-stride views, or
zero-byte elements for ops that only move elements), so a row needs no shape rule of its own.
Dtypes are found by running the op on tiny arrays, cached per (op, dtypes, attrs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import numpy as np

from .errors import DTypeError, GraphError, ShapeError
from .ops import Op, get_op, run_op
from .spec import ALLOWED_DTYPES, NodeSpec, Shape, shape_problem

#: What building assumes of an input declared without a dtype; each run is compiled for the
#: dtype actually fed (see ``Graph.specialize``).
PROVISIONAL_DTYPE = "float64"


def inferred_dtype(record: NodeSpec) -> str | None:
    """A node's dtype for inference: an undeclared input's is provisionally float64."""
    if record.dtype is None and record.op == "input":
        return PROVISIONAL_DTYPE
    return record.dtype


class Label:
    """``add(x, y)``: the name of a node that has none yet, formatted only if an error needs it."""

    __slots__ = ("names", "op")

    def __init__(self, op: str, names: list[str]):
        self.op, self.names = op, names

    def __str__(self) -> str:
        return f"{self.op}({', '.join(self.names)})"

    def __repr__(self) -> str:
        return repr(str(self))


def check_result_shape(label: Any, op: str, shape: Shape | None) -> None:
    """Refuse a result a spec cannot hold (broadcast_to, reshape or index past 32 dimensions
    or 2**36 elements): it would save to JSON that :meth:`Graph.from_json` refuses."""
    problem = shape_problem(shape) if shape is not None else None
    if problem is not None:
        raise ShapeError(f"node {label!r} (op {op}): its result's {problem}")


def infer(
    op: str,
    shapes: Sequence[Sequence[int | None] | None],
    dtypes: Sequence[str | None],
    attrs: dict,
    weak: Sequence[Any],
    node: str | Label,
    spec: Op | None = None,
) -> tuple[Shape | None, str | None]:
    """Output shape and dtype of ``op`` on inputs of these shapes/dtypes; raises on mismatch.

    ``weak`` holds the value of each input that is a Python scalar constant (numpy promotes
    those weakly), else None; ``spec`` is ``get_op(op)`` when the caller has it already.
    """
    if spec is None:
        spec = get_op(op)
    shape, dtype = _infer(op, spec, shapes, dtypes, attrs, weak, node)
    if dtype is not None and dtype not in ALLOWED_DTYPES:
        # e.g. a cast to object or str: such values could not be checked, fed or serialized.
        raise DTypeError(
            f"node {node!r} (op {op}): result dtype {dtype} is not supported "
            f"(allowed: {', '.join(sorted(ALLOWED_DTYPES))})"
        )
    return shape, dtype


def _infer(
    op: str,
    spec: Op,
    shapes: Sequence[Sequence[int | None] | None],
    dtypes: Sequence[str | None],
    attrs: dict,
    weak: Sequence[Any],
    node: str | Label,
) -> tuple[Shape | None, str | None]:
    if spec.arity is not None and len(shapes) != spec.arity:
        raise GraphError(f"node {node!r} (op {op}): takes {spec.arity} inputs, got {len(shapes)}")
    if spec.arity is None and not shapes:
        raise GraphError(f"node {node!r} (op {op}): needs at least one input")
    if spec.infer is not None:  # the op's own rule (see Op.infer)
        return spec.infer(
            [None if s is None else tuple(s) for s in shapes], list(dtypes), attrs, node
        )
    if None in shapes:
        return None, _infer_dtype(op, dtypes, attrs, weak, node)
    known = cast("Sequence[Sequence[int | None]]", shapes)  # `in` above does not narrow for mypy
    if spec.elementwise:
        first = known[0]
        # The common case, tested in C: every input has the same shape (usually one shared
        # list, see ``spec.make_node``), so there is nothing to broadcast.
        if known.count(first) == len(known):
            shape = tuple(first)
        else:
            shape = _broadcast([tuple(s) for s in known], op, node)
        return shape, _infer_dtype(op, dtypes, attrs, weak, node)
    tuples = [tuple(s) for s in known]
    if op == "matmul":
        return _matmul_shape(tuples[0], tuples[1], node), _infer_dtype(
            op, dtypes, attrs, weak, node
        )
    return _infer_by_running(op, tuples, dtypes, attrs, weak, node)


def _broadcast(shapes: Sequence[Shape], op: str, node: str | Label) -> Shape:
    first = shapes[0]
    if all(s == first for s in shapes):  # the common case: nothing to broadcast
        return first
    ndim = max(len(s) for s in shapes)
    out: list[int | None] = []
    for i in range(ndim):
        dims = {s[len(s) - ndim + i] for s in shapes if len(s) - ndim + i >= 0}
        fixed = {d for d in dims if d is not None and d != 1}
        if len(fixed) > 1:
            raise ShapeError(
                f"node {node!r} (op {op}): shapes {_fmt(shapes)} do not broadcast "
                f"(axis {i - ndim}: {sorted(fixed)})"
            )
        out.append(fixed.pop() if fixed else (None if None in dims else 1))
    return tuple(out)


def _matmul_shape(a: Shape, b: Shape, node: str | Label) -> Shape:
    if not a or not b:
        raise ShapeError(
            f"node {node!r} (op matmul): operands must be at least 1-D, got {_fmt([a, b])}"
        )
    a2 = (1, *a) if len(a) == 1 else a
    b2 = (*b, 1) if len(b) == 1 else b
    k1, k2 = a2[-1], b2[-2]
    if k1 is not None and k2 is not None and k1 != k2:
        raise ShapeError(
            f"node {node!r} (op matmul): shapes {_fmt([a, b])} do not align ({k1} != {k2})"
        )
    batch = _broadcast([a2[:-2], b2[:-2]], "matmul", node)
    out = (*batch, a2[-2], b2[-1])
    if len(a) == 1:
        out = out[:-2] + out[-1:]
    if len(b) == 1:
        out = out[:-1]
    return out


#: Largest input (in elements) an op is run on to infer its output shape while building.
INFER_ELEMENTS = 2**24


def _dummy(shape: Shape, dtype: str | None, batch: int, weak: Any) -> Any:
    if weak is not None:
        return weak
    dt = np.dtype(dtype or "float64")
    concrete = tuple(batch if d is None else d for d in shape)
    # Zero-stride views: inference never allocates a parameter-sized array.
    fill = np.zeros((), dt) if dt.kind in "iub" else np.full((), 0.5, dt)
    return np.broadcast_to(fill, concrete)


def _infer_by_running(
    op: str,
    shapes: list[Shape],
    dtypes: Sequence[str | None],
    attrs: dict,
    weak: Sequence[Any],
    node: str | Label,
) -> tuple[Shape | None, str | None]:
    has_batch = any(d is None for s in shapes for d in s)
    spec = get_op(op)
    if spec.movement:
        return _infer_movement(op, shapes, dtypes, attrs, weak, node, has_batch)
    sizes = [math.prod(3 if d is None else d for d in s) for s in shapes]
    # A variadic op's output can be as large as all its inputs together (concat).
    if (sum(sizes) if spec.arity is None else max(sizes, default=0)) > INFER_ELEMENTS:
        # Running the op on a stand-in this large could take minutes or exhaust memory (a
        # reduction walks every element even of a zero-stride view): the shape stays unknown
        # here and the op's own checks apply when it runs on real values.
        return None, _infer_dtype(op, dtypes, attrs, weak, node)
    results: list[np.ndarray | Exception] = []
    # Two stand-in batch sizes, neither equal to a fixed dimension: a batch of 3 against 3
    # classes would broadcast where a real batch does not.
    fixed = {d for s in shapes for d in s}
    batches = [b for b in (2, 3, 5, 7, 11, 13, 17, 19, 23) if b not in fixed][:2]
    for batch in batches if has_batch else (1,):
        args = [_dummy(s, d, batch, w) for s, d, w in zip(shapes, dtypes, weak)]
        try:
            with np.errstate(all="ignore"):
                results.append(np.asarray(run_op(op, args, attrs)))
        except Exception as e:  # numpy's own message says what did not fit
            results.append(e)
    errors = [r for r in results if isinstance(r, Exception)]
    arrays = [r for r in results if not isinstance(r, Exception)]
    if len(errors) == len(results):
        raise ShapeError(
            f"node {node!r} (op {op}): inputs of shapes {_fmt(shapes)} and dtypes {list(dtypes)} "
            f"with attrs {attrs} do not fit: {errors[0]}"
        ) from None
    if errors:  # the other batch size ran
        return None, arrays[0].dtype.name
    if len(arrays) == 1:
        return arrays[0].shape, arrays[0].dtype.name
    a, b = arrays
    if a.ndim != b.ndim:
        return None, a.dtype.name
    return tuple(x if x == y else None for x, y in zip(a.shape, b.shape)), a.dtype.name


#: A stand-in element of zero bytes: views and copies of it cost nothing, whatever the shape.
_NO_BYTES = np.empty((), dtype=np.dtype([]))


def _infer_movement(
    op: str,
    shapes: list[Shape],
    dtypes: Sequence[str | None],
    attrs: dict,
    weak: Sequence[Any],
    node: str | Label,
    has_batch: bool,
) -> tuple[Shape | None, str | None]:
    """Shapes of ops that only move elements (reshape, transpose, broadcast_to, index), found
    on stand-ins of zero-byte elements: a huge declared shape never allocates here."""
    results = []
    for batch in (2, 3) if has_batch else (1,):
        args = [
            np.broadcast_to(_NO_BYTES, tuple(batch if d is None else d for d in s)) for s in shapes
        ]
        try:
            results.append(np.shape(run_op(op, args, attrs)))
        except Exception as e:  # numpy's own message says what did not fit
            results.append(e)
    errors = [r for r in results if isinstance(r, Exception)]
    if len(errors) == len(results):
        raise ShapeError(
            f"node {node!r} (op {op}): inputs of shapes {_fmt(shapes)} "
            f"with attrs {attrs} do not fit: {errors[0]}"
        ) from None
    dtype = dtypes[0]  # moved elements keep their dtype
    if errors:
        return None, dtype
    a, b = results[0], results[-1]
    if len(a) != len(b):
        return None, dtype
    return tuple(x if x == y else None for x, y in zip(a, b)), dtype


def _infer_dtype(
    op: str, dtypes: Sequence[str | None], attrs: dict, weak: Sequence[Any], node: str | Label
) -> str | None:
    if None in dtypes:
        return None
    # The result dtype depends on the op, the input dtypes, the Python types of weak scalars
    # and small attrs (pow's exponent, cast's dtype): cache it instead of running numpy per node.
    key = (op, tuple(dtypes), tuple(map(type, weak)), repr(attrs) if attrs else "")
    hit = _DTYPE_CACHE.get(key)
    if hit is None:
        hit = _DTYPE_CACHE[key] = _run_for_dtype(op, dtypes, attrs, weak, node)
    return hit


_DTYPE_CACHE: dict[tuple, str] = {}


def _run_for_dtype(
    op: str, dtypes: Sequence[str | None], attrs: dict, weak: Sequence[Any], node: str | Label
) -> str:
    error: Exception | None = None
    # Scalars first; ops such as matmul need 2-D operands, and cross_entropy's integer labels
    # one dimension fewer than its logits.
    n = len(dtypes)
    for shapes in ([()] * n, [(1, 1)] * n, [(1, 1)] + [(1,)] * (n - 1)):
        args = [w if w is not None else np.zeros(s, d) for s, d, w in zip(shapes, dtypes, weak)]
        try:
            with np.errstate(all="ignore"):
                return np.asarray(run_op(op, args, attrs)).dtype.name
        except Exception as e:
            error = error or e
    raise DTypeError(
        f"node {node!r} (op {op}): dtypes {list(dtypes)} do not fit: {error}"
    ) from None


def _fmt(shapes: Sequence[Any]) -> str:
    return " and ".join(str(tuple(s)) if s is not None else "(unknown)" for s in shapes)
