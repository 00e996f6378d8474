"""The tracing front end: a ``Graph`` and the ``Node`` handles whose operators build it.

Every node added is checked at once (op known, inputs present, shapes and dtypes compatible), so
a bad graph fails on the line that built the bad node. The graph's content is plain data
(:class:`~distgraph.spec.GraphSpec`); handles only point into it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np

from . import schedule
from ._util import gc_paused
from .errors import DistgraphError, DTypeError, FeedError, GraphError, ShapeError, SpecError
from .ops import LEAF_OPS, VJP_ATTRS, Op, check_attrs, get_op, run_op
from .spec import (
    ALLOWED_DTYPES,
    MAX_SPEC_BYTES,
    MAX_SPEC_NODES,
    MAX_SPEC_VALUES,
    ArrayData,
    GraphSpec,
    NodeSpec,
    Shape,
    decode_constant,
    encode_constant,
    generated_name_problem,
    make_node,
    name_problem,
    shape_problem,
)

Scalar = int | float | bool
Operand = "Node | np.ndarray | Scalar"

#: What building assumes of an input declared without a dtype; each run is compiled for the
#: dtype actually fed (see ``Graph._specialized``).
PROVISIONAL_DTYPE = "float64"


def _inferred_dtype(record: NodeSpec) -> str | None:
    """A node's dtype for inference: an undeclared input's is provisionally float64."""
    if record.dtype is None and record.op == "input":
        return PROVISIONAL_DTYPE
    return record.dtype


#: Graph versions come from one counter, so no two states of any graphs share a version.
_VERSIONS = itertools.count(1)


class _Params(dict):
    """A graph's param values: any change makes the graph a new version (compiled programs and
    installed plans hold the values they were built with)."""

    __slots__ = ("_graph",)

    def __init__(self, graph: Graph, values: Any = ()):
        super().__init__(values)
        self._graph = graph

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        self._graph._touch()

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self._graph._touch()

    def update(self, *args: Any, **kwargs: Any) -> None:
        super().update(*args, **kwargs)
        self._graph._touch()

    def pop(self, *args: Any) -> Any:
        self._graph._touch()
        return super().pop(*args)

    def popitem(self) -> Any:
        self._graph._touch()
        return super().popitem()

    def setdefault(self, key: str, default: Any = None) -> Any:
        self._graph._touch()
        return super().setdefault(key, default)

    def clear(self) -> None:
        super().clear()
        self._graph._touch()

    # mypy compares an in-place operator only with a non-overloaded __or__, and dict's is overloaded.
    def __ior__(self, other: Any) -> _Params:  # type: ignore[misc]
        self.update(other)
        return self


class Node:
    """A handle on one node of a :class:`Graph`; Python operators add new nodes."""

    __slots__ = ("_name", "graph")
    __array_priority__ = 1000  # so ndarray <op> Node defers to Node's reflected operator

    def __init__(self, graph: Graph, name: str):
        self.graph = graph
        self._name = name

    @property
    def name(self) -> str:
        """The node's current name (follows renames made by ``Graph.output``)."""
        return self.graph._resolve(self._name)

    @property
    def spec(self) -> NodeSpec:
        """The node's IR record."""
        return self.graph._nodes[self.name]

    @property
    def op(self) -> str:
        """The op name."""
        return self.spec.op

    @property
    def shape(self) -> Shape | None:
        """Inferred shape (``None`` entries: batch dimensions; ``None``: unknown)."""
        s = self.spec.shape
        return None if s is None else tuple(s)

    @property
    def dtype(self) -> np.dtype | None:
        """Inferred dtype, if known."""
        d = self.spec.dtype
        return None if d is None else np.dtype(d)

    def __repr__(self) -> str:
        return f"<Node {self.name} op={self.op} shape={self.shape} dtype={self.spec.dtype}>"

    def __hash__(self) -> int:
        return id(self)

    def __bool__(self) -> bool:
        raise TypeError("a graph node has no truth value until the graph runs")

    # Arithmetic ------------------------------------------------------------------------------
    def __add__(self, other: Any) -> Node:
        return self.graph.apply("add", self, other)

    def __radd__(self, other: Any) -> Node:
        return self.graph.apply("add", other, self)

    def __sub__(self, other: Any) -> Node:
        return self.graph.apply("sub", self, other)

    def __rsub__(self, other: Any) -> Node:
        return self.graph.apply("sub", other, self)

    def __mul__(self, other: Any) -> Node:
        return self.graph.apply("mul", self, other)

    def __rmul__(self, other: Any) -> Node:
        return self.graph.apply("mul", other, self)

    def __truediv__(self, other: Any) -> Node:
        return self.graph.apply("div", self, other)

    def __rtruediv__(self, other: Any) -> Node:
        return self.graph.apply("div", other, self)

    def __matmul__(self, other: Any) -> Node:
        return self.graph.apply("matmul", self, other)

    def __rmatmul__(self, other: Any) -> Node:
        return self.graph.apply("matmul", other, self)

    def __pow__(self, exponent: Any) -> Node:
        if isinstance(exponent, Node):
            raise GraphError("pow takes a constant exponent; use exp(b * log(a)) for a node")
        if not isinstance(exponent, (int, float)) or isinstance(exponent, bool):
            raise GraphError(f"pow exponent must be an int or float, got {exponent!r}")
        return self.graph.apply("pow", self, exponent=exponent)

    def __neg__(self) -> Node:
        return self.graph.apply("neg", self)

    def __pos__(self) -> Node:
        return self

    def __getitem__(self, key: Any) -> Node:
        return self.graph.apply("index", self, index=_encode_index(key))

    # Methods mirroring numpy -----------------------------------------------------------------
    def sum(self, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Node:
        """Sum over ``axis`` (all axes by default)."""
        return self.graph.apply("sum", self, axis=_axis(axis), keepdims=keepdims)

    def mean(self, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Node:
        """Mean over ``axis``."""
        return self.graph.apply("mean", self, axis=_axis(axis), keepdims=keepdims)

    def max(self, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Node:
        """Maximum over ``axis``."""
        return self.graph.apply("max", self, axis=_axis(axis), keepdims=keepdims)

    def reshape(self, *shape: Any) -> Node:
        """Reshape (one dimension may be -1)."""
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return self.graph.apply("reshape", self, shape=[int(d) for d in shape])

    def transpose(self, *axes: int) -> Node:
        """Permute axes (reverse them when none are given)."""
        if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
            axes = tuple(axes[0])
        return self.graph.apply("transpose", self, axes=list(axes) if axes else None)

    @property
    def T(self) -> Node:
        """Axes reversed."""
        return self.transpose()

    def astype(self, dtype: Any) -> Node:
        """Cast to another dtype."""
        return self.graph.apply("cast", self, dtype=np.dtype(dtype).name)


class Graph:
    """A computational graph under construction.

    >>> g = Graph()
    >>> x = g.input("x"); w = g.param("w", 3.0); b = g.param("b", 1.0)
    >>> z = g.output("z", x * w + b)
    """

    def __init__(self) -> None:
        self._nodes: dict[str, NodeSpec] = {}
        self._params: dict[str, np.ndarray] = _Params(self)
        self._constants: dict[str, Any] = {}
        self._outputs: list[str] = []
        self._alias: dict[str, str] = {}
        self._auto: set[str] = set()
        self._counter = itertools.count(1)
        self._grads: dict[str, str] = {}
        self._grad_of: str | None = None
        self._scalar_consts: dict[tuple[str, str], str] = {}
        #: Changes with every change of the graph (nodes, outputs, param values, gradients), so
        #: programs compiled from an earlier state are never reused; unique across graphs.
        self.version = next(_VERSIONS)
        self._structure: tuple[int, Any] | None = None
        self._groups: tuple[int, list[list[str]]] | None = None
        self._open: tuple[int, list[str]] | None = None

    def _touch(self) -> None:
        """Record a change: what was compiled from the previous state is stale."""
        self.version = next(_VERSIONS)

    # Leaves ----------------------------------------------------------------------------------
    def input(
        self, name: str, shape: Sequence[int | None] | None = None, dtype: Any = None
    ) -> Node:
        """Declare a fed input. ``None`` in ``shape`` marks a batch dimension.

        Without ``shape`` the input takes any shape, and without ``dtype`` it takes the dtype of
        its feed: each run is compiled for the dtypes and ranks it is fed (and checked then).
        """
        dt = None if dtype is None else _dtype_name(dtype, f"input {name!r}")
        if shape is not None:
            if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence):
                raise ShapeError(f"input {name!r}: shape must be a sequence, got {shape!r}")
            dims = []
            d: Any  # the hint says int | None; callers may still pass 1e3, True or junk
            for d in shape:
                if d is not None and (
                    not isinstance(d, (int, np.integer)) or isinstance(d, (bool, np.bool_))
                ):
                    if isinstance(d, float) and d.is_integer():
                        d = int(d)  # 1e3 is a fine way to write 1000
                    else:
                        raise ShapeError(
                            f"input {name!r}: dimension {d!r} of shape {tuple(shape)} is not "
                            "an int or None"
                        )
                dims.append(None if d is None else int(d))
            shape = tuple(dims)
            problem = shape_problem(shape)
            if problem:
                raise ShapeError(f"input {name!r}: {problem}")
        return self._add(name, "input", [], {}, shape, dt, user_named=True)

    def param(self, name: str, value: Any) -> Node:
        """Declare a trainable parameter with its initial value (a scalar or an ndarray)."""
        arr = np.array(value)  # a copy: later changes to the caller's array don't leak in
        if arr.dtype.kind in "iub":
            arr = arr.astype(np.float64)
        if arr.dtype.kind != "f":
            raise DTypeError(f"param {name!r}: values must be floating point, got {arr.dtype}")
        problem = shape_problem(arr.shape, batch=False)
        if problem:
            raise ShapeError(f"param {name!r}: {problem}")
        node = self._add(name, "param", [], {}, arr.shape, arr.dtype.name, user_named=True)
        self._params[name] = arr
        return node

    def const(self, value: Any, name: str | None = None) -> Node:
        """A constant; Python scalars stay weakly typed (``x32 * 2.0`` stays float32)."""
        if isinstance(value, (bool, int, float)):
            key = (type(value).__name__, repr(value))
            if name is None and key in self._scalar_consts:  # one node per distinct scalar
                return Node(self, self._resolve(self._scalar_consts[key]))
            shape: Shape = ()
            dtype = np.result_type(value).name
        else:
            value = np.array(value)
            _dtype_name(value.dtype, "constant")
            problem = shape_problem(value.shape, batch=False)
            if problem:
                raise ShapeError(f"constant {name if name is not None else ''}: {problem}")
            shape, dtype = value.shape, value.dtype.name
        node = self._add(name, "const", [], {}, shape, dtype, user_named=name is not None)
        self._constants[node.name] = value
        if name is None and isinstance(value, (bool, int, float)):
            self._scalar_consts[(type(value).__name__, repr(value))] = node.name
        return node

    def output(self, name: str, node: Node) -> Node:
        """Mark ``node`` as an output called ``name`` and return its handle."""
        node = self._own(node)
        current = node.name
        if name == current:
            if name not in self._outputs:
                self._outputs.append(name)
                self._touch()
            return node
        if current in self._auto and current not in self._outputs:
            self._rename(current, name)
            self._outputs.append(name)
            self._touch()
            return Node(self, name)
        out = self.apply("identity", node, name=name)
        self._outputs.append(name)
        self._touch()
        return out

    # Building --------------------------------------------------------------------------------
    def apply(self, op: str, *operands: Any, name: str | None = None, **attrs: Any) -> Node:
        """Add a node applying registered ``op`` to ``operands`` (nodes or constants)."""
        spec = get_op(op)
        nodes, alias = self._nodes, self._alias
        names: list[str] = []
        shapes: list[Any] = []
        dtypes: list[str | None] = []
        # One pass per operand (this runs once per node built, so its overhead adds up).
        for x in operands:
            if type(x) is Node and x.graph is self:
                n = self._resolve(x._name) if alias else x._name
            else:
                n = self._operand(x).name
            record = nodes[n]
            names.append(n)
            shapes.append(record.shape)
            dtype = record.dtype
            if dtype is None and record.op == "input":
                dtype = PROVISIONAL_DTYPE
            dtypes.append(dtype)
        label = name or _Label(op, names)  # unnamed: say what it was built from (on error only)
        if attrs or spec.required_attrs:
            check_attrs(spec, attrs, shapes, label)
        shape, dtype = _infer_checked(
            op, spec, shapes, dtypes, attrs, self._weak_values(names), label
        )
        _check_result_shape(label, op, shape)
        return self._add(name, op, names, attrs, shape, dtype, user_named=name is not None)

    def _operand(self, x: Any) -> Node:
        if isinstance(x, Node):
            return self._own(x)
        if isinstance(x, (bool, int, float, np.ndarray, np.generic, list)):
            return self.const(x.item() if isinstance(x, np.generic) else x)
        raise GraphError(f"cannot use {type(x).__name__} {x!r} as a graph operand")

    def _weak_values(self, names: list[str]) -> list[Any]:
        """Scalar constants by value (numpy promotes them weakly); None for everything else."""
        consts = self._constants
        if not consts:
            return [None] * len(names)
        return [c if isinstance(c := consts.get(n), (int, float)) else None for n in names]

    def _own(self, node: Node) -> Node:
        if node.graph is not self:
            raise GraphError(f"node {node.name!r} belongs to another graph")
        return node

    def _add(
        self,
        name: str | None,
        op: str,
        inputs: list[str],
        attrs: dict,
        shape: Shape | None,
        dtype: str | None,
        user_named: bool,
        phase: str = "forward",
        origin: str | None = None,
    ) -> Node:
        nodes = self._nodes
        if name is None:
            name = f"{op}_{next(self._counter)}"
            while name in nodes:
                name = f"{op}_{next(self._counter)}"
            self._auto.add(name)
        else:
            if user_named:
                _check_name(name)
            if name in nodes:
                raise GraphError(f"a node named {name!r} already exists")
        nodes[name] = make_node(name, op, inputs, attrs, shape, dtype, phase, origin)
        self.version = next(_VERSIONS)  # inline _touch(): this runs once per node built
        return Node(self, name)

    def _resolve(self, name: str) -> str:
        while name in self._alias:
            name = self._alias[name]
        return name

    def _rename(self, old: str, new: str) -> None:
        _check_name(new)
        if new in self._nodes:
            raise GraphError(f"a node named {new!r} already exists")
        renamed: dict[str, NodeSpec] = {}
        for key, spec in self._nodes.items():
            if key == old:
                spec = spec.model_copy(update={"name": new})
                key = new
            if old in spec.inputs:
                spec = spec.model_copy(
                    update={"inputs": [new if i == old else i for i in spec.inputs]}
                )
            renamed[key] = spec
        self._nodes = renamed
        self._touch()
        self._auto.discard(old)
        if old in self._constants:
            self._constants[new] = self._constants.pop(old)
        self._alias[old] = new

    def copy(self) -> Graph:
        """An independent copy (node records are immutable and shared)."""
        new = Graph()
        new._nodes = dict(self._nodes)
        new._params = _Params(new, {k: v.copy() for k, v in self._params.items()})
        new._constants = dict(self._constants)
        new._outputs = list(self._outputs)
        new._alias = dict(self._alias)
        new._auto = set(self._auto)
        new._counter = itertools.count(next(self._counter))
        new._grads = dict(self._grads)
        new._grad_of = self._grad_of
        new._scalar_consts = dict(self._scalar_consts)
        new._touch()
        return new

    def with_params(self, values: dict[str, Any]) -> Graph:
        """A copy whose params take ``values`` (e.g. ``trainer.params``); shapes must match."""
        new = self.copy()
        for name, value in values.items():
            if name not in new._params:
                raise GraphError(f"no param named {name!r}")
            arr = np.array(value, dtype=new._params[name].dtype)
            if arr.shape != new._params[name].shape:
                raise ShapeError(
                    f"param {name!r}: new value has shape {arr.shape}, graph has {new._params[name].shape}"
                )
            new._params[name] = arr
        return new

    # Compiling for a feed signature -----------------------------------------------------------
    def _open_inputs(self) -> list[str]:
        """Inputs declared without a dtype or without a shape (cached per version)."""
        cached = self._open
        if cached is not None and cached[0] == self.version:
            return cached[1]
        names = [
            n.name
            for n in self._nodes.values()
            if n.op == "input" and (n.dtype is None or n.shape is None)
        ]
        self._open = (self.version, names)
        return names

    def _specialized(self, fed: Mapping[str, tuple[str, int]], ranks: bool = False) -> Graph:
        """A graph for one feed signature: inputs declared without a dtype take the fed dtype,
        and every node they reach is inferred again, so a feed that does not fit fails here
        with the node named. An input declared without a shape stays of unknown shape unless
        fed a scalar; with ``ranks`` it takes the fed rank, every dimension unknown (inference
        then treats them all as one batch size, which a feed of shape (batch, classes) would
        fail: only for estimates). An input fed non-float values takes no gradient (its entry
        in ``grads`` is dropped). Param arrays are shared: the result is for compiling, not
        for changing."""
        g = Graph()
        g._params = _Params(g, self._params)
        g._constants = dict(self._constants)
        g._outputs = list(self._outputs)
        g._alias = dict(self._alias)
        changed: set[str] = set()
        try:
            for name, node in self._nodes.items():
                if node.op == "input" and name in fed:
                    dtype, ndim = fed[name]
                    shape = node.shape
                    if shape is None and (ranks or ndim == 0):
                        shape = [None] * ndim
                    if node.shape is not None and len(node.shape) != ndim:
                        raise FeedError(
                            f"feed {name!r}: {ndim} dimensions, input {name!r} declares "
                            f"shape {tuple(node.shape)}"
                        )
                    g._nodes[name] = make_node(name, "input", [], {}, shape, node.dtype or dtype)
                    changed.add(name)
                elif node.op in LEAF_OPS or changed.isdisjoint(node.inputs):
                    g._nodes[name] = node
                elif node.op == "vjp":
                    g._add_vjp_spec(node)
                    changed.add(name)
                else:
                    g._rebuild(node)
                    changed.add(name)
        except (GraphError, ShapeError, DTypeError) as e:
            fedinfo = "; ".join(
                f"input {n!r} was fed {d} values with {k} dimension{'s' if k != 1 else ''}"
                for n, (d, k) in fed.items()
            )
            raise type(e)(
                f"{e} ({fedinfo}; an input declared without dtype or shape takes its feed's: "
                "declare the intended ones, e.g. g.input('y', shape=(None,), dtype='int64') "
                "for class labels)"
            ) from None
        g._grads = {
            leaf: node
            for leaf, node in self._grads.items()
            if leaf not in fed or np.dtype(g._nodes[leaf].dtype or "float64").kind == "f"
        }
        g._grad_of = self._grad_of
        g._touch()
        return g

    # Views -------------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Node:
        name = self._resolve(name)
        if name not in self._nodes:
            raise GraphError(f"no node named {name!r}")
        return Node(self, name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._resolve(name) in self._nodes

    def __len__(self) -> int:
        return len(self._nodes)

    @property
    def nodes(self) -> list[NodeSpec]:
        """Node records in topological (insertion) order."""
        return list(self._nodes.values())

    @property
    def outputs(self) -> list[str]:
        """Names of the declared outputs."""
        return list(self._outputs)

    @property
    def params(self) -> dict[str, np.ndarray]:
        """Parameter values by name (copies)."""
        return {k: v.copy() for k, v in self._params.items()}

    @property
    def inputs(self) -> list[str]:
        """Names of the fed inputs."""
        return [n.name for n in self._nodes.values() if n.op == "input"]

    @property
    def grads(self) -> dict[str, str]:
        """After :func:`distgraph.grad`: input/param name -> node holding its gradient."""
        return dict(self._grads)

    @property
    def grad_of(self) -> str | None:
        """The node this graph's backward nodes differentiate, if any."""
        return self._grad_of

    @property
    def spec(self) -> GraphSpec:
        """The graph as plain data."""
        return GraphSpec.model_construct(
            format="distgraph.graph/1",
            nodes=list(self._nodes.values()),
            outputs=list(self._outputs),
            params={k: ArrayData.from_numpy(v) for k, v in self._params.items()},
            constants={k: encode_constant(v) for k, v in self._constants.items()},
            grads=dict(self._grads),
            grad_of=self._grad_of,
        )

    @gc_paused
    def levels(self, phase: str | None = None) -> list[list[str]]:
        """Node names grouped by topological level (``phase`` filters forward/backward)."""
        if phase is None:
            return [list(group) for group in self._level_groups()]
        names, _edges, level_of = self.structure()
        keep = np.flatnonzero([n.phase == phase for n in self._nodes.values()])
        return schedule.group_by_level(names, level_of, keep)

    def _level_groups(self) -> list[list[str]]:
        """Every node grouped by level, cached per version like :meth:`structure` (compiling
        the graph needs the same groups): callers must copy before handing them out."""
        cached = self._groups
        if cached is not None and cached[0] == self.version:
            return cached[1]
        names, _edges, level_of = self.structure()
        groups = schedule.group_by_level(names, level_of)
        self._groups = (self.version, groups)
        return groups

    def structure(
        self,
    ) -> tuple[list[str], tuple[np.ndarray, np.ndarray, dict[str, int]], np.ndarray]:
        """Node names, input edges as integer arrays and each node's level, cached per version
        (levels, compilation and partitioning of one graph all start from them)."""
        cached = self._structure
        if cached is not None and cached[0] == self.version:
            return cached[1]
        names = list(self._nodes)
        edges = schedule.edge_arrays(names, [n.inputs for n in self._nodes.values()])
        level_of = schedule.level_array(len(names), edges[0], edges[1])
        self._structure = (self.version, (names, edges, level_of))
        return names, edges, level_of

    def to_svg(self, placement: dict[str, int] | None = None, batch_size: int = 1) -> str:
        """An SVG picture: variables, operations and outputs in columns by level."""
        from .viz import render_svg

        return render_svg(self.spec, placement=placement, batch_size=batch_size)

    def to_dot(self, placement: dict[str, int] | None = None, batch_size: int = 1) -> str:
        """The graph in Graphviz DOT."""
        from .viz import to_dot

        return to_dot(self.spec, placement=placement, batch_size=batch_size)

    def to_json(self, indent: int | None = None) -> str:
        """Serialize (param values and constants included) to JSON text."""
        return self.spec.to_json(indent=indent)

    @classmethod
    def from_json(
        cls,
        text: str | bytes,
        max_bytes: int = MAX_SPEC_BYTES,
        *,
        max_values: int = MAX_SPEC_VALUES,
        max_nodes: int = MAX_SPEC_NODES,
    ) -> Graph:
        """Load and validate a graph written by :meth:`to_json`; never unpickles.

        The limits (see :meth:`GraphSpec.from_json`) refuse a spec before it is parsed or built.
        """
        spec = GraphSpec.from_json(
            text, max_bytes=max_bytes, max_values=max_values, max_nodes=max_nodes
        )
        return cls.from_spec(spec)

    @classmethod
    @gc_paused
    def from_spec(cls, spec: GraphSpec) -> Graph:
        """Rebuild a graph from its spec, re-checking ops, names, order, shapes and dtypes."""
        g = cls()
        by_name: dict[str, NodeSpec] = {}
        for i, node in enumerate(spec.nodes):
            if node.name in by_name:
                raise SpecError(f"nodes.{i}.name: duplicate node name {node.name!r}")
            # The same names the API accepts: generated gradient names only on backward nodes.
            problem = (
                generated_name_problem(node.name)
                if node.phase == "backward"
                else name_problem(node.name)
            )
            if problem:
                raise SpecError(f"nodes.{i}.name: {problem} (a {node.phase} node)")
            if node.op != "vjp" and node.op not in LEAF_OPS:
                try:
                    get_op(node.op)
                except GraphError as e:
                    raise SpecError(f"nodes.{i}.op: {e}") from None
            elif node.op in LEAF_OPS and node.attrs:
                raise SpecError(
                    f"nodes.{i}.attrs: {node.op} node {node.name!r} takes no attributes, "
                    f"got {sorted(node.attrs)}"
                )
            elif node.op in LEAF_OPS and node.inputs:
                # Rebuilding would silently drop them: say the spec is inconsistent instead.
                raise SpecError(
                    f"nodes.{i}.inputs: {node.op} node {node.name!r} takes no inputs, "
                    f"got {node.inputs}"
                )
            by_name[node.name] = node
        order = schedule.toposort({n.name: n.inputs for n in spec.nodes})  # cycles, dangling
        if _is_topological(spec.nodes):  # keep the file's order: to_json(from_json(t)) == t
            order = list(by_name)
        for i, node in enumerate(spec.nodes):
            if node.origin is not None and node.origin not in by_name:
                raise SpecError(f"nodes.{i}.origin: {node.origin!r} is not a node")
        for field, values, op in (
            ("params", spec.params, "param"),
            ("constants", spec.constants, "const"),
        ):
            for key in values:
                if key not in by_name or by_name[key].op != op:
                    raise SpecError(f"{field}.{key}: there is no {op} node named {key!r}")
        params = {k: v.to_numpy() for k, v in spec.params.items()}
        constants = {k: decode_constant(v) for k, v in spec.constants.items()}
        for name in order:
            node = by_name[name]
            if node.op == "param":
                if name not in params:
                    raise SpecError(f"params.{name}: param node has no value")
                g.param(name, params[name])
            elif node.op == "const":
                if name not in constants:
                    raise SpecError(f"constants.{name}: const node has no value")
                g.const(constants[name], name=name)
            elif node.op == "input":
                g.input(name, node.shape, node.dtype)
            elif node.op == "vjp":
                g._add_vjp_spec(node)
            else:
                g._rebuild(node)
        for out in spec.outputs:
            if out not in g._nodes:
                raise SpecError(f"outputs: {out!r} is not a node")
            g._outputs.append(out)
        for src, dst in spec.grads.items():
            if src not in g._nodes or dst not in g._nodes:
                raise SpecError(f"grads.{src}: refers to a missing node")
        if spec.grad_of is not None and spec.grad_of not in g._nodes:
            raise SpecError(f"grad_of: {spec.grad_of!r} is not a node")
        _check_backward_pass(g, spec)
        g._grads = dict(spec.grads)
        g._grad_of = spec.grad_of
        g._touch()
        return g

    def _rebuild(self, node: NodeSpec) -> None:
        names = list(node.inputs)
        shapes = [self._nodes[n].shape for n in names]
        dtypes = [_inferred_dtype(self._nodes[n]) for n in names]
        check_attrs(get_op(node.op), node.attrs, shapes, node.name)
        shape, dtype = infer(
            node.op, shapes, dtypes, node.attrs, self._weak_values(names), node.name
        )
        _check_result_shape(node.name, node.op, shape)
        self._add(
            node.name,
            node.op,
            names,
            dict(node.attrs),
            shape,
            dtype,
            False,
            node.phase,
            node.origin,
        )

    def _add_vjp_spec(self, node: NodeSpec) -> None:
        attrs = node.attrs
        argnum = attrs.get("argnum")
        if (
            not isinstance(attrs.get("op"), str)
            or not isinstance(argnum, int)
            or isinstance(argnum, bool)
            or argnum < 0
        ):
            raise SpecError(
                f"nodes.{node.name}.attrs: a vjp node needs 'op' (a name) and 'argnum' "
                f"(an int >= 0), got op={attrs.get('op')!r}, argnum={argnum!r}"
            )
        if not isinstance(attrs.get("attrs", {}), dict):
            raise SpecError(f"nodes.{node.name}.attrs.attrs: must be an object")
        extra = sorted(set(attrs) - VJP_ATTRS)
        if extra:
            raise SpecError(
                f"node {node.name!r} (op vjp): attribute {extra[0]!r} is not declared "
                f"(a vjp node takes {', '.join(sorted(VJP_ATTRS))})"
            )
        try:
            op = get_op(attrs["op"])
        except GraphError as e:
            raise SpecError(f"nodes.{node.name}.attrs.op: {e}") from None
        if not op.has_vjp(attrs["argnum"]):
            raise SpecError(
                f"nodes.{node.name}.attrs: {attrs['op']} input {attrs['argnum']} has no gradient"
            )
        # Inputs: the cotangent, the forward output when the VJP reads it, the forward inputs.
        fwd = node.inputs[1 + int(op.uses_out) :]
        if (op.arity is not None and len(fwd) != op.arity) or attrs["argnum"] >= len(fwd):
            raise SpecError(
                f"nodes.{node.name}.inputs: a vjp of {attrs['op']} input {attrs['argnum']} "
                f"takes {1 + int(op.uses_out)} + {op.arity or 'the forward'} inputs, "
                f"got {len(node.inputs)}"
            )
        check_attrs(op, attrs.get("attrs", {}), [self._nodes[n].shape for n in fwd], node.name)
        src = fwd[attrs["argnum"]]
        ref = self._nodes[src]
        self._add(
            node.name,
            "vjp",
            list(node.inputs),
            dict(attrs),
            _opt_shape(ref.shape),
            ref.dtype,  # as autodiff makes it, so a spec round-trips unchanged
            False,
            "backward",
            node.origin,
        )


class _Label:
    """``add(x, y)``: the name of a node that has none yet, formatted only if an error needs it."""

    __slots__ = ("names", "op")

    def __init__(self, op: str, names: list[str]):
        self.op, self.names = op, names

    def __str__(self) -> str:
        return f"{self.op}({', '.join(self.names)})"

    def __repr__(self) -> str:
        return repr(str(self))


# --- shape and dtype inference --------------------------------------------------------------


def _check_backward_pass(g: Graph, spec: GraphSpec) -> None:
    """Refuse a spec whose backward pass is not the one :func:`distgraph.grad` builds for its
    ``grad_of``: ``grads`` naming another node, or backward nodes edited, would make a run
    return (and a Trainer apply) values that are not the gradients they are named as."""
    from .autodiff import forward_part, grad  # autodiff builds on this module

    backward = {n.name: n for n in spec.nodes if n.phase == "backward"}
    if spec.grad_of is None:
        if spec.grads or backward:
            raise SpecError(
                "grad_of: null, but the spec holds a backward pass (grads or backward nodes); "
                "a backward pass is only read together with the output it differentiates"
            )
        return
    try:
        want = grad(forward_part(g), of=spec.grad_of, wrt=list(spec.grads))
    except DistgraphError as e:
        raise SpecError(f"grad_of: {e}") from None
    if want._grads != dict(spec.grads):
        raise SpecError(
            f"grads: {dict(spec.grads)} is not where the gradients of {spec.grad_of!r} are "
            f"({want._grads}); re-create the graph with dg.grad(graph, of={spec.grad_of!r})"
        )
    made = {n.name: n for n in want._nodes.values() if n.phase == "backward"}
    for name in sorted(set(made) | set(backward)):
        a, b = made.get(name), backward.get(name)
        if a is None or b is None:
            what = (
                f"a backward node that dg.grad does not build for {spec.grad_of!r}"
                if a is None
                else f"missing: dg.grad builds this backward node for {spec.grad_of!r}"
            )
        else:
            fields = [
                f
                for f, mine, theirs in (
                    ("op", a.op, b.op),
                    ("inputs", list(a.inputs), b.inputs),
                    ("attrs", a.attrs, b.attrs),
                )
                if mine != theirs
            ]
            if not fields:
                continue
            what = (
                f"its {' and '.join(fields)} differ from what dg.grad builds for "
                f"{spec.grad_of!r} (were a forward node's attrs edited?)"
            )
        raise SpecError(
            f"nodes.{name}: {what}; re-create the graph with dg.grad(graph, of={spec.grad_of!r})"
        )


def _check_result_shape(label: Any, op: str, shape: Shape | None) -> None:
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
    node: str | _Label,
) -> tuple[Shape | None, str | None]:
    """Output shape and dtype of ``op`` on inputs of these shapes/dtypes; raises on mismatch."""
    return _infer_checked(op, get_op(op), shapes, dtypes, attrs, weak, node)


def _infer_checked(
    op: str,
    spec: Op,
    shapes: Sequence[Sequence[int | None] | None],
    dtypes: Sequence[str | None],
    attrs: dict,
    weak: Sequence[Any],
    node: str | _Label,
) -> tuple[Shape | None, str | None]:
    """:func:`infer` for an op already looked up (``spec`` is ``get_op(op)``)."""
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
    node: str | _Label,
) -> tuple[Shape | None, str | None]:
    if spec.arity is not None and len(shapes) != spec.arity:
        raise GraphError(f"node {node!r} (op {op}): takes {spec.arity} inputs, got {len(shapes)}")
    if spec.arity is None and not shapes:
        raise GraphError(f"node {node!r} (op {op}): needs at least one input")
    if spec.infer is not None:  # the op's own rule (see Op.infer)
        shape, dtype = spec.infer([_opt_shape(s) for s in shapes], list(dtypes), attrs, node)
        return shape, dtype
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


def _broadcast(shapes: Sequence[Shape], op: str, node: str | _Label) -> Shape:
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


def _matmul_shape(a: Shape, b: Shape, node: str | _Label) -> Shape:
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
    node: str | _Label,
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
    node: str | _Label,
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
    op: str, dtypes: Sequence[str | None], attrs: dict, weak: Sequence[Any], node: str | _Label
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
    op: str, dtypes: Sequence[str | None], attrs: dict, weak: Sequence[Any], node: str | _Label
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


def _is_topological(nodes: Sequence[NodeSpec]) -> bool:
    seen: set[str] = set()
    for node in nodes:
        if any(i not in seen for i in node.inputs):
            return False
        seen.add(node.name)
    return True


def _fmt(shapes: Sequence[Any]) -> str:
    return " and ".join(str(tuple(s)) if s is not None else "(unknown)" for s in shapes)


def _opt_shape(shape: Any) -> Shape | None:
    return None if shape is None else tuple(shape)


def _check_name(name: str) -> None:
    problem = name_problem(name)
    if problem:
        raise GraphError(problem)


def _dtype_name(dtype: Any, what: str) -> str:
    try:
        name = np.dtype(dtype).name
    except TypeError:
        raise DTypeError(f"{what}: {dtype!r} is not a dtype") from None
    if name not in ALLOWED_DTYPES:
        raise DTypeError(f"{what}: dtype {name} is not supported")
    return name


def _axis(axis: int | Sequence[int] | None) -> int | list[int] | None:
    if axis is None or isinstance(axis, int):
        return axis
    return [int(a) for a in axis]


def _encode_index(key: Any) -> list[Any]:
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
