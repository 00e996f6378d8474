"""`wide`: independent branches of heavy matmuls, where two workers should nearly halve the time.

Each branch is a chain ``h = tanh(h @ W_k)``; branches share nothing, so a partitioner that keeps
each chain on one worker moves only the inputs and the outputs. BLAS is pinned to one thread in
every process, so the speedup measures distgraph's parallelism, not OpenBLAS's.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import numpy as np

from ._harness import Record, blas_threads, log, measure
from ._transports import TRANSPORTS, record_choice, run_choice, warm_until_decided

NAME = "wide"
#: label -> (comparison, bound) of every target this benchmark checks.
TARGETS = {
    "ray_speedup_over_local": (">=", 1.8),
    "compiled_speedup_vs_ceiling": (">=", 0.8),
    "auto_speedup_vs_ceiling": (">=", 0.8),
}
#: Packages of the ``bench`` extra this benchmark needs (none: numpy and Ray only).
PEERS: tuple[str, ...] = ()


def make_problem(branches: int, depth: int, n: int, seed: int = 0) -> tuple[dict, dict]:
    """Feeds ``x{b}`` (n x n) and params ``W{b}_{k}`` (n x n), float32, scaled to keep tanh live."""
    rng = np.random.default_rng(seed)
    feeds = {f"x{b}": rng.standard_normal((n, n)).astype(np.float32) for b in range(branches)}
    params = {
        f"W{b}_{k}": (rng.standard_normal((n, n)) / np.sqrt(n)).astype(np.float32)
        for b in range(branches)
        for k in range(depth)
    }
    return feeds, params


def run_numpy(feeds: dict, params: dict, branches: int, depth: int) -> list[np.ndarray]:
    """The branches one after the other in this process."""
    outs = []
    for b in range(branches):
        h = feeds[f"x{b}"]
        for k in range(depth):
            h = np.tanh(h @ params[f"W{b}_{k}"])
        outs.append(h)
    return outs


def build_distgraph(params: dict, branches: int, depth: int, n: int) -> tuple[Any, list[str]]:
    """The branches as one dg.Graph; outputs ``out{b}``."""
    import distgraph as dg

    g = dg.Graph()
    names = []
    for b in range(branches):
        h = g.input(f"x{b}", shape=(n, n), dtype=np.float32)
        for k in range(depth):
            h = dg.tanh(dg.matmul(h, g.param(f"W{b}_{k}", params[f"W{b}_{k}"])))
        names.append(f"out{b}")
        g.output(names[-1], h)
    return g, names


def _half(args: tuple) -> float:
    """Run some branches in a fresh process with one BLAS thread; returns the loop's time."""
    feeds, params, branches, depth, start = args
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        run_numpy(feeds, params, branches, depth)  # warm-up
        t0 = time.perf_counter()
        for b in range(start, branches, 2):
            h = feeds[f"x{b}"]
            for k in range(depth):
                h = np.tanh(h @ params[f"W{b}_{k}"])
        return time.perf_counter() - t0


def _two_process_time(feeds: dict, params: dict, branches: int, depth: int, repeats: int) -> float:
    """Median over repeats of the slower of two processes each running half the branches."""
    import multiprocessing as mp

    times = []
    with mp.get_context("spawn").Pool(2) as pool:
        for _ in range(repeats):
            times.append(
                max(pool.map(_half, [(feeds, params, branches, depth, s) for s in (0, 1)]))
            )
    return float(np.median(times))


def _worker_blas_threads() -> list[int]:
    import ray

    @ray.remote(num_cpus=1)
    def probe() -> list[int]:
        import numpy  # noqa: F401  (BLAS must be loaded for threadpoolctl to see it)

        try:  # self-contained: the worker may not see this checkout on its sys.path
            from threadpoolctl import threadpool_info
        except ImportError:
            return []
        return [int(i["num_threads"]) for i in threadpool_info() if i.get("user_api") == "blas"]

    return ray.get(probe.remote())


def bench(rec: Record, quick: bool = False, progress: bool = False) -> None:
    """Time the branches on LocalExecutor (1 BLAS thread) and RayExecutor(2)."""
    import distgraph as dg

    branches, depth, n = (2, 2, 64) if quick else (8, 4, 512)
    repeats = 3 if quick else 7
    feeds, params = make_problem(branches, depth, n)
    rec.note(f"{branches} branches x {depth} of ({n}x{n} float32 matmul + tanh), forward only.")
    g, names = build_distgraph(params, branches, depth, n)

    with blas_threads(1) as how:
        rec.note(how + ".")
        want = run_numpy(feeds, params, branches, depth)
        log(progress, NAME, "numpy, 1 BLAS thread")
        rec.figure(
            "numpy_1thread_s", measure(lambda: run_numpy(feeds, params, branches, depth), repeats)
        )
        log(progress, NAME, "distgraph local, 1 BLAS thread")
        local = dg.LocalExecutor()
        got = local.run(g, feeds=feeds).values
        for name, w in zip(names, want, strict=True):
            if not np.allclose(got[name], w, rtol=1e-4, atol=1e-5):
                raise AssertionError(f"distgraph local {name} disagrees with numpy")
        local_s = rec.figure(
            "distgraph_local_s", measure(lambda: local.run(g, feeds=feeds), repeats)
        )

    worker_threads = _worker_blas_threads()
    rec.note(f"Ray worker BLAS threads: {worker_threads or 'unknown'}.")
    times: dict[str, float] = {}
    for transport in TRANSPORTS:
        log(progress, NAME, f"distgraph ray, 2 workers, transport={transport}")
        with dg.RayExecutor(num_workers=2, transport=transport) as ex:

            def run(ex: Any = ex) -> Any:
                return ex.run(g, feeds=feeds)

            if transport == "auto":
                record_choice(
                    rec, "wide", warm_until_decided(run, functools.partial(run_choice, ex))
                )
            else:
                run()  # compiled from the plan's second run
            got = run().values
            if transport == "compiled" and ex.compiled.last_reason:
                raise AssertionError(f"wide did not run compiled: {ex.compiled.last_reason}")
            for name, w in zip(names, want, strict=True):
                if not np.allclose(got[name], w, rtol=1e-4, atol=1e-5):
                    raise AssertionError(f"distgraph ray ({transport}) {name} disagrees with numpy")
            suffix = "" if transport == "calls" else f"_{transport}"
            times[transport] = rec.figure(f"distgraph_ray{suffix}_s", measure(run, repeats))

    log(progress, NAME, "machine ceiling: the numpy branches split over 2 plain processes")
    two = rec.figure("numpy_2proc_s", _two_process_time(feeds, params, branches, depth, repeats))
    rec.ratio("numpy_2proc_speedup", rec.figures["numpy_1thread_s"], two)
    rec.note(
        "numpy_2proc_speedup is what two plain processes (1 BLAS thread each, half the branches "
        "each, data already in place) gain over one: the ceiling this machine allows."
    )
    rec.ratio("local_vs_numpy_1thread", local_s, rec.figures["numpy_1thread_s"])
    ceiling = rec.ratios["numpy_2proc_speedup"]
    for transport in TRANSPORTS:
        infix = "" if transport == "calls" else f"_{transport}"
        speedup = rec.ratio(f"ray{infix}_speedup_over_local", local_s, times[transport])
        rec.ratio(f"ray{infix}_speedup_vs_ceiling", speedup, ceiling)
    rec.target("ray_speedup_over_local", rec.ratios["ray_speedup_over_local"])
    rec.target("compiled_speedup_vs_ceiling", rec.ratios["ray_compiled_speedup_vs_ceiling"])
    rec.target("auto_speedup_vs_ceiling", rec.ratios["ray_auto_speedup_vs_ceiling"])
    rec.note(
        "distgraph_ray: transport='calls'; _compiled: transport='compiled' (the plan runs as a "
        "Ray Compiled Graph from its second run); _auto: transport='auto' once it decided "
        "(wide_auto_*: its choice and probe medians); *_vs_ceiling: a speed-up over the "
        "two-process ceiling measured in this run."
    )
