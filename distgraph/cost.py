"""A small cost model: bytes of each value and estimated seconds of each node, per program.

Rough on purpose: it only has to tell a 512x512 matmul from a scalar add, and a 1 MB transfer
from a call's fixed overhead, so the partitioner can keep cheap nodes together.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .ops import LEAF_OPS, OPS, find_op
from .program import Program
from .spec import NodeSpec


@dataclass(frozen=True)
class CostModel:
    """Machine constants the partitioner and planner use (defaults fit a 2-core VM)."""

    flops_per_second: float = 5e9
    #: Python + numpy dispatch per node, which dominates for small tensors.
    node_overhead: float = 3e-6
    #: One actor call, pipelined, and the bandwidth of the object store between workers.
    call_overhead: float = 4e-4
    bytes_per_second: float = 1e9
    #: Assumed size of ``None`` (batch) dimensions when no feed says otherwise.
    batch_size: int = 1

    def numel(self, node: NodeSpec) -> int:
        """Element count of a node's value (unknown shapes count as one element)."""
        if node.shape is None:
            return 1
        return math.prod(self.batch_size if d is None else d for d in node.shape)

    def nbytes(self, node: NodeSpec) -> int:
        """Bytes of a node's value."""
        return self.numel(node) * itemsize(node.dtype)

    def flops(self, node: NodeSpec, inputs: list[NodeSpec]) -> float:
        """Estimated floating-point operations of a node: its op row's rate per element of
        the largest operand, or the row's exact count (matmul's 2*M*N*K)."""
        if node.op in LEAF_OPS:
            return 0.0
        name, factor, start = _cost_rule(node)
        rule = OPS.get(name)
        if rule is not None and rule.flops is not None:
            # The op's own count (matmul's 2*M*N*K, conv2d, einsum), of the forward or of the
            # VJP for one input: a weight gradient never scales like its input's gradient.
            argnum = node.attrs.get("argnum") if name != node.op else None
            return self._rule_flops(rule.flops, node, inputs, start, argnum)
        per = rule.flops_per_element if rule is not None else 1.0
        size = max([self.numel(node)] + [self.numel(i) for i in inputs])
        return factor * per * size

    def _rule_flops(
        self, rule: Any, node: NodeSpec, inputs: list[NodeSpec], start: int, argnum: int | None
    ) -> float:
        """An op's own cost rule (``Op.flops``) on concrete shapes; for a VJP node (``argnum``
        set), the forward's output shape is the cotangent's (the node's first input) and the
        forward inputs start at ``start``."""
        if argnum is not None:
            fwd, out, attrs = inputs[start:], inputs[0], node.attrs.get("attrs", {})
        else:
            fwd, out, attrs = inputs, node, node.attrs
        shapes = [self._concrete(i) for i in fwd]
        out_shape = self._concrete(out)
        if out_shape is None or None in shapes:
            return float(self.numel(node))  # unknown shapes: as cheap as an elementwise op
        return float(rule(out_shape, shapes, attrs, argnum))

    def _concrete(self, node: NodeSpec) -> tuple[int, ...] | None:
        if node.shape is None:
            return None
        return tuple(self.batch_size if d is None else d for d in node.shape)

    def seconds(self, node: NodeSpec, inputs: list[NodeSpec]) -> float:
        """Estimated run time of a node."""
        if node.op in LEAF_OPS:
            return 0.0
        return self.node_overhead + self.flops(node, inputs) / self.flops_per_second

    def transfer_seconds(self, nbytes: int) -> float:
        """Estimated time to move ``nbytes`` between workers."""
        return nbytes / self.bytes_per_second


def _cost_rule(node: NodeSpec) -> tuple[str, float, int]:
    """(op whose cost rule applies, factor on its rate, where its operands start)."""
    row = find_op(node.op)
    if row is not None and row.cost_rule is not None:
        return row.cost_rule(node.attrs)
    return node.op, 1.0, 0


@functools.cache
def itemsize(dtype: str | None) -> int:
    """Bytes per element of a dtype name (unknown dtypes count as float64)."""
    return np.dtype(dtype).itemsize if dtype else 8


@dataclass(eq=False)
class NodeCosts:
    """One program's per-node estimates under one cost model (kept in ``program.cache``)."""

    #: Seconds per node, in ``program.order``.
    seconds: np.ndarray | None = None
    #: Bytes of each node's value, in ``program.order``.
    nbytes: np.ndarray | None = None
    seconds_by_name: dict[str, float] | None = None
    bytes_by_name: dict[str, int] | None = None


def _costs(program: Program, cost: CostModel) -> NodeCosts:
    found = program.cache.costs.get(cost)
    if found is None:
        found = program.cache.costs[cost] = NodeCosts()
    return found


def node_seconds(program: Program, cost: CostModel) -> dict[str, float]:
    """Estimated seconds per node (computed once per program and cost model)."""
    costs = _costs(program, cost)
    if costs.seconds_by_name is None:
        costs.seconds_by_name = dict(zip(program.order, seconds_array(program, cost).tolist()))
    return costs.seconds_by_name


def node_bytes(program: Program, cost: CostModel) -> dict[str, int]:
    """Bytes of each node's value (computed once per program and cost model)."""
    costs = _costs(program, cost)
    if costs.bytes_by_name is None:
        costs.bytes_by_name = dict(zip(program.order, bytes_array(program, cost).tolist()))
    return costs.bytes_by_name


def seconds_array(program: Program, cost: CostModel) -> np.ndarray:
    """Estimated seconds per node as a float array in ``program.order`` (cached)."""
    costs = _costs(program, cost)
    if costs.seconds is not None:
        return costs.seconds
    nodes = program.nodes
    ops = program.cache.ops
    if type(cost) is not CostModel:  # a subclass may estimate differently: ask it per node
        out = [
            cost.seconds(s, [nodes[i] for i in s.inputs]) if s.op not in LEAF_OPS else 0.0
            for s in map(nodes.__getitem__, program.order)
        ]
        arr = costs.seconds = np.array(out, dtype=np.float64)
        return arr
    # The stock model, on arrays: overhead + factor * flops-per-element * largest operand size,
    # except matmuls (2*M*N*K), which are few and asked one by one.
    numel = _numel_array(program, cost)
    # The op whose cost rule applies, and a factor: the node's own, except for rows whose rule
    # depends on their attrs (a VJP's is its forward op's, doubled), visited one by one.
    names = list(ops)
    factor = np.ones(len(ops))
    dynamic = {op for op in set(ops) if (row := find_op(op)) is not None and row.cost_rule}
    if dynamic:
        specs = program.cache.specs
        visit = np.fromiter(map(dynamic.__contains__, ops), bool, len(ops))
        for i in np.flatnonzero(visit).tolist():
            names[i], factor[i], _ = _cost_rule(specs[i])
    rates = {k: OPS[k].flops_per_element if k in OPS else 1.0 for k in set(names)}
    per = np.fromiter(map(rates.__getitem__, names), np.float64, len(names))
    factor *= per
    src, dst = program.cache.edges
    size = numel.astype(np.float64)
    np.maximum.at(size, dst, numel[src].astype(np.float64))
    flops = factor * size
    exact = {k for k in rates if k in OPS and OPS[k].flops is not None}  # matmuls: few
    counted = np.fromiter(map(exact.__contains__, names), bool, len(names))
    for i in np.flatnonzero(counted).tolist():
        s = nodes[program.order[i]]
        flops[i] = cost.flops(s, [nodes[n] for n in s.inputs])
    arr = cost.node_overhead + flops / cost.flops_per_second
    arr[program.cache.leaf_mask] = 0.0
    costs.seconds = arr
    return arr


def bytes_array(program: Program, cost: CostModel) -> np.ndarray:
    """Bytes of each node's value as an int array in ``program.order`` (cached)."""
    costs = _costs(program, cost)
    arr = costs.nbytes
    if arr is None:
        if type(cost) is CostModel:
            dtypes = program.cache.dtypes
            widths = np.fromiter(map(itemsize, dtypes), np.int64, len(dtypes))
            arr = _numel_array(program, cost) * widths
        else:
            nodes = program.nodes
            arr = np.array([cost.nbytes(nodes[n]) for n in program.order], dtype=np.int64)
        costs.nbytes = arr
    return arr


def _numel_array(program: Program, cost: CostModel) -> np.ndarray:
    """Element count of each node's value under the stock model (unknown shapes count one)."""
    arr = program.cache.numel.get(cost.batch_size)
    if arr is None:
        batch = cost.batch_size
        shapes = program.cache.shapes
        try:  # every shape fully known: one C-level pass
            arr = np.fromiter(map(math.prod, shapes), np.int64, len(shapes))
        except TypeError:  # unknown shapes or batch dimensions
            arr = np.fromiter(
                (
                    1
                    if s is None
                    else math.prod(s)
                    if None not in s
                    else math.prod(batch if d is None else d for d in s)
                    for s in shapes
                ),
                np.int64,
                len(shapes),
            )
        program.cache.numel[batch] = arr
    return arr


def estimate_makespan(
    program: Program, placement: Mapping[str, int], cost: CostModel, calls: int, cross_bytes: int
) -> float:
    """Level-synchronous estimate: sum over levels of the busiest worker, plus overheads."""
    secs = node_seconds(program, cost)
    total = 0.0
    for lv in program.levels:
        per: dict[int, float] = {}
        for n in lv:
            per[placement[n]] = per.get(placement[n], 0.0) + secs[n]
        total += max(per.values(), default=0.0)
    return total + calls * cost.call_overhead + cost.transfer_seconds(cross_bytes)


@dataclass(frozen=True)
class Calibration:
    """What the runtime costs on one cluster, as the step-time predictor uses it (seconds).

    Measured by a short probe on an executor's own workers
    (``RayExecutor.calibrate()``, ``distgraph/runtime/ray/calibrate.py``) or, when nothing was
    measured, derived from a cost model's constants (:meth:`from_cost`; ``measured`` False).
    The predictor (:mod:`distgraph.predict`) models one driver that submits every call and
    relays every result a call on another worker waits for, workers that run their calls one
    at a time in submission order, and (pipelined steps) one call per worker running its
    actions in order, values handed from worker to worker (``deliver_s``).
    """

    #: A worker's time per call when calls are queued back to back (unpack, run, reply).
    call_overhead_s: float
    #: Transfer time per byte of a value one worker sends another.
    seconds_per_byte: float
    #: One dependent hop: a call that takes another worker's result as its argument, from the
    #: producer's end to the consumer's end (an empty call's whole relay through the driver).
    hop_s: float = 0.0
    #: The driver's serial cost per call (relaying results, dispatching calls): a step of
    #: ``n`` calls spends at least ``n * driver_s`` of driver time, whatever the workers do.
    driver_s: float = 0.0
    #: The driver's (Python) time to submit one call; a step submits its calls one by one.
    submit_s: float = 0.0
    #: A call's extra time per object it takes or returns beyond one each (the parameter
    #: server's staging call takes every gradient dict and returns params for every worker).
    object_s: float = 0.0
    #: The runtime's extra time per node of a call whose kernel blocks (sleeps, waits): on a
    #: busy machine a kernel that gives up its core waits to get it back.
    node_s: float = 0.0
    #: One hand-off of a pipelined step: a worker's action delivers a value to a peer's
    #: mailbox (an actor call on the peer's ``deliver``) and the peer's action waiting for it
    #: wakes, from the sender's action's end to the receiver's action's start.
    deliver_s: float = 0.0
    #: A pipelined action's own time inside its worker's call besides its nodes: taking its
    #: values, setting up its micro-batch, handing its results on (a ``deliver`` submitted
    #: from the worker), measured with every worker doing so at once.
    action_s: float = 0.0
    #: Workers the probe ran on (0: not measured).
    workers: int = 0
    #: Whether the constants were measured (else: a cost model's defaults).
    measured: bool = False
    #: The machine's 1-minute load average when measured (None: unknown).
    load: float | None = None

    @classmethod
    def from_cost(cls, cost: CostModel) -> Calibration:
        """Uncalibrated constants from a cost model: ``call_overhead`` per call, per hop and
        per hand-off, ``1 / bytes_per_second`` per byte, a free driver."""
        return cls(
            call_overhead_s=cost.call_overhead,
            seconds_per_byte=1.0 / cost.bytes_per_second,
            hop_s=cost.call_overhead,
            deliver_s=cost.call_overhead,
        )

    def describe(self) -> str:
        """One line: where the constants come from and their values."""
        what = (
            f"calibrated on {self.workers} workers"
            + (f" at load {self.load:.1f}" if self.load is not None else "")
            if self.measured
            else "default constants (not calibrated: RayExecutor.calibrate() measures them)"
        )
        return (
            f"{what}: call {self.call_overhead_s * 1e3:.3f} ms, hop {self.hop_s * 1e3:.3f} ms, "
            f"deliver {self.deliver_s * 1e3:.3f} ms, action {self.action_s * 1e3:.3f} ms, "
            f"driver {self.driver_s * 1e3:.3f} ms/call, submit {self.submit_s * 1e3:.3f} ms/call, "
            f"{self.object_s * 1e3:.3f} ms/object, {self.node_s * 1e3:.3f} ms/node, "
            f"{self.seconds_per_byte * 1e9:.3f} s/GB"
        )
