"""How much memory a program needs, known from its shapes before any kernel runs.

An executor keeps every value of a run until the run ends (the backward wave reads the forward
activations), so the estimate is the sum of every value the program holds (feeds, params,
constants and node outputs, at their full contiguous size) plus scratch for the largest
kernel (twice its largest operand: numpy's temporaries). A program above the limit is refused
with a :class:`~distgraph.errors.ResourceError` naming its largest values.

Executors check twice: when a request is compiled, with batch dimensions counted as 1 (this
catches shapes declared huge, before anything allocates); and when the feeds fix the batch
size, for programs whose sizes depend on it (shapes are propagated from the feeds' shapes).
Sizes that cannot be inferred without running (an op on more than ``INFER_ELEMENTS``
elements) count as the sum of their inputs.
"""

from __future__ import annotations

import math
import operator
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .cost import itemsize
from .errors import ConfigError, DistgraphError, ResourceError
from .infer import infer
from .ops import LEAF_OPS, node_op
from .program import Program

#: Used when the machine's memory cannot be read.
FALLBACK_MAX_BYTES = 4 * 2**30


def default_max_bytes() -> int:
    """The default limit: half of this machine's physical memory (4 GiB if unknown)."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return FALLBACK_MAX_BYTES
    return total // 2 if total > 0 else FALLBACK_MAX_BYTES


def check_max_bytes(max_bytes: Any) -> int:
    """Validate a ``max_bytes`` option: None gives the default, else an int >= 1."""
    if max_bytes is None:
        return default_max_bytes()
    if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 1:
        raise ConfigError(f"max_bytes must be an int >= 1 (bytes) or None, got {max_bytes!r}")
    return max_bytes


_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_bytes(text: str) -> int:
    """'8G', '512MiB', '1.5g' or '1000000' -> bytes (binary units); ValueError when malformed."""
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = value[-1:] if value[-1:] in _UNITS else ""
    number = value[: len(value) - len(unit)].strip()
    try:
        n = float(number)
    except ValueError:
        raise ValueError(f"{text!r} is not a size (say 8G, 512M or a number of bytes)") from None
    if not math.isfinite(n) or n * _UNITS[unit] < 1:
        raise ValueError(f"{text!r} is not a positive size")
    return int(n * _UNITS[unit])


@dataclass(frozen=True)
class MemoryEstimate:
    """A program's estimated peak memory and the values that make it up."""

    total_bytes: int
    values_bytes: int
    scratch_bytes: int
    #: (node, bytes, shape, dtype) of the largest values, largest first.
    largest: list[tuple[str, int, tuple[int, ...] | None, str | None]] = field(default_factory=list)

    def describe(self, count: int = 3) -> str:
        """The largest values in words."""
        parts = []
        for name, nbytes, shape, dtype in self.largest[:count]:
            # An input declared without dtype takes its feed's; it is counted as 8 bytes each.
            dt = dtype or "dtype of its feed"
            what = f"shape {shape} {dt}" if shape is not None else "size bounded by its inputs"
            parts.append(f"{name!r} {format_bytes(nbytes)} ({what})")
        return ", ".join(parts)


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} EiB"  # unreachable


def estimate_memory(
    program: Program, input_shapes: Mapping[str, Sequence[int]] | None = None
) -> MemoryEstimate:
    """Estimate ``program``'s peak memory.

    Without ``input_shapes``, the program's inferred shapes are used with batch (``None``)
    dimensions counted as 1. With them (the shapes of the prepared feeds), sizes that depend on
    the batch are propagated from the feeds.
    """
    order, nodes = program.order, program.nodes
    specs = program.cache.specs
    shapes = list(map(_SHAPE, specs))
    # Bytes per node as floats: exact to 2**53, and a huge shape cannot overflow.
    per_item = np.fromiter(map(itemsize, map(_DTYPE, specs)), np.float64, len(order))
    try:  # every shape fully known: one C-level pass
        numel = np.fromiter(map(math.prod, shapes), np.float64, len(order))
        vague: list[int] = []
    except TypeError:  # batch dimensions or unknown shapes
        numel = np.fromiter(map(_numel_or_nan, shapes), np.float64, len(order))
        vague = [i for i, sh in enumerate(shapes) if sh is None or None in sh]
    sizes = numel * per_item
    concrete: dict[str, tuple[int, ...] | None] = {}
    if input_shapes is not None and vague:
        # Propagate the feeds' shapes through the nodes whose size depends on them.
        for i in vague:
            node = nodes[order[i]]
            shape = _concrete_shape(program, node, concrete, shapes, input_shapes)
            concrete[node.name] = shape
            sizes[i] = math.nan if shape is None else math.prod(shape) * per_item[i]
    unknown = np.flatnonzero(np.isnan(sizes)).tolist()
    if unknown:  # in topological order, so inputs are bounded first
        index = {name: i for i, name in enumerate(order)}
        for i in unknown:
            node = nodes[order[i]]
            ins = [float(sizes[index[n]]) for n in node.inputs]
            sizes[i] = _unknown_bytes(node, ins)
    # Kernel scratch: the largest operand (input or output) of any one non-leaf node.
    src, dst = program.cache.edges
    operand = sizes.copy()
    np.maximum.at(operand, dst, sizes[src])
    compute = ~program.cache.leaf_mask
    scratch = 2 * int(operand[compute].max()) if compute.any() else 0
    values = int(sizes.sum())
    top = np.argsort(-sizes, kind="stable")[:5].tolist()
    largest = []
    for i in top:
        name = order[i]
        shape = concrete.get(name) if name in concrete else _opt_tuple(shapes[i], input_shapes)
        largest.append((name, int(sizes[i]), shape, nodes[name].dtype))
    return MemoryEstimate(values + scratch, values, scratch, largest)


_SHAPE = operator.attrgetter("shape")
_DTYPE = operator.attrgetter("dtype")


def _numel_or_nan(shape: Any) -> float:
    """Elements of a shape with batch dimensions counted as 1 (nan when the shape is unknown)."""
    if shape is None:
        return math.nan
    return math.prod(1 if d is None else d for d in shape)


def _opt_tuple(shape: Any, input_shapes: Any) -> tuple[int, ...] | None:
    if shape is None or (input_shapes is not None and None in shape):
        return None
    return tuple(1 if d is None else d for d in shape)


def _unknown_bytes(node: Any, inputs: list[float]) -> float:
    """A bound on a value whose shape could not be inferred without running its op."""
    attrs = node.attrs
    if node.op == "broadcast_to" and isinstance(attrs.get("shape"), list):
        return math.prod(attrs["shape"]) * itemsize(node.dtype)
    if node.op == "concat":
        return sum(inputs)
    biggest = max(inputs, default=0)
    if node.op == "index" and isinstance(attrs.get("index"), list):
        # Integer lists pick (and copy) rows: at most one copy of the input per index entry.
        picks = [np.asarray(i).size for i in attrs["index"] if isinstance(i, list)]
        return biggest * math.prod(picks)
    return biggest  # elementwise ops, reductions, reshapes: no larger than an input


def _concrete_shape(
    program: Program,
    node: Any,
    concrete: Mapping[str, tuple[int, ...] | None],
    shapes: Sequence[Any],
    input_shapes: Mapping[str, Sequence[int]],
) -> tuple[int, ...] | None:
    """A batch-dependent node's shape for these feeds (None when it cannot be inferred)."""
    nodes = program.nodes

    def shape_of(name: str) -> tuple[int, ...] | None:
        if name in concrete:
            return concrete[name]
        s: Any = nodes[name].shape  # batch-independent: as inferred
        return None if s is None or None in s else tuple(s)

    if node.op == "input":
        s = input_shapes.get(node.name)
        return None if s is None else tuple(s)
    if node.op in LEAF_OPS:
        return None
    row = node_op(node.op)
    if row.result_like is not None:  # a vjp node: its forward input's shape
        return shape_of(node.inputs[row.result_like(node.attrs)])
    ins = [shape_of(i) for i in node.inputs]
    if any(s is None for s in ins):
        return None
    consts = program.constants
    weak = [c if isinstance(c := consts.get(i), (int, float)) else None for i in node.inputs]
    try:
        shape, _ = infer(
            node.op, ins, [nodes[i].dtype for i in node.inputs], node.attrs, weak, node.name
        )
    except DistgraphError:
        return None  # the feeds do not fit: the run reports it, naming the node
    if shape is None:
        return None
    dims = tuple(d for d in shape if d is not None)
    return dims if len(dims) == len(shape) else None  # a None left: not fixed by these feeds


def check_memory(
    program: Program,
    max_bytes: int,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> MemoryEstimate:
    """:func:`estimate_memory`, raising :class:`ResourceError` above ``max_bytes``."""
    est = estimate_memory(program, input_shapes)
    if est.total_bytes > max_bytes:
        when = "for these feeds" if input_shapes is not None else "before any feed"
        raise ResourceError(
            f"the program needs about {format_bytes(est.total_bytes)} {when} "
            f"({format_bytes(est.values_bytes)} of values + {format_bytes(est.scratch_bytes)} "
            f"of kernel scratch), more than the limit of {format_bytes(max_bytes)}; "
            f"largest values: {est.describe()}. Raise the limit with max_bytes= on the "
            "executor (--max-memory on the command line) if this is intended"
        )
    return est


def batch_dependent(program: Program) -> bool:
    """Whether any value's size depends on the feeds (a batch dimension or an unknown shape)."""
    return bool(program.cache.batch_dependent)


def check_feeds_memory(program: Program, arrays: Mapping[str, Any]) -> None:
    """The check once the feeds fix the batch size (a no-op for programs compiled outside an
    executor, which sets the limit, and for programs whose sizes do not depend on feeds)."""
    limit = program.cache.memory_limit
    if limit is None or not batch_dependent(program):
        return
    shapes = {k: tuple(getattr(v, "shape", ())) for k, v in arrays.items()}
    key = (limit, tuple(sorted(shapes.items())))
    if program.cache.memory_checked == key:  # the same feed shapes as last time
        return
    check_memory(program, limit, shapes)
    program.cache.memory_checked = key


def check_program_memory(program: Program, max_bytes: int) -> None:
    """Check a compiled program's static estimate against ``max_bytes`` (once per limit), and
    set the limit its feeds are checked against (see :func:`check_feeds_memory`): an executor
    calls this for each program it hands out."""
    if program.cache.memory_limit != max_bytes:
        # Before any kernel allocates; prepare_feeds checks again once the batch is known.
        check_memory(program, max_bytes)
        program.cache.memory_limit = max_bytes
