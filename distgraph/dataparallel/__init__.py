"""Data parallelism without a runtime: the pure pieces a distributed trainer calls.

A layout runs ``R`` replicas of a training program, each partitioned over ``N / R`` workers,
and each step's batch is split into ``R`` row shards. Everything here is plain Python and numpy
on plain data, tested without Ray:

* :func:`analyze_rows` — may the batch be split at all? It follows the batch axis (the leading
  axis of every input declared with a leading ``None``) through the forward ops and tells
  whether the loss is a mean or a sum of per-row terms (then shard gradients combine exactly),
  or raises a :class:`~distgraph.errors.GraphError` naming the node that couples rows.
* :func:`shard_rows` — the row slices of one batch, sizes differing by at most one.
* :func:`combine` — the exact combination of the shards' gradients, in a fixed order.
* :func:`choose_layout` / :func:`explain_layout` — replicas R (and so the partition width) from
  the cost model, with the estimated step time of every alternative.
* :func:`shard_params` / :func:`shard_param_pieces` — parameter-server shards balanced by bytes.
* :class:`StalenessClock` — bounded-delay bookkeeping (which steps may start, what was recorded
  on which parameter version, the staleness histogram).

How a runtime uses them. Once per training program::

    layout = choose_layout(program, cost, N, batch, ps_shards=S, memory_per_worker=...)
    split = analyze_rows(program)            # when R > 1; raises GraphError naming the node
    keys = shard_params({p: nbytes}, S)      # server s owns keys[s] (or shard_param_pieces)

One synchronous step ``t`` (``consistency="sync"``; every replica runs every step)::

    slices = shard_rows(batch_rows, R)       # replica r takes rows slices[r] (same on a retry)
    grads_r = replica r's gradients on its rows (feeds of split.batch_inputs cut by rows,
              split.shared_inputs whole), pushed per key to the key's server
    server s: combine([grads_0[keys], ...], [rows_0, ...], split.kind) in replica order,
              then apply it once as step t (exactly once per (shard, step))
    replicas pull the params their workers hold; step t+1 starts after every shard applied t

Asynchronous with staleness ``tau`` (``consistency="async"``; each replica takes whole
mini-batch steps, handed out in step-id order)::

    clock = StalenessClock(num_shards=S, first_step=first step id not yet applied)
    replica r, for its next step t: wait until clock.may_start(t, tau);
        v = clock.version; pull params (every shard has applied every step <= v)
        clock.record(r, t, v)                # once per (replica, step)
        compute the gradients of step t's whole mini-batch; push each key to its server
    server s applies each gradient as it arrives (no combine: one replica's mini-batch);
        then the driver calls clock.mark_applied(s, t) (once per (shard, step))
    status() reports clock.status(): applied-through per shard and the staleness histogram

``tau = 0`` makes the async schedule synchronous in order (step t waits for every step
before it), though each step is still one replica's mini-batch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from ..cost import CostModel, itemsize
from ..errors import ConfigError, DistgraphError, FeedError, GraphError, ResourceError, ShapeError
from ..graph import Graph
from ..ops import LEAF_OPS
from ..program import Program
from ..spec import NodeSpec

#: How a loss reduces over the batch rows: a mean (shard gradients weighted by their share of
#: the rows) or a sum (shard gradients added as they are).
Reduction = Literal["mean", "sum"]

# --- 1. Row coupling --------------------------------------------------------------------------


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


# --- 2. Row shards ----------------------------------------------------------------------------


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


# --- 3. Exact combination ---------------------------------------------------------------------


def shard_weights(rows_per_replica: Sequence[int], kind: Reduction) -> list[float]:
    """Each replica's gradient weight: ``rows / total`` for a mean loss, ``1.0`` for a sum."""
    if kind not in ("mean", "sum"):
        raise ConfigError(f"kind must be 'mean' or 'sum', got {kind!r}")
    rows = [int(r) for r in rows_per_replica]
    if not rows or min(rows) < 1:
        raise ConfigError(f"every replica that contributes needs rows >= 1, got {rows}")
    total = sum(rows)
    return [r / total if kind == "mean" else 1.0 for r in rows]


def combine(
    grads_per_replica: Sequence[Mapping[str, Any]],
    rows_per_replica: Sequence[int],
    kind: Reduction,
) -> dict[str, np.ndarray]:
    """The full-batch gradient from the replicas' shard gradients.

    ``sum_r w_r * g_r`` with the weights of :func:`shard_weights`, added in replica order (the
    order of the sequences: the same inputs give bit-identical results, whatever order the
    gradients arrived in). The result is the float64 sum of the weighted terms rounded once to
    the gradients' own dtype (float64 stays float64 throughout; narrower floats are rounded
    once, at the end). Two float32 replicas with equal shards (or a sum loss) are added in
    float32 instead, which gives that same correctly rounded value at a fraction of the cost;
    an element where float32 could round differently (a sum below 2**-125 or beyond float32's
    range) sends that gradient through float64. With one replica of weight one the gradient
    comes back unchanged. The result never aliases a replica's array. Only replicas that took
    rows are passed (see :func:`shard_rows`). Every replica must give the same names and
    shapes; a mismatch raises :class:`~distgraph.errors.ShapeError` naming the param.
    """
    if len(grads_per_replica) != len(rows_per_replica):
        raise ConfigError(
            f"combine: {len(grads_per_replica)} gradient sets but {len(rows_per_replica)} row "
            "counts; pass one row count per replica"
        )
    weights = shard_weights(rows_per_replica, kind)
    names = list(grads_per_replica[0])
    for r, grads in enumerate(grads_per_replica):
        if set(grads) != set(names):
            raise ShapeError(
                f"replica {r} sent gradients for {sorted(grads)}, replica 0 for {sorted(names)}"
            )
    out: dict[str, np.ndarray] = {}
    for name in names:
        terms = [np.asarray(grads[name]) for grads in grads_per_replica]
        first = terms[0]
        dtype = first.dtype
        if dtype.kind != "f":
            raise ShapeError(f"gradient of {name!r} has dtype {dtype}; gradients are floating")
        for r, g in enumerate(terms):
            if g.shape != first.shape:
                raise ShapeError(
                    f"gradient of {name!r} from replica {r} has shape {g.shape}, from replica 0 "
                    f"{first.shape}"
                )
        fast = _pair_f32(terms, weights)
        out[name] = fast if fast is not None else _weighted_f64(terms, weights, dtype)
    return out


def _weighted_f64(terms: Sequence[np.ndarray], weights: Sequence[float], dtype: Any) -> Any:
    """``sum_r w_r * g_r`` accumulated in float64 in replica order, rounded once to
    ``dtype``: a fresh array (never one of ``terms``)."""
    acc: Any = None
    tmp: np.ndarray | None = None
    for g, w in zip(terms, weights):
        if acc is None:
            # float64 terms (a copy: the result never aliases a replica's array).
            acc = np.asarray(  # a 0-d product comes back a scalar: keep an array to add into
                g.astype(np.float64) if w == 1.0 else np.multiply(g, w, dtype=np.float64)
            )
        elif w == 1.0:
            acc = np.add(acc, g, out=acc, dtype=np.float64)
        else:
            # The product is rounded in float64 first, as ``g.astype(float64) * w`` is.
            if tmp is None:
                tmp = np.empty(acc.shape, np.float64)
            np.multiply(g, w, out=tmp, dtype=np.float64)
            acc = np.add(acc, tmp, out=acc)
    return acc if dtype == np.float64 else acc.astype(dtype)


#: ``(bits << 1) - 2`` of a float32 (sign dropped) is below this for 0 < |x| < 2**-125.
_F32_TINY = np.uint32(0x01FFFFFE)


def _pair_f32(terms: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray | None:
    """Two float32 gradients weighted (1/2, 1/2) or (1, 1), added in float32 when that is
    bit-identical to the float64 route of :func:`_weighted_f64`; else None.

    Why it is identical: float64 holds each weighted term exactly, and rounding their float64
    sum to float32 gives the correctly rounded float32 sum (the float64 sum of two float32
    values is exact, or off by less than float32 could ever resolve), which is what float32
    addition returns. Halving that sum is exact unless it falls below 2**-125 (subnormal
    territory), and the float32 sum may overflow where the halved float64 one would not:
    either case returns None."""
    if len(terms) != 2 or any(t.dtype != np.float32 for t in terms):
        return None
    halve = tuple(weights) == (0.5, 0.5)
    if not halve and tuple(weights) != (1.0, 1.0):
        return None
    total = np.asarray(np.add(terms[0], terms[1]))
    if halve and total.size:
        bits = np.left_shift(total.view(np.uint32), np.uint32(1))
        bits -= np.uint32(2)  # zero wraps to the top; a tiny nonzero sum lands below _F32_TINY
        if bits.min() < _F32_TINY:
            return None
        total *= np.float32(0.5)
    if not np.isfinite(total).all():  # overflow, or non-finite inputs: the float64 route
        return None
    return total


# --- 4. Choosing R ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LayoutOption:
    """One candidate layout: ``replicas`` replicas, each partitioned over ``width`` workers."""

    replicas: int
    width: int
    strategy: str
    #: Estimated seconds of one training step (``compute + transfer + overhead``); inf if
    #: the layout is not possible.
    step_seconds: float
    #: One replica's plan estimate on its shard (compute, its calls and cross-worker values).
    compute_seconds: float = 0.0
    #: Gradients pushed to and params pulled from the servers by every replica.
    transfer_seconds: float = 0.0
    #: The driver's calls for the other replicas, the servers' calls, combining gradients.
    overhead_seconds: float = 0.0
    #: Largest estimated bytes held by one worker.
    worker_bytes: int = 0
    rows_per_replica: tuple[int, ...] = ()
    #: Why the layout is not possible (empty when it is).
    refused: str = ""
    #: With R > 1: the estimated step of one replica on ``width`` workers taking the whole
    #: batch (the other workers idle), which splitting the rows must beat.
    solo_seconds: float = math.inf

    @property
    def feasible(self) -> bool:
        """Whether this layout can run."""
        return not self.refused


@dataclass(frozen=True)
class Layout:
    """The chosen replicas × width, why, and every alternative considered."""

    replicas: int
    width: int
    num_workers: int
    strategy: str
    step_seconds: float
    reason: str
    #: The loss's reduction when it splits by rows (None when it does not).
    kind: Reduction | None
    rows_per_replica: tuple[int, ...]
    options: list[LayoutOption] = field(default_factory=list)
    ps_shards: int = 1


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def choose_layout(
    program: Program,
    cost: CostModel,
    num_workers: int,
    batch_size: int,
    *,
    strategy: str | Callable[..., Any] = "mincut",
    ps_shards: int = 1,
    memory_per_worker: int | None = None,
    replicas: int | None = None,
) -> Layout:
    """Choose how many data-parallel replicas (R) of ``program`` to run on ``num_workers``.

    Every divisor R of ``num_workers`` is considered, each replica partitioned over
    ``num_workers / R`` workers by ``strategy`` for a shard of ``ceil(batch_size / R)`` rows.
    Its estimated step time is

    * compute: :meth:`Plan.estimate` of one replica's plan (per-level makespan, its actor
      calls, values crossing its workers) — what ``plan.explain()`` reports today;
    * transfer: each replica pushes every param's gradient and pulls every param back, the
      ``ps_shards`` servers receiving and sending in parallel: ``2 * R * G / S`` bytes at the
      cost model's bandwidth (G = bytes of all params);
    * overhead: the calls of the other R-1 replicas' tasks and one call per server, each
      costed as an actor round trip (at least :data:`CALL_ROUND_TRIP`, whatever the cost
      model's pipelined ``call_overhead``), and combining R gradients on the servers
      (:data:`COMBINE_FLOPS_PER_ELEMENT` per gradient element and replica).

    R > 1 needs a loss that splits by rows (:func:`analyze_rows`) and at least R rows. With
    ``memory_per_worker`` (bytes), a layout whose busiest worker holds more (its params, the
    values of the nodes placed on it for its shard, and values it receives) is refused; when
    ``strategy`` keeps too much on one worker the other built-in strategies are tried.

    More replicas must pay clearly: going through the possible layouts by R, one with more
    replicas replaces the current choice only when its estimate is at least
    :data:`AUTO_MARGIN` below the current choice's *and* below that of one replica on the
    same width taking the whole batch (``solo_seconds``: splitting the rows must be what
    pays, not merely a narrower partition dodging a spreading strategy's calls), since R > 1
    gives up bit-identity with the full batch (shard gradients summed in another order equal
    it only to rounding). So tiny graphs, where calls dominate, keep one replica under every
    strategy. ``replicas`` forces R (refused with
    the reason when it is not possible). No possible layout raises
    :class:`~distgraph.errors.ResourceError`.
    """
    from ..partition import STRATEGIES  # partition imports plan imports program: no cycle here

    if not isinstance(num_workers, int) or num_workers < 1:
        raise ConfigError(f"num_workers must be an int >= 1, got {num_workers!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not isinstance(ps_shards, int) or ps_shards < 1:
        raise ConfigError(f"ps_shards must be an int >= 1, got {ps_shards!r}")
    if replicas is not None and (
        not isinstance(replicas, int) or replicas < 1 or num_workers % replicas
    ):
        raise ConfigError(
            f"replicas={replicas!r} must divide num_workers={num_workers} "
            f"(choose from {_divisors(num_workers)}, or 'auto')"
        )
    split: RowSplit | None = None
    split_error = ""
    try:
        split = analyze_rows(program)
    except GraphError as e:
        split_error = str(e)
    name = strategy if isinstance(strategy, str) else "custom"
    tries: list[Any] = [strategy]
    if isinstance(strategy, str) and memory_per_worker is not None:
        tries += [s for s in ("mincut", "level", "round_robin") if s != strategy]
        tries.append(_STAGES)
    grad_bytes = _param_bytes(program)
    options: list[LayoutOption] = []
    for r in _divisors(num_workers):
        width = num_workers // r
        rows = tuple(s.stop - s.start for s in shard_rows(batch_size, r)) if r <= batch_size else ()
        if r > 1 and split is None:
            options.append(
                _refused(r, width, name, f"the loss does not split by rows: {split_error}")
            )
            continue
        if r > batch_size:
            options.append(
                _refused(r, width, name, f"a batch of {batch_size} rows cannot feed {r} replicas")
            )
            continue
        best: LayoutOption | None = None
        best_attempt: Any = strategy
        for attempt in tries if width > 1 else [strategy]:
            option = _evaluate(
                program, cost, r, width, rows, attempt, grad_bytes, ps_shards, STRATEGIES
            )
            if memory_per_worker is not None and option.worker_bytes > memory_per_worker:
                option = dataclasses.replace(
                    option,
                    step_seconds=math.inf,
                    refused=(
                        f"a worker would hold {_fmt_bytes(option.worker_bytes)}, more than the "
                        f"{_fmt_bytes(memory_per_worker)} per worker"
                    ),
                )
            if best is None or (option.feasible, -option.worker_bytes) > (
                best.feasible,
                -best.worker_bytes,
            ):
                best, best_attempt = option, attempt
            if option.feasible:
                break
        assert best is not None
        if r > 1 and best.feasible:
            # What splitting rows is measured against: one replica on this width, whole batch.
            solo = _evaluate(
                program,
                cost,
                1,
                width,
                (batch_size,),
                best_attempt,
                grad_bytes,
                ps_shards,
                STRATEGIES,
            )
            best = dataclasses.replace(best, solo_seconds=solo.step_seconds)
        options.append(best)
    feasible = [o for o in options if o.feasible]
    if replicas is not None:
        chosen = next(o for o in options if o.replicas == replicas)
        if not chosen.feasible:
            raise ConfigError(f"replicas={replicas} is not possible: {chosen.refused}")
        reason = f"replicas={replicas} was requested"
    else:
        if not feasible:
            why = "; ".join(f"R={o.replicas}: {o.refused}" for o in options)
            raise ResourceError(f"no layout of {num_workers} workers is possible: {why}")
        chosen, reason = _auto_choice(feasible)
        if chosen.replicas == 1 and split is None and num_workers > 1:
            reason += " (the loss does not split by rows)"
    return Layout(
        replicas=chosen.replicas,
        width=chosen.width,
        num_workers=num_workers,
        strategy=chosen.strategy,
        step_seconds=chosen.step_seconds,
        reason=reason,
        kind=split.kind if split is not None else None,
        rows_per_replica=chosen.rows_per_replica,
        options=options,
        ps_shards=ps_shards,
    )


#: ``replicas="auto"`` takes more replicas only for an estimated step this much shorter
#: (a fraction of the current choice's): R > 1 equals the full batch to rounding only, and the
#: estimate is rough, so a near tie keeps fewer replicas.
AUTO_MARGIN = 0.25

#: Seconds of one more actor call (a round trip): measured 0.9-1.3 ms on a 2-core machine
#: (issue #16). The planner's ``call_overhead`` is a pipelined call's share, too low for the
#: extra replicas' calls, which the driver submits and waits for on top of one replica's.
CALL_ROUND_TRIP = 1e-3

#: Work per gradient element and replica of :func:`combine` (cast to float64, scale, add:
#: memory-bound passes numpy ran at 1.2-2.6 ns per element on this machine), in flops at the
#: cost model's rate.
COMBINE_FLOPS_PER_ELEMENT = 12.0


def _pays(o: LayoutOption, than: float) -> bool:
    return o.step_seconds <= (1.0 - AUTO_MARGIN) * than


def _auto_choice(feasible: Sequence[LayoutOption]) -> tuple[LayoutOption, str]:
    """The ``auto`` choice among possible layouts (in increasing R) and why."""
    chosen = feasible[0]
    for o in feasible[1:]:
        if _pays(o, chosen.step_seconds) and _pays(o, o.solo_seconds):
            chosen = o
    others = [o for o in feasible if o is not chosen]
    if not others:
        return chosen, "the only possible layout"
    # Faster only because each replica is narrower (a strategy that spreads a small graph
    # with many calls), not because splitting the rows pays: keep the layout asked for.
    narrower = [
        o
        for o in others
        if o.replicas > chosen.replicas
        and _pays(o, chosen.step_seconds)
        and not _pays(o, o.solo_seconds)
    ]
    if narrower:
        o = min(narrower, key=lambda o: (o.step_seconds, o.replicas))
        return chosen, (
            f"{_shape_words(o.replicas, o.width)} is estimated at {_ms(o.step_seconds)}, "
            f"but one replica on {o.width} worker{'s' if o.width != 1 else ''} at "
            f"{_ms(o.solo_seconds)}: splitting the rows would not pay "
            f"(less than {AUTO_MARGIN:.0%} faster), narrower replicas would only avoid "
            f"the {chosen.strategy!r} partition's calls; "
            + (
                "one replica keeps results bit-identical to one process on the full batch"
                if chosen.replicas == 1
                else "a near tie keeps fewer replicas"
            )
        )
    faster = [o for o in others if o.step_seconds < chosen.step_seconds]
    if faster:
        best = min(faster, key=lambda o: (o.step_seconds, o.replicas))
        keep = (
            "one replica keeps results bit-identical to one process on the full batch"
            if chosen.replicas == 1
            else "a near tie keeps fewer replicas"
        )
        return chosen, (
            f"{_shape_words(best.replicas, best.width)} is estimated at "
            f"{_ms(best.step_seconds)} against {_ms(chosen.step_seconds)}, less than "
            f"{AUTO_MARGIN:.0%} faster: {keep}"
        )
    runner = min(others, key=lambda o: (o.step_seconds, o.replicas))
    why = (
        f"lowest estimated step time: {_ms(chosen.step_seconds)} against "
        f"{_ms(runner.step_seconds)} for {_shape_words(runner.replicas, runner.width)}"
    )
    if chosen is not feasible[0]:
        why += f" (more replicas are taken only when {AUTO_MARGIN:.0%} faster)"
    return chosen, why


def _refused(r: int, width: int, strategy: str, why: str) -> LayoutOption:
    return LayoutOption(r, width, strategy, math.inf, refused=why)


def _param_bytes(program: Program, elements: bool = False) -> int:
    """Bytes (or elements) of every trained param (its gradient is as large)."""
    total = 0
    for p in program.grads:
        node = program.nodes[p]
        if node.shape is not None and None not in node.shape:
            n = math.prod(node.shape)  # type: ignore[arg-type]
            total += n if elements else n * itemsize(node.dtype)
    return total


def _evaluate(
    program: Program,
    cost: CostModel,
    r: int,
    width: int,
    rows: tuple[int, ...],
    strategy: Any,
    grad_bytes: int,
    ps_shards: int,
    strategies: Mapping[str, Any],
) -> LayoutOption:
    """Estimate one layout (see :func:`choose_layout`)."""
    from ..cost import bytes_array
    from ..partition import partition
    from ..plan import build_plan

    shard_cost = dataclasses.replace(cost, batch_size=max(rows))
    name = strategy if isinstance(strategy, str) else "custom"
    if strategy is _STAGES:
        placement = partition(program, width, stage_placement(program, width, shard_cost))
    else:
        placement = partition(program, width, strategy, shard_cost)
    plan = build_plan(program, placement, width, shard_cost, training=True, strategy=name)
    compute = plan.estimate_levels()
    transfer = cost.transfer_seconds(2 * r * grad_bytes // ps_shards)
    call = max(cost.call_overhead, CALL_ROUND_TRIP)
    combine_flops = r * _param_bytes(program, elements=True) * COMBINE_FLOPS_PER_ELEMENT
    overhead = (
        (r - 1) * len(plan.tasks) * call
        + ps_shards * cost.call_overhead
        + (combine_flops / ps_shards / cost.flops_per_second if r > 1 else 0.0)
    )
    nbytes = bytes_array(program, shard_cost)
    held = [0] * width
    for i, n in enumerate(program.order):
        held[placement[n]] += int(nbytes[i])
    for _, dst, b in plan.cross_edges:
        held[dst] += b
    return LayoutOption(
        replicas=r,
        width=width,
        strategy=name,
        step_seconds=compute + transfer + overhead,
        compute_seconds=compute,
        transfer_seconds=transfer,
        overhead_seconds=overhead,
        worker_bytes=max(held),
        rows_per_replica=rows,
    )


#: The memory fallback of :func:`choose_layout`: contiguous stages balanced by bytes.
_STAGES = "stages"


def stage_placement(program: Program, width: int, cost: CostModel) -> dict[str, int]:
    """Forward ops cut into ``width`` contiguous runs (in topological order) holding about
    equal bytes, counting with each op the params it reads and the backward nodes that
    differentiate it: a placement that spreads memory (a pipeline's stages) where the
    speed-minded strategies keep a chain on one worker. Returns the forward ops' workers;
    ``partition(program, width, placement)`` places leaves and backward nodes with them."""
    from ..cost import bytes_array

    nbytes = dict(zip(program.order, bytes_array(program, cost).tolist()))
    weight: dict[str, int] = {}
    forward = [
        n
        for n in program.order
        if program.nodes[n].phase == "forward" and program.nodes[n].op not in LEAF_OPS
    ]
    for n in forward:
        node = program.nodes[n]
        own = nbytes[n] + sum(
            nbytes[i] for i in node.inputs if program.nodes[i].op in ("param", "const")
        )
        weight[n] = own
    for n in program.order:
        origin = program.nodes[n].origin
        if program.nodes[n].phase == "backward" and origin in weight:
            weight[origin] += nbytes[n]
    total = sum(weight.values())
    placement, done = {}, 0
    for n in forward:
        # The stage holding the middle of this op's bytes.
        mid = done + weight[n] / 2
        placement[n] = min(width - 1, int(mid * width / total)) if total else 0
        done += weight[n]
    return placement


def _shape_words(replicas: int, width: int) -> str:
    """'2 replicas x 1 worker'."""
    return (
        f"{replicas} replica{'s' if replicas != 1 else ''} x "
        f"{width} worker{'s' if width != 1 else ''}"
    )


def _ms(seconds: float) -> str:
    return "n/a" if math.isinf(seconds) else f"{seconds * 1e3:.3f} ms"


def _fmt_bytes(n: float) -> str:
    from ..memory import format_bytes

    return format_bytes(n)


def explain_layout(layout: Layout) -> str:
    """What was chosen and why, with every alternative's estimated step time."""
    shape = (
        "data parallel"
        if layout.width == 1 and layout.replicas > 1
        else "partitioned"
        if layout.replicas == 1 and layout.width > 1
        else "replicas x partitions"
        if layout.replicas > 1
        else "one worker"
    )
    lines = [
        f"layout: {_shape_words(layout.replicas, layout.width)} each ({shape}) on "
        f"{layout.num_workers} worker{'s' if layout.num_workers != 1 else ''}, "
        f"strategy {layout.strategy!r}, "
        f"est. step {_ms(layout.step_seconds)}",
        f"  why: {layout.reason}",
    ]
    if layout.replicas > 1:
        total = sum(layout.rows_per_replica)
        weight = f"rows / {total}" if layout.kind == "mean" else "1 (a sum over rows)"
        lines.append(
            f"  rows per replica: {list(layout.rows_per_replica)}; gradients weighted by "
            f"{weight}, added in replica order"
        )
    servers = f"{layout.ps_shards} server shard{'s' if layout.ps_shards != 1 else ''}"
    lines.append(
        f"alternatives (est. step = compute + gradient push/pull to {servers} + overhead):"
    )
    for o in layout.options:
        mark = "*" if (o.replicas, o.width) == (layout.replicas, layout.width) else " "
        head = f"  {mark} R={o.replicas} x {o.width} worker{'s' if o.width != 1 else ''}"
        if not o.feasible:
            lines.append(f"{head}: not possible: {o.refused}")
            continue
        solo = (
            f"; one replica on {o.width} worker{'s' if o.width != 1 else ''}: {_ms(o.solo_seconds)}"
            if o.replicas > 1
            else ""
        )
        lines.append(
            f"{head}: {_ms(o.step_seconds)} (compute {_ms(o.compute_seconds)}, transfer "
            f"{_ms(o.transfer_seconds)}, overhead {_ms(o.overhead_seconds)}; busiest worker "
            f"holds {_fmt_bytes(o.worker_bytes)}; strategy {o.strategy!r}{solo})"
        )
    return "\n".join(lines)


# --- 5. Parameter-server shards ---------------------------------------------------------------


def shard_params(param_bytes: Mapping[str, int], shards: int) -> list[list[str]]:
    """Assign whole params to ``shards`` servers, balanced by bytes.

    Greedy, largest first (ties by name), each into the lightest shard so far (ties: lowest
    shard index): deterministic for the same sizes. Within a shard, names keep the order of
    ``param_bytes``. More shards than params raises :class:`~distgraph.errors.ConfigError`.
    A param larger than a shard's fair share (total / shards) unbalances the result however it
    is placed; :func:`shard_param_pieces` splits such params by rows instead.
    """
    if not isinstance(shards, int) or isinstance(shards, bool) or shards < 1:
        raise ConfigError(f"ps_shards must be an int >= 1, got {shards!r}")
    if shards > len(param_bytes):
        raise ConfigError(
            f"ps_shards={shards} is more than the {len(param_bytes)} params "
            f"({', '.join(param_bytes)}): use at most {len(param_bytes)} shards, or split "
            "large params by rows (shard_param_pieces)"
        )
    bad = {k: v for k, v in param_bytes.items() if not isinstance(v, (int, np.integer)) or v < 0}
    if bad:
        raise ConfigError(f"param sizes must be ints >= 0 (bytes), got {bad}")
    owner = _greedy({k: int(v) for k, v in param_bytes.items()}, shards)
    return [[k for k in param_bytes if owner[k] == s] for s in range(shards)]


def _greedy(sizes: Mapping[Any, int], shards: int) -> dict[Any, int]:
    load = [0] * shards
    owner = {}
    for key in sorted(sizes, key=lambda k: (-sizes[k], _sort_key(k))):
        s = min(range(shards), key=lambda i: (load[i], i))
        owner[key] = s
        load[s] += sizes[key]
    return owner


def _sort_key(key: Any) -> tuple[str, int]:
    if isinstance(key, ParamPiece):
        return (key.name, key.start)
    return (str(key), 0)


@dataclass(frozen=True)
class ParamPiece:
    """Rows ``start:stop`` (along axis 0) of param ``name``, or the whole param when ``whole``."""

    name: str
    start: int
    stop: int
    nbytes: int
    whole: bool = True

    @property
    def rows(self) -> slice:
        """The rows as a slice (``slice(None)`` for a whole param, scalars included)."""
        return slice(None) if self.whole else slice(self.start, self.stop)


def split_param(
    name: str, shape: Sequence[int], item_bytes: int, max_bytes: int
) -> list[ParamPiece]:
    """Split a param into row ranges of at most ``max_bytes`` each (sizes differing by at
    most one row); a param that fits, a scalar or one row stays whole (a row is never cut)."""
    shape = tuple(int(d) for d in shape)
    nbytes = math.prod(shape) * item_bytes
    if nbytes <= max_bytes or len(shape) == 0 or shape[0] <= 1:
        return [ParamPiece(name, 0, shape[0] if shape else 1, nbytes, True)]
    row_bytes = nbytes // shape[0]
    rows_per_piece = max(1, max_bytes // max(row_bytes, 1))
    parts = math.ceil(shape[0] / rows_per_piece)
    return [
        ParamPiece(name, s.start, s.stop, (s.stop - s.start) * row_bytes, False)
        for s in shard_rows(shape[0], parts)
    ]


def shard_param_pieces(
    params: Mapping[str, tuple[Sequence[int], Any]], shards: int
) -> list[list[ParamPiece]]:
    """Like :func:`shard_params`, but a param larger than the fair share (total bytes /
    ``shards``, rounded up) is first split by rows into pieces no larger than it, so shards
    stay balanced and no server holds one huge param. ``params`` maps name to (shape, dtype).
    Each server then applies the optimizer to its rows only: elementwise optimizers (SGD,
    Momentum, Adam) give the same result as on the whole param."""
    if not isinstance(shards, int) or isinstance(shards, bool) or shards < 1:
        raise ConfigError(f"ps_shards must be an int >= 1, got {shards!r}")
    sizes = {
        k: math.prod(int(d) for d in shape) * itemsize(None if dt is None else np.dtype(dt).name)
        for k, (shape, dt) in params.items()
    }
    fair = max(1, math.ceil(sum(sizes.values()) / shards))
    pieces: list[ParamPiece] = []
    for k, (shape, dt) in params.items():
        width = itemsize(None if dt is None else np.dtype(dt).name)
        pieces.extend(split_param(k, shape, width, fair))
    if shards > len(pieces):
        raise ConfigError(
            f"ps_shards={shards} is more than the {len(pieces)} pieces the params split into; "
            f"use at most {len(pieces)} shards"
        )
    owner = _greedy({p: p.nbytes for p in pieces}, shards)
    return [[p for p in pieces if owner[p] == s] for s in range(shards)]


def take_pieces(values: Mapping[str, Any], pieces: Iterable[ParamPiece]) -> dict[ParamPiece, Any]:
    """The arrays of ``pieces`` cut from whole param (or gradient) ``values``."""
    return {p: np.asarray(values[p.name])[p.rows] for p in pieces}


def join_pieces(parts: Mapping[ParamPiece, Any]) -> dict[str, np.ndarray]:
    """Whole params from their pieces (every piece of each param must be present)."""
    by_name: dict[str, list[ParamPiece]] = {}
    for p in parts:
        by_name.setdefault(p.name, []).append(p)
    out = {}
    for name, ps in by_name.items():
        ps.sort(key=lambda p: p.start)
        if len(ps) == 1 and ps[0].whole:
            out[name] = np.asarray(parts[ps[0]])
            continue
        expected = 0
        for p in ps:
            if p.whole or p.start != expected:
                raise ConfigError(f"param {name!r}: pieces do not cover its rows: {ps}")
            expected = p.stop
        out[name] = np.concatenate([np.asarray(parts[p]) for p in ps], axis=0)
    return out


# --- 6. Bounded staleness ---------------------------------------------------------------------


class DuplicateStepError(DistgraphError):
    """A (shard, step) applied twice or a (replica, step) recorded twice: exactly-once broken."""


@dataclass(frozen=True)
class Computed:
    """A replica's gradient for ``step``, computed on params of ``version`` (see
    :class:`StalenessClock`); ``staleness`` counts steps before ``step`` possibly missing."""

    replica: int
    step: int
    version: int
    staleness: int


class StalenessClock:
    """Bounded-delay bookkeeping for asynchronous training (pure; the driver owns one).

    Steps are numbered from ``first_step`` (the Trainer's first step id is 1; a resumed run
    passes the first step not yet applied; every step below it counts as applied). Each
    parameter-server shard reports the steps it has applied (:meth:`mark_applied`, at most once
    per (shard, step)); shards may apply steps out of order. The parameter *version* is the
    last step ``v`` such that every shard has applied every step ``<= v``: params pulled now
    reflect at least those. A replica may start step ``t`` under staleness bound ``tau`` when
    ``version >= t - tau - 1`` (:meth:`may_start`); ``tau = 0`` is synchronous training (step
    t waits for every earlier step). Each (replica, step) is recorded once with the version it
    was computed on (:meth:`record`); its staleness is ``t - 1 - version``, the number of
    earlier steps whose updates it may not have seen.
    """

    def __init__(self, num_shards: int = 1, first_step: int = 1):
        if not isinstance(num_shards, int) or num_shards < 1:
            raise ConfigError(f"num_shards must be an int >= 1, got {num_shards!r}")
        self.num_shards = num_shards
        self.first_step = first_step
        self._applied: list[set[int]] = [set() for _ in range(num_shards)]
        #: Per shard: every step <= this one is applied.
        self._through = [first_step - 1] * num_shards
        self._records: dict[tuple[int, int], Computed] = {}

    def mark_applied(self, shard: int, step: int) -> None:
        """Shard ``shard`` applied step ``step``; a second report of the same pair raises
        :class:`DuplicateStepError` (the caller has applied an update twice)."""
        if not 0 <= shard < self.num_shards:
            raise ConfigError(f"shard {shard} is out of range 0..{self.num_shards - 1}")
        if self.has_applied(shard, step):
            raise DuplicateStepError(
                f"shard {shard} already applied step {step}: each (shard, step) is applied once"
            )
        done = self._applied[shard]
        done.add(step)
        through = self._through[shard]
        while through + 1 in done:
            through += 1
            done.discard(through)  # only steps past the contiguous prefix are kept
        self._through[shard] = through

    def applied_through(self, shard: int) -> int:
        """The last step ``v`` such that shard ``shard`` has applied every step ``<= v``."""
        return self._through[shard]

    def has_applied(self, shard: int, step: int) -> bool:
        """Whether shard ``shard`` has applied step ``step``."""
        return step <= self._through[shard] or step in self._applied[shard]

    @property
    def version(self) -> int:
        """The last step every shard has applied with every step before it."""
        return min(self._through)

    def may_start(self, step: int, tau: int) -> bool:
        """Whether step ``step`` may start: every shard applied all steps ``<= step - tau - 1``."""
        if not isinstance(tau, int) or tau < 0:
            raise ConfigError(f"staleness must be an int >= 0, got {tau!r}")
        return self.version >= step - tau - 1

    def record(self, replica: int, step: int, version: int | None = None) -> Computed:
        """Record that ``replica`` computed step ``step`` on params of ``version`` (default: the
        current one); a second record of the same (replica, step) raises
        :class:`DuplicateStepError`."""
        key = (replica, step)
        if key in self._records:
            raise DuplicateStepError(
                f"replica {replica} already recorded step {step} (on version "
                f"{self._records[key].version}): each (replica, step) is recorded once"
            )
        v = self.version if version is None else version
        entry = Computed(replica, step, v, max(0, step - 1 - v))
        self._records[key] = entry
        return entry

    @property
    def records(self) -> list[Computed]:
        """Every record, in the order they were made."""
        return list(self._records.values())

    def histogram(self) -> dict[int, int]:
        """How many recorded (replica, step) had each staleness, by staleness ascending."""
        counts: dict[int, int] = {}
        for c in self._records.values():
            counts[c.staleness] = counts.get(c.staleness, 0) + 1
        return dict(sorted(counts.items()))

    def max_staleness(self) -> int:
        """The largest recorded staleness (0 with no records)."""
        return max((c.staleness for c in self._records.values()), default=0)

    def status(self) -> dict[str, Any]:
        """For ``status()``: applied-through per shard, version, staleness histogram."""
        return {
            "applied_through": list(self._through),
            "version": self.version,
            "staleness_histogram": self.histogram(),
        }
