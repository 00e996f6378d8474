"""`latency`: the seed graph's forward + backward step against one raw Ray actor round trip.

The graph ``z = x*w + b`` does almost no work, so its step time is pure runtime overhead; the
yardstick is the cheapest thing Ray can do, a no-op actor method call, measured in the same run.
"""

from __future__ import annotations

import functools
from typing import Any

from ._harness import Record, log, measure
from ._transports import TRANSPORTS, record_choice, run_choice, warm_until_decided

NAME = "latency"
#: label -> (comparison, bound) of every target this benchmark checks.
TARGETS = {
    "step_vs_round_trip": ("<=", 2.0),
    "compiled_step_vs_round_trip": ("<=", 0.5),
    "auto_step_vs_round_trip": ("<=", 0.5),
}
#: Packages of the ``bench`` extra this benchmark needs (none: numpy and Ray only).
PEERS: tuple[str, ...] = ()


def _noop_actor() -> Any:
    import ray

    class Noop:
        """An actor whose method does nothing: one call is one round trip."""

        def ping(self) -> None:
            return None

    # Ray's stubs type a decorated class as the class itself, without ``.remote``.
    actor_class: Any = ray.remote(num_cpus=0)(Noop)
    return actor_class.remote()


def round_trips(calls: int, repeats: int) -> tuple[float, float]:
    """(sequential, pipelined) seconds per no-op actor call."""
    import ray

    actor = _noop_actor()
    try:
        ray.get(actor.ping.remote())
        sequential = measure(lambda: ray.get(actor.ping.remote()), calls, warmup=50)

        def burst() -> None:
            ray.get([actor.ping.remote() for _ in range(calls)])

        pipelined = measure(burst, repeats) / calls
    finally:
        ray.kill(actor)
    return sequential, pipelined


def build_seed_graph() -> Any:
    """z = x*w + b with w=3, b=1 (the seed story)."""
    import distgraph as dg

    g = dg.Graph()
    x = g.input("x")
    w = g.param("w", 3.0)
    b = g.param("b", 1.0)
    g.output("z", x * w + b)
    return g


def bench(rec: Record, quick: bool = False, progress: bool = False) -> None:
    """Median seed-graph step on RayExecutor(2) over the median no-op round trip."""
    import distgraph as dg

    calls, steps = (50, 20) if quick else (500, 200)

    log(progress, NAME, "raw ray actor round trips")
    seq, pipe = round_trips(calls, repeats=3 if quick else 7)
    rec.figure("ray_round_trip_s", seq)
    rec.figure("ray_round_trip_pipelined_s", pipe)

    g = build_seed_graph()
    steps_s: dict[str, float] = {}
    for transport in TRANSPORTS:
        log(progress, NAME, f"distgraph seed graph, forward + backward, transport={transport}")
        with dg.RayExecutor(num_workers=2, transport=transport) as ex:

            def step(ex: Any = ex) -> Any:
                return ex.run(g, feeds={"x": 2.0}, grad="z")

            if transport == "auto":
                record_choice(
                    rec, "seed", warm_until_decided(step, functools.partial(run_choice, ex))
                )
            else:
                for _ in range(2):  # compiled from the plan's second run
                    step()
            res = step()
            if transport == "compiled" and ex.compiled.last_reason:
                raise AssertionError(f"compiled seed graph ran on calls: {ex.compiled.last_reason}")
            if res.values["z"] != 7.0 or res.grads.get("w") != 2.0:
                raise AssertionError(f"seed graph ({transport}) gave {res.values}, {res.grads}")
            suffix = "" if transport == "calls" else f"_{transport}"
            steps_s[transport] = rec.figure(
                f"distgraph_step{suffix}_s", measure(step, steps, warmup=10)
            )
    # A second round-trip sample after the steps guards against drift during the run.
    seq_after, _ = round_trips(calls, repeats=1)
    rec.figure("ray_round_trip_after_s", seq_after)
    rec.target("step_vs_round_trip", rec.ratio("step_vs_round_trip", steps_s["calls"], seq))
    rec.target(
        "compiled_step_vs_round_trip",
        rec.ratio("compiled_step_vs_round_trip", steps_s["compiled"], seq),
    )
    rec.target(
        "auto_step_vs_round_trip", rec.ratio("auto_step_vs_round_trip", steps_s["auto"], seq)
    )
    rec.ratio("step_vs_pipelined_round_trip", steps_s["calls"], pipe)
    rec.note(
        f"Round trip: median of {calls} sequential ray.get(actor.ping.remote()); pipelined: "
        f"{calls} calls submitted then one ray.get, per call. Step: median of {steps} "
        "ex.run(g, feeds, grad='z') on a warm executor (transport=\"calls\"); _compiled: "
        'transport="compiled" (the plan runs as a Ray Compiled Graph); _auto: transport="auto" '
        "after it decided (seed_auto_*: what it chose and the probe medians it chose on)."
    )
