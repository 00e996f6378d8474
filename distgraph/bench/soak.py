"""`soak`: thousands of training steps on RayExecutor(2), watching for leaks, on actor calls
and then on the compiled transport (``transport="compiled"``).

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
#: The ``compiled_`` ones: the same run on the compiled transport.
TARGETS = {
    "rss_growth_mb": ("<=", 30.0),
    "store_growth_mib": ("<=", 1.0),
    "compiled_rss_growth_mb": ("<=", 30.0),
    "compiled_store_growth_mib": ("<=", 1.0),
}
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


def _phase(
    dg: Any, g: Any, feeds: dict, transport: str, steps: int, progress: bool
) -> dict[str, list[float]]:
    """``steps`` training steps on a fresh ``RayExecutor(2, transport=...)``, gauges sampled
    about 100 times; returns the samples and the steps' wall time."""
    import itertools
    import time

    import numpy as np

    every = max(1, steps // 100)
    out: dict[str, list[float]] = {"rss": [], "store": [], "refs": [], "loss": [], "time": []}
    with dg.RayExecutor(num_workers=2, transport=transport) as ex:
        gauge = StoreGauge()
        trainer = dg.Trainer(
            g, loss="loss", optimizer=dg.SGD(lr=mlp.LR), executor=ex, progress=False
        )
        session = trainer.session
        data = session.attach(feeds)  # as Trainer.fit hands its data over: once
        rows = np.arange(len(next(iter(feeds.values()))))
        ids = itertools.count(1)

        def step() -> float:
            return session.step_rows(next(ids), data, rows)

        for _ in range(5):  # warm-up: actor start, first plans, the graph's compile
            step()
        if transport == "compiled" and session.compiled.last_reason:
            raise RuntimeError(f"the compiled phase ran on calls: {session.compiled.last_reason}")
        log(progress, NAME, f"{steps} steps, transport={transport}")
        start = time.perf_counter()
        for i in range(steps):
            loss = step()
            if i % every == 0 or i == steps - 1:
                out["rss"].append(_rss())
                out["store"].append(gauge.store_bytes())
                out["refs"].append(gauge.driver_refs())
                out["loss"].append(float(loss))
        out["time"].append(time.perf_counter() - start)
        trainer.close()
    return out


def bench(rec: Record, quick: bool = False, progress: bool = False) -> None:
    """Train a small MLP for many steps, on actor calls and then compiled, and report the
    growth of each gauge in each."""
    import distgraph as dg

    steps = 50 if quick else 2_000
    sizes, batch = [16, 32, 32, 4], 32
    params, x, y = mlp.make_problem(sizes, batch, seed=1)
    g = mlp.build_distgraph(sizes, params, batch)
    feeds = {"x": x, "y": y}
    step_s: dict[str, float] = {}
    for transport, prefix in (("calls", ""), ("compiled", "compiled_")):
        got = _phase(dg, g, feeds, transport, steps, progress)
        rss_first, rss_last = _edges(got["rss"])
        store_first, store_last = _edges(got["store"])
        refs_first, refs_last = _edges(got["refs"])
        step_s[transport] = got["time"][0] / steps
        rec.figure(f"{prefix}step_s", step_s[transport])
        rec.figure(f"{prefix}rss_first_mb", rss_first / 2**20)
        rec.figure(f"{prefix}rss_last_mb", rss_last / 2**20)
        rec.figure(f"{prefix}store_first_bytes", store_first)
        rec.figure(f"{prefix}store_last_bytes", store_last)
        rec.figure(f"{prefix}driver_refs_first", refs_first)
        rec.figure(f"{prefix}driver_refs_last", refs_last)
        rec.figure(f"{prefix}loss_first", got["loss"][0])
        rec.figure(f"{prefix}loss_last", got["loss"][-1])
        rec.target(f"{prefix}rss_growth_mb", (rss_last - rss_first) / 2**20)
        rec.target(f"{prefix}store_growth_mib", (store_last - store_first) / 2**20)
    rec.figure("steps", steps)
    rec.ratio("compiled_vs_calls_step", step_s["compiled"], step_s["calls"])
    rec.note(
        f"MLP {'-'.join(map(str, sizes))}, batch {batch}; each transport on its own "
        f"RayExecutor(2) (calls, then compiled: the plan and the server's update as one Ray "
        "Compiled Graph); gauges sampled about 100 times after 5 warm-up steps; growth = mean "
        "of the last 10% of samples minus the first 10%. Store bytes come from the raylet's "
        "store stats (ray._private.internal_api, as used by `ray memory --stats-only`)."
    )
