"""Pipelined training steps on Ray: a batch split into micro-batches, run by a schedule.

State (beyond :class:`~distgraph.runtime.ray.session.RaySession`'s): the options'
``microbatches`` and ``schedule``; ``plan`` is a :class:`~distgraph.stageplan.StagePlan`;
``split``: the row analysis of the loss (``None`` for one micro-batch).

Order of a step (``_step_once``; the stage/commit protocol with the server is the session's):
1. split the batch's rows into ``m`` micro-batches (sizes differ by at most one); inputs
   without a batch axis go whole to every micro-batch;
2. submit every action of the schedule in the plan's submission order (each after every
   action it imports from), one actor call each: ``run_action(ActionCall, CallHeader, ...)``
   with the refs of the same micro-batch's values from other stages as top-level arguments;
   each worker's first action takes its new params, its last returns its gradients combined
   over the micro-batches (to ``ps.stage``) and the loss (to the driver);
3. wait once (bounded by the deadline), commit, or abort on any failure, as a plain step.

Workers keep no replica of their params here (the server sends new params after each step).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import ray

from ...dataparallel import RowSplit, analyze_rows
from ...errors import ConfigError, WaveTimeoutError, WorkerLostError
from ...pipeline import SCHEDULES
from ...plan import DRIVER, PARAM_SERVER
from ...program import Program
from ...result import TraceEvent
from ...stageplan import StagePlan, action_outputs, build_stage_plan, split_batch
from ..actions import ActionCall
from ..protocol import CallHeader, Rows, pack
from . import actors
from .options import INLINE_BYTES
from .server import apply_event
from .session import RaySession
from .training import server_routes, takers
from .waves import RowsFeed, Waves


class PipelinedSession(RaySession):
    """A training session whose steps run as micro-batch pipelines (see module doc)."""

    split: RowSplit | None = None

    def _ensure(self, batch: int) -> None:
        if self.plan is not None:
            return
        o = self.options
        m = o.microbatches or 1
        plan = pipelined_plan(self.waves, self.prog, batch)
        # A loss coupling rows cannot be split: refused (naming the node) before anything runs.
        self.split = analyze_rows(self.prog, self.loss) if m > 1 else None
        self.cluster.check_fits(plan, self._initial.params)
        self.plan = plan
        self.plan_id = self.waves.new_plan_id()
        self.replicas, self.pipelined = {}, False
        self.takers = takers(plan, {}, o.num_workers)
        try:
            self.server.start(self._initial, server_routes(plan, {}, o.num_workers))
        except BaseException:
            self.plan = None
            raise
        try:
            self.waves.install(plan, self.plan_id, self._initial.params)
        except WorkerLostError:
            raise  # the step's recovery replaces the worker and installs the plan on it
        except BaseException:
            self.waves.uninstall(self.plan_id)
            self.server.kill()
            self.plan = None
            raise

    def _microbatch_feeds(
        self, arrays: Mapping[str, Any]
    ) -> tuple[list[dict[str, Any]], list[int]]:
        """Each micro-batch's feeds and rows."""
        plan = self.plan
        assert isinstance(plan, StagePlan)
        if self.split is None:
            rows = _rows(arrays, self.prog)
            return [dict(arrays)], [rows]
        batch_inputs = set(self.split.batch_inputs)
        rows = _rows(arrays, self.prog, self.split.batch_inputs)
        slices = split_batch(rows, plan.microbatches)
        out = []
        for sl in slices:
            feeds: dict[str, Any] = {}
            for k, v in arrays.items():
                if k not in batch_inputs:
                    feeds[k] = v
                elif isinstance(v, RowsFeed):
                    feeds[k] = RowsFeed(v.ref, v.index[sl])
                else:
                    feeds[k] = v[sl]
            out.append(feeds)
        return out, [s.stop - s.start for s in slices]

    def _step_once(self, step_id: int, arrays: Mapping[str, Any], trace: bool = False) -> float:
        """Run one pipelined step and commit it on the server (or leave it never applied)."""
        plan, waves = self.plan, self.waves
        assert isinstance(plan, StagePlan)
        self._settle()
        t_submit = time.time()
        updates, self._updates = self._updates, {}
        pending, self.server.pending = self.server.pending, None
        committing = False
        try:
            refs, grads, driver = self._submit(plan, step_id, arrays, updates, trace)
            if self.takers:
                out = self.ps.stage.options(num_returns=1 + self.options.num_workers).remote(
                    step_id, *grads, routed=True
                )
                staged, routed = out[0], {w: out[1 + w] for w in self.takers}
            else:
                staged, routed = self.ps.stage.remote(step_id, *grads), {}
            extra = [pending] if pending is not None else []
            extra.append(staged)
            try:
                got = waves.get(driver + extra, "running the step")
            except WaveTimeoutError:
                raise self._timeout(plan, step_id, refs) from None
            committing = True
            status_ref = self._commit(step_id)
            if step_id not in self._done:
                self._done.append(step_id)
            status: dict[str, Any] = (
                waves.get([status_ref], "applying the update")[0] if trace else {}
            )
        except BaseException as e:
            self._abandon(step_id, committing, pending, e)
            raise
        self.server.pending = None if trace else status_ref
        self._updates = routed
        if trace:
            events = [
                TraceEvent(f"step {step_id}", "call", "step", -1, "driver", t_submit, time.time())
            ]
            for w in sorted(set(plan.stages)):
                events.extend(
                    actors.fetch(self.cluster.workers[w].take_trace.remote(self.plan_id, step_id))
                )
            events.append(apply_event(step_id, status))
            self.last_trace = sorted(events, key=lambda e: e.start)
        values = got[: len(driver)]
        return float(next(d[self.loss] for d in values if self.loss in d))

    def _submit(
        self,
        plan: StagePlan,
        step_id: int,
        arrays: Mapping[str, Any],
        updates: Mapping[int, Any],
        trace: bool,
    ) -> tuple[dict[Any, list[Any]], list[Any], list[Any]]:
        """Submit every action of the step; returns the refs by (task id, micro-batch), the
        gradient refs for the server and the refs of the driver's outputs."""
        workers = self.cluster.workers
        mb_feeds, rows = self._microbatch_feeds(arrays)
        m = len(mb_feeds)
        sched = plan.schedule(m)
        position = {a: i for acts in sched for i, a in enumerate(acts)}
        pending_update = dict(updates)
        refs: dict[tuple[int, int], list[Any]] = {}
        grads: list[Any] = []
        driver: list[Any] = []
        reduction = self.split.kind if self.split is not None else "mean"
        for act in plan.submission_order(m):
            task = plan.task_of(act)
            w = task.worker
            pos = position[act]
            last = pos == len(sched[act.stage]) - 1
            outputs = action_outputs(plan, act, last)
            record = plan.grads_of[act.stage] + plan.outputs_of[act.stage]
            in_task = set(task.nodes)
            small, big_names, big = _feeds(mb_feeds[act.microbatch], task.feeds)
            update = pending_update.pop(w, None)
            header = CallHeader(
                self.plan_id,
                step_id,
                task.id,
                trace=trace,
                check_finite=self.check_finite,
                by_ref=self.options.data_path == "store",
                update=update is not None,
                inline=small,
                big=big_names,
                imports=len(task.imports),
            )
            call = ActionCall(
                label=act.label,
                microbatch=act.microbatch,
                stage=act.stage,
                position=pos,
                count=len(sched[act.stage]),
                release=act.kind == "B",
                record=tuple(n for n in record if n in in_task),
                outputs=tuple((d, tuple(ns)) for d, ns in outputs),
                rows=tuple(rows),
                reduction=reduction,
            )
            args = pack(
                header,
                update,
                big,
                [refs[(src, act.microbatch)][slot] for src, slot, _ in task.imports],
            )
            n_out = max(1, len(outputs))
            out = workers[w].run_action.options(num_returns=n_out).remote(call, *args)
            got = list(out) if n_out > 1 else [out]
            refs[(task.id, act.microbatch)] = got
            for i, (dest, _names) in enumerate(outputs):
                if dest == PARAM_SERVER:
                    grads.append(got[i])
                elif dest == DRIVER:
                    driver.append(got[i])
        for w, update in pending_update.items():
            workers[w].set_resident.remote(self.plan_id, update)
        return refs, grads, driver

    def _timeout(
        self, plan: StagePlan, step_id: int, refs: dict[tuple[int, int], list[Any]]
    ) -> WaveTimeoutError:
        """Name the actions still pending when a step passes its deadline."""
        every = [(k, r) for k, rs in refs.items() for r in rs]
        _ready, pending = ray.wait(
            [r for _, r in every], num_returns=len(every), timeout=0, fetch_local=False
        )
        waiting = set(pending)
        late = sorted({k for k, r in every if r in waiting})
        names = [
            f"{'F' if tid % 2 == 0 else 'B'}{mb} of stage {tid // 2} on worker "
            f"{plan.tasks[tid].worker}"
            for tid, mb in late
        ]
        shown = ", ".join(names[:12]) + (f", ... {len(names) - 12} more" if len(names) > 12 else "")
        return WaveTimeoutError(
            f"pipelined step {step_id} passed its deadline of {self.options.deadline:g} s; "
            f"actions still pending: {shown or 'none (waiting for the parameter server)'}"
        )

    def microbatch_peaks(self) -> list[dict[int, int]]:
        """Per stage (in stage order): step -> the most micro-batches whose activations its
        worker held at once during that step (as measured on the worker)."""
        assert isinstance(self.plan, StagePlan)
        return actors.fetch(
            [
                self.cluster.workers[w].microbatch_peaks.remote(self.plan_id)
                for w in self.plan.stages
            ]
        )


def _rows(arrays: Mapping[str, Any], prog: Any, names: Any = None) -> int:
    """Rows of the batch: the leading size of the first batch input present."""
    for k in names if names is not None else arrays:
        v = arrays.get(k)
        if isinstance(v, RowsFeed):
            return len(v.index)
        if v is not None and getattr(v, "ndim", 0) >= 1:
            return int(v.shape[0])
    return 1


def _feeds(
    feeds: Mapping[str, Any], names: list[str]
) -> tuple[dict[str, Any], tuple[str, ...], list[Any]]:
    """A call's feeds: small ones inline, large ones put in the object store (one put each),
    rows of a shipped array as their index."""
    small: dict[str, Any] = {}
    big_names: list[str] = []
    big: list[Any] = []
    for n in names:
        v = feeds[n]
        if isinstance(v, RowsFeed):
            small[n] = Rows(v.index)
            big_names.append(n)
            big.append(v.ref)
        elif v.nbytes <= INLINE_BYTES:
            small[n] = v
        else:
            big_names.append(n)
            big.append(ray.put(v))
    return small, tuple(big_names), big


def check_pipeline_options(microbatches: int | None, schedule: str) -> None:
    """Refuse a bad ``microbatches`` / ``schedule`` when the executor is made."""
    if microbatches is not None and (
        not isinstance(microbatches, int) or isinstance(microbatches, bool) or microbatches < 1
    ):
        raise ConfigError(f"microbatches must be an int >= 1 or None, got {microbatches!r}")
    if schedule not in SCHEDULES:
        raise ConfigError(
            f"unknown pipeline schedule {schedule!r}; choose from {sorted(SCHEDULES)}"
        )


def pipelined_plan(waves: Waves, program: Program, batch: int | None) -> StagePlan:
    """The pipelined training plan of ``program`` under the options' strategy (not installed)."""
    o = waves.options
    base = waves.make_plan(program, training=True, batch=batch or 1)
    return build_stage_plan(base, o.microbatches or 1, o.schedule, step_batch=batch)
