"""From a graph and a request (outputs, grad) to a runnable Program, and the node loop itself.

A ``Program`` is plain data: the nodes needed for the request, their levels, and where each
requested value lives. ``run_nodes`` is the single place a node's op is applied; the reference
executor and the Ray workers both call it, so they cannot drift apart.
"""

from __future__ import annotations

import operator
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
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
from .memory import check_feeds_memory
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
    consumers: Mapping[str, list[str]] = field(default_factory=dict)

    def __getstate__(self) -> dict[str, Any]:
        # The memo is derived data (and can be large): rebuild it where the program is used.
        state = dict(self.__dict__)
        state["memo"] = {}
        return state

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
    nodes: dict[str, NodeSpec] = full._nodes  # name -> spec in topological (insertion) order
    names, edges, full_levels = full.structure()
    roots = set(outputs) | set(grads.values())
    sinks = np.flatnonzero(np.bincount(edges[0], minlength=len(names)) == 0).tolist()
    if all(names[i] in roots for i in sinks):
        # Every sink is requested, so every node is needed (the common case): no pruning walk.
        order = names
        kept = dict(nodes)
    else:
        needed: set[str] = set(roots)
        for name in reversed(names):
            if name in needed:
                needed.update(nodes[name].inputs)
        order = [n for n in names if n in needed]
        kept = {n: nodes[n] for n in order}
        edges = schedule.edge_arrays(order, [nodes[n].inputs for n in order])
    leaves: dict[str, list[str]] = {"input": [], "param": [], "const": []}
    specs = list(kept.values())
    ops = list(map(_OP, specs))
    is_leaf = np.fromiter(map(LEAF_OPS.__contains__, ops), bool, len(ops))
    for i in np.flatnonzero(is_leaf).tolist():  # the few leaves, not every node
        leaves[ops[i]].append(order[i])
    if order is names:  # unpruned: the graph's own (cached) levels
        level_of = full_levels
        levels = [list(group) for group in full._level_groups()]
    else:
        level_of = schedule.level_array(len(order), edges[0], edges[1])
        levels = schedule.group_by_level(order, level_of)
    level = dict(zip(order, level_of.tolist()))
    program = Program(
        nodes=kept,
        order=order,
        level=level,
        levels=levels,
        outputs=outputs,
        grads=grads,
        grad_of=full.grad_of,
        inputs=leaves["input"],
        params=leaves["param"],
        constants={n: full._constants[n] for n in leaves["const"]},
        consumers=_Consumers(order, edges[0], edges[1]),
        # Differentiating adds no inputs, so unpruned, the program's inputs are the graph's.
        graph_inputs=leaves["input"] if order is names else graph.inputs,
    )
    # Integer views of the program for the partitioner (cheap here, dear to rebuild).
    program.memo["edges"] = edges[:2]
    program.memo["index"] = edges[2]
    program.memo["level_array"] = level_of
    program.memo["specs"] = specs
    program.memo[("column", "op")] = ops
    program.memo["leaf_mask"] = is_leaf
    return program


_OP = operator.attrgetter("op")


#: NodeSpec fields that partitioning and planning read for every node: fetched together.
_READ_TOGETHER = ("phase", "origin", "attrs", "shape", "dtype")


def node_column(program: Program, attr: str) -> list[Any]:
    """One NodeSpec field of every node, in ``program.order`` (memoized)."""
    key = ("column", attr)
    col = program.memo.get(key)
    if col is None:
        specs = program.memo.get("specs")
        if specs is None:
            specs = program.memo["specs"] = list(map(program.nodes.__getitem__, program.order))
        wanted = [a for a in _READ_TOGETHER if ("column", a) not in program.memo]
        if attr in wanted and len(wanted) > 1 and specs:
            # On a large program, reaching each record costs far more than reading a field of
            # it, so one pass reads every field of the group (its users need them all).
            columns = zip(*map(operator.attrgetter(*wanted), specs))
            for name, values in zip(wanted, columns):
                program.memo["column", name] = list(values)
            return program.memo[key]
        col = program.memo[key] = list(map(operator.attrgetter(attr), specs))
    return col


def edge_arrays(program: Program) -> tuple[np.ndarray, np.ndarray]:
    """Input edges as ``(src, dst)`` arrays of positions in ``program.order`` (memoized)."""
    edges = program.memo.get("edges")
    if edges is None:
        edges = program.memo["edges"] = schedule.edge_arrays(
            program.order, node_column(program, "inputs")
        )[:2]
    return edges


def leaf_mask(program: Program) -> np.ndarray:
    """Whether each node (in ``program.order``) is a leaf: input, param or const (memoized)."""
    mask = program.memo.get("leaf_mask")
    if mask is None:
        ops = node_column(program, "op")
        mask = program.memo["leaf_mask"] = np.fromiter(
            map(LEAF_OPS.__contains__, ops), bool, len(ops)
        )
    return mask


class _Consumers(Mapping[str, list[str]]):
    """Consumers of each node within a program, in order, each listed once (a node may read an
    input twice); a read-only mapping whose table is built on first use, since only some
    callers (transfer timing, explicit placements) need it."""

    def __init__(self, order: list[str], src: np.ndarray, dst: np.ndarray):
        self._order, self._src, self._dst = order, src, dst
        self._table: dict[str, list[str]] | None = None

    def _get_table(self) -> dict[str, list[str]]:
        if self._table is None:
            order, src, dst = self._order, self._src, self._dst
            by_src = np.argsort(src, kind="stable")
            s, d = src[by_src], dst[by_src]
            if len(s):
                first = np.r_[True, (s[1:] != s[:-1]) | (d[1:] != d[:-1])]
                s, d = s[first], d[first]
            ptr = np.searchsorted(s, np.arange(len(order) + 1)).tolist()
            names = np.array(order, dtype=object)[d].tolist()
            self._table = dict(zip(order, map(names.__getitem__, map(slice, ptr[:-1], ptr[1:]))))
        return self._table

    def __getitem__(self, name: str) -> list[str]:
        return self._get_table()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, name: object) -> bool:
        return name in self._get_table()

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Consumers, (self._order, self._src, self._dst))

    def __repr__(self) -> str:
        return repr(self._get_table())


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
    check_feeds_memory(program, arrays)  # sizes that depend on the batch, before any kernel
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
            if isinstance(value, np.ndarray) and not (
                value.flags.c_contiguous or value.flags.f_contiguous
            ):
                # A strided or broadcast view comes out of pickling (between Ray workers) as a
                # contiguous copy, and numpy's matmul sums in a different order for each
                # layout: give every executor the layout a transfer would give, so results
                # agree bit for bit. (The copy can fail too: a huge broadcast.)
                value = np.ascontiguousarray(value)
        except DistgraphError:
            raise
        except Exception as e:
            shapes = ", ".join(f"{i}{tuple(np.shape(a))}" for i, a in zip(node.inputs, args))
            raise ExecutionError(
                f"node {name!r} (op {_op_label(node)}) failed on inputs {shapes}: {e}"
            ) from e
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
