"""A training session's steps on the compiled transport, and transport="auto"'s choice
between them and actor calls.

State: none of its own. :class:`CompiledSteps` is a mixin of ``RaySession`` (``session.py``)
that runs on the session's ``compiled`` (``compiled_training.py``: the plan's graph, whether
it applies and why not), ``choice`` (``transport_choice.py``: calls against compiled, measured
per plan) and ``_sent`` (calls sent without waiting since the latest step), and on the step
protocol's state and methods (:class:`_CompiledHost` lists what it uses).

Order of a compiled step (``_maybe_compiled``, which the session's ``_step_once`` tries first;
``transport`` "compiled" or "auto", from the second step in a row):
1. under "auto" the measured choice may say calls: the graph is released (its readers would
   spin beside the calls steps) and the step runs on calls;
2. any step an earlier failure left undecided is settled, and every call sent without waiting
   (drops, replica resets, progress, new params after a recovery) is awaited
   (``_quiesce``), since the graph's calls do not queue behind them;
3. the rows split over the replicas as with calls (``ReplicaSteps``, ``replicas.py``; a batch
   with fewer rows than replicas runs on calls), and the graph (compiled now if needed) runs
   the same protocol: the server's stage and commit are one node that runs only once every
   task succeeded (with ``ps_shards``: a stage node per shard, then a commit node per shard
   that waits for every shard's stage), and takers get their new params from a last node of
   the same step;
4. a failed execution is fenced, aborted (the server's answer decides), recovered as with
   calls and compiled again by the next step; a step whose messages outgrew the channels runs
   again on calls.

``_timed_step`` reports each step's time and transport to the choice under "auto".
``_check_transport`` refuses, when the plan is placed, what compiled steps do not cover.
``PipelinedSession`` overrides it and ``_step_compiled`` (``pipelined.py``,
``compiled_pipeline.py``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import ray

from ...checkpoint import Checkpoint
from ...errors import ConfigError, WaveTimeoutError
from ...optim import Optimizer
from ...plan import Plan
from ...result import TraceEvent
from .cluster import Cluster
from .compiled import ChannelSizeError
from .compiled_training import CompiledTraining
from .options import RayOptions
from .replicas import Replicas, replica_events
from .server import ServerLink, server_events
from .shards import ShardedServer, merge_commits
from .transport_choice import CALLS, COMPILED, TransportChoice
from .waves import Waves


class _CompiledHost(Protocol):
    """What :class:`CompiledSteps` uses of its session (``RaySession``'s state and step
    protocol, see ``session.py``)."""

    plan: Plan | None
    last_trace: list[TraceEvent]
    _sent: list[Any]
    _updates: dict[int, Any]

    @property
    def options(self) -> RayOptions: ...
    @property
    def cluster(self) -> Cluster: ...
    @property
    def waves(self) -> Waves: ...
    @property
    def server(self) -> ServerLink | ShardedServer: ...
    @property
    def optimizer(self) -> Optimizer: ...
    @property
    def check_finite(self) -> bool: ...
    @property
    def plan_id(self) -> int: ...
    @property
    def layout(self) -> Replicas | None: ...
    @property
    def takers(self) -> list[int]: ...
    @property
    def compiled(self) -> CompiledTraining: ...
    @property
    def choice(self) -> TransportChoice: ...
    @property
    def _initial(self) -> Checkpoint: ...
    @property
    def _done(self) -> list[int]: ...

    # The step protocol (session.py) and its data-parallel part (replicas.py).
    def _step_once(self, step_id: int, arrays: Mapping[str, Any], trace: bool = False) -> float: ...
    def _settle(self) -> None: ...
    def _abandon(
        self, step_id: int, committing: bool, pending: Any, error: BaseException | None = None
    ) -> None: ...
    def _split_rows(
        self, arrays: Mapping[str, Any]
    ) -> tuple[list[tuple[int, int]], list[dict[str, Any]]]: ...
    def _stage_split(self, plan: Plan, rows: Sequence[tuple[int, int]]) -> dict[str, Any]: ...
    def _record_rows(self, step_id: int, plan: Plan, rows: Sequence[tuple[int, int]]) -> None: ...
    def _step_loss(
        self, plan: Plan, driver: Sequence[Mapping[str, Any]], rows: Sequence[tuple[int, int]]
    ) -> float: ...

    # Its own (a subclass overrides some).
    def _auto_says_compiled(self) -> bool: ...
    def _step_compiled(
        self, step_id: int, arrays: Mapping[str, Any], trace: bool
    ) -> float | None: ...
    def _quiesce(self) -> None: ...
    def _compiled_failed(self, graph: Any, step_id: int, error: BaseException) -> None: ...
    def _compiled_done(self, step_id: int) -> None: ...


class CompiledSteps:
    """The compiled-transport part of a training session (a mixin of ``RaySession``, see the
    module docstring): which steps run compiled, running them, and what it says about it."""

    # The session's state these steps assign (``RaySession.__init__`` sets it): declared here
    # too, since a type checker binds ``self.x = ...`` to the class whose method assigns it.
    plan: Plan | None
    last_trace: list[TraceEvent]
    _sent: list[Any]
    _updates: dict[int, Any]

    def _check_transport(self: _CompiledHost, layout: Replicas) -> None:
        """Refuse what compiled training does not cover (ConfigError under "compiled"; under
        "auto" the steps run on actor calls, said in the log and ``explain_transport``):
        asynchronous steps. Replicas and sharded servers compile (``compiled_training.py``);
        pipelined sessions check their own (``pipelined.py``)."""
        o = self.options
        if o.transport == "calls":
            return
        if o.consistency == "async":
            reason = (
                "consistency='async' (each replica's gradients are applied as they arrive; a "
                "compiled step is synchronous)"
            )
        else:
            return
        if o.transport == "compiled":
            self.plan = None
            raise ConfigError(
                f'transport="compiled" does not compile training steps with {reason}; use '
                'transport="auto" (it runs such steps on actor calls) or "calls"'
            )
        self.compiled.refuse(self.plan_id, reason)

    def explain_transport(self: _CompiledHost) -> str:
        """How this session's steps travel: compiled graph or actor calls, and why (under
        ``transport="auto"``, with the measured step times of both)."""
        line = self.compiled.describe()
        if self.options.transport == "auto":
            line += "; " + self.choice.explain()
        return line

    # Steps ------------------------------------------------------------------------------------
    def _compiled_failed(
        self: _CompiledHost, graph: Any, step_id: int, error: BaseException
    ) -> None:
        """A compiled execution failed: fence and retire the graph, let the server decide
        whether the step is applied (its update runs inside the graph; after the fence its
        answer to the abort is final, and with shards a step some shards committed is rolled
        back there: ``ShardedServer.settle``), then raise the step's error -- or return when
        the messages outgrew the channels (ChannelSizeError): the step runs again on calls."""
        failure = self.compiled.failed(graph, step_id, error)
        self._abandon(step_id, True, None, failure)
        if isinstance(failure, ChannelSizeError):
            return
        if failure is error:
            raise error
        raise failure from None

    def _compiled_done(self: _CompiledHost, step_id: int) -> None:
        """A compiled step succeeded: it counts, and the takers already made their new params
        resident inside the graph."""
        self.compiled.last_reason = ""
        if step_id not in self._done:
            self._done.append(step_id)
        self._updates = {}

    def _maybe_compiled(
        self: _CompiledHost, step_id: int, arrays: Mapping[str, Any], trace: bool
    ) -> float | None:
        """The step run as the plan's compiled graph; None: it runs on calls (the transport,
        the measured choice or the graph said no)."""
        if self.compiled.wants(self.plan_id) and self._auto_says_compiled():
            return self._step_compiled(step_id, arrays, trace)
        return None

    def _step_compiled(
        self: _CompiledHost, step_id: int, arrays: Mapping[str, Any], trace: bool
    ) -> float | None:
        """Run one step as the plan's compiled graph (``compiled_training.py``); None: the
        plan runs on calls (refused now, its messages outgrew the channels, or a batch with
        fewer rows than replicas)."""
        plan, layout = self.plan, self.layout
        assert plan is not None and layout is not None
        self._settle()
        self._quiesce()
        rows, parts = self._split_rows(arrays)  # each replica's rows and feeds, as with calls
        if layout.split is not None and len(parts) < layout.count:
            # The graph runs every replica: leave this step to calls.
            self.compiled.last_reason = f"a batch of {len(parts)} rows for {layout.count} replicas"
            return None
        split = self._stage_split(plan, rows)  # the data-parallel stage's arguments
        # One replica takes the batch whole.
        feeds = [self.compiled.feeds(p) for p in parts] or [self.compiled.feeds(arrays)]
        # Sharded servers clip by one global norm: each shard's sums of squares are nodes too.
        clip = isinstance(self.server, ShardedServer) and self.optimizer.clip_norm is not None
        # The slot is held from the graph's lookup to the step's end: an idle graph's reaper
        # (compiled.py's GraphSlot) never tears it down in between.
        with self.compiled.slot.running():
            graph = self.compiled.graph_for(
                plan,
                self.plan_id,
                self.server,
                self.takers,
                feeds,
                self._initial.params,
                layout.width,
                clip,
            )
            if graph is None:
                return None
            t_submit = time.time()
            try:
                driver, statuses = graph.run(
                    step_id,
                    self.server.stage_splits(plan, split, layout.width),
                    feeds,
                    trace,
                    self.check_finite,
                    self.options.deadline,
                )
            except BaseException as e:
                self._compiled_failed(graph, step_id, e)
                return None  # the step runs again on calls
        self._compiled_done(step_id)
        self._record_rows(step_id, plan, rows)
        if trace:
            status = statuses[0] if len(statuses) == 1 else merge_commits(statuses)
            events = self.waves.trace(plan, self.plan_id, step_id, t_submit)
            events += server_events(step_id, status, getattr(self.server, "keys", ()))
            if rows:
                events = replica_events(events, layout.width, rows, t_submit)
            self.last_trace = sorted(events, key=lambda e: e.start)
        return self._step_loss(plan, driver, rows)

    def _quiesce(self: _CompiledHost) -> None:
        """Before a compiled step: every call sent without waiting has run (the graph's calls
        do not queue behind them), the latest commit is applied, and the takers hold the
        server's current params."""
        self.server.drain()
        workers = self.cluster.workers
        sent = self._sent + self.server.take_sent()
        sent += [workers[w].set_resident.remote(self.plan_id, u) for w, u in self._updates.items()]
        self._sent, self._updates = [], {}
        if not sent:
            return
        _done, waiting = ray.wait(sent, num_returns=len(sent), timeout=self.options.deadline)
        if waiting:
            raise WaveTimeoutError(
                f"{len(waiting)} call(s) to the workers or the server sent after the latest step "
                f"did not finish within the deadline of {self.options.deadline:g} s (a worker is "
                "still computing an abandoned step); nothing of the next step was started"
            )

    # transport="auto" (transport_choice.py) --------------------------------------------------
    def _auto_says_compiled(self: _CompiledHost) -> bool:
        """Whether the measured choice runs this step compiled (always, unless "auto"); when
        it says calls, this session's graph is torn down: its readers would spin beside the
        calls steps."""
        if self.options.transport != "auto" or self.choice.choose() == COMPILED:
            return True
        self.compiled.release()
        self.compiled.last_reason = self.choice.status()  # explain_transport adds the numbers
        return False

    def _timed_step(
        self: _CompiledHost, step_id: int, arrays: Mapping[str, Any], trace: bool
    ) -> float:
        """``_step_once``, its time reported to the choice under ``transport="auto"``: which
        transport ran it (the compiled path's ``last_reason`` is "" only after a compiled
        step) and whether it compiled a graph (not a steady step's time)."""
        graph = getattr(self.compiled, "graph", None)
        t0 = time.perf_counter()
        loss = self._step_once(step_id, arrays, trace)
        if self.options.transport == "auto" and not trace:
            why = self.compiled.last_reason
            ran = CALLS if why else COMPILED
            cold = ran == COMPILED and getattr(self.compiled, "graph", None) is not graph
            self.choice.label = f"training plan {self.plan_id}"
            self.choice.record(ran, time.perf_counter() - t0, cold=cold, why=why)
        return loss
