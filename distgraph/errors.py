"""The exception hierarchy: every error distgraph raises on purpose is a ``DistgraphError``.

Messages name the thing at fault (node, op, shape, field, worker) so a user can find it
without a debugger.
"""

from __future__ import annotations


class DistgraphError(Exception):
    """Base class of every error distgraph raises on purpose."""


class GraphError(DistgraphError):
    """The graph's structure is wrong (bad name, dangling input, duplicate node)."""


class CycleError(GraphError):
    """The graph has a cycle; ``cycle`` holds its path, first node repeated at the end."""

    def __init__(self, cycle: list[str]):
        self.cycle = list(cycle)
        super().__init__("graph has a cycle: " + " -> ".join(self.cycle))


class UnknownOpError(GraphError):
    """A node names an op that is not in the registry."""


class ShapeError(DistgraphError):
    """Operand shapes do not fit the op."""


class DTypeError(DistgraphError):
    """Operand dtypes do not fit the op, or a dtype is not allowed."""


class SpecError(DistgraphError):
    """A serialized graph spec is malformed, oversized, or fails validation."""


class FeedError(DistgraphError):
    """Feeds are missing, unexpected, or of the wrong shape, dtype or batch size."""


class NonFiniteError(DistgraphError):
    """A feed or a node's value holds NaN or Inf (raised when ``check_finite`` is on)."""


class ExecutionError(DistgraphError):
    """An op failed while running; the message names the node, op and input shapes."""


class ConfigError(DistgraphError):
    """An invalid setting: optimizer hyperparameters, executor options, partition strategy."""


class GradientCheckError(DistgraphError, AssertionError):
    """Analytic and numerical gradients disagree."""


class ResourceError(DistgraphError):
    """A request would need more memory than the limit (``max_bytes``, ``--max-memory``)."""


class ClusterError(DistgraphError):
    """Ray could not be reached, or the cluster cannot host the requested workers."""


class WaveTimeoutError(DistgraphError):
    """A forward or backward wave passed its deadline; names the pending nodes and workers."""


class WorkerLostError(DistgraphError):
    """A worker or the parameter server died and recovery was not possible."""


class CheckpointError(DistgraphError):
    """A checkpoint is missing, unreadable, or does not match the graph."""
