"""`dp`: one training step of the MLP 784-512-512-10 (batch 256, float32, SGD) with
data-parallel replicas: ``RayExecutor(2, replicas=2)`` (each worker takes half the batch's
rows, the server combines the halves' gradients and applies them once) beside
``replicas=1`` (the whole step on one worker), single-process numpy (every core for BLAS)
and the hand-written Ray parameter server with two data-parallel workers of the ``mlp``
benchmark.

Every system is set up first and the timed steps are interleaved (one step of each per
round, medians over the rounds), so a change in the machine's load falls on all of them alike
rather than on whichever ran last. Two replicas on two cores can at best match numpy using
both cores for the same work; the target allows 10 % over it.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

from ._harness import Record, log
from .mlp import RayParameterServer, build_distgraph, make_problem, numpy_step, training_step

NAME = "dp"
#: label -> (comparison, bound) of every target this benchmark checks.
TARGETS = {
    "replicas2_vs_numpy": ("<=", 1.1),
    "replicas2_vs_ray_ps": ("<=", 0.8),
}
#: Packages of the ``bench`` extra this benchmark needs.
PEERS: tuple[str, ...] = ()

#: Ray CPU resource per actor of the Ray PS and of distgraph's workers: every system stays
#: alive while the others step (the cores are shared either way; BLAS threads do not depend
#: on it).
ACTOR_CPUS = 0.25


def interleaved(steps: dict[str, Callable[[], Any]], rounds: int, warmup: int) -> dict[str, float]:
    """Median seconds per label of ``steps``, timed one step of each per round."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for label, fn in steps.items():
            gc.collect()  # outside the timed region, so one step does not pay for another's
            start = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def bench(rec: Record, quick: bool = False, progress: bool = False) -> None:
    """Time one training step per layout, interleaved with numpy and the Ray PS."""
    import distgraph as dg

    sizes, batch = ([64, 32, 32, 10], 32) if quick else ([784, 512, 512, 10], 256)
    rounds = 5 if quick else 30
    params, x, y = make_problem(sizes, batch)
    rec.note(f"MLP {'-'.join(map(str, sizes))}, batch {batch}, float32, SGD, one step.")
    np_params = [p.copy() for p in params]
    g = build_distgraph(sizes, params, batch)
    feeds = {"x": x, "y": y}
    with contextlib.ExitStack() as stack:
        log(progress, NAME, "setting up the Ray PS and distgraph with replicas=1 and 2")
        ps = RayParameterServer(params, x, y, n=2, worker_cpus=ACTOR_CPUS)
        stack.callback(ps.close)
        steps: dict[str, Callable[[], Any]] = {
            "numpy_s": lambda: numpy_step(np_params, x, y),
            "ray_ps_s": ps.step,
        }
        for replicas in (1, 2):
            ex = stack.enter_context(
                dg.RayExecutor(
                    num_workers=2, replicas=replicas, resources_per_worker={"CPU": ACTOR_CPUS}
                )
            )
            steps[f"replicas{replicas}_s"] = training_step(dg, g, ex, feeds)
        log(progress, NAME, f"{rounds} interleaved rounds")
        medians = interleaved(steps, rounds, warmup=3)
    for label, value in medians.items():
        rec.figure(label, value)
    numpy_s, ray_ps_s = medians["numpy_s"], medians["ray_ps_s"]
    times = {r: medians[f"replicas{r}_s"] for r in (1, 2)}
    rec.ratio("replicas1_vs_numpy", times[1], numpy_s)
    rec.ratio("replicas2_vs_replicas1", times[2], times[1])
    rec.ratio("ray_ps_vs_numpy", ray_ps_s, numpy_s)
    rec.target("replicas2_vs_numpy", rec.ratio("replicas2_vs_numpy", times[2], numpy_s))
    rec.target("replicas2_vs_ray_ps", rec.ratio("replicas2_vs_ray_ps", times[2], ray_ps_s))
    rec.note(
        "replicas=2: each worker computes half the rows with one core; the server combines "
        "the two gradients in replica order and sends both workers the new params. "
        "replicas=1: one worker computes every row and updates its own params copy. "
        f"Steps interleaved over {rounds} rounds (medians); every actor reserves "
        f"{ACTOR_CPUS:g} Ray CPU so all systems stay up together."
    )
