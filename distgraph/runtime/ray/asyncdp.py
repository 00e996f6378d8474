"""Asynchronous data-parallel training with bounded staleness (``consistency="async"``).

State: none of its own between calls; :func:`run_async` drives one batch of steps on a
:class:`~distgraph.runtime.ray.session.RaySession` whose plan holds ``R >= 2`` replicas, and
keeps the session's :class:`~distgraph.dataparallel.StalenessClock` (``session.clock``).

Order (bounded delay, Li et al., OSDI 2014). Steps are handed out in step-id order, each to
the first replica that is idle; a replica runs a whole step (the step's full mini-batch, not
a row shard), so each (replica, step) is one mini-batch gradient:

1. replica ``r`` may start step ``t`` only when ``clock.may_start(t, tau)``: every shard has
   applied every step ``<= t - tau - 1``;
2. it pulls the server's current params (``params_of`` for each of its workers, sent with its
   first call of the step as the update; actor calls run in order, so the params include
   every commit sent before) and records ``(r, t, version)`` once;
3. when all of its tasks' outputs exist, the driver submits ``stage(t, its gradients)`` and
   ``commit(t)`` back to back (no cross-replica combine, nothing can come between them on the
   server) and waits for the commit; then ``clock.mark_applied(shard, t)`` for every shard.

``tau = 0`` gives synchronous order: step t starts only after step t - 1 is applied.

A failure (an error on a worker, the deadline, an interrupt) stops the run: steps still
running are dropped and never applied, steps already committed stay applied (each once; the
server ignores a repeated step id), and every worker that keeps params is sent the server's
current ones before the next step. A lost worker is recovered like a synchronous step's: the
worker is replaced and the step runs again on its replica (same step id, same batch, the
record of ``(r, t)`` kept).

Test hook ``RayOptions.slow_replicas`` (``RayExecutor(_slow_replicas={r: f})``): replica
``r``'s result is released to the server only ``f`` times its measured step time after the
step started (the replica stays busy meanwhile), a straggler without touching the workers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import ray

from ...dataparallel import StalenessClock
from ...errors import WaveTimeoutError, WorkerLostError
from ...plan import DRIVER, Plan
from ...result import TraceEvent
from . import actors
from .server import server_events

if TYPE_CHECKING:
    from .session import RaySession

#: How long one wait for a replica's outputs lasts before the loop looks again (seconds).
_POLL = 0.5


@dataclasses.dataclass
class _Running:
    """One (replica, step) in flight."""

    replica: int
    step: int
    plan: Plan
    refs: dict[int, list[Any]]
    started: float
    #: When its outputs were all ready (None: still computing).
    done_at: float | None = None
    #: Whether its workers record trace events.
    trace: bool = False


def replica_plan(plan: Plan, width: int, replica: int) -> Plan:
    """The tasks of replica ``replica`` only (same ids: every replica stays installed)."""
    return dataclasses.replace(plan, tasks=[t for t in plan.tasks if t.worker // width == replica])


def run_async(
    session: RaySession,
    steps: Sequence[tuple[int, Mapping[str, Any]]],
    on_applied: Callable[[int, float], None] | None = None,
    trace: bool = False,
) -> dict[int, float]:
    """Run ``steps`` ((step id, feeds) in step-id order) asynchronously; returns each applied
    step's loss by step id. Steps already applied by the session are skipped.

    With ``trace``, ``session.last_trace`` becomes the whole run's events: each applied
    (replica, step)'s worker events tagged with its replica, one ``"replica r"`` span per step
    from its start to its last event, and the server's apply (or each shard's stage / commit /
    apply) of it. Steps overlap in time, which is what an async run's timeline should show."""
    o = session.options
    tau = o.staleness
    layout = session.layout
    assert layout is not None and session.plan is not None  # placed by the session's first step
    width, count = layout.width, layout.count
    todo = [(s, f) for s, f in steps if not session.counted(s)]
    losses: dict[int, float] = {}
    events: list[TraceEvent] = []
    if trace:
        session.last_trace = []
    if not todo:
        return losses
    shards = o.ps_shards
    clock = session.clock
    if clock is None or clock.version < todo[0][0] - 1:
        # The first clock, or steps before these were applied outside it (synchronous steps,
        # a resume, an earlier failed run): every step before the first to run counts.
        clock = session.clock = StalenessClock(shards, todo[0][0])
    for s, _ in steps:  # applied by an earlier, failed run: they count as applied
        if session.counted(s) and s >= clock.first_step and not clock.has_applied(0, s):
            for shard in range(shards):
                clock.mark_applied(shard, s)
    feeds = dict(todo)
    order = [s for s, _ in todo]
    slow = dict(o.slow_replicas or {})
    running: dict[int, _Running] = {}  # replica -> its step in flight
    attempts: dict[int, int] = {}
    next_i = 0
    session.settle_and_drain()
    try:
        while next_i < len(order) or running:
            # 1. Hand out steps in order to idle replicas while the staleness bound allows.
            for r in range(count):
                if r in running or next_i >= len(order):
                    continue
                t = order[next_i]
                if not clock.may_start(t, tau):
                    break  # later steps are even further ahead: wait for an update
                running[r] = _start(session, clock, r, t, feeds[t], width, trace)
                next_i += 1
            if not running:
                # Nothing in flight means every step handed out is applied, so the next one
                # may start; getting here would be a bookkeeping error, not a wait.
                raise AssertionError(
                    f"async driver stalled before step {order[next_i]} at version "
                    f"{clock.version} (staleness {tau})"
                )
            # 2. Wait for some replica's outputs (or a straggler's release time).
            finished = _wait(session, running, slow)
            for run in finished:
                del running[run.replica]
                try:
                    loss = _apply(session, run, events)
                except WorkerLostError:
                    tries = attempts.get(run.step, 0)
                    if tries >= o.max_recoveries:
                        raise
                    attempts[run.step] = tries + 1
                    _recover(session, running, run.step)
                    # The same step on the same replica again; its record stays.
                    running[run.replica] = _start(
                        session, clock, run.replica, run.step, feeds[run.step], width, trace
                    )
                    continue
                for s in range(shards):
                    clock.mark_applied(s, run.step)
                session.count(run.step)
                losses[run.step] = loss
                if on_applied is not None:
                    on_applied(run.step, loss)
    except BaseException:
        _drop(session, running)
        raise
    finally:
        # Every param-holding worker takes the server's current params with its next call.
        session.resend_params()
        if trace:  # also after an error: the steps applied before it
            session.last_trace = sorted(events, key=lambda e: e.start)
    return losses


def _start(
    session: RaySession,
    clock: StalenessClock,
    replica: int,
    step: int,
    feeds: Mapping[str, Any],
    width: int,
    trace: bool = False,
) -> _Running:
    """Pull the current params for ``replica``'s workers and submit its tasks of ``step``."""
    assert session.plan is not None
    plan = replica_plan(session.plan, width, replica)
    mine = {t.worker for t in plan.tasks}
    updates = {w: session.server.params_of(w) for w in session.takers if w in mine}
    if not any(c.replica == replica and c.step == step for c in clock.records):
        clock.record(replica, step, clock.version)
    refs = session.waves.submit(
        plan,
        session.plan_id,
        step,
        feeds,
        updates,
        trace,
        session.check_finite,
        training=True,
    )
    return _Running(replica, step, plan, refs, time.time(), trace=trace)


def _wait(
    session: RaySession, running: Mapping[int, _Running], slow: Mapping[int, float]
) -> list[_Running]:
    """The steps whose outputs all exist and whose straggler delay (if any) has passed."""
    deadline = session.options.deadline
    while True:
        now = time.time()
        for run in running.values():
            if run.done_at is None:
                every = [x for refs in run.refs.values() for x in refs]
                ready, _ = ray.wait(every, num_returns=len(every), timeout=0, fetch_local=False)
                if len(ready) == len(every):
                    run.done_at = now
            if run.done_at is None and now - run.started > deadline:
                raise WaveTimeoutError(
                    f"step {run.step} on replica {run.replica} passed its deadline of "
                    f"{deadline:g} s"
                )
        out = [
            r
            for r in running.values()
            if r.done_at is not None and now >= _release(r, slow.get(r.replica, 1.0))
        ]
        if out:
            return out
        # Sleep until the next release, or until some output arrives (bounded poll).
        releases = [
            _release(r, slow.get(r.replica, 1.0)) - now
            for r in running.values()
            if r.done_at is not None
        ]
        computing = [
            x for r in running.values() if r.done_at is None for v in r.refs.values() for x in v
        ]
        wait_for = min([_POLL, *releases])
        if computing:
            ray.wait(computing, num_returns=1, timeout=max(0.0, wait_for), fetch_local=False)
        else:
            time.sleep(max(0.0, wait_for))


def _release(run: _Running, factor: float) -> float:
    """When a step's result reaches the server: its end, or with the straggler hook
    ``factor`` times its measured step time after its start."""
    assert run.done_at is not None
    return run.started + factor * (run.done_at - run.started)


def _apply(session: RaySession, run: _Running, events: list[TraceEvent]) -> float:
    """Stage and commit the step's gradients on the server; returns its loss. A traced
    step's events (its workers', its replica span, the server's) are added to ``events``."""
    answering = [t for t in run.plan.tasks if any(d == DRIVER for d, _ in t.outputs)]
    driver = [run.refs[t.id][t.slot(DRIVER)] for t in answering]
    values = session.waves.get(driver, f"running step {run.step}")
    staged, _ = session.server.stage(run.step, run.plan, run.refs, [], None, 1)
    status = session.server.commit(run.step)
    answer = session.waves.get([*staged, status], f"applying step {run.step}")[-1]
    loss = next(v[session.loss] for v in values if session.loss in v)
    if run.trace:
        events.extend(_step_events(session, run, answer))
    return float(loss)


def _step_events(session: RaySession, run: _Running, status: Mapping[str, Any]) -> list[TraceEvent]:
    """One applied (replica, step)'s trace: its workers' events tagged with the replica, a
    ``"replica r"`` span named after the step, and the server's events of the step."""
    plan_id = session.plan_id
    out: list[TraceEvent] = []
    for w in sorted({t.worker for t in run.plan.tasks}):
        taken = actors.fetch(session.cluster.workers[w].take_trace.remote(plan_id, run.step))
        out.extend(dataclasses.replace(e, args={**e.args, "replica": run.replica}) for e in taken)
    last = max((e.end for e in out), default=run.done_at or run.started)
    out.append(
        TraceEvent(
            f"replica {run.replica}: step {run.step}",
            "call",
            "replica",
            -1,
            f"replica {run.replica}",
            run.started,
            last,
            args={"replica": run.replica, "step": run.step},
        )
    )
    out.extend(server_events(run.step, status, getattr(session.server, "keys", ())))
    return out


def _drop(session: RaySession, running: Mapping[int, _Running]) -> None:
    """Forget the values of steps still in flight (never applied)."""
    for run in running.values():
        for w in session.cluster.workers:
            with contextlib.suppress(Exception):
                w.drop_step.remote(session.plan_id, run.step)
        if session.ps is not None:
            with contextlib.suppress(Exception):
                session.server.abort(run.step)


def _recover(session: RaySession, running: Mapping[int, _Running], failed: int) -> None:
    """Replace lost workers and reinstall the plan on them; steps of other replicas still
    in flight whose workers died fail on their own and are retried the same way."""
    with contextlib.suppress(Exception):
        session.server.abort(failed)
    session.recover(failed)
