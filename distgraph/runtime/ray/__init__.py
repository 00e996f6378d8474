"""The Ray runtime: the only part of distgraph that imports ``ray``.

- ``executor.py``: :class:`RayExecutor`, the facade (options, ``run``, ``plan``,
  ``training_session``, ``close``);
- ``connect.py``: start an embedded runtime or join a cluster, within a deadline;
- ``cluster.py``: placement group, worker actors (start, probe, replace), object-store capacity;
- ``waves.py``: install plans, submit a step's calls, wait with a deadline, diagnose a timeout,
  assemble a step's trace;
- ``session.py``: a training session (stage/commit/abort, recovery and replay), given the
  cluster and the waves; ``server.py``: its parameter-server actor; ``training.py``: what a
  training plan implies (replicas, routes) and a training set shipped once;
- ``actors.py``: ``Worker`` and ``ParameterServer`` as Ray actors, and :func:`fetch`;
- ``options.py``: the settings those parts share.

The driver↔worker call header is :mod:`distgraph.runtime.protocol` (Ray-free: the worker
reads it too).
"""

from .actors import fetch as fetch
from .connect import machine_cpus as machine_cpus
from .executor import RayExecutor as RayExecutor
from .options import INLINE_BYTES as INLINE_BYTES
from .options import RayOptions as RayOptions
from .session import RaySession as RaySession
from .training import replica_layout as replica_layout

__all__ = [
    "INLINE_BYTES",
    "RayExecutor",
    "RayOptions",
    "RaySession",
    "fetch",
    "machine_cpus",
    "replica_layout",
]
