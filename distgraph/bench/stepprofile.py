"""Where the time of one MLP step goes, from its trace (not a timed benchmark).

``python -m distgraph.bench.stepprofile [--steps N] [--replicas R] [--quick]`` runs the MLP
784-512-512-10 (batch 256, float32) of the ``mlp`` benchmark on ``RayExecutor(2)``:
training steps (``--replicas``, default 1) and ``run()`` forward + backward, each under both
transports (a training column for ``compiled`` only where the code compiles training steps),
with ``trace=True``, and prints, per kind of step, the median over the last ``N`` steps of
each phase of the step's timeline:

- ``driver submit``: from the driver's submission (after planning, which a repeated step
  finds cached) until the first worker call starts (Ray's scheduling, the call's arguments
  reaching the worker; for a compiled run, the write to the input channel);
- ``worker compute``: the node events of the busiest worker (numpy's time);
- ``worker call, not compute``: the rest of the worker calls' span (reading inputs, writing
  outputs, the runtime's per-node bookkeeping, gaps between a worker's calls);
- ``worker update``: a worker applying the update to its own param copy (training; it runs
  at the end of the worker's last call);
- ``to server``: from the last worker call's end to the server's stage starting (gradients
  travelling to the parameter server), 0 when it started earlier;
- ``server stage + apply``: the parameter server combining, staging and committing the update;
- ``back to driver``: the rest, until the driver has the step's answer.

The phases are consecutive segments of the step's wall time, so they add up to it.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..result import TraceEvent

PHASES = (
    "driver submit",
    "worker compute",
    "worker call, not compute",
    "worker update",
    "to server",
    "server stage + apply",
    "back to driver",
)


def phases(events: Sequence[TraceEvent]) -> dict[str, float]:
    """One step's trace cut into :data:`PHASES` (seconds, adding up to the step's wall time)."""
    step = next(e for e in events if e.track == "driver" and e.phase == "step")
    t0, t1 = step.start, step.end
    on_workers = [e for e in events if e.worker is not None]
    calls = [e for e in on_workers if e.kind == "call"]
    updates = [e for e in on_workers if e.kind == "update"]
    server = [e for e in events if e.track.startswith("parameter server")]
    out = dict.fromkeys(PHASES, 0.0)
    if not calls:
        out["back to driver"] = t1 - t0
        return out
    first = min(c.start for c in calls)
    last = max(c.end for c in calls)
    busiest = max(
        sum(e.end - e.start for e in on_workers if e.kind == "node" and e.worker == w)
        for w in {c.worker for c in calls}
    )
    update = max((u.end - u.start for u in updates), default=0.0)
    if updates:  # a worker's update runs in its last call, or just after it
        last = max(last, max(u.end for u in updates))
    out["driver submit"] = first - t0
    out["worker compute"] = min(busiest, last - first)
    out["worker update"] = min(update, last - first - out["worker compute"])
    out["worker call, not compute"] = (last - first) - out["worker compute"] - out["worker update"]
    at = last
    if server:
        s0, s1 = min(e.start for e in server), max(e.end for e in server)
        out["to server"] = max(0.0, s0 - at)
        out["server stage + apply"] = max(0.0, s1 - max(at, s0))
        at = max(at, s1)
    out["back to driver"] = max(0.0, t1 - at)
    return out


def _median(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in rows) for k in PHASES}


def profile(steps: int = 10, replicas: int = 1, quick: bool = False) -> dict[str, Any]:
    """Median phases of ``steps`` traced steps of each kind (seconds), and the step totals."""
    import distgraph as dg

    from .mlp import LR, build_distgraph, make_problem

    sizes, batch = ([64, 32, 32, 10], 32) if quick else ([784, 512, 512, 10], 256)
    params, x, y = make_problem(sizes, batch)
    g = build_distgraph(sizes, params, batch)
    feeds = {"x": x, "y": y}
    out: dict[str, Any] = {}
    for transport in ("calls", "compiled"):
        with dg.RayExecutor(num_workers=2, replicas=replicas, transport=transport) as ex:
            trainer = dg.Trainer(
                g, loss="loss", optimizer=dg.SGD(lr=LR), executor=ex, progress=False
            )
            session = trainer.session
            data = session.attach(feeds)
            rows = np.arange(batch)
            got = []
            for i in range(1, steps + 3):  # two warm-up steps (a compiled graph from the 2nd)
                session.step_rows(i, data, rows, trace=True)
                if i > 2:
                    got.append(phases(session.last_trace))
            compiled = getattr(session, "compiled", None)  # code that compiles training steps
            if transport == "compiled" and (compiled is None or compiled.last_reason):
                why = compiled.last_reason if compiled is not None else "not compiled here"
                print(f"training steps stayed on calls under transport='compiled': {why}")
                continue
            out[f"training step ({transport}, replicas={replicas})"] = _median(got)
    for transport in ("calls", "compiled"):
        with dg.RayExecutor(num_workers=2, transport=transport) as ex:
            got = []
            for i in range(steps + 2):
                res = ex.run(g, feeds, grad="loss", trace=True)
                if i >= 2:  # compiled from the plan's second run
                    got.append(phases(res.trace))
            if transport == "compiled" and ex.compiled.last_reason:
                raise AssertionError(f"the MLP did not run compiled: {ex.compiled.last_reason}")
            out[f"run() forward + backward ({transport})"] = _median(got)
    return out


def table(result: dict[str, dict[str, float]]) -> str:
    """A markdown table: one row per phase, one column per kind of step, in ms."""
    kinds = list(result)
    lines = ["| phase (ms, median) | " + " | ".join(kinds) + " |"]
    lines.append("|---" * (len(kinds) + 1) + "|")
    for p in PHASES:
        lines.append(f"| {p} | " + " | ".join(f"{result[k][p] * 1e3:.1f}" for k in kinds) + " |")
    totals = " | ".join(f"**{sum(result[k].values()) * 1e3:.1f}**" for k in kinds)
    lines.append(f"| **step** | {totals} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m distgraph.bench.stepprofile")
    ap.add_argument("--steps", type=int, default=10, help="traced steps per kind (default 10)")
    ap.add_argument("--replicas", type=int, default=1, help="training replicas (default 1)")
    ap.add_argument("--quick", action="store_true", help="a small MLP (seconds)")
    args = ap.parse_args(argv)
    from ._harness import ray_runtime

    with ray_runtime():
        print(table(profile(args.steps, args.replicas, args.quick)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
