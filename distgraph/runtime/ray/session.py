"""A training session on Ray: the cluster's workers compute gradients, a parameter-server
actor applies them.

State:
- ``cluster``, ``waves``, ``options``: shared with the executor (given, not the executor);
- ``plan`` / ``plan_id``: the training plan, placed and installed at the first step;
- ``server``: the parameter-server link (actor handle, the commit not yet awaited, a step
  whose failure came while its commit was being sent); with ``ps_shards`` > 1 a
  ``ShardedServer`` (shards.py) with the same interface, fanning every call out to the shards;
- ``replicas`` (worker -> {param: gradient}: workers that update a local replica) and
  ``takers`` (workers that take new params from the server after each step);
- ``_updates``: per-worker param updates to hand to each worker's first call of the next step;
- ``_done``: the step ids that count (applied, or to be applied by a replay);
- ``layout`` (data-parallel replicas x workers each, chosen with the plan; see
  ``replicas.py``) and ``replica_steps`` (per step id: each replica's rows, workers, nodes);
- ``compiled`` (the compiled transport), ``choice`` (transport="auto"'s measurements) and
  ``_sent`` (calls sent without waiting since the latest step; see ``compiled_steps.py``).

With ``R > 1`` replicas the plan holds R copies of one replica's plan; a step splits its rows
over them, feeds each replica its rows, and stages all their gradients in one
``ps.stage(step, ..., replicas=, kind=)`` that combines them in replica order: the step
protocol below is the same, one stage / commit / abort per step id. No worker keeps a local
replica of its params then (it sees its shard's gradients only): every param-holding worker
takes the new params from the server, and steps are not pipelined. The session's
data-parallel part (the rows' split, the stage's arguments, the combined loss, the record of
each replica's rows) is ``ReplicaSteps`` (``replicas.py``).

Order of a step (``_step_once``):
1. submit every task (``waves.submit``) and ``ps.stage(step, *gradient refs)``: the server
   computes the update and holds it. A worker that computes every gradient of its own params
   applies the same update to a local replica, so no params travel back;
2. wait once for the step's end, bounded by the deadline (the driver's outputs, the previous
   step's commit, and, unless the outputs prove every gradient exists, the staged update);
3. the step succeeded: submit ``ps.commit(step)`` and count the step. Its per-worker results
   are passed to each worker's first call of the next step; the commit itself is awaited by
   the next step (or any read of the server). A step that fails before this point (error,
   deadline, interrupt) is aborted instead (``ps.abort``) and is never applied; workers are
   reset to the server's state. A commit that finds nothing staged fails as a lost worker:
   the session recovers and replays the step.

The plan and the step's calls come from hooks (``_place``; ``_submit_step``, ``_finish_step``,
``_step_events``): ``pipelined.py`` places replicas of a chain of stages and runs each
worker's micro-batch actions in one call, keeping every other part of this protocol (rows
over replicas, stage / commit / abort, recovery).

Compiled transport (``transport`` "compiled" or "auto", from the second step in a row): the
same protocol inside one Ray Compiled Graph, the server's stage and commit one node that runs
only once every task succeeded; a failed execution is aborted and recovered as below. Those
steps, and under "auto" the measured choice between them and these calls, are
``CompiledSteps`` (``compiled_steps.py``).

Recovery: a step that loses a worker is run again (same step id, same feeds) after the lost
worker is replaced and the plan reinstalled on it with the server's current params. A lost
server is restarted from its latest checkpoint (or the initial state) and the steps it had
applied since are replayed through ``replay`` (the Trainer's deterministic batch order)
before the failed step runs again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ...checkpoint import Checkpoint, save_checkpoint
from ...dataparallel import StalenessClock
from ...errors import ConfigError, WorkerLostError
from ...interpret import prepare_feeds
from ...optim import Optimizer
from ...paramstore import ParameterStore
from ...plan import Plan
from ...program import Program
from ...result import TraceEvent
from ..base import TrainingSession
from .cluster import Cluster
from .compiled_steps import CompiledSteps
from .compiled_training import CompiledTraining
from .options import RayOptions
from .replicas import (
    REPLICA_HISTORY,
    Replicas,
    ReplicaSteps,
    active_view,
    check_replicas,
    choose_replicas,
    replica_events,
    replicate,
)
from .server import ServerLink, server_events
from .shards import ShardedServer
from .training import Attached, attach_arrays, replica_layout, server_routes, takers
from .transport_choice import TransportChoice
from .waves import RowsFeed, Waves, batch_size

log = logging.getLogger(__name__)


class RaySession(CompiledSteps, ReplicaSteps, TrainingSession):
    """Training steps on a cluster's workers with a parameter-server actor.

    A step counts (``_done``) from the moment the driver sends its commit, and a counted step
    is applied exactly once (by the commit, or by a replay if the commit finds nothing
    staged). If an interrupt lands while the commit is being sent, the server's answer
    decides (``_settle``, ``step_applied``).
    """

    #: Whether a worker that computes every gradient of its params may keep a local replica of
    #: them (``worker_updates``); a subclass whose steps do not end in one task per worker
    #: (``pipelined.py``) turns it off.
    local_updates = True

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
        self.cluster, self.waves, self.options = cluster, waves, options
        self.check_finite = check_finite
        self._compile = compile_program
        self._prog: Program | None = None
        self.optimizer = optimizer
        self.plan: Plan | None = None
        self.plan_id = 0
        self._initial = store.to_checkpoint()
        self.server: ServerLink | ShardedServer
        if options.ps_shards > 1:  # the params over several server actors (see shards.py)
            self.server = ShardedServer(
                waves, options, optimizer, {}, self._recover, options.ps_shards
            )
        else:
            self.server = ServerLink(waves, options, optimizer, {}, self._recover)
        self._updates: dict[int, Any] = {}
        self._done: list[int] = list(self._initial.applied_steps)
        #: step id -> feeds; set by the Trainer so a restarted parameter server can catch up.
        self.replay: Callable[[int], Mapping[str, Any]] | None = None
        self.recoveries: list[str] = []
        self.last_trace: list[TraceEvent] = []
        #: worker -> {param: gradient node}: workers that apply each update to a local replica.
        self.replicas: dict[int, dict[str, str]] = {}
        self.takers: list[int] = []
        #: Whether a step may return before the server has applied it (see ``_step_once``).
        self.pipelined = False
        self._unrecovered = False  # a step gave up on a lost worker: recover before the next
        #: The data-parallel layout, chosen when the first step places the program.
        self.layout: Replicas | None = None
        #: step id -> per replica: its rows, workers and nodes (the latest steps).
        self.replica_steps: dict[int, list[dict[str, Any]]] = {}
        #: consistency="async": which (replica, step) ran on which version (see asyncdp.py).
        self.clock: StalenessClock | None = None
        #: The compiled transport of this session's steps (see compiled_training.py).
        self.compiled = CompiledTraining(cluster, options)
        #: transport="auto": the measured choice between calls and compiled steps.
        self.choice = TransportChoice("a training session")
        #: Refs of calls sent without waiting since the latest step (drops, replica resets):
        #: a compiled step waits for them first, since its calls do not queue behind them.
        self._sent: list[Any] = []

    @property
    def prog(self) -> Program:
        """The training program, compiled on first use: opening a session never fails on the
        graph (a loss that is not a scalar is refused by the first step)."""
        if self._prog is None:
            self._prog = self._compile()
            self.server.grads = dict(self._prog.grads)
        return self._prog

    @property
    def loss(self) -> str:
        """The loss node's name in the program."""
        return self.prog.outputs[0]

    @property
    def ps(self) -> Any:
        """The parameter-server actor (None before the first step and after close)."""
        return self.server.handle

    def _ensure(self, batch: int) -> None:
        if self.plan is not None:
            return
        o = self.options
        check_replicas(o.replicas, o.num_workers)  # the option may have been set since
        layout = self._layout(batch)
        log.info("%s", layout.explanation)
        self.plan = dataclasses.replace(self._place(layout, batch), layout=layout.explanation)
        self.layout = layout
        self.plan_id = self.waves.new_plan_id()
        self._check_transport(layout)
        self.cluster.check_fits(self.plan, self._initial.params)
        if isinstance(self.server, ShardedServer):
            # Each worker sends each shard only the gradients of that shard's params.
            self.server.assign(self._initial.params)
            self.plan = self.server.route_plan(self.plan)
        # Clipping needs every gradient's share of the global norm: only the server has them.
        # Sharded servers hold the optimizer state in parts, and a data-parallel replica's
        # worker sees its shard's gradients only: workers take their params back.
        elif (
            o.worker_updates
            and self.local_updates
            and self.optimizer.clip_norm is None
            and layout.count == 1
        ):
            self.replicas, self.pipelined = replica_layout(self.plan)
        else:
            self.replicas, self.pipelined = {}, False
        self.takers = takers(self.plan, self.replicas, o.num_workers)
        try:
            self.server.start(self._initial, self._routes())
        except BaseException:
            self.plan = None  # nothing was started: the next step tries again
            raise
        try:
            self.waves.install(
                self.plan,
                self.plan_id,
                self._initial.params,
                replicas=self._replicas(self._initial),
            )
        except WorkerLostError:
            raise  # the step's recovery replaces the worker and installs the plan on it
        except BaseException:
            self.waves.uninstall(self.plan_id)
            self.server.kill()
            self.plan = None  # nothing half-installed stays: the next step retries
            raise

    def _layout(self, batch: int) -> Replicas:
        """How many replicas train, over how many workers each (``replicas``, or the cost
        model's choice under ``"auto"``)."""
        o = self.options
        return choose_replicas(self.prog, o.num_workers, o.replicas, o.strategy, o.cost, batch)

    def _place(self, layout: Replicas, batch: int) -> Plan:
        """The training plan of ``layout``: one replica placed over ``layout.width`` workers
        (sized for the largest row shard of ``batch``), copied ``layout.count`` times."""
        shard = -(-batch // layout.count)  # the largest shard's rows
        base = self.waves.make_plan(self.prog, True, batch=shard, num_workers=layout.width)
        return replicate(base, layout.count)

    def _routes(self) -> dict[int, list[str]]:
        assert self.plan is not None
        return server_routes(self.plan, self.replicas, self.options.num_workers)

    def _replicas(self, ckpt: Any, only: Sequence[int] | None = None) -> dict[int, Any]:
        """Install arguments for the replica workers: (server state or its ref, grad names)."""
        return {w: (ckpt, g) for w, g in self.replicas.items() if only is None or w in only}

    def _reset_replicas(self) -> None:
        """Make every replica equal the server again, after whatever the server did last.

        The checkpoint is passed as a ref: the server answers after any update still queued
        (actor calls run in order), and each worker resets after its queued calls, so a step
        that was still running when the driver gave up cannot leave a replica ahead."""
        if not self.replicas or self.ps is None:
            return
        state = self.server.checkpoint_ref()
        for w in self.replicas:
            self._sent.append(self.cluster.workers[w].set_replica.remote(self.plan_id, state))

    def set_progress(self, progress: Mapping[str, Any]) -> None:
        """The Trainer's progress (epoch, fit segments, history) for the server's checkpoints;
        sent without waiting (the server takes it in order with the updates)."""
        self.server.set_progress(progress)

    # Steps --------------------------------------------------------------------------------------
    def step(self, step_id: int, feeds: Mapping[str, Any], trace: bool = False) -> float:
        arrays = prepare_feeds(self.prog, feeds, self.check_finite)
        self.cluster.check_feeds_fit(arrays)
        return self._run_step(step_id, arrays, trace, batch_size(self.prog, arrays))

    def attach(self, data: Mapping[str, Any]) -> Any:
        """Check the training arrays once and put the large ones in the object store, so a
        step sends only its row indices (the workers take the rows themselves)."""
        attached = attach_arrays(self.cluster, self.prog, data, self.check_finite)
        return super().attach(data) if attached is None else attached

    def step_rows(self, step_id: int, data: Any, rows: Any, trace: bool = False) -> float:
        if not isinstance(data, Attached):
            return super().step_rows(step_id, data, rows, trace)
        feeds, batch = self._rows_feeds(data, rows)
        return self._run_step(step_id, feeds, trace, batch)

    @property
    def consistency(self) -> str:
        """``"sync"`` or ``"async"`` (the executor's setting; the Trainer reads it)."""
        return self.options.consistency

    def _rows_feeds(self, data: Any, rows: Any) -> tuple[dict[str, Any], int]:
        """A step's feeds from training ``data`` (``attach``'s result or arrays) and its rows."""
        index = np.asarray(rows)
        if isinstance(data, Attached):
            feeds: dict[str, Any] = {
                k: RowsFeed(data.shipped[k], index) if k in data.shipped else v[index]
                for k, v in data.arrays.items()
            }
            return feeds, len(index)
        arrays = prepare_feeds(self.prog, {k: v[index] for k, v in data.items()}, self.check_finite)
        return arrays, batch_size(self.prog, arrays)

    def run_async(
        self,
        steps: Sequence[tuple[int, Any]],
        data: Any,
        on_applied: Callable[[int, float], None] | None = None,
        trace: bool = False,
    ) -> dict[int, float]:
        """Run ``steps`` ((step id, rows of ``data``), in step-id order) asynchronously with
        bounded staleness (``consistency="async"``, see ``asyncdp.py``): each step is one
        replica's whole mini-batch, applied as it arrives, exactly once. Returns the applied
        steps' losses by step id; ``on_applied(step, loss)`` is called as each is applied.
        With ``trace``, ``last_trace`` holds the events of every step the run applied."""
        from .asyncdp import run_async

        self.cluster.check_open()
        if not steps:
            return {}
        fed = [(s, self._rows_feeds(data, rows)) for s, rows in steps]
        for attempt in range(self.options.max_recoveries + 1):
            try:
                self._ensure(fed[0][1][1])
                break
            except WorkerLostError:
                if attempt == self.options.max_recoveries:
                    raise
                if self.plan is None:
                    self.waves.recover()
                else:
                    self._recover(None)
        assert self.layout is not None
        if self.layout.count < 2:
            raise ConfigError(
                f"consistency='async' needs replicas >= 2, but this session runs "
                f"{self.layout.count} replica; set replicas=R (R >= 2 dividing num_workers)"
            )
        return run_async(self, [(s, f) for s, (f, _n) in fed], on_applied, trace)

    # Hooks of the asynchronous driver (asyncdp.py) --------------------------------------------
    def counted(self, step_id: int) -> bool:
        """Whether step ``step_id`` counts as applied (see ``_done``)."""
        return step_id in self._done

    def count(self, step_id: int) -> None:
        """Count step ``step_id`` as applied (its commit succeeded)."""
        if step_id not in self._done:
            self._done.append(step_id)

    def settle_and_drain(self) -> None:
        """Decide any unsettled step and wait for the latest commit."""
        self._settle()
        self.server.drain()

    def resend_params(self) -> None:
        """Every worker that takes params from the server gets its current ones with its
        next call (after steps that each pulled their own)."""
        if self.ps is not None:
            self._updates = {w: self.server.params_of(w) for w in self.takers}

    def recover(self, failed_step: int | None) -> None:
        """Replace lost workers (or a lost server) as a failed step's recovery does."""
        self._recover(failed_step)

    def _run_step(self, step_id: int, arrays: Mapping[str, Any], trace: bool, batch: int) -> float:
        self.cluster.check_open()
        if self._unrecovered and self.plan is not None:
            # An earlier step gave up on a lost worker or server (or its recovery failed):
            # recover first, so the workers are whole again and the steps counted that the
            # server never applied are replayed before this one runs.
            self._recover(None)
            self._unrecovered = False
        try:
            for attempt in range(self.options.max_recoveries + 1):
                try:
                    # Inside the recovery loop: a worker that died while idle fails the
                    # install, and is replaced like one lost during a step.
                    self._ensure(batch)
                    return self._timed_step(step_id, arrays, trace)
                except WorkerLostError as e:
                    if attempt == self.options.max_recoveries:
                        raise
                    log.warning("step %d lost a worker (%s); recovering", step_id, e)
                    self._unrecovered = True  # until the recovery below is complete
                    if self.plan is None:  # lost before the plan was placed: workers only
                        self.waves.recover()
                    else:
                        self._recover(step_id)
                    self._unrecovered = False
        except WorkerLostError:
            self._unrecovered = True
            raise
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _step_once(
        self, step_id: int, arrays: Mapping[str, np.ndarray], trace: bool = False
    ) -> float:
        """Run one step and commit it on the server, or leave it never applied (see below)."""
        plan, waves = self.plan, self.waves
        assert plan is not None
        loss = self._maybe_compiled(step_id, arrays, trace)
        if loss is not None:  # it ran compiled (compiled_steps.py)
            return loss
        self._sent.clear()  # calls run in submission order: after those sent before
        self.server.take_sent()  # likewise
        self._settle()  # a step an earlier failure left undecided is decided first
        t_submit = time.time()
        updates, self._updates = self._updates, {}
        # Pipelined (every worker updates its own replica, and every task that sends gradients
        # also answers the driver): once the driver's outputs are in, every gradient exists, so
        # the driver commits without waiting for the server to hold the update; the server's
        # work finishes during the next step, which waits for it (as does any read).
        # Otherwise the driver also waits for the staged update: a task that only sends
        # gradients may have failed, and that step must not count.
        defer = self.pipelined and not trace
        pending, self.server.pending = self.server.pending, None
        committing = False
        layout = self.layout
        assert layout is not None  # chosen with the plan
        width = layout.width
        rows, parts = self._split_rows(arrays)  # each active replica's rows and feeds
        try:
            # The calls of the step: ``sent`` lists, per call, what it sends the server and
            # the driver (its ``outputs``), ``refs`` their refs by the call's task id.
            sent, refs = self._submit_step(step_id, arrays, parts, updates, trace)
            split = self._stage_split(sent, rows)  # the data-parallel stage's arguments
            staged, routed = self.server.stage(step_id, sent, refs, self.takers, split, width)
            extra = [pending] if pending is not None else []
            if not defer:
                extra.extend(staged)
            driver = self._finish_step(sent, step_id, refs, extra)
            self._straggle(t_submit, rows)
            # The step succeeded: from the commit on it counts, and it is applied (now, or by
            # a replay should its gradients never reach the server).
            committing = True
            status_ref = self._commit(step_id)
            if step_id not in self._done:
                self._done.append(step_id)
            # The server's answer to the commit, read only for a trace.
            status: dict[str, Any] = (
                waves.get([status_ref], "applying the update")[0] if trace else {}
            )
        except BaseException as e:
            self._abandon(step_id, committing, pending, e)
            raise
        self.server.pending = None if trace else status_ref
        self._updates = routed
        self._record_rows(step_id, sent, rows)
        if trace:
            # With shards: each shard's stage / commit / apply on its own track.
            events = self._step_events(sent, step_id, t_submit) + server_events(
                step_id, status, getattr(self.server, "keys", ())
            )
            if rows:
                events = replica_events(events, width, rows, t_submit)
            self.last_trace = sorted(events, key=lambda e: e.start)
        return self._step_loss(sent, driver, rows)

    # The calls of a step (hooks: ``pipelined.py`` runs a step as schedule actions) -----------
    def _submit_step(
        self,
        step_id: int,
        arrays: Mapping[str, Any],
        parts: Sequence[Mapping[str, Any]],
        updates: Mapping[int, Any],
        trace: bool,
    ) -> tuple[Plan, dict[int, list[Any]]]:
        """Submit every call of the step; returns a plan whose tasks are the step's calls that
        ran (their ``outputs`` naming what each sends the server and the driver) and each
        call's output refs by task id. ``parts``: each active replica's feeds (none: one
        replica takes ``arrays``)."""
        plan = self.plan
        assert plan is not None and self.layout is not None
        width = self.layout.width
        if parts:  # a batch with fewer rows than replicas leaves the last ones out
            plan = active_view(plan, width, len(parts))
        refs = self.waves.submit(
            plan,
            self.plan_id,
            step_id,
            arrays,
            updates,
            trace,
            self.check_finite,
            training=True,
            replica_feeds=parts,
            width=width,
        )
        return plan, refs

    def _finish_step(
        self, sent: Plan, step_id: int, refs: dict[int, list[Any]], extra: list[Any]
    ) -> list[dict[str, Any]]:
        """Wait for the step's end (and ``extra``) within the deadline; returns the driver's
        outputs, one dict per task of ``sent`` that answers the driver, in task order."""
        return self.waves.finish(sent, self.plan_id, step_id, refs, extra=extra)["driver"]

    def _step_events(self, sent: Plan, step_id: int, t_submit: float) -> list[TraceEvent]:
        """The traced step's events from the workers (and the driver's wait)."""
        return self.waves.trace(sent, self.plan_id, step_id, t_submit)

    def _commit(self, step_id: int) -> Any:
        """Submit the server's commit of ``step_id``; returns the ref of its status."""
        return self.server.commit(step_id)

    def _abandon(
        self, step_id: int, committing: bool, pending: Any, error: BaseException | None = None
    ) -> None:
        """After a failed step: make sure it is never applied (or learn that it was), and put
        every worker back in step with the server.

        ``committing``: the failure came after the driver started sending the commit (an
        interrupt), so the server decides; its answer is awaited here (bounded) and otherwise
        before the session's next call."""
        ps = self.ps
        assert self.plan is not None
        for w in self.cluster.workers:  # values a failed step left behind (harmless if gone)
            with contextlib.suppress(Exception):
                self._sent.append(w.drop_step.remote(self.plan_id, step_id))
        if ps is None:
            return
        if self.server.pending is None and not self.server.reported(pending, error):
            self.server.pending = pending  # the previous step's commit may not have been awaited
        # Runs after the step's stage and any commit sent: its answer is final, and an update
        # the server still holds (gradients of a step that timed out) is dropped.
        aborted = self.server.abort(step_id)
        if committing:
            self.server.unsettled = (step_id, aborted)
            with contextlib.suppress(Exception):
                self._settle()
        # The workers that take params from the server get its current ones, and replicas are
        # reset to its state: both are read after the abort, whatever the outcome was.
        self._updates = {w: self.server.params_of(w) for w in self.takers}
        self._reset_replicas()

    def _settle(self) -> None:
        """Decide a step whose failure came while its commit was being sent."""
        decided = self.server.settle()
        if decided is not None and decided[1] and decided[0] not in self._done:
            self._done.append(decided[0])

    def step_applied(self, step_id: int) -> bool:
        """Whether step ``step_id`` counts as applied (asked after a step call raised)."""
        self._settle()
        return step_id in self._done

    # Recovery -----------------------------------------------------------------------------------
    def _recover(self, failed_step: int | None) -> None:
        self.server.recovering = True
        try:
            self._recover_once(failed_step)
        finally:
            self.server.recovering = False

    def _recover_once(self, failed_step: int | None) -> None:
        assert self.plan is not None
        self.compiled.drop()  # its actors may be gone: the next compiled step compiles anew
        replaced = self.waves.recover()
        if replaced:
            self.recoveries.append(f"step {failed_step}: replaced workers {replaced}")
        self.server.pending = None  # its outcome is read from the server's state below
        if self.server.alive():
            params = self.server.call("worker_params")
            state = self.server.call("checkpoint") if self.replicas else None
            for w in replaced:
                if w not in self.replicas:
                    values = params[w]
                elif state is None:  # read above whenever there are replicas; cannot be None
                    raise WorkerLostError(
                        f"worker {w} was replaced but the parameter server gave no state to "
                        "restore its replica from"
                    )
                else:
                    values = state.params
                self.waves.install(self.plan, self.plan_id, values, [w], self._replicas(state, [w]))
            # Survivors may or may not have taken the last update before the failure: resend it.
            self._updates = {w: params[w] for w in self.takers}
            self._reset_replicas()
            # A pipelined step can have finished on its worker and still never reached the
            # server (its gradients lost with a node): run it again.
            self._replay(failed_step, self.server.call("status")["applied"])
            return
        ckpt = self.server.restart(self._initial, self._routes())
        self.recoveries.append(
            f"step {failed_step}: parameter server restarted from version {ckpt.step}"
        )
        state = self.server.call("checkpoint")
        self.waves.install(self.plan, self.plan_id, state.params, replicas=self._replicas(state))
        self._updates = {}
        self._replay(failed_step, ckpt.applied_steps)

    def _replay(self, failed_step: int | None, applied: Sequence[int]) -> None:
        """Run again the finished steps the server has not applied (all but ``failed_step``)."""
        done = set(applied)
        missing = [s for s in self._done if s not in done and s != failed_step]
        if not missing:
            return
        self.recoveries.append(f"step {failed_step}: replaying steps {missing}")
        if self.replay is None:
            raise WorkerLostError(
                f"steps {missing} were lost with the parameter server's state and cannot be "
                "replayed: no data source (train through Trainer.fit, which provides one)"
            )
        for s in missing:
            assert self.replay is not None
            arrays = prepare_feeds(self.prog, self.replay(s), self.check_finite)
            self._step_once(s, arrays)

    # Reads --------------------------------------------------------------------------------------
    @property
    def params(self) -> dict[str, Any]:
        if self.ps is None:
            return dict(self._initial.params)
        return self.server.call("params")

    @property
    def applied_steps(self) -> list[int]:
        if self.ps is None:
            return list(self._initial.applied_steps)
        return self.server.call("status")["applied"]

    def status(self) -> dict[str, Any]:
        """The parameter server's version, applied step ids and ignored duplicates, and under
        ``"replicas"`` the data-parallel layout: ``count``, ``width`` (workers per replica),
        ``kind`` (how shard gradients were weighted), ``last_step`` and, by step id for the
        latest steps (up to ``REPLICA_HISTORY``), which rows each replica took and on which
        workers, Ray nodes (ids) and IPs it computed them (``steps``). ``"consistency"`` is
        ``"sync"`` or ``"async"``; after asynchronous steps ``"async"`` holds the staleness
        bound, the clock's applied-through per shard and version, the staleness histogram
        (staleness -> count), ``max_staleness`` and the latest (replica, step, version,
        staleness) records."""
        out = dict(self.server.call("status") or {})
        replicas = self._replica_status()
        if replicas is not None:
            out["replicas"] = replicas
        out["consistency"] = self.options.consistency
        if self.clock is not None:
            # Bounded staleness: each (replica, step) once, with the version it computed on.
            out["async"] = {
                "staleness": self.options.staleness,
                **self.clock.status(),
                "max_staleness": self.clock.max_staleness(),
                # The latest REPLICA_HISTORY records: (replica, step, version, staleness).
                "records": [dataclasses.asdict(c) for c in self.clock.records[-REPLICA_HISTORY:]],
            }
        return out

    def checkpoint(self) -> Checkpoint:
        if self.ps is None:
            return self._initial
        return self.server.call("checkpoint")

    def save(self, path: str) -> None:
        """Have the parameter server write its checkpoint to ``path`` (on the PS's node)."""
        if self.ps is None:
            save_checkpoint(path, self._initial, same_run=True)
            return
        self.server.call("save", str(path))

    def restore(self, ckpt: Checkpoint) -> None:
        self.server.unsettled = None  # the restored state decides every step from here on
        self._done = list(ckpt.applied_steps)
        if self.ps is None:
            self._initial = ckpt
            return
        self.server.call("restore", ckpt)
        params = self.server.call("worker_params")
        self._updates = {w: params[w] for w in self.takers}
        self._reset_replicas()

    def close(self) -> None:
        self.compiled.close()
        if self.ps is not None:
            with contextlib.suppress(Exception):
                self.server.drain()  # surface nothing here: the state is read before closing
            self.server.kill()
        if self.plan is not None:
            self.waves.uninstall(self.plan_id)
            self.plan = None
