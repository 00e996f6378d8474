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
2. submit one call per active worker, ``run_actions(StepActions, *values)``, holding its
   whole action list for the step (``runtime/actions.py``), stage 0 first: no call waits for
   another on the driver. Values crossing stages go from worker to worker (the producing
   action delivers them to the consumer's mailbox at once); the first action takes the
   worker's new params, the last returns its gradients combined over its micro-batches,
   weighted by rows (one dict per server shard), and the loss (to the driver);
3. the server combines the replicas' gradients in replica order, weighted by their rows;
   the driver waits for every call, failing at the first error (a worker lost mid-step
   fails the step at once; ``_abandon`` cancels the other workers' waits for its values),
   and the step is committed (or aborted) once, as a plain step.

Workers keep no replica of their params here (the server sends new params after each step).

Compiled transport (``transport`` "compiled" or "auto", from the second step in a row): the
same step as one Ray Compiled Graph (``compiled_pipeline.py``): one node per (worker,
action), hand-offs in its channels instead of the mailbox, the server's combine, stage and
commit one node that runs only once every action succeeded. Rows split as above; a step
whose micro-batch count differs from the graph's (a short batch) runs on calls. A failed
execution is fenced, aborted (the server's answer decides), recovered as on calls and
compiled again. With parameter-server shards, each shard's stage and commit are nodes of the
graph (two phases, as on calls).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ray

from ...dataparallel import RowSplit, analyze_rows
from ...errors import ConfigError, WaveTimeoutError
from ...optim import Optimizer
from ...paramstore import ParameterStore
from ...pipeline import SCHEDULES
from ...plan import DRIVER, PARAM_SERVER, Plan, Task
from ...program import Program
from ...result import TraceEvent
from ...stageplan import StagePlan, build_stage_plan
from ..actions import ActionCall, StepActions
from ..protocol import CallHeader, Rows
from . import actors
from .cluster import Cluster
from .compiled_pipeline import CompiledPipeline, PipelineSpec
from .options import INLINE_BYTES, RayOptions
from .replicas import Replicas, combine_losses, replica_events, replicate, split_rows
from .server import server_events
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
    #: Numbers the step attempts (a retried step id gets a new one: workers key mail by it).
    _attempts = itertools.count(1)
    _attempt = 0
    #: The latest step's call refs by worker, for naming the late ones.
    _calls: dict[int, list[Any]]
    compiled: CompiledPipeline

    def __init__(
        self,
        cluster: Cluster,
        waves: Waves,
        options: RayOptions,
        compile_program: Callable[[], Program],
        optimizer: Optimizer,
        store: ParameterStore,
        check_finite: bool,
    ):
        super().__init__(cluster, waves, options, compile_program, optimizer, store, check_finite)
        #: The compiled transport of the pipelined steps (see compiled_pipeline.py).
        self.compiled = CompiledPipeline(cluster, options)

    def _layout(self, batch: int) -> Replicas:
        # Micro-batches ask for a pipeline: under "auto" it spans every worker (the cost
        # model's replica choice does not weigh stages against replicas); R > 1 is R pipelines.
        if self.options.replicas == "auto":
            return Replicas(
                1,
                self.options.num_workers,
                None,
                "layout: 1 replica (replicas='auto' runs one pipeline over every worker under "
                "microbatches; pass replicas=R for R pipelines)",
            )
        return super()._layout(batch)

    def _place(self, layout: Replicas, batch: int) -> Plan:
        o = self.options
        m = o.microbatches or 1
        # A loss coupling rows cannot be split: refused (naming the node) before anything runs
        # (with replicas ``choose_replicas`` has refused it already).
        self.split = (layout.split or analyze_rows(self.prog, self.loss)) if m > 1 else None
        self.stage_plan = stage_plan(self.waves, self.prog, layout, batch)
        self._calls = {}
        return replicate(self.stage_plan, layout.count)

    def _check_transport(self, layout: Replicas) -> None:
        """Every synchronous pipelined layout compiles (replicas of pipelines, sharded
        servers): a compiled pipeline's server nodes go to the session's shards, given here."""
        self.compiled.sharded = self.server if isinstance(self.server, ShardedServer) else None

    def _step_compiled(self, step_id: int, arrays: Mapping[str, Any], trace: bool) -> float | None:
        """Run one pipelined step as a compiled graph (``compiled_pipeline.py``); None: it
        runs on calls (refused, a step of another shape than the graph's, or its messages
        outgrew the channels). Rows split over replicas and micro-batches as on calls."""
        plan, one, layout = self.plan, self.stage_plan, self.layout
        assert isinstance(plan, StagePlan) and one is not None and layout is not None
        self._settle()
        self._quiesce()
        feeds = self.compiled.feeds(arrays)
        rows: list[tuple[int, int]] = []
        parts: list[dict[str, Any]] = []
        if layout.split is not None:
            slices, parts = split_rows(feeds, layout.split.batch_inputs, layout.count)
            rows = [(sl.start, sl.stop) for sl in slices]
        mbs = [self._microbatches(f) for f in parts or [feeds]]
        control = (
            step_id,
            trace,
            self.check_finite,
            [f for f, _ in mbs],
            [tuple(r) for _, r in mbs],
            [b - a for a, b in rows],
        )
        spec = PipelineSpec(
            plan=plan,
            one=one,
            plan_id=self.plan_id,
            takers=tuple(self.takers),
            ends=self._ends,
            reduction=self.split.kind if self.split is not None else "mean",
            kind=layout.split.kind if layout.split is not None else None,
        )
        # The slot is held from the graph's lookup to the step's end (the idle reaper waits).
        with self.compiled.slot.running():
            graph = self.compiled.pipeline_for(
                spec, self.ps, tuple(len(f) for f, _ in mbs), control, self._initial.params
            )
            if graph is None:
                return None
            t_submit = time.time()
            try:
                driver, status = graph.execute(control, self.options.deadline)
            except BaseException as e:
                self._compiled_failed(graph, step_id, e)
                return None  # the step runs again on calls
        self._compiled_done(step_id)
        self._straggle(t_submit, rows)
        self._record_rows(step_id, graph.sent, rows)
        if trace:
            events = self._step_events(graph.sent, step_id, t_submit) + server_events(
                step_id, status, getattr(self.server, "keys", ())
            )
            if rows:
                events = replica_events(events, layout.width, rows, t_submit)
            self.last_trace = sorted(events, key=lambda e: e.start)
        if not rows:
            return float(next(d[self.loss] for d in driver if self.loss in d))
        losses = {
            w // layout.width: d[self.loss]
            for w, d in zip(graph.answering, driver)
            if self.loss in d
        }
        assert layout.split is not None
        return combine_losses(
            [losses[r] for r in range(len(rows))], [b - a for a, b in rows], layout.split.kind
        )

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
        """Submit one call per active worker holding its whole action list (stage 0 first);
        returns one task per (replica, stage) saying what its call sends the server(s) and
        the driver, and those refs (see module doc)."""
        plan, sp = self.plan, self.stage_plan
        assert isinstance(plan, StagePlan) and sp is not None
        workers = self.cluster.workers
        self._attempt = next(self._attempts)
        calls = step_calls(
            plan,
            sp,
            CallHeader(
                self.plan_id,
                step_id,
                -1,
                trace=trace,
                check_finite=self.check_finite,
                by_ref=self.options.data_path == "store",
            ),
            self._attempt,
            [self._microbatches(feeds) for feeds in list(parts) or [arrays]],
            self._ends,
            self.split.kind if self.split is not None else "mean",
            self.options.deadline,
            workers,
            updates,
        )
        # Submitted stage by stage (replicas side by side): stage 0 starts the step.
        refs: dict[tuple[int, int], list[Any]] = {}
        for key in sorted(calls, key=lambda k: (k[1], k[0])):
            w, step_call, args = calls[key]
            n_out = max(1, len(self._ends(key[1])))
            out = workers[w].run_actions.options(num_returns=n_out).remote(step_call, *args)
            refs[key] = list(out) if n_out > 1 else [out]
        active = {w for w, _, _ in calls.values()}
        for w, update in updates.items():
            if w not in active:  # no call this step: the new params still go now
                workers[w].set_resident.remote(self.plan_id, update)
        self._calls = {calls[k][0]: rs for k, rs in refs.items()}
        # In replica order, then stage order: the server takes each replica's dicts together.
        order = sorted(calls)
        sent = [
            Task(id=i, worker=calls[k][0], outputs=self._ends(k[1])) for i, k in enumerate(order)
        ]
        return dataclasses.replace(plan, tasks=sent), {i: refs[k] for i, k in enumerate(order)}

    def _ends(self, stage: int) -> list[tuple[int | str, list[str]]]:
        """What stage ``stage``'s last action sends: its gradients to the server (or each
        shard its own), then its outputs to the driver."""
        assert self.stage_plan is not None
        out = self._grad_dests(stage)
        if self.stage_plan.outputs_of[stage]:
            out.append((DRIVER, list(self.stage_plan.outputs_of[stage])))
        return out

    def _finish_step(
        self, sent: Plan, step_id: int, refs: dict[int, list[Any]], extra: list[Any]
    ) -> list[dict[str, Any]]:
        """Wait for every worker's call (and ``extra``) within the deadline, failing at the
        first error: a worker waiting for a lost peer's values would otherwise hold the step
        until the deadline (``_abandon`` then cancels the waits)."""
        driver = [
            refs[t.id][t.slot(DRIVER)] for t in sent.tasks if any(d == DRIVER for d, _ in t.outputs)
        ]
        every = [r for rs in self._calls.values() for r in rs] + list(extra)
        end = time.monotonic() + self.options.deadline
        left = list(every)
        while left:
            ready, left = _wait_some(left, end)
            if not ready:
                raise self._timeout(step_id, left)
            self.waves.get(ready, "running the step")  # raises the first failure
        return self.waves.get(driver, "running the step")

    def _abandon(
        self,
        step_id: int,
        committing: bool,
        pending: Any,
        error: BaseException | None = None,
    ) -> None:
        """Release every worker still waiting for this attempt's values, then abandon the
        step as the session does."""
        for w in self.cluster.workers:
            with contextlib.suppress(Exception):
                w.cancel_actions.remote(self.plan_id, self._attempt)
        super()._abandon(step_id, committing, pending, error)

    def _step_events(self, sent: Plan, step_id: int, t_submit: float) -> list[TraceEvent]:
        events = [
            TraceEvent(f"step {step_id}", "call", "step", -1, "driver", t_submit, time.time())
        ]
        for w in sorted({t.worker for t in sent.tasks}):
            events.extend(
                actors.fetch(self.cluster.workers[w].take_trace.remote(self.plan_id, step_id))
            )
        return events

    def _timeout(self, step_id: int, late: Sequence[Any]) -> WaveTimeoutError:
        """Name the workers (stage and replica) whose calls had not ended at the deadline."""
        assert self.stage_plan is not None and self.layout is not None
        waiting = set(late)
        width = self.layout.width
        names = [
            f"stage {self.stage_plan.stages.index(w % width)}"
            f"{f' of replica {w // width}' if self.layout.count > 1 else ''} on worker {w}"
            for w, rs in sorted(self._calls.items())
            if any(r in waiting for r in rs)
        ]
        return WaveTimeoutError(
            f"pipelined step {step_id} passed its deadline of {self.options.deadline:g} s; "
            f"still running: {', '.join(names) or 'none (waiting for the parameter server)'}"
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


def step_calls(
    plan: StagePlan,
    one: StagePlan,
    base: CallHeader,
    attempt: int,
    replicas: Sequence[tuple[Sequence[Mapping[str, Any]], Sequence[int]]],
    ends: Callable[[int], list[tuple[int | str, list[str]]]],
    reduction: str,
    deadline: float,
    workers: Sequence[Any],
    updates: Mapping[int, Any],
) -> dict[tuple[int, int], tuple[int, StepActions, list[Any]]]:
    """Every worker's call of one pipelined step, as data: (replica, stage) -> (worker, its
    :class:`StepActions`, the call's values after it).

    ``plan``: the replicated plan (``one``: one replica's); ``base``: the step's header
    fields (plan, step, flags); ``replicas``: per active replica, its micro-batches' feeds and
    rows; ``ends(stage)``: what the stage's last action sends the server(s) and the driver;
    ``workers``: the handles values are delivered to; ``updates``: worker -> new params, taken
    by its first action. Large feeds are put in the object store here (one put each)."""
    calls: dict[tuple[int, int], tuple[int, StepActions, list[Any]]] = {}
    for r, (mb_feeds, rows) in enumerate(replicas):
        for s in range(one.num_stages):
            w = plan.tasks[r * len(one.tasks) + 2 * s].worker
            update = updates.get(w)
            pairs: list[tuple[ActionCall, CallHeader]] = []
            args: list[Any] = []
            peers: dict[int, Any] = {}
            for call, task in stage_actions(plan, one, r, s, len(mb_feeds), ends, reduction, rows):
                peers.update({d: workers[d] for d, _ in call.outputs if isinstance(d, int)})
                small, big_names, big = _feeds(mb_feeds[call.microbatch], task.feeds)
                first = update is not None and call.position == 0
                header = dataclasses.replace(
                    base,
                    task_id=task.id,
                    update=first,
                    inline=small,
                    big=big_names,
                    imports=len(task.imports),
                )
                pairs.append((call, header))
                args.extend(([update] if first else []) + big)
            actions = StepActions(base.plan_id, base.step, attempt, tuple(pairs), peers, deadline)
            calls[(r, s)] = (w, actions, args)
    return calls


def stage_actions(
    plan: StagePlan,
    one: StagePlan,
    replica: int,
    stage: int,
    microbatches: int,
    ends: Callable[[int], list[tuple[int | str, list[str]]]],
    reduction: str,
    rows: Sequence[int] = (),
) -> list[tuple[ActionCall, Task]]:
    """Replica ``replica``'s stage ``stage`` in a step of ``microbatches`` micro-batches: its
    worker's actions in schedule order, each with the task of ``plan`` (the replicated plan;
    ``one``: one replica's) it runs. ``rows``: each micro-batch's rows (a compiled pipeline
    fills them in per step)."""
    count = len(one.tasks)  # tasks per replica
    acts = one.schedule(microbatches)[stage]
    record = one.grads_of[stage] + one.outputs_of[stage]
    out = []
    for pos, act in enumerate(acts):
        task = plan.tasks[replica * count + one.task_of(act).id]
        outputs = list(task.outputs) + (ends(stage) if pos == len(acts) - 1 else [])
        in_task = set(task.nodes)
        call = ActionCall(
            label=act.label,
            microbatch=act.microbatch,
            stage=stage,
            position=pos,
            count=len(acts),
            release=act.kind == "B",
            record=tuple(n for n in record if n in in_task),
            outputs=tuple((d, tuple(ns)) for d, ns in outputs),
            rows=tuple(rows),
            reduction=reduction,
            sources=tuple(plan.tasks[src].worker for src, _, _ in task.imports),
        )
        out.append((call, task))
    return out


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


def _wait_some(refs: list[Any], end: float) -> tuple[list[Any], list[Any]]:
    """The refs of ``refs`` that are ready (at least one, unless ``end`` passes first), and
    the rest."""
    ready, rest = ray.wait(
        refs, num_returns=1, timeout=max(0.0, end - time.monotonic()), fetch_local=False
    )
    if ready and rest:  # take every other one that is ready too, without waiting
        more, rest = ray.wait(rest, num_returns=len(rest), timeout=0, fetch_local=False)
        ready += more
    return ready, rest
