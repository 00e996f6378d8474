"""`fine`: a layered random DAG of tiny ops, where per-node scheduling overhead is everything.

Level 0 holds ``width`` random 16-element float64 vectors; every later node is
``tanh(a) + 0.5 * b`` of two random nodes of the level before. Only the forward pass runs.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from ._harness import Record, log, measure

NAME = "fine"
#: label -> (comparison, bound) of every target this benchmark checks.
TARGETS = {"distgraph_vs_dask_threaded": ("<=", 0.12)}
#: Packages of the ``bench`` extra this benchmark needs (Dask threaded and distributed).
PEERS: tuple[str, ...] = ("dask", "distributed")


def make_dag(levels: int, width: int, dim: int, seed: int = 0) -> tuple[np.ndarray, list]:
    """Level-0 values (width x dim) and, per later level, the (a, b) parent indices of each node."""
    rng = np.random.default_rng(seed)
    inputs = rng.standard_normal((width, dim))
    edges = [rng.integers(0, width, size=(width, 2)).tolist() for _ in range(levels - 1)]
    return inputs, edges


def _node(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.tanh(a) + 0.5 * b


def run_numpy(inputs: np.ndarray, edges: list) -> list[np.ndarray]:
    """The single-process loop every other system is compared with."""
    prev = list(inputs)
    for level in edges:
        prev = [_node(prev[a], prev[b]) for a, b in level]
    return prev


def dask_graph(inputs: np.ndarray, edges: list) -> tuple[dict, list]:
    """The DAG as a dask dict graph and the keys of its last level."""
    dsk: dict[Any, Any] = {("n", 0, i): inputs[i] for i in range(len(inputs))}
    for lvl, level in enumerate(edges, start=1):
        for i, (a, b) in enumerate(level):
            dsk[("n", lvl, i)] = (_node, ("n", lvl - 1, a), ("n", lvl - 1, b))
    last = len(edges)
    return dsk, [("n", last, i) for i in range(len(inputs))]


def run_ray_tasks(inputs: np.ndarray, edges: list) -> list[np.ndarray]:
    """One Ray task per node, chained by object refs."""
    import ray

    remote_node = _ray_node()
    prev = [ray.put(v) for v in inputs]
    for level in edges:
        prev = [remote_node.remote(prev[a], prev[b]) for a, b in level]
    return ray.get(prev)


_RAY_NODE = None


def _ray_node() -> Any:
    # Defined lazily so importing this module does not need Ray.
    global _RAY_NODE
    if _RAY_NODE is None:
        import ray

        _RAY_NODE = ray.remote(num_cpus=1)(_node)
    return _RAY_NODE


def build_distgraph(inputs: np.ndarray, edges: list) -> tuple[Any, dict, list[str]]:
    """The same DAG as a dg.Graph; returns the graph, its feeds and the output names."""
    import distgraph as dg

    g = dg.Graph()
    prev = [g.input(f"x{i}", shape=v.shape, dtype=v.dtype) for i, v in enumerate(inputs)]
    feeds = {f"x{i}": v for i, v in enumerate(inputs)}
    for level in edges:
        prev = [dg.tanh(prev[a]) + 0.5 * prev[b] for a, b in level]
    names = [f"out{i}" for i in range(len(prev))]
    for name, node in zip(names, prev, strict=True):
        g.output(name, node)
    return g, feeds, names


def _check(got: list, want: list, system: str) -> None:
    if not all(np.allclose(g, w) for g, w in zip(got, want, strict=True)):
        raise AssertionError(f"{system} disagrees with the numpy loop")


def bench(rec: Record, quick: bool = False, progress: bool = False) -> None:
    """Time every system on the DAG in this process and compare distgraph with Dask threaded."""
    import dask.threaded

    levels, width, dim = (4, 20, 16) if quick else (20, 100, 16)
    fast, slow = (2, 1) if quick else (7, 3)
    inputs, edges = make_dag(levels, width, dim)
    rec.figure("nodes", levels * width)
    want = run_numpy(inputs, edges)

    log(progress, NAME, "numpy loop")
    rec.figure("numpy_s", measure(lambda: run_numpy(inputs, edges), fast * 3))

    log(progress, NAME, "dask threaded")
    dsk, keys = dask_graph(inputs, edges)
    _check(dask.threaded.get(dsk, keys), want, "dask threaded")
    dask_s = rec.figure("dask_threaded_s", measure(lambda: dask.threaded.get(dsk, keys), fast))

    log(progress, NAME, "dask distributed (2 processes x 1 thread)")
    rec.figure("dask_distributed_s", _time_dask_distributed(dsk, keys, want, slow))

    log(progress, NAME, "ray, one task per node")
    _check(run_ray_tasks(inputs, edges), want, "ray tasks")
    rec.figure("ray_tasks_s", measure(lambda: run_ray_tasks(inputs, edges), slow))

    log(progress, NAME, "distgraph")
    _time_distgraph(rec, inputs, edges, want, fast)

    best = min((rec.figures[k] for k in ("distgraph_mincut_s", "distgraph_level_s")), default=None)
    for label in ("numpy_s", "ray_tasks_s", "dask_distributed_s"):
        if label in rec.figures:
            rec.ratio(f"dask_threaded_vs_{label[:-2]}", dask_s, rec.figures[label])
    rec.ratio("distgraph_mincut_vs_dask_threaded", rec.figures.get("distgraph_mincut_s"), dask_s)
    rec.ratio("distgraph_level_vs_dask_threaded", rec.figures.get("distgraph_level_s"), dask_s)
    for strategy in ("mincut", "level"):
        rec.ratio(
            f"distgraph_{strategy}_compiled_vs_calls",
            rec.figures.get(f"distgraph_{strategy}_compiled_s"),
            rec.figures.get(f"distgraph_{strategy}_s"),
        )
    rec.ratio("distgraph_vs_numpy", best, rec.figures["numpy_s"])
    rec.target(
        "distgraph_vs_dask_threaded",
        rec.ratio("distgraph_best_vs_dask_threaded", best, dask_s),
    )
    rec.note(
        f"{levels} levels x {width} nodes of tanh(a) + 0.5*b on {dim}-element float64 vectors, "
        "forward only; medians after one warm-up; results checked against the numpy loop. "
        "distgraph_*_compiled: RayExecutor(transport='compiled'), the plan run as a Ray "
        "Compiled Graph from its second run (the target is judged on calls, the default)."
    )


def _time_dask_distributed(dsk: dict, keys: list, want: list, repeats: int) -> float:
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            host="127.0.0.1",
        ) as cluster,
        Client(cluster) as client,
    ):
        _check(client.get(dsk, keys), want, "dask distributed")
        return measure(lambda: client.get(dsk, keys), repeats)


def _time_distgraph(rec: Record, inputs: np.ndarray, edges: list, want: list, repeats: int) -> None:
    import distgraph as dg

    g, feeds, names = build_distgraph(inputs, edges)
    local = dg.LocalExecutor()
    _check([local.run(g, feeds=feeds).values[n] for n in names], want, "distgraph local")
    rec.figure("distgraph_local_s", measure(lambda: local.run(g, feeds=feeds), repeats))
    for strategy in ("mincut", "level"):
        for transport in ("calls", "compiled"):
            with dg.RayExecutor(num_workers=2, strategy=strategy, transport=transport) as ex:
                for _ in range(2):  # a compiled plan is compiled on its second run
                    res = ex.run(g, feeds=feeds)
                if transport == "compiled" and ex.compiled.last_reason:
                    raise AssertionError(
                        f"fine ({strategy}) did not run compiled: {ex.compiled.last_reason}"
                    )
                _check([res.values[n] for n in names], want, f"distgraph ray {strategy}")
                step = functools.partial(ex.run, g, feeds=feeds)
                suffix = "_compiled" if transport == "compiled" else ""
                rec.figure(f"distgraph_{strategy}{suffix}_s", measure(step, repeats))
