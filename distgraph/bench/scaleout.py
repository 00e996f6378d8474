"""`scaleout`: simulated pipelines at 2 to 32 workers, and the step-time predictor against them.

Each point is a chain of ``N`` ``sim_layer`` stages (10 ms forward / 20 ms backward per
micro-batch, sleeping, so 32 workers fit on 2 cores) on ``N`` workers, 8 micro-batches, GPipe.
Figures per ``N``: the measured median step; the ideal (the schedule's longest path with no
call overhead and free transfers); efficiency = ideal / measured; and the predictor's
estimate (``StagePlan.estimate_pipeline``) with the per-action overhead calibrated once by a
probe (2-stage pipelines of zero-time layers with 2 and 8 micro-batches: a fixed cost per
step plus a cost per action on the critical path, fitted to their median steps), and its
relative error.

Data-parallel layouts are not measured here (replicas come from another part of issue 15).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

import numpy as np

from ._harness import Record, log

NAME = "scaleout"
M = 8
F_MS, B_MS = 10.0, 20.0
SIZES = (2, 4, 8, 16, 32)
TARGETS = {"efficiency_16": (">=", 0.85), "predictor_error_max": ("<=", 0.15)}
PEERS: tuple[str, ...] = ()


def _pipeline(
    workers: int, layers: int, f_ms: float, b_ms: float, cost: Any, microbatches: int = M
) -> Any:
    import distgraph as dg
    from distgraph.paramstore import ParameterStore
    from distgraph.simops import sim_chain

    graph = sim_chain(layers, f_ms=f_ms, b_ms=b_ms)
    ex = dg.RayExecutor(
        num_workers=workers,
        strategy="pipeline",
        cost=cost,
        ops_modules=["distgraph.simops"],
        resources_per_worker={"CPU": 0.05},
        microbatches=microbatches,
        schedule="gpipe",
    )
    opt = dg.SGD(lr=0.01)
    session = ex.training_session(graph, "loss", opt, ParameterStore(graph.param_values, opt))
    return ex, session


def _median_step(session: Any, steps: int) -> float:
    feeds = {"x": np.ones((16, 1))}
    session.step(1, feeds)  # install and warm up
    times = []
    for i in range(steps):
        start = time.perf_counter()
        session.step(2 + i, feeds)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def calibrate(steps: int = 5) -> tuple[float, float]:
    """(seconds per step, seconds per action on the critical path), fitted to two probes:
    2-stage pipelines of zero-time layers with 2 and 8 micro-batches (a line through the
    two (critical-path actions, median step) points)."""
    from distgraph.simops import SimCostModel

    free = dataclasses.replace(SimCostModel(), call_overhead=0.0, node_overhead=0.0)
    points = []
    for m in (2, 8):
        ex, session = _pipeline(2, 2, 0.0, 0.0, SimCostModel(), m)
        try:
            step = _median_step(session, steps)
            session.plan.cost = free
            points.append((len(session.plan.estimate_pipeline().critical_path), step))
            session.close()
        finally:
            ex.close()
    (n1, t1), (n2, t2) = points
    per_action = max(0.0, (t2 - t1) / (n2 - n1))
    return max(0.0, t1 - per_action * n1), per_action


def bench(rec: Record, quick: bool = False, progress: bool = False) -> None:
    """Measure each size; record efficiency and predictor error (targets at 16 and overall)."""
    from distgraph.simops import SimCostModel

    steps = 2 if quick else 4
    sizes = SIZES[:3] if quick else SIZES
    fixed, per_action = calibrate()
    overhead = rec.figure("calibrated_action_overhead_s", per_action)
    rec.figure("calibrated_step_overhead_s", fixed)
    log(
        progress,
        NAME,
        f"calibrated {fixed * 1e3:.1f} ms per step + {overhead * 1e3:.2f} per action",
    )
    errors = []
    for n in sizes:
        ex, session = _pipeline(n, n, F_MS, B_MS, SimCostModel())
        try:
            measured = _median_step(session, steps)
            plan = session.plan
            base = dataclasses.replace(SimCostModel(), bytes_per_second=float("inf"))
            plan.cost = dataclasses.replace(base, call_overhead=0.0, node_overhead=0.0)
            ideal = plan.estimate_pipeline().seconds
            plan.cost = dataclasses.replace(base, call_overhead=overhead)
            predicted = plan.estimate_pipeline(step_overhead=fixed).seconds
            session.close()
        finally:
            ex.close()
        rec.figure(f"n{n}_step_s", measured)
        rec.figure(f"n{n}_ideal_s", ideal)
        rec.figure(f"n{n}_predicted_s", predicted)
        eff = rec.ratio(f"n{n}_efficiency", ideal, measured)
        err = rec.ratio(f"n{n}_predictor_error", abs(predicted - measured), measured)
        errors.append(err)
        log(progress, NAME, f"{n} workers: {measured * 1e3:.0f} ms, efficiency {eff:.2f}")
    if 16 in sizes:
        rec.target("efficiency_16", rec.ratios["n16_efficiency"])
    rec.target("predictor_error_max", max(errors))
    rec.note(
        f"GPipe, {M} micro-batches, {F_MS:g}/{B_MS:g} ms per layer and micro-batch, one layer "
        "per worker; ideal = the schedule with free calls and transfers; the predictor adds "
        "the probe-calibrated overheads (per step and per action on the critical path)."
    )
