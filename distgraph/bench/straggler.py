"""`straggler`: data-parallel training with one replica slowed 3x (the ``_slow_replicas``
test hook of ``RayExecutor``): asynchronous updates with staleness 4 against synchronous ones,
in training steps (mini-batches applied) per second.

Synchronous: every step waits for its slowest replica, so the straggler sets the pace.
Asynchronous (``consistency="async", staleness=4``): each replica runs whole mini-batches and
the server applies each as it arrives; the fast replica keeps going while the slow one
computes, up to 4 steps ahead of the oldest unapplied one.
"""

from __future__ import annotations

import time
from typing import Any

from ._harness import Record, log

NAME = "straggler"
#: label -> (comparison, bound) of every target this benchmark checks.
TARGETS = {"async_vs_sync_throughput": (">=", 1.5)}
#: Packages of the ``bench`` extra this benchmark needs.
PEERS: tuple[str, ...] = ()

SLOW = 3.0
TAU = 4


def bench(rec: Record, quick: bool = False, progress: bool = False) -> None:
    """Time an epoch of training per consistency model with replica 1 slowed 3x."""
    from .. import models

    rows, batch, epochs = (256, 32, 2) if quick else (2048, 64, 3)
    data = models.spirals(rows // 2, seed=0)
    sizes = (2, 64, 64, 2)
    rec.note(
        f"MLP {'-'.join(map(str, sizes))}, {rows} rows, batch {batch}, {epochs} epochs, SGD; "
        f"2 workers, replicas=2, replica 1 slowed {SLOW:g}x (its results are held back for "
        f"{SLOW:g}x its measured step time)."
    )
    steps = epochs * -(-rows // batch)
    times: dict[str, float] = {}
    log(progress, NAME, "sync, no replica slowed (for reference)")
    seconds, _ = _train(models, data, sizes, batch, epochs, "sync", slow=1.0)
    rec.figure("sync_unslowed_step_s", seconds / steps)
    for consistency in ("sync", "async"):
        log(progress, NAME, f"{consistency}, replica 1 slowed {SLOW:g}x")
        seconds, status = _train(models, data, sizes, batch, epochs, consistency, SLOW)
        times[consistency] = rec.figure(f"{consistency}_step_s", seconds / steps)
        if consistency == "async":
            info = status["async"]
            rec.figure("async_max_staleness", float(info["max_staleness"]))
            slow_steps = sum(1 for r in info["records"] if r["replica"] == 1)
            rec.figure("async_slow_replica_steps", float(slow_steps))
    rec.figure("steps", float(steps))
    # Throughput ratio: steps per second async over steps per second sync.
    rec.target(
        "async_vs_sync_throughput",
        rec.ratio("async_vs_sync_throughput", times["sync"], times["async"]),
    )
    rec.note(
        f"async staleness {TAU}: every gradient computed on params missing at most {TAU} "
        "earlier steps; each step is one replica's whole mini-batch (sync: each replica "
        "computes half the rows of every step). The hook holds the slow replica's results "
        "back without using CPU, so on a machine with fewer cores than workers the fast "
        "replica meanwhile computes with less contention than a real straggler would leave it."
    )


def _train(
    models: Any,
    data: dict,
    sizes: tuple[int, ...],
    batch: int,
    epochs: int,
    consistency: str,
    slow: float,
) -> tuple[float, dict[str, Any]]:
    import distgraph as dg

    options: dict[str, Any] = {"consistency": consistency}
    if consistency == "async":
        options["staleness"] = TAU
    with dg.RayExecutor(num_workers=2, replicas=2, _slow_replicas={1: slow}, **options) as ex:
        tr = dg.Trainer(
            models.mlp_classifier(sizes, seed=3),
            loss="loss",
            optimizer=dg.SGD(lr=0.05),
            executor=ex,
            progress=False,
        )
        # One warm-up step places the plan and starts the server outside the timing.
        tr.fit({k: v[:batch] for k, v in data.items()}, epochs=1, batch_size=batch, seed=1)
        start = time.perf_counter()
        tr.fit(data, epochs=epochs, batch_size=batch, seed=0)
        seconds = time.perf_counter() - start
        status = tr.session.status()
        tr.close()
    return seconds, status
