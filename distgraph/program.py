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
from .autodiff import forward_part
from .autodiff import grad as differentiate
from .errors import (
    DistgraphError,
    DTypeError,
    ExecutionError,
    FeedError,
    GraphError,
    NonFiniteError,
    ShapeError,
)
from .graph import Graph
from .infer import PROVISIONAL_DTYPE
from .memory import check_feeds_memory
from .ops import LEAF_OPS, get_op, run_op, run_vjp
from .result import TraceEvent
from .spec import ALLOWED_DTYPES, NodeSpec

#: One feed's type as far as compiling cares: (input name, dtype name, number of dimensions).
FeedType = tuple[str, str, int]


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
    #: For inputs compiled for a feed signature: the (shape, dtype) they were declared with,
    #: which feeds are checked against (their nodes carry the fed dtype and rank).
    declared: dict[str, tuple[list[int | None] | None, str | None]] = field(default_factory=dict)
    #: Outputs that must be scalars (a training loss): checked at compile time when their shape
    #: is known, else for each feed signature before anything runs.
    scalar_outputs: list[str] = field(default_factory=list)

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


def feed_signature(graph: Graph, feeds: Mapping[str, Any] | None) -> tuple[FeedType, ...]:
    """The dtype and rank of each feed for an input declared without a dtype or a shape: what
    a program must be compiled for (see :func:`compile_program`); empty when all are declared."""
    open_inputs = graph.open_inputs()
    if not feeds or not open_inputs:
        return ()
    out = []
    for name in open_inputs:
        if name not in feeds:
            continue
        value = feeds[name]
        try:
            arr = value if isinstance(value, np.ndarray) else np.asarray(value)
        except Exception:
            continue  # prepare_feeds reports it
        if arr.dtype.name in ALLOWED_DTYPES:
            out.append((name, _undeclared_dtype(value, arr).name, arr.ndim))
    return tuple(out)


def _undeclared_dtype(value: Any, arr: np.ndarray) -> np.dtype:
    """The dtype an input declared without one takes from its feed: a numpy array's (or numpy
    scalar's) own; Python numbers and lists, which carry none, are read as float64."""
    if isinstance(value, (np.ndarray, np.generic)):
        return arr.dtype
    return np.dtype(PROVISIONAL_DTYPE)


@gc_paused
def compile_program(
    graph: Graph,
    outputs: Sequence[str] | str | None = None,
    grad: str | None = None,
    wrt: Sequence[str] | None = None,
    fed: Sequence[FeedType] = (),
) -> Program:
    """Differentiate (when ``grad`` is given), prune to what the request needs, and level it.

    ``fed`` (from :func:`feed_signature`) gives the dtype and rank of the feeds for inputs
    declared without them: the program is compiled, and checked, for those. A graph that
    already holds a backward pass answers for its own ``grad_of``; asked for another output's
    gradient (or for params it has no gradient for) its forward part is differentiated anew.
    """
    if isinstance(outputs, str):
        outputs = [outputs]
    declared: dict[str, tuple[list[int | None] | None, str | None]] = {}
    if fed:
        nodes0 = graph.node_map
        declared = {n: (nodes0[n].shape, nodes0[n].dtype) for n, _, _ in fed}
        graph = graph.specialize({n: (d, k) for n, d, k in fed})
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
        of = graph[grad].name
        if graph.grad_of is None:
            full = differentiate(graph, of, wrt)
        elif of != graph.grad_of or (wrt is not None and not set(wrt) <= set(graph.grads)):
            full = _redifferentiate(graph, of, wrt, outputs)
    grads = full.grads
    if grad is not None and wrt is not None:
        wanted = {full[n].name for n in wrt if n in full}
        grads = {k: v for k, v in grads.items() if k in wanted}
    nodes = full.node_map  # name -> spec in topological (insertion) order
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
        levels = full.levels()  # cached per graph version
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
        constants={n: full.constants[n] for n in leaves["const"]},
        consumers=_Consumers(order, edges[0], edges[1]),
        # Differentiating adds no inputs, so unpruned, the program's inputs are the graph's.
        graph_inputs=leaves["input"] if order is names else graph.inputs,
        declared=declared,
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


def _redifferentiate(
    graph: Graph, of: str, wrt: Sequence[str] | None, outputs: Sequence[str]
) -> Graph:
    """``graph`` holds the backward pass of another output (or for other leaves): differentiate
    its forward part for ``of`` instead of answering with the gradient it holds."""
    forward = forward_part(graph)
    lost = [o for o in outputs if o not in forward]
    if lost:
        raise GraphError(
            f"cannot take the gradient of {of!r}: the graph holds the backward pass of "
            f"{graph.grad_of!r} (for {sorted(graph.grads)}) and the requested outputs {lost} "
            f"are part of it; ask for grad={graph.grad_of!r}, or differentiate the forward "
            f"graph with dg.grad(g, of={of!r})"
        )
    return differentiate(forward, of, wrt if wrt is not None else (list(graph.grads) or None))


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
        want = np.dtype(dtype) if dtype is not None else _undeclared_dtype(value, arr)
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
                    f"{_fmt_shape(dims)}"
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


def check_scalar_loss(program: Program, loss: str) -> None:
    """Refuse a training loss whose inferred shape is not a scalar (naming node and shape); one
    whose shape is unknown yet is checked per feed signature (see :func:`prepare_feeds`)."""
    shape = program.nodes[loss].shape
    if shape is not None and len(shape) != 0:
        raise ShapeError(
            f"loss {loss!r} has shape {_fmt_shape(shape)}, but a training loss must be a "
            f"scalar: reduce it (e.g. .mean() over the batch) before training on it"
        )
    if loss not in program.scalar_outputs:
        program.scalar_outputs.append(loss)


def _check_signature(program: Program, arrays: Mapping[str, np.ndarray]) -> None:
    """A program compiled without knowing some inputs' dtype or rank (a training session's)
    is checked once per feed signature, so a feed that does not fit the graph fails here
    naming the node instead of deep inside a run."""
    open_inputs = program.memo.get("open_inputs")
    if open_inputs is None:
        open_inputs = program.memo["open_inputs"] = [
            n
            for n in program.inputs
            if program.nodes[n].dtype is None or program.nodes[n].shape is None
        ]
    if not open_inputs:
        return
    sig = tuple((n, arrays[n].dtype.name, arrays[n].ndim) for n in open_inputs)
    checked = program.memo.setdefault("signatures", set())
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
                f"loss {loss!r} has shape {_fmt_shape(shape)} for these feeds (dtypes and ranks "
                f"{[s[1:] for s in sig]}), but a training loss must be a scalar: reduce it "
                "(e.g. .mean() over the batch) or declare the inputs' shapes"
            )
    checked.add(sig)


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
                + _undeclared_hint(program, name, env)
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
            + _undeclared_hint(program, name, env)
        ) from e


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
