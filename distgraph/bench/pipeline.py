"""`pipeline`: micro-batched pipeline training on Ray, simulated and real.

Simulated (``distgraph.simops``, kernels that sleep, so no core is needed): a chain of 4
``sim_layer`` stages, 20 ms forward and 40 ms backward per micro-batch, 8 micro-batches per
step, ``strategy="pipeline"`` on 4 workers. A step's ideal time is ``(m + p - 1)`` slots of
``F + B`` (both GPipe and 1F1B): 11 x 60 ms = 660 ms. Measured: the median step (the
driver's wall time of ``session.step``), for GPipe and 1F1B; the predictor's estimate
(``plan.estimate(calibration=cal)``: one call per worker holding its actions, hand-offs
worker to worker, ``cal`` the mean of ``ex.calibrate(refresh=True)`` probes on the same
workers before and after the steps); the measured bubble of a traced step next to the formula
``(p - 1) / (m + p - 1)``; and the median hand-off between stages in that step
(``sim_<schedule>_hop_s``: an upstream action's end to the start of the action waiting for
its value; a pipelined step sends these values from worker to worker). The same steps again
with ``transport="compiled"`` on the same workers (``sim_<schedule>_compiled_*``: one Ray
Compiled Graph node per action, hand-offs in its channels), reported beside calls.

Real (numpy compute): an MLP with 8 hidden layers of 1024 (float32, batch 512), one worker vs
2 stages x 4 micro-batches (GPipe), reported next to the two-process ceiling measured in the same
run: how much faster two processes finish two halves of a matmul workload than one process
(with every core) finishes all of it.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import numpy as np

from ._harness import Record, log
from .scaleout import mean_calibration

NAME = "pipeline"
P, M = 4, 8
F_MS, B_MS = 20.0, 40.0
#: label -> (comparison, bound) of every target this benchmark checks.
TARGETS = {
    "gpipe_vs_ideal": ("<=", 1.10),
    "1f1b_vs_ideal": ("<=", 1.10),
    "1f1b_vs_gpipe": ("<=", 1.05),
}
PEERS: tuple[str, ...] = ()


def _session(ex: Any, graph: Any, lr: float = 0.01) -> Any:
    import distgraph as dg
    from distgraph.paramstore import ParameterStore

    opt = dg.SGD(lr=lr)
    return ex.training_session(graph, "loss", opt, ParameterStore(graph.param_values, opt))


def _step_times(session: Any, feeds: dict[str, Any], steps: int, first: int = 1) -> list[float]:
    times = []
    for i in range(steps):
        start = time.perf_counter()
        session.step(first + i, feeds)
        times.append(time.perf_counter() - start)
    return times


def _simulated(rec: Record, quick: bool, progress: bool) -> None:
    import distgraph as dg
    from distgraph.simops import SimCostModel, sim_chain
    from distgraph.stageplan import bubble_formula, measured_bubble

    steps = 3 if quick else 6
    graph = sim_chain(P, f_ms=F_MS, b_ms=B_MS)
    feeds = {"x": np.ones((2 * M, 1))}
    ideal = (M + P - 1) * (F_MS + B_MS) / 1000.0
    rec.figure("sim_ideal_step_s", ideal)
    measured: dict[str, float] = {}
    for schedule in ("gpipe", "1f1b"):
        ex = dg.RayExecutor(
            num_workers=P,
            strategy="pipeline",
            cost=SimCostModel(),
            ops_modules=["distgraph.simops"],
            resources_per_worker={"CPU": 0.25},
            microbatches=M,
            schedule=schedule,
        )
        try:
            session = _session(ex, graph)
            session.step(1, feeds)  # warm-up: install, first calls
            before = ex.calibrate(refresh=True)
            times = _step_times(session, feeds, steps, first=2)
            session.step(steps + 2, feeds, trace=True)
            cal = mean_calibration(before, ex.calibrate(refresh=True))
            bubble = measured_bubble(session.last_trace)
            hop = _hop_seconds(session.last_trace)
            plan = session.plan
            predicted = plan.estimate(calibration=cal)
            session.close()
            # The same steps on the compiled transport, in the same run on the same workers.
            compiled = _compiled_steps(ex, graph, feeds, steps)
        finally:
            ex.close()
        med = statistics.median(times)
        measured[schedule] = med
        rec.figure(f"sim_{schedule}_step_s", med)
        rec.figure(f"sim_{schedule}_predicted_s", predicted)
        rec.figure(f"sim_{schedule}_cal_deliver_s", cal.deliver_s)
        rec.figure(f"sim_{schedule}_cal_call_s", cal.call_overhead_s)
        rec.figure(f"sim_{schedule}_cal_node_s", cal.node_s)
        rec.figure(f"sim_{schedule}_bubble_measured", bubble)
        if hop is not None:
            rec.figure(f"sim_{schedule}_hop_s", hop)
        rec.ratio(f"sim_{schedule}_predictor_error", abs(predicted - med), med)
        rec.target(f"{schedule}_vs_ideal", rec.ratio(f"{schedule}_vs_ideal", med, ideal))
        c_med, c_bubble, c_hop = compiled
        rec.figure(f"sim_{schedule}_compiled_step_s", c_med)
        rec.figure(f"sim_{schedule}_compiled_bubble_measured", c_bubble)
        if c_hop is not None:
            rec.figure(f"sim_{schedule}_compiled_hop_s", c_hop)
        rec.ratio(f"sim_{schedule}_compiled_vs_ideal", c_med, ideal)
        rec.ratio(f"sim_{schedule}_compiled_over_calls", c_med, med)
        log(
            progress,
            NAME,
            f"{schedule}: step {med * 1e3:.1f} ms on calls, {c_med * 1e3:.1f} ms compiled "
            f"(ideal {ideal * 1e3:.0f} ms, predicted on calls {predicted * 1e3:.1f} ms); "
            f"{cal.describe()}",
        )
    rec.figure("sim_bubble_formula", bubble_formula(P, M))
    ratio = rec.ratio("1f1b_over_gpipe", measured["1f1b"], measured["gpipe"])
    rec.target("1f1b_vs_gpipe", max(ratio, 1.0 / ratio) if ratio > 0 else math.nan)
    rec.note(
        f"simulated: {P} stages x {M} micro-batches, {F_MS:g} ms F / {B_MS:g} ms B per "
        f"micro-batch (sleeping kernels); ideal step (m + p - 1) x (F + B); "
        "1f1b_vs_gpipe is max(r, 1/r) of the two median steps (on calls); *_compiled_*: the "
        'same steps with transport="compiled" on the same workers (one compiled graph node '
        "per action), timed from the third step (the second compiles)."
    )


def _compiled_steps(
    ex: Any, graph: Any, feeds: dict[str, Any], steps: int
) -> tuple[float, float, float | None]:
    """The median compiled step (from the third: the first runs on calls, the second
    compiles), and a traced compiled step's bubble and median hand-off."""
    from distgraph.errors import ConfigError
    from distgraph.stageplan import measured_bubble

    ex.transport = "compiled"
    session = _session(ex, graph)
    try:
        session.step(1, feeds)
        session.step(2, feeds)  # compiles the graph
        times = _step_times(session, feeds, steps, first=3)
        session.step(steps + 3, feeds, trace=True)
        if session.compiled.last_reason:  # a figure of calls under a compiled label: refuse
            raise ConfigError(f"the pipeline did not compile: {session.compiled.last_reason}")
        return (
            statistics.median(times),
            measured_bubble(session.last_trace),
            _hop_seconds(session.last_trace),
        )
    finally:
        session.close()
        ex.transport = "calls"


def _hop_seconds(events: list[Any]) -> float | None:
    """The median time a traced pipelined step's action waited for a value from another
    stage: from the end of the upstream action (F of the previous stage, B of the next) to the
    start of the action that needed it, over the actions whose worker was idle by then."""
    acts = {(e.args["stage"], e.name): e for e in events if "action" in e.args}
    last_end: dict[int, float] = {}
    gaps = []
    for e in sorted(acts.values(), key=lambda e: e.start):
        stage, kind, mb = e.args["stage"], e.name[0], e.name[1:]
        dep = acts.get((stage - 1, f"F{mb}") if kind == "F" else (stage + 1, f"B{mb}"))
        if dep is not None and dep.end >= last_end.get(stage, 0.0):
            gaps.append(e.start - dep.end)
        last_end[stage] = e.end
    return statistics.median(gaps) if gaps else None


def _ceiling(work: int, size: int) -> float:
    """One process with every core doing ``work`` matmuls vs two one-thread processes doing
    half each, at once: the speed-up two workers can get on this machine at best."""
    import ray

    @ray.remote(num_cpus=0)
    def matmuls(n: int, threads: int | None) -> float:
        from threadpoolctl import threadpool_limits

        a = np.ones((size, size), dtype=np.float32)
        with threadpool_limits(limits=threads):
            a @ a  # warm the pool
            start = time.perf_counter()
            for _ in range(n):
                a @ a
            return time.perf_counter() - start

    # Start (and warm) two worker processes first, so neither timing pays for a process start.
    ray.get([matmuls.remote(1, 1), matmuls.remote(1, 1)])
    start = time.perf_counter()
    ray.get(matmuls.remote(work, None))
    one = time.perf_counter() - start
    start = time.perf_counter()
    ray.get([matmuls.remote(work // 2, 1), matmuls.remote(work // 2, 1)])
    two = time.perf_counter() - start
    return one / two


def _real(rec: Record, quick: bool, progress: bool) -> None:
    import distgraph as dg
    from distgraph import models

    width, layers, batch = (256, 8, 128) if quick else (1024, 8, 512)
    steps = 2 if quick else 4
    graph = models.mlp_classifier((width,) + (width,) * layers + (10,), seed=0, dtype="float32")
    rng = np.random.default_rng(0)
    feeds = {
        "x": rng.standard_normal((batch, width)).astype(np.float32),
        "y": rng.integers(0, 10, size=batch),
    }
    results: dict[str, float] = {}
    for label, workers, m in (("one_worker", 1, None), ("pipeline_2x4", 2, 4)):
        ex = dg.RayExecutor(
            num_workers=workers,
            strategy="pipeline",
            resources_per_worker={"CPU": 0.5},
            microbatches=m,
        )
        try:
            session = _session(ex, graph, lr=1e-3)
            session.step(1, feeds)
            results[label] = statistics.median(_step_times(session, feeds, steps, first=2))
            session.close()
        finally:
            ex.close()
        rec.figure(f"real_{label}_step_s", results[label])
        log(progress, NAME, f"real {label}: {results[label] * 1e3:.1f} ms")
    speedup = rec.ratio("real_pipeline_speedup", results["one_worker"], results["pipeline_2x4"])
    ceiling = rec.figure("real_two_process_ceiling", _ceiling(8 if quick else 24, width))
    rec.ratio("real_speedup_vs_ceiling", speedup, ceiling)
    rec.note(
        f"real: MLP {layers} hidden x {width}, batch {batch}, float32; one worker vs 2 stages x "
        "4 micro-batches (GPipe); the ceiling is measured in the same run."
    )


def bench(rec: Record, quick: bool = False, progress: bool = False) -> None:
    """Run the simulated pipeline (targets) and the real MLP pipeline (reported)."""
    _simulated(rec, quick, progress)
    _real(rec, quick, progress)
