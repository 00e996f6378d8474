"""Shared plumbing: timing, result records, the one Ray runtime, BLAS pinning, machine facts."""

from __future__ import annotations

import contextlib
import gc
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

#: Environment every Ray worker of the benchmark job starts with: one BLAS thread per process,
#: so two workers on two cores do not oversubscribe them.
BLAS_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def log(progress: bool, bench: str, message: str) -> None:
    """Print one progress line to stderr when ``progress`` is on."""
    if progress:
        print(f"[{bench}] {message}", file=sys.stderr, flush=True)


def measure(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        # Collect garbage outside the timed region so one run does not pay for another's.
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """Run ``fn()`` once; return its value and the seconds it took."""
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


@dataclass
class Record:
    """One benchmark's outcome; ``as_dict`` is the JSON shape ``distgraph.bench.run`` returns."""

    name: str
    goals: dict[str, tuple[str, float]] = field(default_factory=dict)
    figures: dict[str, float] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)
    targets: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    def figure(self, label: str, value: float) -> float:
        """Record a figure (seconds unless the label says otherwise) and return it."""
        self.figures[label] = float(value)
        return float(value)

    def ratio(self, label: str, num: float | None, den: float | None) -> float:
        """Record ``num / den`` (NaN when either side is missing) and return it."""
        value = num / den if num is not None and den is not None and den != 0 else math.nan
        self.ratios[label] = float(value)
        return float(value)

    def target(self, label: str, value: float) -> bool:
        """Record whether ``value`` meets goal ``label`` (``<=``/``>=`` a bound); NaN never does."""
        op, bound = self.goals[label]
        if op not in ("<=", ">="):
            raise ValueError(f"unknown comparison {op!r}")
        met = not math.isnan(value) and (value <= bound if op == "<=" else value >= bound)
        self.targets[label] = {"value": float(value), "target": f"{op} {bound:g}", "met": met}
        return met

    def note(self, text: str) -> None:
        """Add one sentence to the notes."""
        self.notes.append(text)

    def as_dict(self) -> dict[str, Any]:
        """The plain-JSON form: name, figures, ratios, targets, notes, error.

        Every goal appears under ``targets``; one never measured (the run failed first) has
        value NaN and is not met.
        """
        for label in self.goals:
            if label not in self.targets:
                self.target(label, math.nan)
        return {
            "name": self.name,
            "figures": dict(self.figures),
            "ratios": dict(self.ratios),
            "targets": {k: dict(v) for k, v in self.targets.items()},
            "notes": " ".join(self.notes),
            "error": self.error,
        }


@contextlib.contextmanager
def ray_runtime() -> Iterator[bool]:
    """Share one local Ray runtime across benchmarks; yield whether this call started it.

    A runtime that is already up (a test session's fixture, an executor's) is reused and left
    running; one started here is shut down on exit.
    """
    import ray

    started = False
    if not ray.is_initialized():
        ray.init(
            # "local" always starts a fresh runtime: never join a cluster someone else started.
            address="local",
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": dict(BLAS_ENV)},
        )
        started = True
    try:
        yield started
    finally:
        if started:
            ray.shutdown()


@contextlib.contextmanager
def blas_threads(n: int) -> Iterator[str]:
    """Limit this process's BLAS pools to ``n`` threads; yield how it was done."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # the env vars only act before numpy loads, so say so
        yield "threadpoolctl missing: driver BLAS threads not limited"
        return
    with threadpool_limits(limits=n, user_api="blas"):
        yield f"driver BLAS limited to {n} thread(s) with threadpoolctl"


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # not installed
        return None


def machine_info() -> dict[str, Any]:
    """Cores, memory, CPU model, OS, Python and the versions of every peer library."""
    info: dict[str, Any] = {
        "logical_cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        import psutil

        info["physical_cores"] = psutil.cpu_count(logical=False)
        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except ImportError:
        pass
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    for pkg in [
        "distgraph",
        "numpy",
        "ray",
        "dask",
        "distributed",
        "pymetis",
        "torch",
        "threadpoolctl",
        "psutil",
    ]:
        info[pkg] = _version(pkg)
    return info


def sgd_session_step(graph: Any, executor: Any, feeds: Any, lr: float) -> Callable[[], Any]:
    """One training step of ``graph`` on ``executor``'s session (forward, backward, SGD
    update) as a call to time: each call is the next step id."""
    import itertools

    import distgraph as dg

    trainer = dg.Trainer(
        graph, loss="loss", optimizer=dg.SGD(lr=lr), executor=executor, progress=False
    )
    session, ids = trainer.session, itertools.count(1)
    return lambda: session.step(next(ids), feeds)
