"""The cluster: a Ray connection, one placement group and ``num_workers`` worker actors.

State:
- ``options``: the executor's settings (shared, read live);
- ``workers`` (actor handles, by index) and ``worker_info`` (where each runs);
- the placement group holding one bundle per worker;
- ``replacements``: indices of workers replaced after a crash or node loss;
- the object store's capacity (asked once, and again after a recovery);
- the embedded runtime this cluster shares, if it started or joined one of this process.

Lifetime: connect (or reuse an initialised Ray) -> place the group -> start the workers ->
(probe and replace dead ones, as often as needed) -> close: kill the actors, release the group,
and shut down an embedded runtime when its last user closes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ...errors import ClusterError, ConfigError, WorkerLostError
from ...plan import Plan
from . import actors
from .connect import EmbeddedRuntime, connect
from .options import INLINE_BYTES, RayOptions

log = logging.getLogger(__name__)


class Cluster:
    """Ray connection, placement group and worker actors of one executor."""

    def __init__(
        self, options: RayOptions, connect_timeout: float, init_kwargs: dict[str, Any]
    ) -> None:
        self.options = options
        self.closed = False
        self.workers: list[Any] = []
        self.worker_info: list[dict[str, Any]] = []
        #: Workers replaced after a crash or node loss, by index.
        self.replacements: list[int] = []
        self._pg: PlacementGroup | None = None
        self._capacity: float | None = None
        started = connect(options, connect_timeout, init_kwargs)
        #: Node id of the embedded runtime this cluster shares (None: not one we started).
        self._embedded = EmbeddedRuntime.join(started)
        try:
            self._start_workers()
        except BaseException:
            self.close()
            raise

    # Actors -------------------------------------------------------------------------------------
    def _start_workers(self) -> None:
        o = self.options
        bundles = [dict(o.resources) for _ in range(o.num_workers)]
        strategy = "SPREAD" if o.placement == "spread" else "PACK"
        timeout = min(o.deadline, 60.0)
        total = ray.cluster_resources()
        short = {
            k: v * o.num_workers
            for k, v in o.resources.items()
            if v * o.num_workers > total.get(k, 0)
        }
        if short:  # can never fit: say so now instead of waiting for the placement group
            raise ClusterError(
                f"cannot place {o.num_workers} workers with {o.resources} each: they need "
                f"{_fmt_resources(short)} but the cluster has {_fmt_resources(total)} in all; lower "
                "num_workers or resources_per_worker"
            )
        self._pg = placement_group(bundles, strategy=strategy)
        try:
            ray.get(self._pg.ready(), timeout=timeout)
        except GetTimeoutError:
            total = ray.cluster_resources()
            remove_placement_group(self._pg)
            self._pg = None
            raise ClusterError(
                f"cannot place {o.num_workers} workers with {o.resources} each within "
                f"{timeout:.0f} s: the cluster has {_fmt_resources(total)}; lower num_workers or "
                "resources_per_worker"
            ) from None
        self.workers = [self._new_worker(i) for i in range(o.num_workers)]
        self.worker_info = actors.fetch([w.info.remote() for w in self.workers], timeout=timeout)

    def _new_worker(self, index: int, in_group: bool = True) -> Any:
        o = self.options
        res = dict(o.resources)
        cpus = res.pop("CPU", 0)
        gpus = res.pop("GPU", 0)
        options: dict[str, Any] = {
            "num_cpus": cpus,
            "num_gpus": gpus,
            "resources": res or None,
            "max_restarts": 0,
        }
        if in_group and self._pg is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                self._pg, placement_group_bundle_index=index
            )
        if o.worker_runtime_env:
            options["runtime_env"] = o.worker_runtime_env
        return actors.WorkerActor.options(**options).remote(index, o.blas_threads, o.ops_modules)

    def replace_worker(self, index: int) -> None:
        """Start a fresh worker ``index``: in its placement-group bundle if that can still be
        placed (Ray re-places bundles of a lost node), else anywhere the cluster has room."""
        with contextlib.suppress(Exception):
            ray.kill(self.workers[index])
        timeout = min(self.options.deadline, 60.0)
        for in_group in (True, False):
            worker = self._new_worker(index, in_group)
            try:
                info = actors.fetch(worker.info.remote(), timeout=timeout)
            except (GetTimeoutError, RayActorError):
                with contextlib.suppress(Exception):
                    ray.kill(worker)
                continue
            self.workers[index] = worker
            self.worker_info[index] = info
            self.replacements.append(index)
            log.warning("replaced worker %d; it now runs on node %s", index, info["node_ip"])
            return
        raise WorkerLostError(
            f"worker {index} died and no node has room for a replacement ({self.options.resources})"
        )

    def dead_workers(self) -> list[int]:
        """Indices of the workers that do not answer a probe. Nodes may have come or gone, so
        the object store's capacity is asked again next time it is needed."""
        probes = [(i, w.info.remote()) for i, w in enumerate(self.workers)]
        dead = []
        for i, ref in probes:
            try:
                actors.fetch(ref, timeout=30)
            except (RayActorError, GetTimeoutError, RayTaskError):
                dead.append(i)
        self._capacity = None
        return dead

    @property
    def nodes(self) -> list[str]:
        """Node IP of each worker, by worker index."""
        return [i["node_ip"] for i in self.worker_info]

    def check_open(self) -> None:
        """Refuse to run on a closed executor."""
        # Without workers a closed executor failed with a raw IndexError, and a call reaching
        # Ray after the runtime shut down silently started a new one nobody would stop.
        if self.closed:
            raise ConfigError(
                "this RayExecutor is closed (close() or the end of its with block); "
                "create a new RayExecutor to run or train again"
            )

    def close(self) -> None:
        """Stop the actors, release the placement group, and shut down an embedded Ray."""
        self.closed = True
        for w in self.workers:
            with contextlib.suppress(Exception):
                ray.kill(w)
        self.workers = []
        if self._pg is not None:
            with contextlib.suppress(Exception):
                remove_placement_group(self._pg)
            self._pg = None
        embedded, self._embedded = self._embedded, None
        if embedded is not None:  # shut down only when no other executor uses it
            EmbeddedRuntime.leave(embedded)

    # Capacity -----------------------------------------------------------------------------------
    def object_store_capacity(self) -> float:
        """Bytes of object store on the largest node (one value must fit on one node); asked
        of the cluster once and again after a recovery, not on every step."""
        if self._capacity is None:
            per_node = [
                n.get("Resources", {}).get("object_store_memory", 0.0)
                for n in ray.nodes()
                if n.get("Alive")
            ]
            self._capacity = max(
                per_node, default=ray.cluster_resources().get("object_store_memory", 0.0)
            )
        return self._capacity

    def check_fits(self, plan: Plan, values: Mapping[str, Any]) -> None:
        """Refuse a param or a predicted cross-worker value that cannot fit in the object store."""
        capacity = self.object_store_capacity()
        if not capacity:
            return
        too_big = [
            (n, int(np.asarray(v).nbytes))
            for n, v in values.items()
            if np.asarray(v).nbytes > capacity
        ]
        too_big += [(v, b) for v, _, b in plan.cross_edges if b > capacity]
        if too_big:
            name, nbytes = max(too_big, key=lambda t: t[1])
            raise ClusterError(
                f"{name!r} needs {nbytes:,} bytes but the object store holds at most {int(capacity):,} "
                "bytes per node; shrink the tensor (smaller batch) or start Ray with a larger "
                "object_store_memory"
            )

    def check_feeds_fit(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Refuse a feed that cannot fit in the object store."""
        big = {n: a for n, a in arrays.items() if a.nbytes > INLINE_BYTES}
        if big:
            capacity = self.object_store_capacity()
            for name, arr in big.items():
                if capacity and arr.nbytes > capacity:
                    raise ClusterError(
                        f"feed {name!r} is {arr.nbytes:,} bytes but the object store holds at most "
                        f"{int(capacity):,} bytes per node; feed smaller batches or start Ray with a "
                        "larger object_store_memory"
                    )


def _fmt_resources(res: Mapping[str, float]) -> str:
    keep = {
        k: v
        for k, v in res.items()
        if not k.startswith(("node:", "memory", "object_store", "bundle_group"))
        and "_group_" not in k
    }
    return ", ".join(f"{v:g} {k}" for k, v in sorted(keep.items())) or "no resources"
