"""From a graph and a request (outputs, grad) to a runnable Program, and the node loop itself.

A ``Program`` is plain data: the nodes needed for the request, their levels, and where each
requested value lives. ``run_nodes`` is the single place a node's op is applied; the reference
executor and the Ray workers both call it, so they cannot drift apart.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import schedule
from ._util import gc_paused
from .autodiff import grad as differentiate
from .errors import (
    DistgraphError,
    DTypeError,
    ExecutionError,
    FeedError,
    GraphError,
    NonFiniteError,
)
from .graph import Graph
from .ops import LEAF_OPS, get_op, run_op, run_vjp
from .result import TraceEvent
from .spec import NodeSpec


@dataclass
class Program:
    """The part of a graph a request needs, in levels; pure data, picklable."""

    nodes: dict[str, NodeSpec]
    order: list[str]
    level: dict[str, int]
    levels: list[list[str]]
    outputs: list[str]
    grads: dict[str, str]
    grad_of: str | None
    inputs: list[str]
    params: list[str]
    constants: dict[str, Any] = field(default_factory=dict)
    #: Every input the graph declares, needed or not (feeding an unneeded one is fine).
    graph_inputs: list[str] = field(default_factory=list)
    #: Derived tables (node costs per cost model), filled on first use.
    memo: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)
    #: Consumers of each node within the program (for placement and transfers).
    consumers: dict[str, list[str]] = field(default_factory=dict)

    @property
    def fetches(self) -> list[str]:
        """Every node whose value the driver receives: outputs, then gradient nodes."""
        seen = dict.fromkeys(self.outputs)
        seen.update(dict.fromkeys(self.grads.values()))
        return list(seen)


@gc_paused
def compile_program(
    graph: Graph,
    outputs: Sequence[str] | str | None = None,
    grad: str | None = None,
    wrt: Sequence[str] | None = None,
) -> Program:
    """Differentiate (when ``grad`` is given), prune to what the request needs, and level it."""
    if isinstance(outputs, str):
        outputs = [outputs]
    if outputs is None:
        outputs = graph.outputs or ([grad] if grad else [])
        if not outputs:
            raise GraphError(
                "nothing to compute: the graph declares no outputs and none were asked for"
            )
    for o in outputs:
        if o not in graph:
            raise GraphError(f"unknown output {o!r}; graph outputs are {graph.outputs}")
    outputs = [graph[o].name for o in outputs]
    full = graph
    if grad is not None:
        if grad not in graph:
            raise GraphError(f"cannot take the gradient of {grad!r}: no such node")
        full = differentiate(graph, graph[grad].name, wrt) if graph.grad_of is None else graph
    grads = full.grads
    nodes = {n.name: n for n in full.nodes}

    needed: set[str] = set(outputs) | set(grads.values())
    for name in reversed(list(nodes)):
        if name in needed:
            needed.update(nodes[name].inputs)
    order = [n for n in nodes if n in needed]
    inputs_of = {n: nodes[n].inputs for n in order}
    level = schedule.node_levels(order, inputs_of)
    # Dicts as ordered sets: a shared constant can have tens of thousands of consumers.
    consumer_sets: dict[str, dict[str, None]] = {n: {} for n in order}
    for n in order:
        for i in nodes[n].inputs:
            consumer_sets[i][n] = None
    consumers = {n: list(c) for n, c in consumer_sets.items()}
    return Program(
        nodes={n: nodes[n] for n in order},
        order=order,
        level=level,
        levels=[lv for lv in schedule.group_levels(order, level) if lv],
        outputs=outputs,
        grads=grads,
        grad_of=full.grad_of,
        inputs=[n for n in order if nodes[n].op == "input"],
        params=[n for n in order if nodes[n].op == "param"],
        constants={n: full._constants[n] for n in order if nodes[n].op == "const"},
        consumers=consumers,
        graph_inputs=graph.inputs,
    )


def prepare_feeds(
    program: Program, feeds: Mapping[str, Any], check_finite: bool = False, strict: bool = True
) -> dict[str, np.ndarray]:
    """Check feeds against the declared inputs and convert them to arrays of the declared dtype.

    Every problem is reported at once: missing inputs, unexpected names, wrong ranks, fixed
    dimensions and batch sizes that disagree between inputs.
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
    for name in program.inputs:
        node = program.nodes[name]
        value = feeds[name]
        try:
            arr = np.asarray(value)
        except Exception as e:
            raise FeedError(
                f"feed {name!r}: cannot convert {type(value).__name__} to an array: {e}"
            ) from None
        want = np.dtype(node.dtype or "float64")
        if arr.dtype != want:
            if not np.can_cast(arr.dtype, want, casting="same_kind") and not (
                arr.dtype.kind in "iub" and want.kind in "f"
            ):
                raise DTypeError(
                    f"feed {name!r}: dtype {arr.dtype} cannot be used as {want} (input {name!r} declares {want})"
                )
            arr = arr.astype(want)
        if not (arr.flags.c_contiguous or arr.flags.f_contiguous):
            arr = np.ascontiguousarray(arr)  # the layout it would have on a Ray worker
        if node.shape is not None:
            shape = tuple(node.shape)
            if arr.ndim != len(shape) or any(
                d is not None and d != a for d, a in zip(shape, arr.shape)
            ):
                raise FeedError(
                    f"feed {name!r}: shape {arr.shape} does not match the declared shape "
                    f"{_fmt_shape(shape)}"
                )
            for d, a in zip(shape, arr.shape):
                if d is None:
                    batch.setdefault(a, []).append(name)
                    break
        if check_finite and arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise NonFiniteError(f"feed {name!r} contains NaN or Inf")
        arrays[name] = arr
    if len(batch) > 1:
        detail = ", ".join(f"{names} have batch size {b}" for b, names in sorted(batch.items()))
        raise FeedError(f"feeds disagree on the batch size: {detail}")
    return arrays


def _fmt_shape(shape: Sequence[int | None]) -> str:
    return (
        "("
        + ", ".join("batch" if d is None else str(d) for d in shape)
        + ("," if len(shape) == 1 else "")
        + ")"
    )


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

    ``current``, when given, holds the name of the node being evaluated (a worker reports it
    when a wave passes its deadline).
    """
    if not check_finite and trace is None:
        _run_fast(program, names, env, current)
        return
    nodes = program.nodes
    for name in names:
        node = nodes[name]
        if node.op in LEAF_OPS:
            continue
        args = [env[i] for i in node.inputs]
        if current is not None:
            current[0] = name
        start = time.time() if trace is not None else 0.0
        try:
            value = run_op(node.op, args, node.attrs)
        except DistgraphError:
            raise
        except Exception as e:
            shapes = ", ".join(f"{i}{tuple(np.shape(a))}" for i, a in zip(node.inputs, args))
            raise ExecutionError(
                f"node {name!r} (op {_op_label(node)}) failed on inputs {shapes}: {e}"
            ) from e
        if isinstance(value, np.ndarray) and not (
            value.flags.c_contiguous or value.flags.f_contiguous
        ):
            # A strided or broadcast view comes out of pickling (between Ray workers) as a
            # contiguous copy, and numpy's matmul sums in a different order for each layout:
            # give every executor the layout a transfer would give, so results agree bit for bit.
            value = np.ascontiguousarray(value)
        if check_finite:
            _check_finite(node, value, args)
        env[name] = value
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


def _run_fast(
    program: Program, names: Iterable[str], env: dict[str, Any], current: list[str] | None
) -> None:
    """The same loop without checks or tracing: prepared kernels, one dict lookup per input."""
    kernels = _kernels(program)
    track = current if current is not None else [""]
    name = ""
    try:
        for name in names:
            kernel = kernels.get(name)
            if kernel is None:  # a leaf
                continue
            track[0] = name
            fn, inputs, attrs = kernel
            value = fn(*[env[i] for i in inputs], **attrs)
            if type(value) is np.ndarray and not (
                value.flags.c_contiguous or value.flags.f_contiguous
            ):
                value = np.ascontiguousarray(value)  # see run_nodes: match what a transfer gives
            env[name] = value
    except DistgraphError:
        raise
    except Exception as e:
        node = program.nodes[name]
        shapes = ", ".join(f"{i}{tuple(np.shape(env[i]))}" for i in node.inputs if i in env)
        raise ExecutionError(
            f"node {name!r} (op {_op_label(node)}) failed on inputs {shapes}: {e}"
        ) from e


def _kernels(program: Program) -> dict[str, tuple[Any, list[str], dict[str, Any]]]:
    """name -> (function, input names, keyword attrs) for every non-leaf node, built once."""
    kernels = program.memo.get("kernels")
    if kernels is None:
        kernels = {}
        for name, node in program.nodes.items():
            if node.op in LEAF_OPS:
                continue
            if node.op == "vjp":
                kernels[name] = (_vjp_kernel(node.attrs), node.inputs, {})
            else:
                kernels[name] = (get_op(node.op).forward, node.inputs, node.attrs)
        program.memo["kernels"] = kernels
    return kernels


def _vjp_kernel(attrs: dict[str, Any]) -> Any:
    op_name, argnum, fwd_attrs = attrs["op"], attrs["argnum"], attrs.get("attrs", {})
    uses_out = get_op(op_name).uses_out

    def kernel(g: Any, *rest: Any) -> Any:
        out, inputs = (rest[0], rest[1:]) if uses_out else (None, rest)
        return run_vjp(op_name, argnum, g, out, inputs, fwd_attrs)

    return kernel


def _op_label(node: NodeSpec) -> str:
    return f"vjp({node.attrs['op']}, {node.attrs['argnum']})" if node.op == "vjp" else node.op


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
