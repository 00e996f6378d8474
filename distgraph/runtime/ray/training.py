"""What a training session derives once: which workers keep a replica of their params, and a
training set shipped to the object store once for all its steps."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from ...errors import DistgraphError
from ...interpret import prepare_feeds
from ...plan import DRIVER, PARAM_SERVER, Plan
from ...program import Program
from .cluster import Cluster
from .options import INLINE_BYTES


@dataclass(frozen=True)
class Attached:
    """A training set checked once: its arrays, and object refs of the large ones."""

    arrays: dict[str, np.ndarray]
    shipped: dict[str, Any]


def attach_arrays(
    cluster: Cluster, program: Program, data: Mapping[str, Any], check_finite: bool
) -> Attached | None:
    """Check a training set once and put its large arrays in the object store; None when
    it is better sent per step (a problem each step should report, or too big to copy)."""
    try:
        arrays = prepare_feeds(program, data, check_finite)
        cluster.check_feeds_fit(arrays)
    except DistgraphError:
        return None  # each step then reports its own problem, as before
    large = {k: v for k, v in arrays.items() if v.nbytes > INLINE_BYTES}
    capacity = cluster.object_store_capacity()
    if capacity and sum(v.nbytes for v in large.values()) > capacity / 4:
        return None  # too big to keep a copy: batches travel per step
    shipped = {k: ray.put(v) for k, v in large.items()}
    return Attached(arrays, shipped)


def replica_layout(plan: Plan) -> tuple[dict[int, dict[str, str]], bool]:
    """Which workers can update their own params, and whether steps can be pipelined.

    A worker can when every gradient of the params it keeps is computed on it (its last task
    of a step then holds them all). Steps can be pipelined when every param-holding worker can,
    and every task that sends gradients also answers the driver (so the driver's outputs
    arriving proves the whole step succeeded)."""
    prog = plan.program
    home: dict[str, int] = {}
    for t in plan.tasks:
        for dest, names in t.outputs:
            if dest == PARAM_SERVER:
                home.update(dict.fromkeys(names, t.worker))
    replicas: dict[int, dict[str, str]] = {}
    holders = set()
    for w, names in plan.resident.items():
        params = [p for p in names if p in prog.params and p in prog.grads]
        if not params:
            continue
        holders.add(w)
        if all(home.get(prog.grads[p]) == w for p in params):
            replicas[w] = {p: prog.grads[p] for p in params}
    answers = all(
        any(d == DRIVER for d, _ in t.outputs)
        for t in plan.tasks
        if any(d == PARAM_SERVER for d, _ in t.outputs)
    )
    return replicas, bool(replicas) and holders == set(replicas) and answers


def takers(plan: Plan, replicas: Mapping[int, Any], num_workers: int) -> list[int]:
    """Workers that take their params from the server after each step: those that keep
    params and no replica (the others would only be sent empty updates)."""
    params = plan.program.params
    return [
        w
        for w in range(num_workers)
        if w not in replicas and any(p in params for p in plan.resident[w])
    ]


def server_routes(
    plan: Plan, replicas: Mapping[int, Any], num_workers: int
) -> dict[int, list[str]]:
    """Worker -> the params the server sends it after each step (none for replicas)."""
    params = plan.program.params
    return {
        w: [] if w in replicas else [p for p in plan.resident[w] if p in params]
        for w in range(num_workers)
    }
