"""distgraph's benchmark suite: each workload timed against hand-written peers in one run.

Shipped with the package; the third-party peers it compares against (Dask, pymetis, psutil) come
with the ``bench`` extra (``pip install 'distgraph[bench]'``). Each benchmark module lists the
ones it needs in ``PEERS``; ``run`` refuses a benchmark whose peers are missing before anything
runs, rather than reporting a half-measured result.

``run(names, quick, progress)`` returns one plain dict per benchmark (a benchmark that fails
keeps the figures it measured, lists its targets as NaN / not met and says why in ``error``)::

    {"name": "fine",
     "figures": {"numpy_s": 0.005, ...},             # seconds unless the label says otherwise
     "ratios": {"distgraph_best_vs_dask_threaded": 0.1, ...},
     "targets": {"distgraph_vs_dask_threaded": {"value": 0.1, "target": "<= 0.12", "met": True}},
     "notes": "...",
     "error": None}                                   # the exception text if the benchmark failed

``format_table(results)`` renders them for people; ``to_json(results)`` adds the machine facts.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import traceback
from typing import Any

from ..errors import ConfigError
from ._harness import Record, machine_info, ray_runtime

#: Benchmark names in the order they run; each is a module here with ``TARGETS``, ``PEERS``
#: and ``bench(record, quick, progress)``.
NAMES = (
    "fine",
    "mlp",
    "dp",
    "dp_sim",
    "straggler",
    "wide",
    "latency",
    "scale",
    "soak",
    "conv",
    "attention",
    "pipeline",
    "scaleout",
)
#: Benchmarks that never touch Ray (no runtime is started for a run made only of these).
_NO_RAY = frozenset({"scale", "conv", "attention"})

#: The extra that installs every benchmark's peers, as a user types it.
INSTALL_HINT = "pip install 'distgraph[bench]'"

__all__ = [
    "INSTALL_HINT",
    "NAMES",
    "format_table",
    "machine_info",
    "missing_peers",
    "run",
    "to_json",
]


def run(names: list[str] | None = None, quick: bool = False, progress: bool = False) -> list[dict]:
    """Run the named benchmarks (all when ``names`` is empty) sharing one Ray runtime."""
    chosen = list(names) if names else list(NAMES)
    unknown = [n for n in chosen if n not in NAMES]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; choose from {list(NAMES)}")
    _require_peers(chosen)
    results = []
    if all(n in _NO_RAY for n in chosen):
        return [_run_one(n, quick, progress) for n in chosen]
    with ray_runtime():
        for name in chosen:
            results.append(_run_one(name, quick, progress))
    return results


def missing_peers(names: list[str] | None = None) -> dict[str, list[str]]:
    """Per named benchmark (all when empty), the packages of its ``PEERS`` not installed."""
    missing: dict[str, list[str]] = {}
    for name in names or NAMES:
        absent = [pkg for pkg in _module(name).PEERS if importlib.util.find_spec(pkg) is None]
        if absent:
            missing[name] = absent
    return missing


def _require_peers(names: list[str]) -> None:
    missing = missing_peers(names)
    if not missing:
        return
    needs = "; ".join(f"{name} needs {', '.join(pkgs)}" for name, pkgs in missing.items())
    # Name what runs without the extra, so a user without it still has something to try.
    runnable = [n for n in NAMES if n not in missing_peers()]
    alternative = f", or run only {', '.join(runnable)}" if runnable else ""
    raise ConfigError(f"benchmark peers are not installed ({needs}): {INSTALL_HINT}{alternative}")


def _module(name: str) -> Any:
    return importlib.import_module(f"{__name__}.{name}")


def _run_one(name: str, quick: bool, progress: bool) -> dict:
    module = _module(name)
    rec = Record(name, goals=dict(module.TARGETS))
    try:
        module.bench(rec, quick=quick, progress=progress)
    except Exception as exc:  # one broken benchmark must not hide the others' figures
        last = traceback.extract_tb(exc.__traceback__)[-1]
        rec.error = f"{type(exc).__name__}: {exc} (at {last.filename}:{last.lineno})"
    return rec.as_dict()


def to_json(results: list[dict], indent: int | None = 2) -> str:
    """``{"machine": ..., "results": [...]}`` as JSON text (NaN written as null)."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and math.isnan(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    return json.dumps({"machine": machine_info(), "results": clean(results)}, indent=indent)


def _fmt(label: str, value: float) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    if label.endswith("_s"):
        return f"{value * 1e3:.3f} ms" if value < 1 else f"{value:.3f} s"
    if float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:.3g}"


def format_table(results: list[dict]) -> str:
    """A plain-text report: per benchmark its figures, ratios and targets (met or not)."""
    lines: list[str] = []
    for r in results:
        lines.append(f"== {r['name']} ==")
        if r.get("error"):
            lines.append(f"  ERROR {r['error']}")
        for label, value in r["figures"].items():
            lines.append(f"  {label:<40} {_fmt(label, value):>14}")
        for label, value in r["ratios"].items():
            lines.append(f"  {label:<40} {_fmt('ratio', value):>14}")
        for label, t in r["targets"].items():
            mark = "met" if t["met"] else "NOT MET"
            value = _fmt("ratio", t["value"])
            lines.append(f"  target {label:<33} {value:>14}  {t['target']:<10} {mark}")
        if r.get("notes"):
            lines.append(f"  note: {r['notes']}")
        lines.append("")
    met = sum(t["met"] for r in results for t in r["targets"].values())
    total = sum(len(r["targets"]) for r in results)
    lines.append(f"targets met: {met}/{total}")
    return "\n".join(lines)
