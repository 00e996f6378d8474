"""`dp_sim`: data-parallel training throughput at 1, 2, 4 and 8 replicas of simulated compute.

Weak scaling (the usual data-parallel throughput claim): every replica takes the same number of
rows per step, so the batch grows with the replica count and the ideal step time stays flat.
Each replica is one worker running a chain of ``sim_layer`` ops that sleep (``distgraph.simops``;
the sleeps leave the cores free, so 8 worker actors fit on 2 cores) for ``F_MS`` forward and
``B_MS`` backward per layer, whatever the rows; the server combines the replicas' gradients
exactly (``consistency="sync"``) and returns the new params to every worker.

Figures per ``R``: the median step and the throughput in rows per second; ratio
``r{R}_vs_linear`` = throughput at ``R`` / (``R`` x throughput at 1) = step at 1 / step at
``R``. What a step costs beyond its sleeps (call overhead, the combine, the driver) is the gap
to 1.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np

from ._harness import Record, log

NAME = "dp_sim"
#: label -> (comparison, bound) of every target this benchmark checks.
TARGETS = {"r8_vs_linear": (">=", 0.85)}
#: Packages of the ``bench`` extra this benchmark needs.
PEERS: tuple[str, ...] = ()

LAYERS = 2
F_MS, B_MS = 25.0, 50.0
ROWS_PER_REPLICA = 16
REPLICAS = (1, 2, 4, 8)


def _session(replicas: int, f_ms: float, b_ms: float) -> tuple[Any, Any]:
    import distgraph as dg
    from distgraph.paramstore import ParameterStore
    from distgraph.simops import SimCostModel, sim_chain

    graph = sim_chain(LAYERS, f_ms=f_ms, b_ms=b_ms, width=4)
    ex = dg.RayExecutor(
        num_workers=replicas,
        replicas=replicas,
        cost=SimCostModel(),
        ops_modules=["distgraph.simops"],
        # Sleeping workers need no core each: 8 of them share this machine's 2.
        resources_per_worker={"CPU": 0.05},
    )
    opt = dg.SGD(lr=0.01)
    try:
        session = ex.training_session(graph, "loss", opt, ParameterStore(graph.param_values, opt))
    except BaseException:
        ex.close()
        raise
    return ex, session


def median_steps(
    counts: tuple[int, ...], rounds: int, f_ms: float = F_MS, b_ms: float = B_MS
) -> dict[int, float]:
    """Median seconds of a training step per replica count (one worker per replica,
    ``ROWS_PER_REPLICA`` rows each), after two warm-up steps. Every layout is open at once
    and the rounds interleave them (one step of each per round), so a change in the machine's
    load falls on every replica count alike instead of on whichever ran last."""
    rng = np.random.default_rng(0)
    opened: dict[int, tuple[Any, Any, dict[str, Any]]] = {}
    times: dict[int, list[float]] = {r: [] for r in counts}
    try:
        for r in counts:
            ex, session = _session(r, f_ms, b_ms)
            feeds = {"x": rng.standard_normal((ROWS_PER_REPLICA * r, 4))}
            opened[r] = (ex, session, feeds)
            session.step(1, feeds)  # places, installs and starts the server
            session.step(2, feeds)
        for i in range(rounds):
            for r, (_ex, session, feeds) in opened.items():
                start = time.perf_counter()
                session.step(3 + i, feeds)
                times[r].append(time.perf_counter() - start)
    finally:
        for ex, session, _feeds in opened.values():
            try:
                session.close()
            finally:
                ex.close()
    return {r: statistics.median(t) for r, t in times.items()}


def ideal_step(f_ms: float, b_ms: float) -> float:
    """Seconds a step sleeps: every layer's forward and backward, except that the first
    layer's backward skips the input's gradient (half its ``b_ms``)."""
    return (LAYERS * f_ms + (LAYERS - 0.5) * b_ms) / 1000.0


def bench(rec: Record, quick: bool = False, progress: bool = False) -> None:
    """Time a step at each replica count; record throughput and the ratio to linear."""
    steps = 3 if quick else 20
    # --quick shortens the sleeps (the ratio is then dominated by overhead: not judged).
    f_ms, b_ms = (5.0, 10.0) if quick else (F_MS, B_MS)
    ideal = rec.figure("ideal_step_s", ideal_step(f_ms, b_ms))
    log(progress, NAME, f"{', '.join(map(str, REPLICAS))} replicas, interleaved, {steps} rounds")
    steps_s = median_steps(REPLICAS, steps, f_ms, b_ms)
    base = steps_s[1]
    for r in REPLICAS:
        step = rec.figure(f"r{r}_step_s", steps_s[r])
        rec.figure(f"r{r}_rows_per_sec", ROWS_PER_REPLICA * r / step)
        # throughput_R / (R * throughput_1) = (R * rows / step_R) / (R * rows / step_1)
        rec.ratio(f"r{r}_vs_linear", base, step)
        log(progress, NAME, f"  {r}: {step * 1e3:.1f} ms per step, {base / step:.3f} of linear")
    rec.ratio("r1_vs_ideal", ideal, base)
    rec.target("r8_vs_linear", rec.ratios["r8_vs_linear"])
    rec.note(
        f"weak scaling: {ROWS_PER_REPLICA} rows per replica, one worker per replica, sync; "
        f"{LAYERS} sim layers of {f_ms:g} ms forward / {b_ms:g} ms backward (sleeps: "
        f"{ideal * 1e3:g} ms of compute per step per replica, whatever its rows); "
        "rN_vs_linear = throughput at N / (N x throughput at 1); the layouts are open at "
        "once and their steps interleaved."
    )
    if quick:
        rec.note("--quick: short sleeps, so the ratios measure overhead more than scaling.")
