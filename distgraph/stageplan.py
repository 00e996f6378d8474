"""A training plan run as a pipeline: stages, micro-batches and a schedule, as plain data.

A :class:`StagePlan` is a :class:`~distgraph.plan.Plan` whose placement is a chain of stages
(one worker each). Every stage has two tasks: ``F`` (its forward nodes) and ``B`` (its
backward nodes). A step splits the batch into ``m`` micro-batches and runs, per worker, the
action list of a schedule from :data:`distgraph.pipeline.SCHEDULES`: action ``F(s, i)`` runs
stage ``s``'s F task on micro-batch ``i``, ``B(s, i)`` its B task. Values crossing stages are
the F/B tasks' outputs of the same micro-batch. Each worker records its param gradients (and
the loss) per micro-batch and combines them in micro-batch order, weighted by rows
(:func:`distgraph.dataparallel.combine`), in its last action of the step, which sends them to
the parameter server (and the driver) once per step.

Which placements are chains: order the workers by their first node in the program's
topological order (stage 0 first). A forward value may flow only to later stages, a gradient
only to earlier ones; a backward node may read a forward value of any stage (that action runs
after it in every schedule). Anything else (a forward node reading a gradient, a gradient
flowing to a later stage, e.g. a param shared by two stages) is refused, naming the value.

Nothing here imports the runtime: ``runtime/ray/pipelined.py`` runs a StagePlan.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .cost import Calibration, CostModel, node_bytes
from .errors import ConfigError
from .ops import LEAF_OPS
from .pipeline import (
    Action,
    Schedule,
    StepEstimate,
    estimate_step,
    grid,
    make_schedule,
    peak_inflight,
    stage_profile,
)
from .plan import Plan, Task, build_plan
from .predict import Call, Prediction, pipeline_calls, server_seconds, simulate_calls
from .program import Program
from .result import TraceEvent

__all__ = [
    "NotAChainError",
    "StagePlan",
    "bubble_formula",
    "build_stage_plan",
    "measured_bubble",
]


#: No runtime costs at all: the schedule's own time.
_FREE = Calibration(call_overhead_s=0.0, seconds_per_byte=0.0)


class NotAChainError(ConfigError):
    """A placement cannot run as a pipeline: its workers do not form a chain of stages."""


def bubble_formula(stages: int, microbatches: int) -> float:
    """The idle fraction of GPipe and 1F1B with equal stages: ``(p - 1) / (m + p - 1)``."""
    return (stages - 1) / (microbatches + stages - 1)


def measured_bubble(events: Sequence[TraceEvent]) -> float:
    """The idle fraction of a traced pipelined step: 1 - (time the workers spent in actions)
    / (workers x the span from the first action's start to the last one's end). Events of
    pipelined actions carry ``args["action"]`` (``"F3"``); 0.0 when there are none."""
    acts = [e for e in events if "action" in e.args]
    if not acts:
        return 0.0
    span = max(e.end for e in acts) - min(e.start for e in acts)
    workers = {e.worker for e in acts}
    busy = sum(e.end - e.start for e in acts)
    return 1.0 - busy / (len(workers) * span) if span > 0 else 0.0


@dataclass
class StagePlan(Plan):
    """A training plan of a chain of stages with its micro-batch schedule (see module doc).

    ``tasks`` holds two tasks per stage: ``tasks[2s]`` is stage ``s``'s F task, ``tasks[2s+1]``
    its B task, both on worker ``stages[s]``. Their ``outputs`` list only other workers: the
    gradients (to the server) and the loss (to the driver) leave with each worker's last
    action of a step, combined over the micro-batches."""

    #: Worker of each stage, stage 0 first.
    stages: tuple[int, ...] = ()
    schedule_name: str = "gpipe"
    microbatches: int = 1
    #: Per stage: the gradient nodes it computes (sent to the server once per step).
    grads_of: tuple[tuple[str, ...], ...] = ()
    #: Per stage: the driver's outputs it computes (the loss), combined like the gradients.
    outputs_of: tuple[tuple[str, ...], ...] = ()
    #: The batch size the plan's cost model assumed for a whole step (None: unknown).
    step_batch: int | None = None
    _schedules: dict[int, Schedule] = field(default_factory=dict, repr=False, compare=False)
    _orders: dict[int, list[Action]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_stages(self) -> int:
        """How many stages the chain has."""
        return len(self.stages)

    def schedule(self, microbatches: int | None = None) -> Schedule:
        """The validated action lists (stage space: worker ``s`` of an action is stage ``s``;
        ``stages[s]`` is the real worker) for ``microbatches`` (default: the plan's)."""
        m = self.microbatches if microbatches is None else microbatches
        if m not in self._schedules:
            self._schedules[m] = make_schedule(self.schedule_name, self.num_stages, m)
        return self._schedules[m]

    def task_of(self, act: Action) -> Task:
        """The task an action runs."""
        return self.tasks[2 * act.stage + (0 if act.kind == "F" else 1)]

    def submission_order(self, microbatches: int | None = None) -> list[Action]:
        """Every action in an order that respects each worker's list and every dependency
        (each action after the ones it imports from): the simulated start order. Computed
        once per micro-batch count (the driver asks every step; at 32 stages simulating
        the schedule costs milliseconds of the driver's serial time)."""
        m = self.microbatches if microbatches is None else microbatches
        order = self._orders.get(m)
        if order is None:
            starts = _unit_starts(self.schedule(m))
            order = self._orders[m] = sorted(starts, key=lambda a: (starts[a], a.stage))
        return list(order)

    def peak_inflight(self, microbatches: int | None = None) -> list[int]:
        """Per stage: the micro-batches whose activations the schedule has it hold at once."""
        return peak_inflight(self.schedule(microbatches))

    def estimate_pipeline(self, step_overhead: float = 0.0) -> StepEstimate:
        """Predicted step time: the schedule's longest path with per-micro-batch stage times
        from the cost model (at ``step_batch / microbatches`` rows), its call overhead per
        action and its transfer time per stage boundary, plus ``step_overhead`` seconds per
        step. The schedule alone, with a flat call overhead per action: :meth:`estimate`
        models the step as the runtime runs it (one call per worker, calibrated costs)."""
        m = self.microbatches
        batch = max(1, (self.step_batch or self.cost.batch_size * m) // m)
        cost = dataclasses.replace(self.cost, batch_size=batch)
        stage_of = {n: self.stages.index(w) for n, w in self.placement.items()}
        prof = stage_profile(self.program, stage_of, self.num_stages, cost)
        est = estimate_step(
            self.schedule(),
            prof.forward,
            prof.backward,
            call_overhead=cost.call_overhead,
            transfer_bytes=prof.boundary_bytes,
            bandwidth=cost.bytes_per_second,
        )
        if not step_overhead:
            return est
        return dataclasses.replace(est, seconds=est.seconds + step_overhead)

    def microbatch_cost(self, cost: CostModel | None = None) -> CostModel:
        """``cost`` (default: the plan's) at one micro-batch's rows (``step_batch / m``)."""
        cost = cost or self.cost
        m = self.microbatches
        batch = max(1, (self.step_batch or cost.batch_size * m) // m)
        return dataclasses.replace(cost, batch_size=batch)

    @property
    def replicas(self) -> int:
        """How many copies of the chain the plan holds (data-parallel replicas, each on its
        own ``p`` workers; see ``runtime/ray/replicas.py``)."""
        return max(1, len(self.tasks) // (2 * max(1, self.num_stages)))

    def calls(self, cost: CostModel | None = None) -> list[Call]:
        """The step's actor calls as the runtime submits them: one per worker, stage by stage
        (replicas side by side), holding that worker's action list (its stage's forward or
        backward time per micro-batch; the same micro-batch's values it takes from other
        stages, delivered worker to worker), then the parameter server's staging call taking
        each worker's gradients from its call (see :mod:`distgraph.predict`)."""
        cost = self.microbatch_cost(cost)
        program = self.program
        nbytes = node_bytes(program, cost)
        stage_of = {n: self.stages.index(w) for n, w in self.placement.items()}
        prof = stage_profile(program, stage_of, self.num_stages, cost)
        sched = self.schedule()
        p, reps = self.num_stages, self.replicas
        by_key = {(a.kind, a.stage, a.microbatch): a for acts in sched for a in acts}
        imports: dict[int, list[tuple[str, int, int]]] = {}
        for t in self.tasks[: 2 * p]:
            imports[t.id] = [
                ("F" if src % 2 == 0 else "B", src // 2, sum(nbytes[v] for v in names))
                for src, _slot, names in t.imports
            ]
        grad_bytes = [sum(nbytes[g] for g in grads) for grads in self.grads_of]
        # (replica, stage) of each call, in the order pipelined.py submits them.
        keys = sorted(((r, s) for r in range(reps) for s in range(p)), key=lambda k: (k[1], k[0]))
        lists = [[(r, a) for a in sched[s]] for r, s in keys]

        def deps(ra: tuple[int, Action]) -> list[tuple[tuple[int, Action], int]]:
            r, act = ra
            return [
                ((r, by_key[(kind, stage, act.microbatch)]), b)
                for kind, stage, b in imports[self.task_of(act).id]
            ]

        def sent(i: int) -> int:
            s = keys[i][1]
            return grad_bytes[s] if self.grads_of[s] else 0

        return pipeline_calls(
            lists,
            worker_of=lambda i: self.tasks[keys[i][0] * 2 * p + 2 * keys[i][1]].worker,
            seconds_of=lambda ra: (prof.forward if ra[1].kind == "F" else prof.backward)[
                ra[1].stage
            ],
            deps_of=deps,
            nodes_of=lambda ra: len(self.task_of(ra[1]).nodes),
            server=(
                server_seconds(sum(grad_bytes) * reps, p * reps, cost),
                sent,
                sum(1 for names in self.resident.values() if names),
            ),
            nested=reps > 1,
            label_of=lambda ra: f"{ra[1].label}@{ra[1].stage}",
        )

    def predict(
        self, cost: CostModel | None = None, calibration: Calibration | None = None
    ) -> Prediction:
        """The predicted step with its per-call times (see :meth:`estimate`)."""
        cal = calibration or Calibration.from_cost(cost or self.cost)
        return simulate_calls(self.calls(cost), cal)

    def estimate(
        self, cost: CostModel | None = None, calibration: Calibration | None = None
    ) -> float:
        """Predicted seconds of one pipelined step as the runtime runs it: one call per
        worker holding its schedule actions (stage times per micro-batch from ``cost``,
        default the plan's), each action waiting for the same micro-batch's values delivered
        by other stages' workers, then the server's staging call; under ``calibration``'s
        call, node, hand-off, driver and transfer costs (default: the cost model's
        constants)."""
        return self.predict(cost, calibration).seconds

    def explain(self, calibration: Calibration | None = None) -> str:
        """The plan's summary, then the pipeline: stages, the schedule grid, the predicted
        step time and the bubble."""
        p, m = self.num_stages, self.microbatches
        lines = [
            Plan.explain(self, calibration),
            f"pipeline: {p} stages on workers {list(self.stages)}, {m} micro-batches, "
            f"schedule {self.schedule_name!r}",
            "schedule grid (one slot = one forward, backward = 2 slots; F3 = forward of "
            "micro-batch 3, B1 = backward of 1; '.' = idle):",
        ]
        lines += ["  " + row for row in grid(self.schedule(), 1, 2).splitlines()]
        peaks = self.peak_inflight()
        lines.append(f"micro-batches held per stage (activations): {peaks}")
        ideal = self.predict(calibration=_FREE)
        span = ideal.seconds
        busy = sum(end - start for row in ideal.action_times for start, end in row)
        bubble = 1.0 - busy / (p * span) if span > 0 else 0.0
        lines.append(
            f"schedule alone (free calls and transfers): {span * 1e3:.3f} ms (busiest worker "
            f"{ideal.busiest * 1e3:.3f} ms); bubble {bubble:.3f}, formula (p-1)/(m+p-1) = "
            f"{bubble_formula(p, m):.3f}"
        )
        return "\n".join(lines)


def _needs(act: Action, stages: int) -> list[tuple[str, int, int]]:
    """(kind, stage, micro-batch) of the actions ``act`` waits for: the previous stage's
    forward of its micro-batch; for a backward, its own forward and the next stage's
    backward (the dependencies ``distgraph.pipeline.validate`` checks)."""
    s, i = act.stage, act.microbatch
    if act.kind == "F":
        return [("F", s - 1, i)] if s > 0 else []
    return [("F", s, i)] + ([("B", s + 1, i)] if s < stages - 1 else [])


def _unit_starts(schedule: Schedule) -> dict[Action, float]:
    """Each action's earliest start when every action takes one unit: the same times as
    ``simulate(schedule, 1.0, 1.0)``, in one pass over the actions in dependency order
    (linear in the actions; the simulation revisits blocked workers, which at 1,024 stages
    takes minutes). ``schedule`` is validated already."""
    by_key = {(a.kind, a.stage, a.microbatch): a for acts in schedule for a in acts}
    p = 1 + max(k[1] for k in by_key)
    after: dict[Action, list[Action]] = {a: [] for a in by_key.values()}
    waiting = dict.fromkeys(after, 0)
    for acts in schedule:
        for x, y in itertools.pairwise(acts):
            after[x].append(y)
            waiting[y] += 1
    for act in after:
        for k in _needs(act, p):
            dep = by_key[k]
            if dep.worker != act.worker:  # same-worker order is the list's, counted above
                after[dep].append(act)
                waiting[act] += 1
    start = dict.fromkeys(after, 0.0)
    ready = [a for a, n in waiting.items() if n == 0]
    while ready:
        act = ready.pop()
        for nxt in after[act]:
            start[nxt] = max(start[nxt], start[act] + 1.0)
            waiting[nxt] -= 1
            if waiting[nxt] == 0:
                ready.append(nxt)
    return start


def build_stage_plan(
    base: Plan, microbatches: int, schedule: str, step_batch: int | None = None
) -> StagePlan:
    """The pipelined form of a placed training plan ``base`` (see :func:`plan.plan_for`):
    same placement, resident values and cost; tasks regrouped into F and B per stage.

    Raises :class:`NotAChainError` naming the value when the placement is not a chain, and
    :class:`~distgraph.errors.ConfigError` for a bad ``microbatches`` / ``schedule``.
    """
    if not isinstance(microbatches, int) or isinstance(microbatches, bool) or microbatches < 1:
        raise ConfigError(f"microbatches must be an int >= 1, got {microbatches!r}")
    program, placement = base.program, base.placement
    nodes = program.nodes
    order = [n for n in program.order if nodes[n].op not in LEAF_OPS]
    stages: list[int] = []
    for n in order:
        if placement[n] not in stages:
            stages.append(placement[n])
    if not stages:
        raise NotAChainError("the program has no computing node to pipeline")
    rank = {w: s for s, w in enumerate(stages)}

    def kind(n: str) -> str:
        return "F" if nodes[n].phase == "forward" else "B"

    def where(n: str) -> str:
        return f"{n!r} ({nodes[n].op}, {'forward' if kind(n) == 'F' else 'backward'}, stage {rank[placement[n]]} on worker {placement[n]})"

    for n in order:
        s, k = rank[placement[n]], kind(n)
        for v in nodes[n].inputs:
            if nodes[v].op in LEAF_OPS:
                continue
            sv, kv = rank[placement[v]], kind(v)
            ok = (
                (k == "F" and kv == "F" and sv <= s)
                or (k == "B" and kv == "F")
                or (k == "B" and kv == "B" and sv >= s)
            )
            if not ok:
                raise NotAChainError(
                    f"placement is not a chain of pipeline stages: {where(n)} reads {where(v)}; "
                    "forward values may only flow to later stages and gradients to earlier "
                    "ones (a param shared by two stages does this). Use strategy='pipeline', "
                    "or run without microbatches"
                )
    for what, names in (("gradient", program.grads.values()), ("output", program.outputs)):
        for n in names:
            if nodes[n].op in LEAF_OPS:
                raise NotAChainError(
                    f"the {what} {n!r} is a {nodes[n].op} node, computed by no stage; a "
                    "pipelined step combines only computed values (run without microbatches)"
                )
    p = len(stages)
    made = make_schedule(schedule, p, microbatches)  # refuse a bad name or size first
    tasks: list[Task] = []
    for w in stages:
        for k in ("F", "B"):
            t = Task(id=len(tasks), worker=w, phases=["forward" if k == "F" else "backward"])
            t.nodes = [n for n in order if placement[n] == w and kind(n) == k]
            lv = [program.level[n] for n in t.nodes] or [0]
            t.first_level, t.last_level = min(lv), max(lv)
            tasks.append(t)
    # Feeds: every input a stage reads comes with its F action (F always precedes B).
    for s in range(p):
        seen: set[str] = set()
        for n in tasks[2 * s].nodes + tasks[2 * s + 1].nodes:
            for v in nodes[n].inputs:
                if nodes[v].op == "input" and v not in seen:
                    seen.add(v)
                    tasks[2 * s].feeds.append(v)
    # Imports: F takes what its forward nodes read from other stages' F tasks; B takes the
    # rest of what its nodes read (forward values F did not import, other stages' gradients).
    sends: dict[int, dict[int, list[str]]] = {t.id: {} for t in tasks}
    imports: dict[int, dict[int, list[str]]] = {t.id: {} for t in tasks}
    for s, w in enumerate(stages):
        have: set[str] = set()
        for t in (tasks[2 * s], tasks[2 * s + 1]):
            for n in t.nodes:
                for v in nodes[n].inputs:
                    if nodes[v].op in LEAF_OPS or placement[v] == w or v in have:
                        continue
                    have.add(v)
                    src = 2 * rank[placement[v]] + (0 if kind(v) == "F" else 1)
                    imports[t.id].setdefault(src, []).append(v)
                    sends[src].setdefault(w, []).append(v)
    for t in tasks:
        t.outputs = sorted(sends[t.id].items())
    for t in tasks:
        t.imports = [
            (src, tasks[src].slot(t.worker), names) for src, names in imports[t.id].items()
        ]
    grads = set(program.grads.values())
    outs = [o for o in program.outputs if nodes[o].op not in LEAF_OPS]
    return StagePlan(
        program=program,
        placement=dict(placement),
        num_workers=base.num_workers,
        tasks=tasks,
        cross_edges=list(base.cross_edges),
        resident=dict(base.resident),
        cost=base.cost,
        strategy=base.strategy,
        stages=tuple(stages),
        schedule_name=schedule,
        microbatches=microbatches,
        grads_of=tuple(tuple(n for n in order if placement[n] == w and n in grads) for w in stages),
        outputs_of=tuple(tuple(n for n in outs if placement[n] == w) for w in stages),
        step_batch=step_batch,
        _schedules={microbatches: made},
    )


def stage_plan_for(
    program: Program,
    placement: Mapping[str, int],
    num_workers: int,
    cost: CostModel,
    microbatches: int,
    schedule: str,
    step_batch: int | None = None,
) -> StagePlan:
    """Build the training plan of ``placement`` and regroup it as a pipeline."""
    base = build_plan(program, placement, num_workers, cost, training=True, strategy="custom")
    return build_stage_plan(base, microbatches, schedule, step_batch)
