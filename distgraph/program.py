"""From a graph and a request (outputs, grad) to a runnable Program (see interpret.py to run one).

A ``Program`` is plain data: the nodes needed for the request, their levels, and where each
requested value lives, plus a cache of tables derived from them.
"""

from __future__ import annotations

import functools
import itertools
import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from . import schedule
from ._util import gc_paused
from .autodiff import forward_part
from .autodiff import grad as differentiate
from .errors import (
    GraphError,
    ShapeError,
)
from .graph import Graph
from .infer import PROVISIONAL_DTYPE
from .ops import LEAF_OPS
from .spec import ALLOWED_DTYPES, NodeSpec

if TYPE_CHECKING:  # cost.py and interpret.py build on this module
    from .cost import CostModel, NodeCosts

#: One feed's type as far as compiling cares: (input name, dtype name, number of dimensions).
FeedType = tuple[str, str, int]


#: A non-leaf node's prepared call: (function, input names, keyword attrs).
Kernel = tuple[Callable[..., Any], list[str], dict[str, Any]]


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
    #: Consumers of each node within the program (for placement and transfers).
    consumers: Mapping[str, list[str]] = field(default_factory=dict)
    #: For inputs compiled for a feed signature: the (shape, dtype) they were declared with,
    #: which feeds are checked against (their nodes carry the fed dtype and rank).
    declared: dict[str, tuple[list[int | None] | None, str | None]] = field(default_factory=dict)
    #: Outputs that must be scalars (a training loss): checked at compile time when their shape
    #: is known, else for each feed signature before anything runs.
    scalar_outputs: list[str] = field(default_factory=list)
    #: Derived tables and caches, built on first use (see :class:`ProgramCache`); not pickled.
    cache: ProgramCache = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.cache = ProgramCache(self)

    def __getstate__(self) -> dict[str, Any]:
        # The cache is derived data (and can be large): rebuild it where the program is used.
        state = dict(self.__dict__)
        del state["cache"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.cache = ProgramCache(self)

    @property
    def fetches(self) -> list[str]:
        """Every node whose value the driver receives: outputs, then gradient nodes."""
        seen = dict.fromkeys(self.outputs)
        seen.update(dict.fromkeys(self.grads.values()))
        return list(seen)


class ProgramCache:
    """A program's derived data, built on first use (``compile_program`` hands over what it
    has at hand) and never pickled. Tables are columns and integer arrays over positions in
    ``program.order``, which partitioning, costing, memory estimates and the interpreter read;
    the mutable caches below each belong to the module named beside them, which alone writes
    them.
    """

    def __init__(self, program: Program):
        self.program = program
        #: cost.py: per cost model, each node's estimated seconds and bytes.
        self.costs: dict[CostModel, NodeCosts] = {}
        #: cost.py: each node's element count, per assumed batch size.
        self.numel: dict[int, np.ndarray] = {}
        #: interpret.py: each non-leaf node's kernel.
        self.kernels: dict[str, Kernel] | None = None
        #: interpret.py: the feed signatures (of open inputs) already checked against the graph.
        self.checked_signatures: set[tuple[FeedType, ...]] = set()
        #: memory.py: the limit the program's static estimate was checked against.
        self.memory_limit: int | None = None
        #: memory.py: (limit, feed shapes) of the last feeds checked, so a repeat is free.
        self.memory_checked: tuple[int, tuple[Any, ...]] | None = None
        #: dataparallel/rows.py: row-coupling analyses, by (loss, batch inputs).
        self.row_splits: dict[tuple[str | None, tuple[str, ...] | None], Any] = {}

    def seed(self, **known: Any) -> None:
        """Hand over tables computed anyway while compiling (names of the properties below)."""
        for name in known:
            assert isinstance(getattr(ProgramCache, name, None), functools.cached_property), name
        vars(self).update(known)

    @functools.cached_property
    def specs(self) -> list[NodeSpec]:
        """Node records in order."""
        return list(map(self.program.nodes.__getitem__, self.program.order))

    @functools.cached_property
    def ops(self) -> list[str]:
        """Each node's op."""
        return list(map(_OP, self.specs))

    @functools.cached_property
    def inputs(self) -> list[list[str]]:
        """Each node's input names."""
        return list(map(_INPUTS, self.specs))

    @functools.cached_property
    def _fields(self) -> tuple[list[Any], ...]:
        # On a large program, reaching each record costs far more than reading a field of it,
        # so one pass reads the fields partitioning and planning use together.
        specs = self.specs
        if not specs:
            return tuple([] for _ in _READ_TOGETHER)
        return tuple(map(list, zip(*map(operator.attrgetter(*_READ_TOGETHER), specs))))

    @property
    def phases(self) -> list[str]:
        """Each node's phase (forward or backward)."""
        return self._fields[0]

    @property
    def origins(self) -> list[Any]:
        """Each backward node's forward node (None for forward nodes)."""
        return self._fields[1]

    @property
    def attrs(self) -> list[dict[str, Any]]:
        """Each node's attributes."""
        return self._fields[2]

    @property
    def shapes(self) -> list[Any]:
        """Each node's inferred shape."""
        return self._fields[3]

    @property
    def dtypes(self) -> list[str | None]:
        """Each node's inferred dtype."""
        return self._fields[4]

    @functools.cached_property
    def edges(self) -> tuple[np.ndarray, np.ndarray]:
        """Input edges as ``(src, dst)`` position arrays, grouped by consumer in order."""
        return schedule.edge_arrays(self.program.order, self.inputs)[:2]

    @functools.cached_property
    def index(self) -> dict[str, int]:
        """Position of each node in ``program.order``."""
        order = self.program.order
        return dict(zip(order, range(len(order))))

    @functools.cached_property
    def level_array(self) -> np.ndarray:
        """Each node's level."""
        order, level = self.program.order, self.program.level
        return np.fromiter(map(level.__getitem__, order), np.int64, len(order))

    @functools.cached_property
    def leaf_mask(self) -> np.ndarray:
        """Whether each node is a leaf: input, param or const."""
        ops = self.ops
        return np.fromiter(map(LEAF_OPS.__contains__, ops), bool, len(ops))

    @functools.cached_property
    def origin_index(self) -> np.ndarray:
        """Position of each node's origin (-1 for none)."""
        index, origins = self.index, self.origins
        return np.fromiter(map(index.get, origins, itertools.repeat(-1)), np.int64, len(origins))

    @functools.cached_property
    def forward_ops(self) -> np.ndarray:
        """Positions of the forward non-leaf nodes, in order."""
        forward = np.fromiter(map("forward".__eq__, self.phases), bool, len(self.phases))
        return np.flatnonzero(forward & ~self.leaf_mask)

    @functools.cached_property
    def open_inputs(self) -> list[str]:
        """Inputs compiled without a known dtype or shape (checked per feed signature)."""
        nodes = self.program.nodes
        return [n for n in self.program.inputs if nodes[n].dtype is None or nodes[n].shape is None]

    @functools.cached_property
    def batch_dependent(self) -> bool:
        """Whether any value's size depends on the feeds (a batch dimension or unknown shape)."""
        return any(s is None or None in s for s in self.shapes)


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
            out.append((name, undeclared_dtype(value, arr).name, arr.ndim))
    return tuple(out)


def undeclared_dtype(value: Any, arr: np.ndarray) -> np.dtype:
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
    program.cache.seed(
        edges=edges[:2],
        index=edges[2],
        level_array=level_of,
        specs=specs,
        ops=ops,
        leaf_mask=is_leaf,
    )
    return program


_OP = operator.attrgetter("op")
_INPUTS = operator.attrgetter("inputs")


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


def edge_arrays(program: Program) -> tuple[np.ndarray, np.ndarray]:
    """Input edges as ``(src, dst)`` arrays of positions in ``program.order`` (cached)."""
    return program.cache.edges


def leaf_mask(program: Program) -> np.ndarray:
    """Whether each node (in ``program.order``) is a leaf: input, param or const (cached)."""
    return program.cache.leaf_mask


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


def check_scalar_loss(program: Program, loss: str) -> None:
    """Refuse a training loss whose inferred shape is not a scalar (naming node and shape); one
    whose shape is unknown yet is checked per feed signature (see :func:`prepare_feeds`)."""
    shape = program.nodes[loss].shape
    if shape is not None and len(shape) != 0:
        raise ShapeError(
            f"loss {loss!r} has shape {format_shape(shape)}, but a training loss must be a "
            f"scalar: reduce it (e.g. .mean() over the batch) before training on it"
        )
    if loss not in program.scalar_outputs:
        program.scalar_outputs.append(loss)


def format_shape(shape: Sequence[int | None]) -> str:
    return (
        "("
        + ", ".join("batch" if d is None else str(d) for d in shape)
        + ("," if len(shape) == 1 else "")
        + ")"
    )
