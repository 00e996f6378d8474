"""Pipelined training steps on Ray: a batch split into micro-batches, run by a schedule.

Composes with data-parallel replicas and sharded parameter servers: ``R`` replicas x ``p``
stages on ``num_workers = R * p`` workers (replica ``r`` on workers ``r*p .. r*p + p - 1``),
each replica's row shard split into ``m`` micro-batches, and ``ps_shards=S`` servers.

State (beyond :class:`~distgraph.runtime.ray.session.RaySession`'s): the options'
``microbatches`` and ``schedule``; ``plan`` is the replicated
:class:`~distgraph.stageplan.StagePlan` (its ``stages`` are replica 0's) and ``stage_plan``
one replica's; ``split``: the row analysis of the loss (``None`` for one micro-batch).

Order of a step (the session's ``_step_once``: rows split over the replicas, stage / commit /
abort with the server(s); here the hooks ``_place``, ``_submit_step``, ``_finish_step``):
1. split each replica's rows into ``m`` micro-batches with the replicas' own helper
   (:func:`~distgraph.runtime.ray.replicas.split_rows`: sizes differ by at most one); inputs
   without a batch axis go whole to every micro-batch;
2. submit every action of each replica's schedule in the plan's submission order (each after
   every action it imports from), one actor call each: ``run_action(ActionCall, CallHeader,
   ...)`` with the refs of the same micro-batch's values from other stages as top-level
   arguments; each worker's first action takes its new params, its last returns its
   gradients combined over its micro-batches, weighted by rows (one dict per server shard),
   and the loss (to the driver);
3. the server combines the replicas' gradients in replica order, weighted by their rows, and
   the step is committed (or aborted) once, as a plain step.

Workers keep no replica of their params here (the server sends new params after each step).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ray

from ...dataparallel import RowSplit, analyze_rows
from ...errors import ConfigError, WaveTimeoutError
from ...pipeline import SCHEDULES
from ...plan import DRIVER, PARAM_SERVER, Plan, Task
from ...program import Program
from ...result import TraceEvent
from ...stageplan import StagePlan, build_stage_plan
from ..actions import ActionCall
from ..protocol import CallHeader, Rows, pack
from . import actors
from .options import INLINE_BYTES
from .replicas import Replicas, replicate, split_rows
from .session import RaySession
from .shards import ShardedServer, shard_dest
from .waves import RowsFeed, Waves


class PipelinedSession(RaySession):
    """A training session whose steps run as micro-batch pipelines (see module doc)."""

    local_updates = False
    #: How micro-batches split the rows (None: one micro-batch per step, nothing split).
    split: RowSplit | None = None
    #: One replica's stage plan (workers ``0 .. p - 1``; replica ``r`` adds ``r * p``).
    stage_plan: StagePlan | None = None
    #: The refs of the latest step's actions by (replica, task id, micro-batch), for naming
    #: the late ones.
    _action_refs: dict[tuple[int, int, int], list[Any]] = {}

    def _place(self, layout: Replicas, batch: int) -> Plan:
        o = self.options
        m = o.microbatches or 1
        # A loss coupling rows cannot be split: refused (naming the node) before anything runs
        # (with replicas ``choose_replicas`` has refused it already).
        self.split = (layout.split or analyze_rows(self.prog, self.loss)) if m > 1 else None
        self.stage_plan = stage_plan(self.waves, self.prog, layout, batch)
        return replicate(self.stage_plan, layout.count)

    def _grad_dests(self, stage: int) -> list[tuple[int | str, list[str]]]:
        """Where stage ``stage``'s gradients go: the server, or each shard its own."""
        assert self.stage_plan is not None
        names = self.stage_plan.grads_of[stage]
        if not names:
            return []
        if not isinstance(self.server, ShardedServer):
            return [(PARAM_SERVER, list(names))]
        shard_of = {g: self.server.owner[p] for p, g in self.server.grads.items()}
        per: dict[int, list[str]] = {}
        for n in names:
            per.setdefault(shard_of[n], []).append(n)
        return [(shard_dest(k), per[k]) for k in sorted(per)]

    def _microbatches(self, feeds: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[int]]:
        """One replica's micro-batches: their feeds and rows."""
        assert self.stage_plan is not None
        if self.split is None:
            return [dict(feeds)], [1]
        slices, parts = split_rows(feeds, self.split.batch_inputs, self.stage_plan.microbatches)
        return parts, [s.stop - s.start for s in slices]

    def _submit_step(
        self,
        step_id: int,
        arrays: Mapping[str, Any],
        parts: Sequence[Mapping[str, Any]],
        updates: Mapping[int, Any],
        trace: bool,
    ) -> tuple[Plan, dict[int, list[Any]]]:
        """Submit every action of the step, replica by replica interleaved in each replica's
        submission order; returns one task per (replica, stage) saying what its worker's last
        action sends the server(s) and the driver, and those refs."""
        plan, sp = self.plan, self.stage_plan
        assert plan is not None and sp is not None
        workers = self.cluster.workers
        count = len(sp.tasks)  # tasks per replica
        reduction = self.split.kind if self.split is not None else "mean"
        pending_update = dict(updates)
        refs: dict[tuple[int, int, int], list[Any]] = {}
        self._action_refs = refs
        # (replica, stage) -> (worker, what its last action sends the server(s) / driver, refs)
        ends: dict[tuple[int, int], tuple[int, list[tuple[int | str, list[str]]], list[Any]]] = {}
        orders = []
        for r, feeds in enumerate(list(parts) or [arrays]):
            mb_feeds, rows = self._microbatches(feeds)
            sched = sp.schedule(len(mb_feeds))
            position = {a: i for acts in sched for i, a in enumerate(acts)}
            orders.append(
                [
                    (r, a, mb_feeds, rows, sched, position)
                    for a in sp.submission_order(len(mb_feeds))
                ]
            )
        for item in itertools.chain.from_iterable(itertools.zip_longest(*orders)):
            if item is None:
                continue
            r, act, mb_feeds, rows, sched, position = item
            task = plan.tasks[r * count + sp.task_of(act).id]
            w = task.worker
            pos = position[act]
            last = pos == len(sched[act.stage]) - 1
            extras: list[tuple[int | str, list[str]]] = []
            if last:
                extras = self._grad_dests(act.stage)
                if sp.outputs_of[act.stage]:
                    extras.append((DRIVER, list(sp.outputs_of[act.stage])))
            outputs = list(task.outputs) + extras
            record = sp.grads_of[act.stage] + sp.outputs_of[act.stage]
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
                [refs[(r, src, act.microbatch)][slot] for src, slot, _ in task.imports],
            )
            n_out = max(1, len(outputs))
            out = workers[w].run_action.options(num_returns=n_out).remote(call, *args)
            got = list(out) if n_out > 1 else [out]
            refs[(r, task.id, act.microbatch)] = got
            if last:
                ends[(r, act.stage)] = (w, extras, got[len(task.outputs) :])
        for w, update in pending_update.items():
            workers[w].set_resident.remote(self.plan_id, update)
        # In replica order, then stage order: the server takes each replica's dicts together.
        sent: list[Task] = []
        sent_refs: dict[int, list[Any]] = {}
        for i, key in enumerate(sorted(ends)):
            w, extras, got = ends[key]
            sent.append(Task(id=i, worker=w, outputs=extras))
            sent_refs[i] = got
        return dataclasses.replace(plan, tasks=sent), sent_refs

    def _finish_step(
        self, sent: Plan, step_id: int, refs: dict[int, list[Any]], extra: list[Any]
    ) -> list[dict[str, Any]]:
        driver = [
            refs[t.id][t.slot(DRIVER)] for t in sent.tasks if any(d == DRIVER for d, _ in t.outputs)
        ]
        try:
            got = self.waves.get(driver + extra, "running the step")
        except WaveTimeoutError:
            raise self._timeout(step_id) from None
        return got[: len(driver)]

    def _step_events(self, sent: Plan, step_id: int, t_submit: float) -> list[TraceEvent]:
        events = [
            TraceEvent(f"step {step_id}", "call", "step", -1, "driver", t_submit, time.time())
        ]
        for w in sorted({t.worker for t in sent.tasks}):
            events.extend(
                actors.fetch(self.cluster.workers[w].take_trace.remote(self.plan_id, step_id))
            )
        return events

    def _timeout(self, step_id: int) -> WaveTimeoutError:
        """Name the actions still pending when a step passes its deadline."""
        plan = self.plan
        assert plan is not None and self.stage_plan is not None
        count = len(self.stage_plan.tasks)
        every = [(k, r) for k, rs in self._action_refs.items() for r in rs]
        _ready, pending = ray.wait(
            [r for _, r in every], num_returns=len(every), timeout=0, fetch_local=False
        )
        waiting = set(pending)
        late = sorted({k for k, r in every if r in waiting})
        names = [
            f"{'F' if (tid % count) % 2 == 0 else 'B'}{mb} of stage {(tid % count) // 2}"
            f"{f' of replica {r}' if self.layout and self.layout.count > 1 else ''} on worker "
            f"{plan.tasks[tid].worker}"
            for r, tid, mb in late
        ]
        shown = ", ".join(names[:12]) + (f", ... {len(names) - 12} more" if len(names) > 12 else "")
        return WaveTimeoutError(
            f"pipelined step {step_id} passed its deadline of {self.options.deadline:g} s; "
            f"actions still pending: {shown or 'none (waiting for the parameter server)'}"
        )

    def microbatch_peaks(self) -> list[dict[int, int]]:
        """Per worker, replica by replica and stage by stage within each (stage order): step ->
        the most micro-batches whose activations it held at once during that step (as measured
        on the worker)."""
        assert self.stage_plan is not None and self.layout is not None
        width = self.layout.width
        return actors.fetch(
            [
                self.cluster.workers[w + r * width].microbatch_peaks.remote(self.plan_id)
                for r in range(self.layout.count)
                for w in self.stage_plan.stages
            ]
        )


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


def stage_plan(waves: Waves, program: Program, layout: Replicas, batch: int | None) -> StagePlan:
    """One replica's pipelined training plan (over ``layout.width`` workers, for its row
    shard of a ``batch``-row step) under the options' strategy, microbatches and schedule."""
    o = waves.options
    shard = -(-batch // layout.count) if batch else None  # the largest shard's rows
    base = waves.make_plan(program, training=True, batch=shard or 1, num_workers=layout.width)
    return build_stage_plan(base, o.microbatches or 1, o.schedule, step_batch=shard)


def pipelined_plan(
    waves: Waves, program: Program, layout: Replicas, batch: int | None
) -> StagePlan:
    """The pipelined training plan of ``program``: ``layout.count`` copies of one replica's
    :func:`stage_plan` (not installed)."""
    return replicate(stage_plan(waves, program, layout, batch), layout.count)
