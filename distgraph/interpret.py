"""The interpreter: feeds checked and converted, then one loop that applies each node's op.

``run_nodes`` is the single place a node's op is applied; the reference executor and the Ray
workers both call it, so they cannot drift apart.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from .errors import (
    DistgraphError,
    DTypeError,
    ExecutionError,
    FeedError,
    NonFiniteError,
    ShapeError,
)
from .graph import Graph
from .memory import check_feeds_memory
from .ops import LEAF_OPS, node_op
from .program import Kernel, Program, format_shape, undeclared_dtype
from .result import TraceEvent
from .spec import ALLOWED_DTYPES, NodeSpec


def prepare_feeds(
    program: Program, feeds: Mapping[str, Any], check_finite: bool = False, strict: bool = True
) -> dict[str, np.ndarray]:
    """Check feeds against the declared inputs and convert them to arrays of the declared dtype.

    Missing inputs, unexpected names, wrong ranks, fixed dimensions and batch sizes that
    disagree between inputs are reported at once. A value that does not fit the declared dtype
    is refused, never wrapped: an integer out of the dtype's range, a float that is not a whole
    number (or out of range) for an integer input, a finite value that would overflow to inf.
    Floats may narrow (float64 to float32 rounds). An input declared without a dtype takes the
    dtype of a numpy array fed to it (Python numbers and lists are read as float64); without a
    shape, any shape (the feeds' dtypes and ranks are checked against the graph once per
    signature).
    """
    missing = [n for n in program.inputs if n not in feeds]
    problems: list[str] = []
    if missing:
        problems.append(f"missing feeds for inputs {missing}")
    if strict:
        unknown = [n for n in feeds if n not in program.graph_inputs]
        if unknown:
            problems.append(
                f"unexpected feeds {unknown} (the graph's inputs are {program.graph_inputs})"
            )
    if problems:
        raise FeedError("; ".join(problems))
    arrays: dict[str, np.ndarray] = {}
    batch: dict[int, list[str]] = {}
    declared = program.declared
    for name in program.inputs:
        node = program.nodes[name]
        shape, dtype = declared.get(name, (node.shape, node.dtype))
        value = feeds[name]
        try:
            arr = np.asarray(value)
        except Exception as e:
            raise FeedError(
                f"feed {name!r}: cannot convert {type(value).__name__} to an array: {e}"
            ) from None
        if arr.dtype.name not in ALLOWED_DTYPES:
            raise DTypeError(
                f"feed {name!r}: dtype {arr.dtype} is not supported (feed numbers or booleans; "
                f"allowed dtypes: {', '.join(sorted(ALLOWED_DTYPES))})"
            )
        want = np.dtype(dtype) if dtype is not None else undeclared_dtype(value, arr)
        if arr.dtype != want:
            arr = _convert_feed(name, arr, want)
        elif node.dtype is not None and arr.dtype != node.dtype:
            # Compiled for another signature: a caller bypassed Executor.program's cache key.
            raise DTypeError(
                f"feed {name!r}: dtype {arr.dtype}, but the program was compiled for {node.dtype}"
            )
        if not (arr.flags.c_contiguous or arr.flags.f_contiguous):
            arr = np.ascontiguousarray(arr)  # the layout it would have on a Ray worker
        if shape is not None:
            dims = tuple(shape)
            if arr.ndim != len(dims) or any(
                d is not None and d != a for d, a in zip(dims, arr.shape)
            ):
                raise FeedError(
                    f"feed {name!r}: shape {arr.shape} does not match the declared shape "
                    f"{format_shape(dims)}"
                )
            for d, a in zip(dims, arr.shape):
                if d is None:
                    batch.setdefault(a, []).append(name)
                    break
        if check_finite and arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise NonFiniteError(f"feed {name!r} contains NaN or Inf")
        arrays[name] = arr
    if len(batch) > 1:
        detail = ", ".join(f"{names} have batch size {b}" for b, names in sorted(batch.items()))
        raise FeedError(f"feeds disagree on the batch size: {detail}")
    _check_signature(program, arrays)
    check_feeds_memory(program, arrays)  # sizes that depend on the batch, before any kernel
    return arrays


def _convert_feed(name: str, arr: np.ndarray, want: np.dtype) -> np.ndarray:
    """``arr`` as ``want``, refusing values that would not survive the conversion."""
    have = arr.dtype
    if want.kind == "b" or have.kind not in "biuf":
        raise DTypeError(
            f"feed {name!r}: dtype {have} cannot be used as {want} (input {name!r} declares {want})"
        )
    if want.kind in "iu":
        info = np.iinfo(want)
        if have.kind == "f":
            # Whole numbers only (labels read from a CSV arrive as floats), within range.
            with np.errstate(invalid="ignore"):
                fraction = ~np.isfinite(arr) | (arr != np.trunc(arr))
            if fraction.any():  # a float that is not a whole number: the wrong kind of data
                _refuse_value(name, arr, fraction, want, "whole numbers", DTypeError)
            bad = (arr < info.min) | (arr >= float(info.max) + 1)  # max + 1: a power of two
            if bad.any():
                _refuse_value(name, arr, bad, want, f"[{info.min}, {info.max}]")
        elif have.kind in "iu" and arr.size:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < info.min or hi > info.max:
                bad = arr > info.max if hi > info.max else arr < info.min
                _refuse_value(name, arr, bad, want, f"[{info.min}, {info.max}]")
        with np.errstate(all="ignore"):
            return arr.astype(want)
    # want is floating: narrowing rounds, but a finite value must not become inf.
    with np.errstate(all="ignore"):
        out = arr.astype(want)
    if have.kind != "b" and want.itemsize < 8 and arr.size:
        overflow = np.isinf(out)
        if have.kind == "f" and overflow.any():  # an inf fed as inf is no overflow
            overflow &= np.isfinite(arr)
        if overflow.any():
            top = float(np.finfo(want).max)
            _refuse_value(name, arr, overflow, want, f"magnitudes up to {top:g}")
    return out


def _refuse_value(
    name: str,
    arr: np.ndarray,
    bad: np.ndarray,
    want: np.dtype,
    fits: str,
    error: type[DistgraphError] = FeedError,
) -> None:
    idx = np.unravel_index(int(np.argmax(bad)), arr.shape) if arr.ndim else ()
    where = f" at index {list(map(int, idx))}" if arr.ndim else ""
    raise error(
        f"feed {name!r}: {arr.dtype} value {arr[idx].item()!r}{where} does not fit {want} "
        f"(input {name!r} declares {want}, which holds {fits}; {int(np.count_nonzero(bad))} "
        "such value(s)): fix the data or declare another dtype"
    )


def _check_signature(program: Program, arrays: Mapping[str, np.ndarray]) -> None:
    """A program compiled without knowing some inputs' dtype or rank (a training session's)
    is checked once per feed signature, so a feed that does not fit the graph fails here
    naming the node instead of deep inside a run."""
    open_inputs = program.cache.open_inputs
    if not open_inputs:
        return
    sig = tuple((n, arrays[n].dtype.name, arrays[n].ndim) for n in open_inputs)
    checked = program.cache.checked_signatures
    if sig in checked:
        return
    scratch = Graph.from_records(program.nodes, program.constants)
    scratch.specialize({n: (d, k) for n, d, k in sig})
    for loss in program.scalar_outputs:
        # The loss's rank, estimated from the feeds' ranks: a refusal now beats a step that
        # fails after its update was applied; an estimate that fails says nothing.
        try:
            shape = (
                scratch.specialize({n: (d, k) for n, d, k in sig}, ranks=True).node_map[loss].shape
            )
        except DistgraphError:
            continue
        if shape is not None and len(shape) != 0:
            raise ShapeError(
                f"loss {loss!r} has shape {format_shape(shape)} for these feeds (dtypes and ranks "
                f"{[s[1:] for s in sig]}), but a training loss must be a scalar: reduce it "
                "(e.g. .mean() over the batch) or declare the inputs' shapes"
            )
    checked.add(sig)


def run_nodes(
    program: Program,
    names: Iterable[str],
    env: dict[str, Any],
    *,
    check_finite: bool = False,
    trace: list[TraceEvent] | None = None,
    track: str = "worker 0",
    worker: int = 0,
    current: list[str] | None = None,
) -> None:
    """Evaluate ``names`` in order, reading inputs from and writing results to ``env``.

    The one node loop. Its hooks, ``check_finite`` and ``trace``, observe each value before it
    is stored; without them (the common case) the loop does nothing else. ``current``, when
    given, holds the name of the node being evaluated (a worker reports it when a wave passes
    its deadline).
    """
    kernels = _kernels(program)
    hooks = check_finite or trace is not None
    where = current if current is not None else [""]
    name = ""
    try:
        for name in names:
            kernel = kernels.get(name)
            if kernel is None:  # a leaf
                continue
            where[0] = name
            fn, inputs, attrs = kernel
            args = [env[i] for i in inputs]
            start = time.time() if hooks else 0.0
            value = fn(*args, **attrs)
            if type(value) is np.ndarray and not (
                value.flags.c_contiguous or value.flags.f_contiguous
            ):
                # A strided or broadcast view comes out of pickling (between Ray workers) as a
                # contiguous copy, and numpy's matmul sums in a different order for each
                # layout: give every executor the layout a transfer would give, so results
                # agree bit for bit. (The copy can fail too: a huge broadcast.)
                value = np.ascontiguousarray(value)
            if hooks:
                _observe(program, name, value, args, start, check_finite, trace, track, worker)
            env[name] = value
    except DistgraphError:
        raise
    except Exception as e:
        node = program.nodes[name]
        shapes = ", ".join(f"{i}{tuple(np.shape(env[i]))}" for i in node.inputs if i in env)
        raise ExecutionError(
            f"node {name!r} (op {_op_label(node)}) failed on inputs {shapes}: {e}"
            + _undeclared_hint(program, name, env)
        ) from e


def _observe(
    program: Program,
    name: str,
    value: Any,
    args: Sequence[Any],
    start: float,
    check_finite: bool,
    trace: list[TraceEvent] | None,
    track: str,
    worker: int,
) -> None:
    """The loop's hooks for one node's value: refuse NaN/Inf, record a trace event."""
    node = program.nodes[name]
    if check_finite:
        _check_finite(node, value, args)
    if trace is not None:
        info = {"value": preview(value)}
        if node.origin is not None:
            info["origin"] = node.origin
        event = TraceEvent(
            name,
            "node",
            node.phase,
            program.level[name],
            track,
            start,
            time.time(),
            _op_label(node),
            worker,
            info,
        )
        trace.append(event)


def _undeclared_hint(program: Program, name: str, env: Mapping[str, Any]) -> str:
    """For a node that failed at run time: the inputs it reads that were declared without a
    dtype or shape (their mismatches could not be caught while building), and what to do."""
    nodes, declared = program.nodes, program.declared
    upstream, stack = set(), [name]
    while stack:
        for i in nodes[stack.pop()].inputs:
            if i not in upstream:
                upstream.add(i)
                stack.append(i)
    found = []
    for n in program.inputs:
        shape, dtype = declared.get(n, (nodes[n].shape, nodes[n].dtype))
        if n in upstream and (shape is None or dtype is None):
            fed = f" (fed {env[n].dtype} of shape {tuple(env[n].shape)})" if n in env else ""
            found.append(f"{n!r}{fed}")
    if not found:
        return ""
    return (
        f"; it reads inputs declared without a dtype or shape: {', '.join(found)}; declare "
        "them so the graph is checked when built, e.g. g.input('y', shape=(None,), "
        "dtype='int64') for class labels"
    )


def _kernels(program: Program) -> dict[str, Kernel]:
    """name -> (function, input names, keyword attrs) for every non-leaf node, built once."""
    kernels = program.cache.kernels
    if kernels is None:
        kernels = {
            name: (node_op(node.op).forward, node.inputs, node.attrs)
            for name, node in program.nodes.items()
            if node.op not in LEAF_OPS
        }
        program.cache.kernels = kernels
    return kernels


def _op_label(node: NodeSpec) -> str:
    return node_op(node.op).node_label(node.attrs)


def _check_finite(node: NodeSpec, value: Any, args: Sequence[Any]) -> None:
    arr = np.asarray(value)
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        bad = "NaN" if np.isnan(arr).any() else "Inf"
        raise NonFiniteError(
            f"node {node.name!r} (op {_op_label(node)}) produced {bad} from inputs {node.inputs}"
        )


#: Values with at most this many elements are copied whole into trace events.
PREVIEW_ELEMENTS = 16


def preview(value: Any) -> Any:
    """A JSON-able look at a value for traces and reports: small values whole, else a summary."""
    arr = np.asarray(value)
    if arr.size <= PREVIEW_ELEMENTS:
        return arr.tolist()
    flat = arr.reshape(-1)
    mean = float(np.mean(flat)) if arr.dtype.kind in "fiu" else None
    return {
        "shape": list(arr.shape),
        "dtype": arr.dtype.name,
        "first": flat[:4].tolist(),
        "mean": mean,
    }


def to_python(value: Any) -> Any:
    """0-d results become Python scalars; arrays are returned as writable numpy arrays."""
    arr = np.asarray(value)
    if arr.ndim == 0:
        return arr.item()
    return arr if arr.flags.writeable else arr.copy()
