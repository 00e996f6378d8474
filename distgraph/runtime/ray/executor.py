"""The Ray executor: a thin facade over a cluster of worker actors, the waves that run plans
on them, and training sessions with a parameter-server actor.

State: ``options`` (shared with the parts below, so setting ``ex.deadline`` and the like
applies to the next call), ``cluster`` (the Ray connection, placement group and workers),
``waves`` (installed plans, one step's calls) and a counter of run() step ids.

Order of a run (``Executor.run``'s template, then ``_evaluate`` here): compile the request
into a Program (cached) -> check the feeds -> place it and group it into tasks (a Plan,
cached and installed on the workers once) -> submit every task of the step at once and wait
for its end within the deadline, fetching only the requested outputs. A worker lost on the
way is replaced and the run tried again, up to ``max_recoveries`` times. Training steps are
described in ``session.py``.

Only ``distgraph.runtime.ray`` imports ``ray``.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, Generic, TypeVar

from ...cost import Calibration, CostModel
from ...errors import ConfigError, DistgraphError, WorkerLostError
from ...graph import Graph
from ...optim import Optimizer
from ...paramstore import ParameterStore
from ...partition import Strategy
from ...plan import Plan
from ...program import Program
from ...result import TraceEvent
from ..base import Evaluation, Executor, TrainingSession
from .cluster import Cluster
from .compiled import TRANSPORTS, CompiledRuns, is_retry
from .options import RayOptions
from .pipelined import PipelinedSession, check_pipeline_options, pipelined_plan
from .replicas import check_consistency, check_replicas, choose_replicas, replicate
from .session import RaySession
from .waves import Waves, batch_size

log = logging.getLogger(__name__)

T = TypeVar("T")


class _Option(Generic[T]):
    """An executor attribute kept in its shared :class:`RayOptions` (read and set live)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, ex: Any, owner: Any = None) -> T:
        return getattr(ex.options, self.name)

    def __set__(self, ex: Any, value: T) -> None:
        setattr(ex.options, self.name, value)


class RayExecutor(Executor):
    """Run graphs on ``num_workers`` Ray worker actors.

    ``address=None`` (and no ``RAY_ADDRESS``) starts an embedded local Ray, which later
    executors of the process share, and the last of them to ``close()`` shuts it down;
    ``"auto"`` or ``"host:port"`` joins a running cluster and leaves it running; an
    already initialised Ray is reused as it is. ``strategy`` is ``"mincut"``, ``"level"``,
    ``"round_robin"``, a callable or a ``{node: worker}`` dict. ``placement="spread"`` asks Ray
    to put workers on distinct nodes, ``"pack"`` on as few as possible. ``worker_updates=False``
    makes every worker take its new params from the parameter server after each step.

    Joining a cluster gives up after ``connect_timeout`` seconds in all (reachability probe,
    token check and ``ray.init`` together) with a ``ClusterError``. An embedded Ray refuses more
    workers (or worker CPUs) than this machine has CPUs, since each worker is a process of its
    own; ``oversubscribe=True`` (or an explicit ``ray_init_kwargs["num_cpus"]``) allows it.

    ``replicas``: data-parallel training. ``R`` replicas of the training program, each placed
    by ``strategy`` over ``num_workers / R`` workers (R must divide ``num_workers``; a
    ``ConfigError`` names the choices); each step's batch is split into R row shards (sizes
    differing by at most one), each replica computes its shard's gradients, and the server
    combines them (weighted by rows for a mean loss) in replica order and applies them once.
    The default ``"auto"`` lets the cost model choose R at the first step's batch size
    (``dataparallel.choose_layout``): each R's estimated step (compute on its shard, gradients
    pushed and params pulled, every extra actor call as a round trip, the server's combine)
    is compared, and more replicas are taken only when estimated at least
    ``dataparallel.AUTO_MARGIN`` (25 %) faster. So a model that fits one worker with a batch
    worth splitting (the MLP 784-512-512-10 at batch 256 on 2 workers) trains data-parallel,
    and small graphs, where calls dominate, keep R = 1. What was chosen, why, and every
    alternative's estimate are in the training plan's ``explain()`` and the log. A loss that
    couples rows keeps R = 1 under ``"auto"`` and says why; a given R > 1 is refused for it
    with a ``GraphError`` naming the node. With one replica results equal ``LocalExecutor``'s
    bit for bit; with R > 1 they equal it to rounding (the full batch's sums are added in
    another order), so pass ``replicas=1`` where bit-identity matters more than speed.
    ``run()`` (inference, one-off gradients) never splits rows: it always runs one plan over
    all workers.

    ``data_path``: how values for another worker or the server travel. ``"inline"`` (default)
    returns them from the task; Ray keeps results up to 100 KiB in the caller's process, so
    small values, gradients and params pass through the driver's memory (it never reads them)
    on their way, which is the fastest route for small graphs. ``"store"``: the producer puts
    them in the object store and returns only a reference, so nothing but the requested
    outputs reaches the driver, at the cost of an object-store put per value (about 1-2 ms
    each on a loaded 2-core machine).

    ``transport``: how run() steps and training steps travel. ``"calls"``: one actor call per
    task. ``"compiled"``: from a plan's second run in a row on, its steps run as a Ray
    Compiled Graph (shared-memory channels sized from the plan, no per-call scheduling); a
    plan that cannot be compiled runs on calls with a warning. ``"auto"`` (default): measured
    per plan. Where compiling is supported (one node, ``data_path="inline"``, messages up to
    256 MB; otherwise calls, the reason logged and shown by ``explain_transport``), a
    repeated plan (a training session's steps, repeated ``run()`` of one request) runs its
    first 6 steps on calls and the next 6 compiled, then keeps whichever measured faster
    (medians of 5 steps each, the first of each transport not counted; compiled must be 15 %
    faster to replace calls, and the other way round), tearing the graph down when calls
    wins; it measures again after 256 steps (twice as long each time the choice stands) or
    when the chosen transport's step time drifts 2x. Results are bit-identical either way;
    ``explain_transport`` and the log say the choice and both measured ms/step
    (``transport_choice.py``).
    Training steps follow the same transport: from a session's second step on, its plan and
    the parameter server's update run as one compiled graph (exactly once per step, never
    half-applied; a failed step recovers and recompiles), data-parallel replicas and
    ``ps_shards`` included, and pipelined ``microbatches`` as one node per worker action
    (with replicas and ``ps_shards`` too); ``consistency="async"`` sessions are refused
    under ``"compiled"`` (ConfigError) and run on calls under ``"auto"``
    (``session.explain_transport()``).
    ``ps_shards``: training keeps the params on this many parameter-server actors (default 1),
    each param whole on one shard, balanced by bytes (``dataparallel.shard_params``). Each
    worker sends each shard only the gradients of that shard's params and takes its params
    from the shards that own them. A step is applied by every shard or by none, and the
    global-norm clipping of ``clip_norm`` is combined across shards, so the result equals one
    server's. Periodic checkpoints go to ``checkpoint_dir/shard-<s>`` (one per shard, written
    at the same version); ``session.save(path)`` writes one merged checkpoint.

    ``consistency``: ``"sync"`` (default; as above, every replica computes a row shard of
    every step) or ``"async"`` with ``staleness=tau`` (default 0), which needs ``replicas=R``
    with R >= 2: steps (mini-batches, in step-id order) go to whichever replica is idle, each
    replica runs a step's whole batch on the params current when it starts, and the server
    applies each step's gradient as it arrives, exactly once. Replica r may start step t only
    once every step <= t - tau - 1 has been applied (bounded delay); ``tau = 0`` keeps steps in
    order. ``session.status()["async"]`` holds the staleness histogram and every (replica,
    step, version) record. ``_slow_replicas={r: f}`` is a test hook: replica r's steps last f
    times as long (its results are held back), to simulate a straggler.

    ``microbatches=m`` (training): the placement must be a chain of stages (``strategy=
    "pipeline"`` makes one); each step's batch is split into ``m`` micro-batches run by the
    ``schedule`` (``"gpipe"`` or ``"1f1b"``, see ``distgraph.pipeline``), and the gradients
    summed over them, weighted by rows, reach the parameter server once per step (a loss that
    couples rows is refused for ``m > 1``). Inference (``run``) is not pipelined. It composes
    with ``replicas=R`` (each replica a pipeline over its own ``num_workers / R`` workers,
    its row shard split into ``m`` micro-batches, the replicas combined at the server) and
    ``ps_shards``; not with ``consistency="async"``. Under ``replicas="auto"`` a pipelined
    session is one pipeline over every worker: give R to run R pipelines.
    """

    num_workers = _Option[int]()
    strategy = _Option["str | Strategy | Mapping[str, int]"]()
    address = _Option["str | None"]()
    placement = _Option[str]()
    resources = _Option["dict[str, float]"]()
    cost = _Option[CostModel]()
    blas_threads = _Option["int | None"]()
    deadline = _Option[float]()
    checkpoint_dir = _Option["str | None"]()
    checkpoint_every = _Option[int]()
    max_recoveries = _Option[int]()
    #: Training: a worker that computes every gradient of its params applies the optimizer
    #: step to its own copy too, so new params need not come back from the server.
    worker_updates = _Option[bool]()
    data_path = _Option[str]()
    ops_modules = _Option["list[str]"]()
    worker_runtime_env = _Option["dict[str, Any] | None"]()
    #: Let an embedded Ray start more workers than the machine has CPUs.
    oversubscribe = _Option[bool]()
    #: How many run() plans stay installed (least recently used ones are dropped).
    max_plans = _Option[int]()
    #: Parameter-server shards of the next training session.
    ps_shards = _Option[int]()
    #: Data-parallel replicas of a training program: an int dividing ``num_workers`` or
    #: ``"auto"`` (the default; read by each training session when its first step places the
    #: program).
    replicas = _Option["int | str"]()
    #: How run() steps travel: "calls", "compiled" or "auto" (see the class docstring).
    transport = _Option[str]()
    #: Training updates: "sync" or "async" (see the class docstring).
    consistency = _Option[str]()
    #: Async staleness bound tau.
    staleness = _Option[int]()
    #: Training: micro-batches per step of a pipelined layout (None: no pipelining).
    microbatches = _Option["int | None"]()
    #: Training: the pipeline schedule, ``"gpipe"`` or ``"1f1b"``.
    schedule = _Option[str]()

    def __init__(
        self,
        num_workers: int = 2,
        strategy: str | Strategy | Mapping[str, int] = "mincut",
        address: str | None = None,
        placement: str = "spread",
        resources_per_worker: Mapping[str, float] | None = None,
        *,
        cost: CostModel | None = None,
        blas_threads: int | None = None,
        deadline: float = 600.0,
        connect_timeout: float = 30.0,
        checkpoint_dir: str | None = None,
        checkpoint_every: int = 0,
        max_recoveries: int = 3,
        worker_updates: bool = True,
        data_path: str = "inline",
        ops_modules: Sequence[str] = (),
        worker_runtime_env: Mapping[str, Any] | None = None,
        ray_init_kwargs: Mapping[str, Any] | None = None,
        oversubscribe: bool = False,
        max_bytes: int | None = None,
        ps_shards: int = 1,
        replicas: int | str = "auto",
        transport: str = "auto",
        consistency: str = "sync",
        staleness: int = 0,
        _slow_replicas: Mapping[int, float] | None = None,
        microbatches: int | None = None,
        schedule: str = "gpipe",
    ):
        super().__init__(max_bytes)  # a request's estimated memory limit (distgraph.memory)
        if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 1:
            raise ConfigError(f"num_workers must be an int >= 1, got {num_workers!r}")
        if not (
            isinstance(connect_timeout, (int, float))
            and not isinstance(connect_timeout, bool)
            and 0 < connect_timeout < float("inf")
        ):
            raise ConfigError(
                f"connect_timeout must be a positive number of seconds, got {connect_timeout!r}"
            )
        if placement not in ("spread", "pack"):
            raise ConfigError(f"placement must be 'spread' or 'pack', got {placement!r}")
        if not (isinstance(deadline, (int, float)) and deadline > 0):
            raise ConfigError(f"deadline must be a positive number of seconds, got {deadline!r}")
        if data_path not in ("inline", "store"):
            raise ConfigError(f"data_path must be 'inline' or 'store', got {data_path!r}")
        if not isinstance(ps_shards, int) or isinstance(ps_shards, bool) or ps_shards < 1:
            raise ConfigError(f"ps_shards must be an int >= 1, got {ps_shards!r}")
        check_replicas(replicas, num_workers)
        if transport not in TRANSPORTS:
            raise ConfigError(
                f"transport must be one of {', '.join(map(repr, TRANSPORTS))}, got {transport!r}"
            )
        slow = check_consistency(consistency, staleness, replicas, _slow_replicas)
        check_pipeline_options(microbatches, schedule)
        if checkpoint_every and not checkpoint_dir:
            raise ConfigError("checkpoint_every needs checkpoint_dir (a path every node can reach)")
        self.options = RayOptions(
            num_workers=num_workers,
            strategy=strategy,
            address=address if address is not None else os.environ.get("RAY_ADDRESS") or None,
            placement=placement,
            resources=dict(resources_per_worker or {"CPU": 1}),
            cost=cost or CostModel(),
            blas_threads=blas_threads,
            deadline=float(deadline),
            checkpoint_dir=checkpoint_dir,
            checkpoint_every=checkpoint_every,
            max_recoveries=max_recoveries,
            worker_updates=bool(worker_updates),
            data_path=data_path,
            ops_modules=list(ops_modules),
            worker_runtime_env=dict(worker_runtime_env) if worker_runtime_env else None,
            oversubscribe=bool(oversubscribe),
            ps_shards=ps_shards,
            replicas=replicas,
            transport=transport,
            consistency=consistency,
            staleness=staleness,
            slow_replicas=slow,
            microbatches=microbatches,
            schedule=schedule,
        )
        for module in self.options.ops_modules:  # the driver builds graphs with these ops too
            importlib.import_module(module)
        self._run_steps = itertools.count(1)
        self.cluster = Cluster(self.options, connect_timeout, dict(ray_init_kwargs or {}))
        self.waves = Waves(self.cluster, self.options)
        self.compiled = CompiledRuns(self.cluster, self.options)

    # What the cluster and the waves know --------------------------------------------------------
    @property
    def workers(self) -> list[Any]:
        """The worker actors, by index."""
        return self.cluster.workers

    @property
    def worker_info(self) -> list[dict[str, Any]]:
        """Where each worker runs (index, pid, host, node id and IP, CPUs)."""
        return self.cluster.worker_info

    @property
    def nodes(self) -> list[str]:
        """Node IP of each worker, by worker index."""
        return self.cluster.nodes

    @property
    def replacements(self) -> list[int]:
        """Workers replaced after a crash or node loss, by index."""
        return self.cluster.replacements

    @property
    def last_calls(self) -> list[tuple[int, int, int, tuple[str, ...]]]:
        """(worker, first level, last level, phases) of every actor call of the latest step."""
        return self.waves.last_calls

    def recover(self) -> list[int]:
        """Replace dead workers and reinstall the run() plans on them; returns their indices."""
        self.compiled.close()  # graphs hold the old actors: compiled again on the next run
        return self.waves.recover()

    def close(self) -> None:
        """Tear down compiled graphs, stop the actors, release the placement group, and shut
        down an embedded Ray."""
        compiled = getattr(self, "compiled", None)
        if compiled is not None:
            compiled.close()
        waves, cluster = getattr(self, "waves", None), getattr(self, "cluster", None)
        if waves is not None:
            waves.plans.clear()
        if cluster is not None:
            cluster.close()

    def calibrate(self, refresh: bool = False) -> Calibration:
        """What calls, the driver and transfers cost on this executor's workers, for the
        step-time predictor (``plan.estimate(calibration=...)``, ``plan.explain(...)``):
        measured once per cluster and worker count by a short probe of empty calls and one
        4 MiB transfer on the workers (about a second), cached; ``refresh`` measures again
        (the machine's load changes them). See ``runtime/ray/calibrate.py``."""
        from .calibrate import calibrate

        self.cluster.check_open()
        return calibrate(self.cluster.workers, refresh=refresh)

    # Planning -----------------------------------------------------------------------------------
    def plan(
        self,
        graph: Graph,
        outputs: Sequence[str] | str | None = None,
        grad: str | None = None,
        *,
        training: bool = False,
        wrt: Sequence[str] | None = None,
        batch_size: int | None = None,
    ) -> Plan:
        """The plan this executor would run for a request (not installed). A training plan
        holds every data-parallel replica (``replicas``; for ``"auto"`` chosen at the cost
        model's batch size) and ``explain()`` starts with the layout chosen and why; one with
        ``microbatches`` set is a :class:`~distgraph.stageplan.StagePlan` (its ``explain()``
        shows the schedule grid and the predicted step)."""
        prog = self.program(graph, outputs, grad, wrt)
        if not training:
            return self.waves.make_plan(prog, False, batch_size or 1)
        o = self.options
        batch = batch_size or max(1, o.cost.batch_size)
        chosen = choose_replicas(prog, o.num_workers, o.replicas, o.strategy, o.cost, batch)
        if self.microbatches is not None:
            plan = pipelined_plan(self.waves, prog, chosen, batch_size)
            return dataclasses.replace(plan, layout=chosen.explanation)
        base = self.waves.make_plan(prog, True, batch, num_workers=chosen.width)
        layout = chosen.explanation
        if o.ps_shards > 1:  # which params each server shard holds, as the session assigns them
            from ...viz.scaling import explain_shards

            layout += "\n" + explain_shards(graph.params, o.ps_shards)
        return dataclasses.replace(replicate(base, chosen.count), layout=layout)

    # Running ------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        self.cluster.check_open()

    def _evaluate(
        self,
        graph: Graph,
        prog: Program,
        feeds: Mapping[str, Any],
        env: dict[str, Any],
        *,
        check_finite: bool,
        trace: bool,
        started: float,
    ) -> Evaluation:
        """Run the request's plan across the workers; only the requested outputs come back."""
        self.cluster.check_feeds_fit(feeds)
        for attempt in range(self.max_recoveries + 1):
            step = next(self._run_steps)
            try:
                # Installing is inside the recovery loop: a worker that died while the executor
                # was idle is found here, replaced, and the plan installed on its successor.
                plan, plan_id = self.waves.installed(
                    prog,
                    False,
                    graph.param_values,
                    batch_size(prog, feeds),
                    key_extra=graph.version,
                )
                t_submit = time.time()
                t0 = time.perf_counter()
                compiled = self._compiled_step(plan, plan_id, step, feeds, trace, check_finite)
                if compiled is not None:
                    driver = compiled
                else:
                    refs = self.waves.submit(plan, plan_id, step, feeds, {}, trace, check_finite)
                    driver = self.waves.finish(plan, plan_id, step, refs, extra=[])["driver"]
                if not trace:  # a traced step also collects its events: not a steady step
                    self.compiled.record(plan_id, time.perf_counter() - t0)
                break
            except WorkerLostError:
                if attempt == self.max_recoveries:
                    raise
                log.warning("a worker died during a run; replacing it and running again")
                self.recover()
        for values in driver:
            # The request's own feeds, params and constants stay as given (the originals).
            env.update({k: v for k, v in values.items() if k not in env})
        events: list[TraceEvent] = []
        if trace:
            events.append(TraceEvent("plan", "call", "plan", -1, "driver", started, t_submit))
            events.extend(self.waves.trace(plan, plan_id, step, t_submit))
        return Evaluation(sorted(events, key=lambda e: e.start), dict(plan.placement))

    def _compiled_step(
        self,
        plan: Plan,
        plan_id: int,
        step: int,
        feeds: Mapping[str, Any],
        trace: bool,
        check_finite: bool,
    ) -> list[dict[str, Any]] | None:
        """The step's driver outputs, run as a compiled graph; None: run it on calls."""
        try:
            return self.compiled.step(plan, plan_id, step, feeds, trace, check_finite)
        except DistgraphError as e:
            if is_retry(e):  # the graph is gone and the plan goes back to calls
                return None
            raise

    def explain_transport(
        self,
        graph: Graph,
        feeds: Mapping[str, Any] | None = None,
        outputs: Sequence[str] | str | None = None,
        grad: str | None = None,
    ) -> str:
        """How run() steps of this request travel (compiled graph or actor calls, and why)."""
        prog = self.program(graph, outputs, grad, feeds=feeds)
        for plan, plan_id, _ in self.waves.plans.values():
            if plan.program is prog:
                return self.compiled.describe(plan_id)
        return self.compiled.describe(-1)

    # Training -----------------------------------------------------------------------------------
    def training_session(
        self,
        graph: Graph,
        loss: str,
        optimizer: Optimizer,
        store: ParameterStore,
        check_finite: bool = False,
    ) -> TrainingSession:
        """Workers compute gradients; a parameter-server actor applies them."""
        self.cluster.check_open()
        wrt = list(store.params)
        if self.microbatches is not None and self.consistency != "sync":
            # An asynchronous step is one replica's whole batch, applied on its own; a
            # pipelined step combines every replica's micro-batches before one update.
            raise ConfigError(
                f"microbatches={self.microbatches} needs consistency='sync' (got "
                f"{self.consistency!r}): pipelined replicas are combined into one update per "
                "step; use consistency='sync' or drop microbatches"
            )
        kind = PipelinedSession if self.microbatches is not None else RaySession
        session = kind(
            self.cluster,
            self.waves,
            self.options,
            lambda: self.training_program(graph, loss, wrt),
            optimizer,
            store,
            check_finite,
        )
        return session
