"""Which nodes couple batch rows, and the row shards of a batch.

Owns :func:`analyze_rows` (may a training program's batch be split into row shards whose
gradients combine exactly into the full batch's? It follows the batch axis through the forward
ops and either says whether the loss is a mean or a sum of per-row terms, or raises a
:class:`~distgraph.errors.GraphError` naming the node that couples rows), the per-op rules it
applies (:func:`declare_rowwise` adds custom ops to them), and :func:`shard_rows` (the row
slices of one batch). Kept apart because it is the package's one table of what each op does
to batch rows: the layout, the gradient arithmetic and the shards only see row counts and the
``RowSplit`` this returns.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ..errors import ConfigError, FeedError, GraphError
from ..graph import Graph
from ..ops import LEAF_OPS
from ..program import Program
from ..spec import NodeSpec

#: How a loss reduces over the batch rows: a mean (shard gradients weighted by their share of
#: the rows) or a sum (shard gradients added as they are).
Reduction = Literal["mean", "sum"]

# --- Row coupling -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RowSplit:
    """How a training program's batch may be split into row shards (see :func:`analyze_rows`)."""

    #: ``"mean"``: weight each shard's gradient by shard rows / batch rows; ``"sum"``: by 1.
    kind: Reduction
    #: The loss node analysed.
    loss: str
    #: Inputs whose feeds are split by rows (leading axis); every replica gets its own rows.
    batch_inputs: tuple[str, ...]
    #: Inputs fed whole to every replica (no batch axis).
    shared_inputs: tuple[str, ...]


@dataclass(frozen=True)
class _State:
    """What is known of one forward value with respect to the batch rows.

    ``free``: does not depend on the batch; ``rows``: its leading axis is the batch axis and
    row i depends only on row i of the batch inputs; ``mean`` / ``sum``: a linear function of a
    mean (sum) over the rows of per-row terms (batch-free in shape); ``coupled``: none of these
    (``reason`` says why, naming the node at fault).
    """

    kind: str
    #: For mean/sum: the node that reduced over the batch axis, described for messages.
    origin: str = ""
    reason: str = ""


_FREE = _State("free")
_ROWS = _State("rows")

#: Elementwise ops (numpy broadcasting) that keep rows independent.
_ELEMENTWISE = frozenset(
    [
        "add",
        "sub",
        "mul",
        "div",
        "neg",
        "pow",
        "maximum",
        "minimum",
        "exp",
        "log",
        "sqrt",
        "abs",
        "relu",
        "sigmoid",
        "tanh",
        "softplus",
        "where",
        "stop_gradient",
        "identity",
        "cast",
    ]
)
#: Custom ops declared (``declare_rowwise``) to work elementwise with numpy broadcasting.
_DECLARED_ROWWISE: set[str] = set()


def declare_rowwise(op: str) -> None:
    """Declare that custom op ``op`` computes each element from the same element of its
    inputs (numpy broadcasting), so :func:`analyze_rows` lets a batch be split through it as
    through ``mul``. Without it a custom op counts as coupling rows: ``elementwise=True`` in
    ``defop`` says only the output's shape, not that rows stay independent."""
    _DECLARED_ROWWISE.add(op)


#: Unary ops that are linear in their input: a mean (sum) over rows stays one through them.
_LINEAR_UNARY = frozenset({"neg", "identity", "stop_gradient"})
#: Shape ops that are linear: a batch reduction stays one through them.
_LINEAR_MOVES = frozenset({"reshape", "transpose", "broadcast_to", "index"})

_ADVICE = (
    "train with replicas=1, or compute the loss as a mean (or a sum) over the batch rows of "
    "per-row terms, reducing over the batch axis only there"
)


def analyze_rows(
    program: Program | Graph,
    loss: str | None = None,
    batch_inputs: Sequence[str] | None = None,
) -> RowSplit:
    """Decide whether shard gradients of ``program``'s loss combine into the full-batch one.

    The batch axis is the leading axis of each batch input: by default every input whose
    declared shape starts with ``None``; ``batch_inputs`` names them instead. The axis is
    followed through the forward nodes that the loss depends on: elementwise ops, matmuls
    against batch-free operands, reductions and softmaxes over other axes, and reshapes,
    transposes, indexes and concats that keep it leading, keep rows independent. A mean or sum
    over the batch axis (a ``mean``/``sum`` reduction including axis 0, ``mse``,
    ``cross_entropy``) is allowed when only linear steps follow it to the loss (adding,
    scaling by a batch-free value, further reductions). Anything else couples rows and is
    refused: a batch statistic used by per-row values (batch norm), a nonlinear function of a
    batch mean, a max or softmax over the batch axis, a reshape mixing the batch axis, and any
    op not known to keep rows independent. The analysis is conservative: an op that moves the
    batch axis away from position 0 is refused even if a later op moves it back.

    Returns a :class:`RowSplit` whose ``kind`` is ``"mean"`` or ``"sum"``; raises
    :class:`~distgraph.errors.GraphError` naming the node and op at fault otherwise. A
    ``"sum"`` loss may not add terms that do not depend on the batch (each replica would add
    them once); a ``"mean"`` loss may (the shard weights sum to one).
    """
    key = (loss, None if batch_inputs is None else tuple(batch_inputs))
    if isinstance(program, Program) and key in program.cache.row_splits:
        cached: RowSplit = program.cache.row_splits[key]
        return cached
    split = _analyze_rows(program, loss, batch_inputs)
    if isinstance(program, Program):
        program.cache.row_splits[key] = split
    return split


def _analyze_rows(
    program: Program | Graph, loss: str | None, batch_inputs: Sequence[str] | None
) -> RowSplit:
    nodes, loss_name, inputs, declared = _forward_view(program, loss)
    batch, shared = _batch_inputs(nodes, inputs, declared, batch_inputs, loss_name)
    needed = _ancestors(nodes, loss_name)
    states: dict[str, _State] = {}
    batch_set = set(batch)
    for name, node in nodes.items():
        if name not in needed:
            continue
        if node.op in LEAF_OPS:
            states[name] = _ROWS if name in batch_set else _FREE
            continue
        ins = [states[i] for i in node.inputs]
        shapes = [_shape(nodes[i]) for i in node.inputs]
        states[name] = _transfer(node, ins, shapes, nodes)
    final = states[loss_name]
    where = f"cannot split the batch of loss {loss_name!r} into row shards"
    if final.kind == "coupled":
        raise GraphError(f"{where}: {final.reason}; {_ADVICE}")
    if final.kind == "rows":
        raise GraphError(
            f"{where}: the loss still has the batch axis (it is not reduced over the rows of "
            f"{batch}); reduce it with a mean over the batch before training on it"
        )
    if final.kind == "free":
        raise GraphError(
            f"{where}: the loss does not depend on any batch input ({batch}), so there is "
            "nothing to split; train with replicas=1"
        )
    kind: Reduction = "mean" if final.kind == "mean" else "sum"
    return RowSplit(kind, loss_name, tuple(batch), tuple(shared))


def _forward_view(
    program: Program | Graph, loss: str | None
) -> tuple[dict[str, NodeSpec], str, list[str], dict[str, Any]]:
    """(forward nodes in topological order, loss name, input names, declared input shapes)."""
    if isinstance(program, Graph):
        specs = program.nodes
        names = [s.name for s in specs]
        if loss is None:
            loss = program.grad_of
        if loss is None:
            outs = program.outputs
            if len(outs) != 1:
                raise GraphError(
                    f"which output is the loss? the graph has outputs {outs}; pass loss=NAME"
                )
            loss = outs[0]
        if loss not in program:
            raise GraphError(f"no loss node {loss!r}; the graph's outputs are {program.outputs}")
        loss = program[loss].name
        all_nodes = dict(zip(names, specs))
        declared: dict[str, Any] = {}
        inputs = program.inputs
    else:
        all_nodes = program.nodes
        if loss is None:
            loss = program.grad_of
        if loss is None:
            if len(program.outputs) != 1:
                raise GraphError(
                    f"which output is the loss? the program has outputs {program.outputs}; "
                    "pass loss=NAME"
                )
            loss = program.outputs[0]
        if loss not in all_nodes:
            raise GraphError(f"no loss node {loss!r} in the program (outputs {program.outputs})")
        declared = program.declared
        inputs = program.inputs
    nodes = {n: s for n, s in all_nodes.items() if s.phase == "forward"}
    if loss not in nodes:
        raise GraphError(f"loss {loss!r} is a backward node; name a forward output")
    return nodes, loss, list(inputs), declared


def _batch_inputs(
    nodes: Mapping[str, NodeSpec],
    inputs: Sequence[str],
    declared: Mapping[str, Any],
    given: Sequence[str] | None,
    loss: str,
) -> tuple[list[str], list[str]]:
    """(batch inputs, shared inputs) among the inputs the loss depends on."""
    needed = _ancestors(nodes, loss)
    used = [n for n in inputs if n in needed]
    if given is not None:
        unknown = [n for n in given if n not in inputs]
        if unknown:
            raise GraphError(f"batch_inputs {unknown} are not inputs of the graph ({inputs})")
        batch = [n for n in used if n in given]
        shared = [n for n in used if n not in given]
    else:
        batch, shared, vague = [], [], []
        for n in used:
            shape = declared[n][0] if n in declared else nodes[n].shape
            if shape is None:
                vague.append(n)
            elif len(shape) and shape[0] is None:
                batch.append(n)
            else:
                shared.append(n)
        if vague:
            raise GraphError(
                f"cannot tell the batch axis of inputs {vague}: they are declared without a "
                "shape; declare it (None for the batch dimension, e.g. g.input('x', "
                "shape=(None, 4))) or pass batch_inputs"
            )
    if not batch:
        raise GraphError(
            f"cannot split the batch of loss {loss!r} into row shards: no input it depends on "
            f"declares a batch dimension (a leading None in its shape; inputs: {used}); "
            "train with replicas=1"
        )
    return batch, shared


def _ancestors(nodes: Mapping[str, NodeSpec], of: str) -> set[str]:
    seen = {of}
    stack = [of]
    while stack:
        for i in nodes[stack.pop()].inputs:
            if i not in seen:
                seen.add(i)
                stack.append(i)
    return seen


def _shape(node: NodeSpec) -> tuple[int | None, ...] | None:
    return None if node.shape is None else tuple(node.shape)


def _label(node: NodeSpec) -> str:
    """``'name' (op X[, axis A])`` for messages."""
    extra = ""
    if "axis" in node.attrs:
        extra = f", axis {node.attrs['axis']}"
    return f"{node.name!r} (op {node.op}{extra})"


def _coupled(node: NodeSpec, why: str) -> _State:
    return _State("coupled", reason=f"node {_label(node)} {why}")


def _axes(axis: Any, rank: int) -> set[int]:
    if axis is None:
        return set(range(rank))
    if isinstance(axis, int):
        return {axis % rank} if rank else set()
    return {a % rank for a in axis}


def _transfer(
    node: NodeSpec,
    ins: list[_State],
    shapes: list[tuple[int | None, ...] | None],
    nodes: Mapping[str, NodeSpec],
) -> _State:
    """The state of ``node``'s value from its inputs' states (see :class:`_State`)."""
    for s in ins:
        if s.kind == "coupled":
            return s  # the first coupling found stays the one reported
    kinds = {s.kind for s in ins}
    if kinds <= {"free"}:
        return _FREE  # a computation on batch-free values cannot couple rows
    op = node.op
    reduced = [s for s in ins if s.kind in ("mean", "sum")]
    if "rows" in kinds and reduced:
        return _coupled(
            node,
            f"combines per-row values with {reduced[0].origin}, a reduction over the batch "
            "axis: each row would see its shard's statistic instead of the whole batch's",
        )
    if reduced:
        return _transfer_reduced(node, ins, reduced)
    # Only rows and batch-free inputs from here on.
    if op in _ELEMENTWISE or op == "add_n" or op in _DECLARED_ROWWISE:
        if op == "cast" or _aligned(ins, shapes, _rank(node)):
            return _ROWS
        return _coupled(node, _misaligned(ins, shapes))
    if op in ("ones_like", "zeros_like"):
        return _ROWS
    if op == "matmul":
        return _matmul_rows(node, ins, shapes)
    if op in ("sum", "mean", "max"):
        rank = _known_rank(shapes[0])
        if rank is None:
            return _coupled(node, "reduces an operand of unknown rank")
        if 0 not in _axes(node.attrs.get("axis"), rank):
            return _ROWS
        if op == "max":
            return _coupled(node, "takes a max over the batch axis, which no shard can know")
        return _State(op, origin=f"{_label(node)} over the batch axis")
    if op in ("mse", "cross_entropy"):
        return _loss_rows(node, ins, shapes, nodes)
    if op in ("softmax", "log_softmax"):
        rank = _known_rank(shapes[0])
        if rank is None:
            return _coupled(node, "normalises an operand of unknown rank")
        if node.attrs.get("axis", -1) % rank == 0:
            return _coupled(node, "normalises over the batch axis: every row reads the others")
        return _ROWS
    if op == "reshape":
        return _reshape_rows(node, shapes[0])
    if op == "transpose":
        rank = _known_rank(shapes[0])
        perm = node.attrs.get("axes")
        if rank == 1 or (rank is not None and perm is not None and perm[0] % rank == 0):
            return _ROWS
        return _coupled(node, "moves the batch axis away from the front")
    if op == "index":
        return _index_rows(node)
    if op == "concat":
        rank = _known_rank(shapes[0])
        if kinds != {"rows"}:
            return _coupled(node, "joins per-row values with batch-free ones")
        if rank is None or node.attrs.get("axis", 0) % rank == 0:
            return _coupled(node, "concatenates along the batch axis")
        return _ROWS
    if op == "broadcast_to":
        return _coupled(node, "broadcasts per-row values to a fixed shape")
    if op in _NN_ROWWISE:
        return _nn_rows(node, ins, shapes)
    if op == "dropout":
        return _coupled(
            node,
            "draws its mask from each element's position in the whole batch: a shard would "
            "draw the first rows' masks",
        )
    return _coupled(
        node, "is not known to keep batch rows independent (unknown ops count as coupling)"
    )


#: Neural-network ops whose first input carries the batch on axis 0, the other inputs being
#: weights: each output row reads only its own input row (checked per op in ``_nn_rows``).
_NN_ROWWISE = frozenset(
    {
        "conv2d",
        "max_pool2d",
        "avg_pool2d",
        "layer_norm",
        "embedding",
        "gelu",
        "causal_mask",
        "einsum",
        "split",
        "stack",
    }
)


def _nn_rows(
    node: NodeSpec, ins: list[_State], shapes: list[tuple[int | None, ...] | None]
) -> _State:
    op = node.op
    rank = _known_rank(shapes[0])
    if op == "einsum":
        return _einsum_rows(node, ins)
    if op == "stack":
        if {s.kind for s in ins} != {"rows"}:
            return _coupled(node, "stacks per-row values with batch-free ones")
        if node.attrs.get("axis", 0) == 0:
            return _coupled(node, "stacks along the front, moving the batch axis away from it")
        return _ROWS
    if ins[0].kind != "rows" or any(s.kind != "free" for s in ins[1:]):
        return _coupled(node, "reads the batch through an input other than its first")
    if rank is None:
        return _coupled(node, "has an operand of unknown rank")
    if op == "layer_norm" and rank < 2:
        return _coupled(node, "normalises over the batch axis (its only axis)")
    if op == "causal_mask" and rank < 3:
        return _coupled(node, "masks over the batch axis")
    if op == "split" and node.attrs.get("axis", 0) % rank == 0:
        return _coupled(node, "splits along the batch axis")
    return _ROWS


def _einsum_rows(node: NodeSpec, ins: list[_State]) -> _State:
    """Rows stay independent when every per-row operand starts with the same letter, the
    output starts with it too, and no batch-free operand uses it."""
    text = str(node.attrs.get("subscripts", "")).replace(" ", "")
    if "->" not in text:
        return _coupled(node, "has subscripts without an explicit output")
    left, out = text.split("->")
    terms = left.split(",")
    if len(terms) != len(ins):
        return _coupled(node, "has subscripts that do not match its operands")
    row_terms = [t for t, s in zip(terms, ins) if s.kind == "rows"]
    letters = {t[:1] for t in row_terms}
    if len(letters) != 1 or not out.startswith(next(iter(letters))):
        return _coupled(node, f"moves or contracts the batch axis ({text!r})")
    batch = next(iter(letters))
    if any(batch in t for t, s in zip(terms, ins) if s.kind == "free"):
        return _coupled(node, f"contracts the batch axis with a batch-free operand ({text!r})")
    return _ROWS


def _transfer_reduced(node: NodeSpec, ins: list[_State], reduced: list[_State]) -> _State:
    """A node reading means or sums over the batch (and batch-free values): linear steps keep
    the reduction, anything else couples rows."""
    op = node.op
    kinds = {s.kind for s in reduced}
    first = reduced[0]
    if kinds == {"mean", "sum"}:
        means = next(s for s in reduced if s.kind == "mean")
        sums = next(s for s in reduced if s.kind == "sum")
        return _coupled(
            node,
            f"mixes a mean over the batch rows ({means.origin}) with a sum over them "
            f"({sums.origin}): shard gradients would need two weightings; make both terms "
            "means (or both sums)",
        )
    kind = first.kind
    free = any(s.kind == "free" for s in ins)
    if op in ("add", "sub", "add_n", "concat"):
        if free and kind == "sum" and op != "concat":
            return _coupled(
                node,
                f"adds a term that does not depend on the batch to a sum over the rows "
                f"({first.origin}): every replica would add it once; use a mean over the rows",
            )
        if op == "concat" and free:
            return _coupled(node, f"joins {first.origin} with batch-free values")
        return _State(kind, first.origin)
    if op in ("mul", "matmul"):
        if len(reduced) == 1:
            return _State(kind, first.origin)  # linear in the reduction
        return _coupled(node, f"multiplies two reductions over the batch ({first.origin})")
    if op == "div":
        if len(reduced) == 1 and ins[0].kind == kind:
            return _State(kind, first.origin)
        return _coupled(node, f"divides by a reduction over the batch ({first.origin})")
    if op in _LINEAR_UNARY or op in _LINEAR_MOVES or op in ("sum", "mean"):
        return _State(kind, first.origin)
    if op == "cast" and np.dtype(node.attrs["dtype"]).kind == "f":
        return _State(kind, first.origin)
    if op in ("ones_like", "zeros_like"):
        return _FREE
    return _coupled(
        node,
        f"applies op {op}, which is not linear, to {first.origin}: the result on a shard "
        "is not a share of the result on the batch",
    )


def _rank(node: NodeSpec) -> int | None:
    return None if node.shape is None else len(node.shape)


def _known_rank(shape: tuple[int | None, ...] | None) -> int | None:
    return None if shape is None else len(shape)


def _aligned(
    ins: list[_State], shapes: list[tuple[int | None, ...] | None], rank: int | None
) -> bool:
    """Whether broadcasting keeps the batch axis at position 0 of a result of ``rank``:
    every per-row operand has the full rank, and a batch-free operand of full rank has a
    leading dimension of one (else it would be matched row by row against the batch)."""
    if rank is None:
        return False
    for s, shape in zip(ins, shapes):
        if shape is None:
            if s.kind == "rows":
                return False
            continue  # an unknown batch-free operand: see below
        if s.kind == "rows" and len(shape) != rank:
            return False
        if s.kind == "free" and len(shape) == rank and rank and shape[0] != 1:
            return False
    return all(shape is not None for shape in shapes)


def _misaligned(ins: list[_State], shapes: list[tuple[int | None, ...] | None]) -> str:
    described = ", ".join(
        f"{'per-row' if s.kind == 'rows' else 'batch-free'} {shape}"
        for s, shape in zip(ins, shapes)
    )
    return (
        f"broadcasts its operands ({described}) so that the batch axis is not the leading "
        "axis of the result, or is matched against a batch-free axis"
    )


def _matmul_rows(
    node: NodeSpec, ins: list[_State], shapes: list[tuple[int | None, ...] | None]
) -> _State:
    ra, rb = _known_rank(shapes[0]), _known_rank(shapes[1])
    if ra is None or rb is None:
        return _coupled(node, "multiplies operands of unknown rank")
    a_rows, b_rows = ins[0].kind == "rows", ins[1].kind == "rows"
    if a_rows and not b_rows and ra >= 2 and rb <= 2:
        return _ROWS  # (N, ..., k) @ (k, m): row by row
    if b_rows and not a_rows and rb >= 3 and ra <= 2:
        return _ROWS  # (p, k) @ (N, k, m): a batched matmul per row
    if a_rows and b_rows and ra == rb >= 3:
        return _ROWS  # (N, t, k) @ (N, k, m): row i with row i
    return _coupled(
        node,
        f"contracts or broadcasts the batch axis (operands of rank {ra} and {rb}, "
        f"{'both' if a_rows and b_rows else 'one'} per-row)",
    )


def _loss_rows(
    node: NodeSpec,
    ins: list[_State],
    shapes: list[tuple[int | None, ...] | None],
    nodes: Mapping[str, NodeSpec],
) -> _State:
    """``mse`` and ``cross_entropy``: a mean over every row of per-row terms, when the batch
    axis is a leading axis of the terms (never cross_entropy's class axis)."""
    pred, target = shapes
    if pred is None or target is None:
        return _coupled(node, "takes operands of unknown rank")
    if node.op == "cross_entropy":
        if ins[0].kind != "rows":
            return _coupled(node, "reads per-row labels against batch-free logits")
        if len(pred) < 2:
            return _coupled(
                node, "normalises over the batch axis (the logits' last axis is the classes)"
            )
        labels = nodes[node.inputs[1]]
        integer = labels.dtype is not None and np.dtype(labels.dtype).kind in "iub"
        rank = len(pred) - 1 if integer else len(pred)
        terms = [_ROWS, ins[1]]
        if not _aligned(terms, [pred[:rank], target], rank):
            return _coupled(node, _misaligned(ins, shapes))
    else:
        rank = max(len(pred), len(target))
        if rank == 0 or not _aligned(ins, shapes, rank):
            return _coupled(node, _misaligned(ins, shapes))
    return _State("mean", origin=f"{_label(node)} over the batch axis")


def _reshape_rows(node: NodeSpec, shape: tuple[int | None, ...] | None) -> _State:
    target = list(node.attrs["shape"])
    tail = [] if shape is None else [d for d in shape[1:] if d is not None]
    rest = math.prod(tail) if shape is not None and len(tail) == len(shape) - 1 else None
    if (
        target
        and target[0] == -1
        and -1 not in target[1:]
        and rest is not None
        and math.prod(target[1:]) == rest
    ):
        return _ROWS  # (N, a, b) -> (-1, a*b): each row stays one row
    return _coupled(
        node,
        f"reshapes {shape} to {tuple(target)}: only (-1, ...) keeping each row's elements "
        "together keeps rows apart",
    )


def _index_rows(node: NodeSpec) -> _State:
    index = node.attrs["index"]
    if not index:
        return _ROWS
    first = index[0]
    if first != {"slice": [None, None, None]}:
        return _coupled(node, "selects or reorders along the batch axis (index the rows with ':')")
    lists = sum(isinstance(item, list) for item in index[1:])
    ints = sum(isinstance(item, int) and not isinstance(item, bool) for item in index[1:])
    if lists > 1 or (lists and ints):
        # numpy moves separated advanced indexes to the front, ahead of the batch axis.
        return _coupled(node, "mixes advanced indexes that may move the batch axis")
    return _ROWS


# --- Row shards -------------------------------------------------------------------------------


def shard_rows(n_rows: int, replicas: int) -> list[slice]:
    """The row ranges of a batch of ``n_rows`` for ``replicas`` replicas, in replica order.

    Sizes differ by at most one; the first ``n_rows % replicas`` shards hold the extra rows
    (``numpy.array_split``'s rule), so the split depends only on the two numbers. A batch with
    fewer rows than replicas gets ``n_rows`` shards of one row: the remaining replicas sit the
    step out (no shard is ever empty, since a mean over no rows is undefined). ``n_rows == 0``
    raises :class:`~distgraph.errors.FeedError`.
    """
    for name, value in (("n_rows", n_rows), ("replicas", replicas)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise ConfigError(f"shard_rows: {name} must be an int, got {value!r}")
    if replicas < 1:
        raise ConfigError(f"replicas must be >= 1, got {replicas}")
    if n_rows < 1:
        raise FeedError(f"cannot split a batch of {n_rows} rows: a step needs at least one row")
    count = min(int(n_rows), int(replicas))
    base, extra = divmod(int(n_rows), count)
    out, start = [], 0
    for r in range(count):
        size = base + (1 if r < extra else 0)
        out.append(slice(start, start + size))
        start += size
    return out
