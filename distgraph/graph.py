"""The tracing front end: a ``Graph`` and the ``Node`` handles whose operators build it.

Every node added is checked at once (op known, inputs present, shapes and dtypes compatible), so
a bad graph fails on the line that built the bad node. The graph's content is plain data
(:class:`~distgraph.spec.GraphSpec`); handles only point into it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np

from . import schedule
from ._util import gc_paused
from .errors import DTypeError, FeedError, GraphError, ShapeError, SpecError
from .infer import PROVISIONAL_DTYPE, Label, check_result_shape, infer, inferred_dtype
from .ops import LEAF_OPS, check_attrs, encode_index, get_op, node_op
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

    def __rpow__(self, base: Any) -> Node:
        # c ** x is exp(x * ln c): defined (and differentiable) only for a positive constant c.
        if isinstance(base, bool) or not isinstance(base, (int, float)):
            raise GraphError(f"{base!r} ** {self.name}: the base must be an int or float")
        if base <= 0:
            raise GraphError(
                f"{base!r} ** {self.name}: the base must be positive (c ** x is exp(x * ln c))"
            )
        return self.graph.apply("exp", self * math.log(base))

    def __neg__(self) -> Node:
        return self.graph.apply("neg", self)

    def __pos__(self) -> Node:
        return self

    def __getitem__(self, key: Any) -> Node:
        return self.graph.apply("index", self, index=encode_index(key))

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
        label = name or Label(op, names)  # unnamed: say what it was built from (on error only)
        if attrs or spec.required_attrs:
            check_attrs(spec, attrs, shapes, label)
        shape, dtype = infer(op, shapes, dtypes, attrs, self._weak_values(names), label, spec)
        check_result_shape(label, op, shape)
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

    # Hooks for autodiff ------------------------------------------------------------------------
    def attach_backward(self, nodes: Sequence[NodeSpec], grads: Mapping[str, str], of: str) -> None:
        """Record the backward pass :func:`distgraph.grad` built: append ``nodes`` (phase
        ``backward``, each reading nodes of the graph or earlier ones of ``nodes``) and set
        ``grads`` and ``grad_of``. Shapes and dtypes are taken as given (autodiff knows them:
        a gradient has its input's), so this is not a way to build unchecked forward nodes."""
        if self._grad_of is not None:
            raise GraphError(f"graph already holds the backward pass of {self._grad_of!r}")
        table = self._nodes
        new = {node.name: node for node in nodes}
        for node in nodes:  # checked before anything is added: a refusal changes nothing
            if node.name in table or len(new) != len(nodes):
                raise GraphError(f"cannot add gradient node {node.name!r}: the name is taken")
            if node.phase != "backward":
                raise GraphError(f"gradient node {node.name!r} must have phase 'backward'")
        missing = [n for n in (of, *grads, *grads.values()) if n not in table and n not in new]
        if missing:
            raise GraphError(f"the backward pass refers to missing nodes {missing}")
        table.update(new)
        self._grads = dict(grads)
        self._grad_of = of
        self._touch()

    def without_backward(self) -> Graph:
        """A copy without its backward pass: backward nodes, nodes computed from them and the
        ``grads``/``grad_of`` record are dropped (outputs among them too)."""
        out = self.copy()
        dropped: set[str] = set()
        kept = {}
        for name, node in self._nodes.items():
            if node.phase == "backward" or not dropped.isdisjoint(node.inputs):
                dropped.add(name)
            else:
                kept[name] = node
        out._nodes = kept
        out._outputs = [o for o in out._outputs if o not in dropped]
        out._constants = {k: v for k, v in out._constants.items() if k not in dropped}
        out._grads = {}
        out._grad_of = None
        out._touch()
        return out

    @classmethod
    def from_records(cls, nodes: Mapping[str, NodeSpec], constants: Mapping[str, Any]) -> Graph:
        """A graph over node records that were checked already (a compiled program's), for
        :meth:`specialize`-ing them again; nothing is re-inferred and it holds no params."""
        g = cls()
        g._nodes = dict(nodes)
        g._constants = dict(constants)
        return g

    # Compiling for a feed signature -----------------------------------------------------------
    def open_inputs(self) -> list[str]:
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

    def specialize(self, fed: Mapping[str, tuple[str, int]], ranks: bool = False) -> Graph:
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
    def node_map(self) -> Mapping[str, NodeSpec]:
        """Node records by name in topological (insertion) order: a read-only view, no copy."""
        return MappingProxyType(self._nodes)

    @property
    def param_values(self) -> Mapping[str, np.ndarray]:
        """Parameter values by name: a read-only view of the arrays themselves, no copies
        (do not modify them in place; :attr:`params` gives copies)."""
        return MappingProxyType(self._params)

    @property
    def constants(self) -> Mapping[str, Any]:
        """Constant values by node name: a read-only view."""
        return MappingProxyType(self._constants)

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
            if node.op not in LEAF_OPS:
                try:
                    node_op(node.op)
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
        from .autodiff import check_backward_pass  # autodiff builds on this module

        check_backward_pass(g, spec)
        g._grads = dict(spec.grads)
        g._grad_of = spec.grad_of
        g._touch()
        return g

    def _rebuild(self, node: NodeSpec) -> None:
        """Add a node read from a spec (or re-inferred for a feed signature), checked by its
        op's row: attributes and inferred shape and dtype, or the row's own check and the
        shape and dtype of the input its result is like (a vjp node: its forward input's)."""
        names = list(node.inputs)
        records = [self._nodes[n] for n in names]
        shapes = [r.shape for r in records]
        row = node_op(node.op)
        if row.result_like is not None and row.check_node is not None:
            row.check_node(node.name, names, node.attrs, shapes)
            like = records[row.result_like(node.attrs)]
            # As autodiff makes it (the declared dtype), so a spec round-trips unchanged.
            shape, dtype = _opt_shape(like.shape), like.dtype
        else:
            check_attrs(row, node.attrs, shapes, node.name)
            dtypes = [inferred_dtype(r) for r in records]
            weak = self._weak_values(names)
            shape, dtype = infer(node.op, shapes, dtypes, node.attrs, weak, node.name, row)
            check_result_shape(node.name, node.op, shape)
        self._add(
            node.name,
            node.op,
            names,
            dict(node.attrs),
            shape,
            dtype,
            False,
            row.phase or node.phase,
            node.origin,
        )


def _is_topological(nodes: Sequence[NodeSpec]) -> bool:
    seen: set[str] = set()
    for node in nodes:
        if any(i not in seen for i in node.inputs):
            return False
        seen.add(node.name)
    return True


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
