"""A small cost model: bytes of each value and estimated seconds of each node.

Rough on purpose: it only has to tell a 512x512 matmul from a scalar add, and a 1 MB transfer
from a call's fixed overhead, so the partitioner can keep cheap nodes together.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .ops import LEAF_OPS, OPS
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
        """Estimated floating-point operations of a node."""
        if node.op in LEAF_OPS:
            return 0.0
        op_name = node.attrs.get("op") if node.op == "vjp" else node.op
        rule = OPS[op_name].flops if op_name in OPS else None
        if rule is not None:  # the op's own rule: matmul (2*M*N*K), conv2d, einsum
            return self._rule_flops(rule, node, inputs)
        per = OPS[op_name].flops_per_element if op_name in OPS else 1.0
        size = max([self.numel(node)] + [self.numel(i) for i in inputs])
        return (2.0 if node.op == "vjp" else 1.0) * per * size

    def _rule_flops(self, rule: Any, node: NodeSpec, inputs: list[NodeSpec]) -> float:
        """An op's own cost rule (``Op.flops``) on concrete shapes; for a VJP node, the forward's
        output shape is the cotangent's and its inputs are the node's last inputs."""
        if node.op == "vjp":
            op = OPS[node.attrs["op"]]
            skip = 2 if op.uses_out else 1
            fwd, out, attrs = inputs[skip:], inputs[0], node.attrs.get("attrs", {})
            argnum = node.attrs.get("argnum")
        else:
            fwd, out, attrs, argnum = inputs, node, node.attrs, None
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


@functools.cache
def itemsize(dtype: str | None) -> int:
    """Bytes per element of a dtype name (unknown dtypes count as float64)."""
    return np.dtype(dtype).itemsize if dtype else 8
