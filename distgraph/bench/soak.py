"""`soak`: thousands of training steps on RayExecutor(2), watching for leaks.

Three gauges are sampled through the run: the driver's resident memory (psutil), the object
store's bytes in use across the cluster (the raylet's store stats, the figure behind
``ray memory --stats-only``), and the number of object refs the driver process holds (Ray's
reference table). The first 10% of samples are compared with the last 10%.
"""

from __future__ import annotations

import statistics
from typing import Any

from . import mlp
from ._harness import Record, log

NAME = "soak"
#: label -> (comparison, bound) of every target this benchmark checks. "Flat" object store:
#: the last 10% of samples may exceed the first 10% by at most 1 MiB.
TARGETS = {"rss_growth_mb": ("<=", 30.0), "store_growth_mib": ("<=", 1.0)}
#: Packages of the ``bench`` extra this benchmark needs (psutil, which reads the driver's memory).
PEERS: tuple[str, ...] = ("psutil",)


class StoreGauge:
    """Reads cluster-wide object-store bytes in use and the driver's live ref count."""

    def __init__(self) -> None:
        import ray
        from ray._private import internal_api

        self._api = internal_api
        self._state = internal_api.get_state_from_address(ray.get_runtime_context().gcs_address)
        # A private Ray object with no type stubs: its reference table is what we count.
        worker: Any = ray._private.worker.global_worker
        self._core = worker.core_worker

    def store_bytes(self) -> int:
        """Bytes in use in the shared-memory object store, summed over nodes."""
        reply = self._api.get_memory_info_reply(self._state)
        return int(reply.store_stats.object_store_bytes_used)

    def driver_refs(self) -> int:
        """Object refs currently tracked by the driver's reference counter."""
        return len(self._core.get_all_reference_counts())


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _edges(samples: list[float]) -> tuple[float, float]:
    tenth = max(1, len(samples) // 10)
    return statistics.mean(samples[:tenth]), statistics.mean(samples[-tenth:])


def bench(rec: Record, quick: bool = False, progress: bool = False) -> None:
    """Train a small MLP for many steps and report the growth of each gauge."""
    import distgraph as dg

    steps = 50 if quick else 2_000
    every = max(1, steps // 100)
    sizes, batch = [16, 32, 32, 4], 32
    params, x, y = mlp.make_problem(sizes, batch, seed=1)
    g = mlp.build_distgraph(sizes, params, batch)
    feeds = {"x": x, "y": y}
    rss: list[float] = []
    store: list[float] = []
    refs: list[float] = []
    losses: list[float] = []

    with dg.RayExecutor(num_workers=2) as ex:
        gauge = StoreGauge()
        step = mlp.training_step(dg, g, ex, feeds)
        for _ in range(5):  # warm-up: actor start, first plans, allocator pools
            step()
        log(progress, NAME, f"{steps} steps")
        for i in range(steps):
            loss = step()
            if i % every == 0 or i == steps - 1:
                rss.append(_rss())
                store.append(gauge.store_bytes())
                refs.append(gauge.driver_refs())
                if loss is not None:
                    losses.append(float(loss))

    rss_first, rss_last = _edges(rss)
    store_first, store_last = _edges(store)
    refs_first, refs_last = _edges(refs)
    rec.figure("steps", steps)
    rec.figure("rss_first_mb", rss_first / 2**20)
    rec.figure("rss_last_mb", rss_last / 2**20)
    rec.figure("store_first_bytes", store_first)
    rec.figure("store_last_bytes", store_last)
    rec.figure("driver_refs_first", refs_first)
    rec.figure("driver_refs_last", refs_last)
    if losses:
        rec.figure("loss_first", losses[0])
        rec.figure("loss_last", losses[-1])
    rec.target("rss_growth_mb", (rss_last - rss_first) / 2**20)
    rec.target("store_growth_mib", (store_last - store_first) / 2**20)
    rec.note(
        f"MLP {'-'.join(map(str, sizes))}, batch {batch}; gauges sampled every {every} steps "
        "after 5 warm-up steps; growth = mean of the last 10% of samples minus the first 10%. "
        "Store bytes come from the raylet's store stats (ray._private.internal_api, as used by "
        "`ray memory --stats-only`)."
    )
