"""The Ray executor's settings, one mutable object shared by the cluster, the waves and every
training session (a setting changed on the executor, e.g. ``ex.deadline = 5``, applies to the
next call of each)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ...cost import CostModel
from ...partition import Strategy


@dataclass
class RayOptions:
    """Validated settings of a :class:`~distgraph.runtime.ray.RayExecutor` (see its docstring)."""

    num_workers: int = 2
    strategy: str | Strategy | Mapping[str, int] = "mincut"
    address: str | None = None
    placement: str = "spread"
    resources: dict[str, float] = field(default_factory=lambda: {"CPU": 1})
    cost: CostModel = field(default_factory=CostModel)
    blas_threads: int | None = None
    deadline: float = 600.0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    max_recoveries: int = 3
    worker_updates: bool = True
    data_path: str = "inline"
    ops_modules: list[str] = field(default_factory=list)
    worker_runtime_env: dict[str, Any] | None = None
    oversubscribe: bool = False
    #: How many run() plans stay installed (least recently used ones are dropped).
    max_plans: int = 32
    #: Parameter-server shards: params split over this many server actors, balanced by bytes.
    ps_shards: int = 1
    #: Data-parallel replicas of a training program (an int dividing num_workers, or "auto":
    #: the cost model's choice, one replica unless more pay clearly; see replicas.py).
    replicas: int | str = "auto"
    #: How run() steps travel: "calls" (actor calls), "compiled" (a Ray Compiled Graph from a
    #: plan's second run) or "auto" (the default: whichever of the two measured faster on the
    #: plan's own steps where compiling is supported, else calls; see transport_choice.py).
    transport: str = "auto"
    #: Training updates: "sync" (every replica computes a row shard of every step, combined)
    #: or "async" (each replica runs whole steps, applied as they arrive; see asyncdp.py).
    consistency: str = "sync"
    #: Async: a replica may start step t once every step <= t - staleness - 1 is applied.
    staleness: int = 0
    #: Test hook: replica -> slow-down factor (its steps take that many times as long).
    slow_replicas: dict[int, float] = field(default_factory=dict)
    #: Training steps split into this many micro-batches and run as a pipeline (None: not).
    microbatches: int | None = None
    #: The pipeline schedule (a key of ``distgraph.pipeline.SCHEDULES``).
    schedule: str = "gpipe"


#: Arrays bigger than this are put in the object store once instead of inlined per call.
INLINE_BYTES = 100 * 1024
