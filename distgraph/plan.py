"""A Plan: which worker runs which nodes, grouped into calls, and what crosses between workers.

Pure data built from a Program and a placement. A *task* is one actor call: a run of
consecutive levels on one worker. A worker's open task keeps absorbing levels until another
worker needs one of its values; then it is closed (its results become an object ref other tasks
take as a top-level argument). Tasks are listed in submission order, and a task only imports
from tasks listed before it, so submitting the whole list at once cannot deadlock.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ._util import gc_paused
from .cost import Calibration, CostModel, estimate_makespan, node_bytes, node_seconds
from .errors import ConfigError
from .graph import Graph
from .ops import LEAF_OPS
from .partition import Strategy, partition
from .program import Program, compile_program

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
    #: A training plan of data-parallel replicas: what layout was chosen and why (shown first
    #: by :meth:`explain`); empty for a plan that is not replicated.
    layout: str = ""

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

    def estimate(
        self, cost: CostModel | None = None, calibration: Calibration | None = None
    ) -> float:
        """Predicted seconds of one step of this plan as the runtime runs it: every task an
        actor call submitted in order by the driver, taking its imports from other workers'
        calls, and (training) the parameter server's staging call combining the gradients,
        under ``calibration``'s call overhead, driver and transfer costs (default: the cost
        model's constants). Node times come from ``cost`` (default: the plan's). A replicated
        plan is its replicas' calls together: the slowest replica plus the combine and
        update. See :mod:`distgraph.predict`."""
        from .predict import plan_calls, simulate_calls

        cost = cost or self.cost
        cal = calibration or Calibration.from_cost(cost)
        return simulate_calls(plan_calls(self, cost), cal).seconds

    def estimate_levels(self) -> float:
        """The cost model's level-synchronous estimate (per-level makespan, every call's
        overhead, every transfer): a coarse score for comparing placements."""
        return estimate_makespan(
            self.program, self.placement, self.cost, len(self.tasks), self.cross_bytes
        )

    def explain(self, calibration: Calibration | None = None) -> str:
        """A human-readable summary: load, parallelism, critical path, bytes crossing, and
        the predicted step time (under ``calibration``; default constants when None)."""
        prog = self.program
        lines = [self.layout] if self.layout else []
        lines += [
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
        lines += _predicted_lines(self.estimate(calibration=calibration), self.cost, calibration)
        return "\n".join(lines)


def _predicted_lines(seconds: float, cost: CostModel, calibration: Calibration | None) -> list[str]:
    """The explain lines of a predicted step: the time and where its constants come from."""
    cal = calibration or Calibration.from_cost(cost)
    return [
        f"predicted step: {seconds * 1e3:.3f} ms",
        f"  runtime constants: {cal.describe()}",
    ]


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


def program_of(
    source: Graph | Program,
    outputs: Sequence[str] | str | None = None,
    grad: str | None = None,
    wrt: Sequence[str] | None = None,
) -> Program:
    """The program a plan is made for: ``source`` itself, or a Graph compiled for the request."""
    if isinstance(source, Program):
        return source
    return compile_program(source, outputs, grad, wrt)


def plan_for(
    source: Graph | Program,
    *,
    num_workers: int,
    strategy: str | Strategy | Mapping[str, int] = "mincut",
    training: bool = False,
    batch_size: int | None = None,
    cost: CostModel | None = None,
    outputs: Sequence[str] | str | None = None,
    grad: str | None = None,
    wrt: Sequence[str] | None = None,
) -> Plan:
    """Compile, partition, plan: the one path from a request to the plan that runs it.

    ``source`` is a Graph (compiled for ``outputs``/``grad``/``wrt``) or a Program compiled
    already (an executor's, cached). ``batch_size``, when given, is the batch the cost model
    assumes for ``None`` dimensions (a copy of ``cost`` with it). ``training`` sends param
    gradients to the parameter server instead of the driver.
    """
    program = program_of(source, outputs, grad, wrt)
    cost = cost or CostModel()
    if batch_size is not None and batch_size != cost.batch_size:
        cost = dataclasses.replace(cost, batch_size=batch_size)
    placement = partition(program, num_workers, strategy, cost)
    name = strategy if isinstance(strategy, str) else "custom"
    return build_plan(program, placement, num_workers, cost, training=training, strategy=name)
