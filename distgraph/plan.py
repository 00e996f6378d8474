"""A Plan: which worker runs which nodes, grouped into calls, and what crosses between workers.

Pure data built from a Program and a placement. A *task* is one actor call: a run of
consecutive levels on one worker. A worker's open task keeps absorbing levels until another
worker needs one of its values; then it is closed (its results become an object ref other tasks
take as a top-level argument). Tasks are listed in submission order, and a task only imports
from tasks listed before it, so submitting the whole list at once cannot deadlock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from ._util import gc_paused
from .cost import CostModel, itemsize
from .errors import ConfigError
from .ops import LEAF_OPS, OPS
from .program import Program, edge_arrays, leaf_mask, node_column

DRIVER = "driver"
PARAM_SERVER = "ps"


@dataclass
class Task:
    """One actor call: nodes (topological order) a worker runs, and what flows in and out."""

    id: int
    worker: int
    nodes: list[str] = field(default_factory=list)
    first_level: int = 0
    last_level: int = 0
    phases: list[str] = field(default_factory=list)
    #: Inputs whose feeds this task receives from the driver (first use on its worker).
    feeds: list[str] = field(default_factory=list)
    #: (source task id, output slot, value names) for values produced on other workers.
    imports: list[tuple[int, int, list[str]]] = field(default_factory=list)
    #: (destination, value names): another worker's index, DRIVER or PARAM_SERVER.
    outputs: list[tuple[int | str, list[str]]] = field(default_factory=list)
    #: Whether no later task of this step runs on the same worker (its values can be dropped).
    last_on_worker: bool = False

    def slot(self, dest: int | str) -> int:
        """Index of the output going to ``dest``."""
        return next(i for i, (d, _) in enumerate(self.outputs) if d == dest)


@dataclass
class Plan:
    """Placement plus the calls that realise it."""

    program: Program
    placement: dict[str, int]
    num_workers: int
    tasks: list[Task]
    #: (value, destination worker, bytes) for every value that travels between workers.
    cross_edges: list[tuple[str, int, int]]
    #: Params and constants each worker keeps resident (sent once, updated by the PS).
    resident: dict[int, list[str]]
    cost: CostModel = field(default_factory=CostModel)
    strategy: str = "custom"

    @property
    def levels(self) -> list[list[str]]:
        """The program's levels."""
        return self.program.levels

    @property
    def cross_bytes(self) -> int:
        """Bytes predicted to cross workers per run."""
        return sum(b for _, _, b in self.cross_edges)

    def worker_nodes(self, worker: int) -> list[str]:
        """Non-leaf nodes a worker runs."""
        return [n for t in self.tasks if t.worker == worker for n in t.nodes]

    def load(self) -> dict[int, float]:
        """Estimated compute seconds per worker."""
        secs = node_seconds(self.program, self.cost)
        out = dict.fromkeys(range(self.num_workers), 0.0)
        for n, w in self.placement.items():
            out[w] += secs[n]
        return out

    def critical_path(self) -> tuple[float, list[str]]:
        """Longest chain of estimated compute time through the program."""
        secs = node_seconds(self.program, self.cost)
        best: dict[str, tuple[float, str | None]] = {}
        for n in self.program.order:
            ins = self.program.nodes[n].inputs
            prev = max(ins, key=lambda i: best[i][0]) if ins else None
            best[n] = (secs[n] + (best[prev][0] if prev else 0.0), prev)
        end = max(best, key=lambda n: best[n][0])
        path: list[str] = []
        cur: str | None = end
        while cur is not None:
            path.append(cur)
            cur = best[cur][1]
        return best[end][0], path[::-1]

    def estimate(self) -> float:
        """Estimated seconds of one run: per-level makespan, calls and transfers."""
        return estimate_makespan(
            self.program, self.placement, self.cost, len(self.tasks), self.cross_bytes
        )

    def explain(self) -> str:
        """A human-readable summary: load, parallelism, critical path, bytes crossing."""
        prog = self.program
        lines = [
            f"plan: {len(prog.order)} nodes on {self.num_workers} workers, strategy {self.strategy!r}, {len(self.tasks)} actor calls per run"
        ]
        load = self.load()
        lines.append("per-worker load:")
        for w in range(self.num_workers):
            nodes = self.worker_nodes(w)
            calls = sum(1 for t in self.tasks if t.worker == w)
            lines.append(
                f"  worker {w}: {len(nodes):6d} nodes, {calls:4d} calls, est. {load[w] * 1e3:9.3f} ms"
            )
        lines.append("per-level parallelism (nodes / workers busy):")
        for i, lv in enumerate(prog.levels):
            busy = sorted({self.placement[n] for n in lv if prog.nodes[n].op not in LEAF_OPS})
            phase = prog.nodes[lv[0]].phase
            if len(prog.levels) > 40 and 20 <= i < len(prog.levels) - 20:
                if i == 20:
                    lines.append(f"  ... {len(prog.levels) - 40} more levels ...")
                continue
            lines.append(f"  level {i:3d} [{phase:8s}]: {len(lv):5d} nodes on workers {busy}")
        total, path = self.critical_path()
        shown = " -> ".join(path if len(path) <= 12 else path[:6] + ["..."] + path[-5:])
        lines.append(f"critical path: {len(path)} nodes, est. {total * 1e3:.3f} ms: {shown}")
        lines.append(
            f"bytes crossing workers per run: {self.cross_bytes:,} in {len(self.cross_edges)} transfers"
        )
        for v, dst, b in self.cross_edges[:10]:
            lines.append(f"  {v} (worker {self.placement[v]}) -> worker {dst}: {b:,} B")
        if len(self.cross_edges) > 10:
            lines.append(f"  ... {len(self.cross_edges) - 10} more")
        lines.append(f"estimated run time: {self.estimate() * 1e3:.3f} ms")
        return "\n".join(lines)


def node_seconds(program: Program, cost: CostModel) -> dict[str, float]:
    """Estimated seconds per node (computed once per program and cost model)."""
    cache = program.memo.get(("seconds", cost))
    if cache is None:
        cache = dict(zip(program.order, seconds_array(program, cost).tolist()))
        program.memo[("seconds", cost)] = cache
    return cache


def node_bytes(program: Program, cost: CostModel) -> dict[str, int]:
    """Bytes of each node's value (computed once per program and cost model)."""
    cache = program.memo.get(("bytes", cost))
    if cache is None:
        cache = dict(zip(program.order, bytes_array(program, cost).tolist()))
        program.memo[("bytes", cost)] = cache
    return cache


def seconds_array(program: Program, cost: CostModel) -> np.ndarray:
    """Estimated seconds per node as a float array in ``program.order`` (memoized)."""
    key = ("seconds_array", cost)
    arr = program.memo.get(key)
    if arr is not None:
        return arr
    nodes = program.nodes
    ops = node_column(program, "op")
    if type(cost) is not CostModel:  # a subclass may estimate differently: ask it per node
        out = [
            cost.seconds(s, [nodes[i] for i in s.inputs]) if s.op not in LEAF_OPS else 0.0
            for s in map(nodes.__getitem__, program.order)
        ]
        arr = program.memo[key] = np.array(out, dtype=np.float64)
        return arr
    # The stock model, on arrays: overhead + factor * flops-per-element * largest operand size,
    # except ops with their own cost rule (Op.flops: matmul's 2*M*N*K, conv2d, einsum), which
    # are few and asked one by one.
    numel = _numel_array(program, cost)
    vjp = np.fromiter(map("vjp".__eq__, ops), bool, len(ops))
    # The op whose cost rule applies (a VJP's forward op); only VJPs are visited one by one.
    names = list(ops)
    attrs = node_column(program, "attrs")
    for i in np.flatnonzero(vjp).tolist():
        names[i] = attrs[i].get("op")
    rates = {k: OPS[k].flops_per_element if k in OPS else 1.0 for k in set(names)}
    per = np.fromiter(map(rates.__getitem__, names), np.float64, len(names))
    factor = np.where(vjp, 2.0, 1.0) * per
    src, dst = edge_arrays(program)
    size = numel.astype(np.float64)
    np.maximum.at(size, dst, numel[src].astype(np.float64))
    flops = factor * size
    ruled = {k for k in rates if k in OPS and OPS[k].flops is not None}
    matmuls = np.fromiter(map(ruled.__contains__, names), bool, len(names))
    for i in np.flatnonzero(matmuls).tolist():
        s = nodes[program.order[i]]
        flops[i] = cost.flops(s, [nodes[n] for n in s.inputs])
    arr = cost.node_overhead + flops / cost.flops_per_second
    arr[leaf_mask(program)] = 0.0
    program.memo[key] = arr
    return arr


def bytes_array(program: Program, cost: CostModel) -> np.ndarray:
    """Bytes of each node's value as an int array in ``program.order`` (memoized)."""
    key = ("bytes_array", cost)
    arr = program.memo.get(key)
    if arr is None:
        if type(cost) is CostModel:
            dtypes = node_column(program, "dtype")
            widths = np.fromiter(map(itemsize, dtypes), np.int64, len(dtypes))
            arr = _numel_array(program, cost) * widths
        else:
            nodes = program.nodes
            arr = np.array([cost.nbytes(nodes[n]) for n in program.order], dtype=np.int64)
        program.memo[key] = arr
    return arr


def _numel_array(program: Program, cost: CostModel) -> np.ndarray:
    """Element count of each node's value under the stock model (unknown shapes count one)."""
    key = ("numel_array", cost.batch_size)
    arr = program.memo.get(key)
    if arr is None:
        batch = cost.batch_size
        shapes = node_column(program, "shape")
        try:  # every shape fully known: one C-level pass
            arr = np.fromiter(map(math.prod, shapes), np.int64, len(shapes))
        except TypeError:  # unknown shapes or batch dimensions
            arr = np.fromiter(
                (
                    1
                    if s is None
                    else math.prod(s)
                    if None not in s
                    else math.prod(batch if d is None else d for d in s)
                    for s in shapes
                ),
                np.int64,
                len(shapes),
            )
        program.memo[key] = arr
    return arr


def estimate_makespan(
    program: Program, placement: Mapping[str, int], cost: CostModel, calls: int, cross_bytes: int
) -> float:
    """Level-synchronous estimate: sum over levels of the busiest worker, plus overheads."""
    secs = node_seconds(program, cost)
    total = 0.0
    for lv in program.levels:
        per: dict[int, float] = {}
        for n in lv:
            per[placement[n]] = per.get(placement[n], 0.0) + secs[n]
        total += max(per.values(), default=0.0)
    return total + calls * cost.call_overhead + cost.transfer_seconds(cross_bytes)


@gc_paused
def build_plan(
    program: Program,
    placement: Mapping[str, int],
    num_workers: int,
    cost: CostModel | None = None,
    training: bool = False,
    strategy: str = "custom",
) -> Plan:
    """Group a placed program into tasks; ``training`` sends param gradients to the PS."""
    cost = cost or CostModel()
    nodes = program.nodes
    nbytes = node_bytes(program, cost)
    missing = [n for n in program.order if n not in placement]
    if missing:
        raise ConfigError(f"placement has no worker for nodes {missing[:10]}")
    bad = {
        n: w
        for n, w in placement.items()
        if n in nodes and not (isinstance(w, int) and 0 <= w < num_workers)
    }
    if bad:
        raise ConfigError(
            f"placement puts nodes on workers outside 0..{num_workers - 1}: {dict(list(bad.items())[:10])}"
        )
    placement = {n: placement[n] for n in program.order}

    tasks: list[Task] = []
    submitted: list[Task] = []
    open_task: dict[int, Task | None] = dict.fromkeys(range(num_workers))
    task_of: dict[str, Task] = {}
    has_value: dict[int, set[str]] = {w: set() for w in range(num_workers)}
    resident: dict[int, list[str]] = {w: [] for w in range(num_workers)}
    cross: list[tuple[str, int, int]] = []
    imports: dict[int, dict[int, list[str]]] = {}  # task id -> source task id -> names

    def close(task: Task) -> None:
        open_task[task.worker] = None
        submitted.append(task)

    for lv_index, level in enumerate(program.levels):
        by_worker: dict[int, list[str]] = {}
        for n in level:
            if nodes[n].op not in LEAF_OPS:
                by_worker.setdefault(placement[n], []).append(n)
        for w in sorted(by_worker):
            # Close the producers of every cross-worker input first, then open/extend our task.
            for n in by_worker[w]:
                for v in nodes[n].inputs:
                    src = task_of.get(v)
                    if (
                        src is not None
                        and src.worker != w
                        and v not in has_value[w]
                        and open_task[src.worker] is src
                    ):
                        close(src)
            task = open_task[w]
            if task is None:
                task = Task(id=len(tasks), worker=w, first_level=lv_index)
                tasks.append(task)
                open_task[w] = task
                imports[task.id] = {}
            for n in by_worker[w]:
                for v in nodes[n].inputs:
                    if v in has_value[w]:
                        continue
                    op = nodes[v].op
                    if op in ("param", "const"):
                        resident[w].append(v)
                    elif op == "input":
                        task.feeds.append(v)
                    else:
                        src = task_of[v]
                        imports[task.id].setdefault(src.id, []).append(v)
                        cross.append((v, w, nbytes[v]))
                    has_value[w].add(v)
                task.nodes.append(n)
                task_of[n] = task
                has_value[w].add(n)
                if nodes[n].phase not in task.phases:
                    task.phases.append(nodes[n].phase)
            task.last_level = lv_index
    for w in range(num_workers):
        still_open = open_task[w]
        if still_open is not None:
            close(still_open)

    # Outputs: what each task must hand to other workers, the driver and the parameter server.
    sends: dict[int, dict[int | str, list[str]]] = {t.id: {} for t in tasks}
    for t in tasks:
        for src_id, names in imports[t.id].items():
            sends[src_id].setdefault(t.worker, []).extend(names)
    wanted_by_driver = program.outputs if training else program.fetches
    for v in wanted_by_driver:
        if nodes[v].op in LEAF_OPS:
            continue
        sends[task_of[v].id].setdefault(DRIVER, []).append(v)
    if training:
        for node_name in program.grads.values():
            sends[task_of[node_name].id].setdefault(PARAM_SERVER, []).append(node_name)
    for t in tasks:
        t.outputs = sorted(sends[t.id].items(), key=lambda kv: (isinstance(kv[0], str), str(kv[0])))
    for t in tasks:
        t.imports = [
            (src, tasks[src].slot(t.worker), names) for src, names in imports[t.id].items()
        ]
    last: dict[int, Task] = {}
    for t in submitted:
        last[t.worker] = t
    for t in last.values():
        t.last_on_worker = True
    return Plan(
        program=program,
        placement=placement,
        num_workers=num_workers,
        tasks=submitted,
        cross_edges=cross,
        resident={w: sorted(set(v)) for w, v in resident.items()},
        cost=cost,
        strategy=strategy,
    )
