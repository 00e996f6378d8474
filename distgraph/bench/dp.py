"""`dp`: one training step of the MLP 784-512-512-10 (batch 256, float32, SGD) with
data-parallel replicas: ``RayExecutor(2, replicas=2)`` (each worker takes half the batch's
rows, the server combines the halves' gradients and applies them once) beside
``replicas=1`` (the whole step on one worker), single-process numpy (every core for BLAS)
and the hand-written Ray parameter server with two data-parallel workers of the ``mlp``
benchmark.

Two replicas on two cores can at best match numpy using both cores for the same work; the
target allows 10 % over it.
"""

from __future__ import annotations

from typing import Any

from ._harness import Record, log, measure
from .mlp import RayParameterServer, build_distgraph, make_problem, numpy_step, training_step

NAME = "dp"
#: label -> (comparison, bound) of every target this benchmark checks.
TARGETS = {
    "replicas2_vs_numpy": ("<=", 1.1),
    "replicas2_vs_ray_ps": ("<=", 0.8),
}
#: Packages of the ``bench`` extra this benchmark needs.
PEERS: tuple[str, ...] = ()


def bench(rec: Record, quick: bool = False, progress: bool = False) -> None:
    """Time one training step per layout and compare them with numpy and the Ray PS."""
    sizes, batch = ([64, 32, 32, 10], 32) if quick else ([784, 512, 512, 10], 256)
    repeats = 5 if quick else 30
    params, x, y = make_problem(sizes, batch)
    rec.note(f"MLP {'-'.join(map(str, sizes))}, batch {batch}, float32, SGD, one step.")

    log(progress, NAME, "numpy by hand")
    np_params = [p.copy() for p in params]
    numpy_s = rec.figure("numpy_s", measure(lambda: numpy_step(np_params, x, y), repeats, 3))

    log(progress, NAME, "ray parameter server, 2 data-parallel workers")
    ps = RayParameterServer(params, x, y, n=2)
    try:
        ray_ps_s = rec.figure("ray_ps_s", measure(ps.step, repeats, 3))
    finally:
        ps.close()

    g = build_distgraph(sizes, params, batch)
    feeds = {"x": x, "y": y}
    times: dict[int, float] = {}
    for replicas in (1, 2):
        log(progress, NAME, f"distgraph ray, 2 workers, replicas={replicas}")
        times[replicas] = rec.figure(
            f"replicas{replicas}_s", _time_replicas(g, feeds, replicas, repeats)
        )
    rec.ratio("replicas1_vs_numpy", times[1], numpy_s)
    rec.ratio("replicas2_vs_replicas1", times[2], times[1])
    rec.ratio("ray_ps_vs_numpy", ray_ps_s, numpy_s)
    rec.target("replicas2_vs_numpy", rec.ratio("replicas2_vs_numpy", times[2], numpy_s))
    rec.target("replicas2_vs_ray_ps", rec.ratio("replicas2_vs_ray_ps", times[2], ray_ps_s))
    rec.note(
        "replicas=2: each worker computes half the rows with one core; the server combines "
        "the two gradients in replica order and sends both workers the new params. "
        "replicas=1: one worker computes every row and updates its own params copy."
    )


def _time_replicas(g: Any, feeds: dict, replicas: int, repeats: int) -> float:
    import distgraph as dg

    with dg.RayExecutor(num_workers=2, replicas=replicas) as ex:
        step = training_step(dg, g, ex, feeds)
        return measure(step, repeats, 3)
