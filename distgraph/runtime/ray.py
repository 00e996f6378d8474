"""The Ray executor: the driver that runs plans over worker actors and a parameter server.

State: the Ray connection (embedded or joined), one placement group, ``num_workers`` worker
actors, installed plans (id -> Plan) and, during training, one parameter-server actor plus the
per-worker refs of the newest parameter version not yet consumed.

Order of a run or training step:
1. compile the request into a Program (cached), place it (strategy), group it into tasks
   (a Plan, cached and installed on the workers once);
2. submit every task of the step at once, in plan order; each takes its feeds and the refs of
   the values it imports as top-level arguments, so workers resolve them directly and the
   driver never touches intermediate tensors;
3. training only: submit ``ps.stage(step, *gradient refs)``: the server computes the update
   and holds it. A worker that computes every gradient of its own params applies the same
   update to a local replica (``worker_updates``), so no params travel back;
4. wait once for the step's end, bounded by ``deadline`` (the driver's outputs, the previous
   step's commit, and, unless the outputs prove every gradient exists, the staged update);
   fetch only the requested outputs;
5. training only: the step succeeded, so submit ``ps.commit(step)`` and count the step. Its
   per-worker results are passed to each worker's first task of the next step; the commit
   itself is awaited by the next step (or any read of the server). A step that fails before
   this point (error, deadline, interrupt) is aborted instead (``ps.abort``) and is never
   applied; workers are reset to the server's state. A commit that finds nothing staged fails
   as a lost worker: the session recovers and replays the step.
Only this module imports ``ray``.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, ObjectLostError, RayActorError, RayTaskError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ..checkpoint import (
    Checkpoint,
    checkpoint_run_id,
    foreign_run_error,
    is_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from ..cost import CostModel
from ..errors import ClusterError, ConfigError, DistgraphError, WaveTimeoutError, WorkerLostError
from ..graph import Graph
from ..optim import Optimizer
from ..paramstore import ParameterStore
from ..partition import Strategy, partition
from ..plan import DRIVER, PARAM_SERVER, Plan, build_plan
from ..program import Program, prepare_feeds, to_python
from ..result import Result, TraceEvent
from .base import Executor, TrainingSession
from .paramserver import ParameterServer
from .worker import Rows, Worker

log = logging.getLogger(__name__)

#: Arrays bigger than this are put in the object store once instead of inlined per call.
INLINE_BYTES = 100 * 1024


def _resolve(items: Sequence[Any]) -> list[Any]:
    """``items`` with every ObjectRef replaced by its value, fetched in one ``ray.get``."""
    at = [i for i, v in enumerate(items) if isinstance(v, ray.ObjectRef)]
    out = list(items)
    if at:
        for i, value in zip(at, ray.get([out[i] for i in at])):
            out[i] = value
    return out


class _RayWorker(Worker):
    # progress() must answer while run_task is busy, so it gets its own concurrency group.
    # ray.method returns the function it tags, but its stub types it as an actor handle's method.
    @ray.method(concurrency_group="control")
    def progress(self) -> dict[str, Any] | None:  # type: ignore[override]
        return Worker.progress(self)

    # Ray keeps a task's results of up to 100 KiB in the caller's process, and the driver is
    # the caller of every task: with data_path="store", values for other workers and the
    # server are put in the object store here instead (owned by this worker) and only their
    # reference is returned, which the receiver, given it as a top-level argument, finds
    # nested and fetches itself.
    def _send(self, values: dict[str, Any]) -> Any:
        return ray.put(values)

    def _receive(self, items: list[Any]) -> list[Any]:
        return _resolve(items)


class _RayParamServer(ParameterServer):
    """The server as an actor. With data_path="store" gradients arrive by reference from the
    workers, and each worker's new params leave the same way, so neither is stored in the
    driver (the caller of ``stage``)."""

    def stage(self, step_id: int, *grad_dicts: Any, routed: bool = False) -> Any:
        by_ref = any(isinstance(g, ray.ObjectRef) for g in grad_dicts)  # data_path="store"
        out = ParameterServer.stage(self, step_id, *_resolve(grad_dicts), routed=routed)
        if not (routed and by_ref):
            return out
        step, *params = out  # answer the way the gradients came
        return (step, *[ray.put(p) if p else p for p in params])


# Step calls must run in submission order (the worker checks it: see worker.py). Ray documents
# that order for single-threaded actors; a concurrency group makes the actor threaded, so the
# order is pinned explicitly: in-order submission and execution (Ray refuses this setting
# together with max_concurrency > 1), every order-sensitive method in the default group of one
# thread, all called by this driver; only progress() runs beside them.
# (Ray's stub for ray.remote lacks these two actor options; its docstring and runtime take them.)
_WorkerActor = ray.remote(  # type: ignore[call-overload]
    concurrency_groups={"control": 1}, allow_out_of_order_execution=False
)(_RayWorker)
_ParamServerActor = ray.remote(_RayParamServer)


class _EmbeddedRuntime:
    """The Ray runtime an executor of this process started, shared by every executor that
    joined it: it is shut down when the last of them closes, not when the first does."""

    lock = threading.Lock()
    node_id: str | None = None  # the runtime's head node (a new runtime has a new one)
    users = 0

    @classmethod
    def join(cls, started: bool) -> str | None:
        """Count an executor in; returns the runtime's node id if it uses the embedded one."""
        node = ray.get_runtime_context().get_node_id()
        with cls.lock:
            if started:  # this executor started it (any earlier one was shut down)
                cls.node_id, cls.users = node, 1
                return node
            if cls.node_id is not None and node == cls.node_id:
                cls.users += 1
                return node
            return None  # a runtime the user started or joined: never ours to shut down

    @classmethod
    def leave(cls, node: str) -> None:
        """Count an executor out; the last one shuts the runtime down."""
        with cls.lock:
            if node != cls.node_id:
                return  # that runtime is gone already (shut down by the user)
            cls.users -= 1
            if cls.users > 0:
                return
            cls.node_id, cls.users = None, 0
        if ray.is_initialized():
            ray.shutdown()


def fetch(refs: Any, timeout: float | None = None) -> Any:
    """The driver's only way to read values (one place to instrument in tests)."""
    return ray.get(refs, timeout=timeout)


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

    ``data_path``: how values for another worker or the server travel. ``"inline"`` (default)
    returns them from the task; Ray keeps results up to 100 KiB in the caller's process, so
    small values, gradients and params pass through the driver's memory (it never reads them)
    on their way, which is the fastest route for small graphs. ``"store"``: the producer puts
    them in the object store and returns only a reference, so nothing but the requested
    outputs reaches the driver, at the cost of an object-store put per value (about 1-2 ms
    each on a loaded 2-core machine).
    """

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
    ):
        super().__init__(max_bytes)  # a request's estimated memory limit (distgraph.memory)
        self._closed = False
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
        #: Let an embedded Ray start more workers than the machine has CPUs.
        self.oversubscribe = bool(oversubscribe)
        if placement not in ("spread", "pack"):
            raise ConfigError(f"placement must be 'spread' or 'pack', got {placement!r}")
        if not (isinstance(deadline, (int, float)) and deadline > 0):
            raise ConfigError(f"deadline must be a positive number of seconds, got {deadline!r}")
        if data_path not in ("inline", "store"):
            raise ConfigError(f"data_path must be 'inline' or 'store', got {data_path!r}")
        if checkpoint_every and not checkpoint_dir:
            raise ConfigError("checkpoint_every needs checkpoint_dir (a path every node can reach)")
        self.num_workers = num_workers
        self.strategy = strategy
        self.placement = placement
        self.resources = dict(resources_per_worker or {"CPU": 1})
        self.cost = cost or CostModel()
        self.blas_threads = blas_threads
        self.deadline = float(deadline)
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_every = checkpoint_every
        self.max_recoveries = max_recoveries
        #: Training: a worker that computes every gradient of its params applies the optimizer
        #: step to its own copy too, so new params need not come back from the server.
        self.worker_updates = bool(worker_updates)
        self.data_path = data_path
        self.ops_modules = list(ops_modules)
        self.worker_runtime_env = dict(worker_runtime_env) if worker_runtime_env else None
        for module in self.ops_modules:  # the driver builds graphs with these ops too
            importlib.import_module(module)
        self.address = address if address is not None else os.environ.get("RAY_ADDRESS") or None
        self._owns_ray = False
        #: Installed run() plans: key -> (plan, plan id, resident values to reinstall them with).
        self._plans: dict[tuple, tuple[Plan, int, Mapping[str, Any]]] = {}
        self._capacity: float | None = None
        #: How many run() plans stay installed (least recently used ones are dropped).
        self.max_plans = 32
        #: Workers replaced after a crash or node loss, by index.
        self.replacements: list[int] = []
        self._plan_ids = itertools.count(1)
        self._run_steps = itertools.count(1)
        #: (worker, first level, last level, phases) of every actor call of the latest step.
        self.last_calls: list[tuple[int, int, int, tuple[str, ...]]] = []
        self.worker_info: list[dict[str, Any]] = []
        self._pg: PlacementGroup | None = None
        self.workers: list[Any] = []
        self._connect(connect_timeout, dict(ray_init_kwargs or {}))
        #: Node id of the embedded runtime this executor shares (None: not one we started).
        self._embedded = _EmbeddedRuntime.join(self._owns_ray)
        try:
            self._start_workers()
        except BaseException:
            self.close()
            raise

    # Connection and actors ----------------------------------------------------------------------
    def _connect(self, timeout: float, init_kwargs: dict[str, Any]) -> None:
        if ray.is_initialized():
            return
        init_kwargs.setdefault("include_dashboard", False)
        init_kwargs.setdefault("log_to_driver", True)
        init_kwargs.setdefault("configure_logging", False)
        if self.address is None:
            cpus = _machine_cpus()
            need = int(np.ceil(self.resources.get("CPU", 1) * self.num_workers))
            if (
                max(self.num_workers, need) > cpus
                and not self.oversubscribe
                and "num_cpus" not in init_kwargs
            ):
                # Each worker is a process: past the CPU count they only add memory and
                # contention (1000 workers meant ~90 processes and 6 GB before Ray gave up).
                raise ClusterError(
                    f"{self.num_workers} workers need {max(self.num_workers, need)} CPUs but this "
                    f"machine has {cpus}; an embedded Ray runs each worker as a process of its "
                    f"own, so lower num_workers to at most {cpus}, join a cluster with "
                    "address=..., or pass oversubscribe=True (CLI: --oversubscribe)"
                )
            init_kwargs.setdefault("num_cpus", max(cpus, need))
            # "local" starts a new runtime even when another cluster runs on this machine.
            ray.init(address="local", **init_kwargs)
            self._owns_ray = True
            return
        # One deadline for the whole connection: the probe, the token check and ray.init.
        deadline = time.monotonic() + timeout
        _check_reachable(self.address, timeout)
        done: dict[str, Any] = {}
        abandoned = threading.Event()
        decided = threading.Lock()  # connected-in-time and given-up are mutually exclusive
        address = self.address

        def connect() -> None:
            try:
                _check_token(address, max(deadline - time.monotonic(), 0.1))
                if abandoned.is_set():
                    return
                ray.init(address=self.address, **init_kwargs)
                with decided:
                    if abandoned.is_set():  # the caller has given up: do not stay connected
                        ray.shutdown()
                        return
                    done["ok"] = True
            except BaseException as e:  # reported to the caller below
                done["error"] = e

        # Ray's own connection retries have no overall bound, so wait in another thread.
        t = threading.Thread(target=connect, daemon=True, name="distgraph-connect")
        t.start()
        t.join(max(deadline - time.monotonic(), 0.0))
        with decided:
            if "ok" in done:
                return
            abandoned.set()
        err = done.get("error")
        if isinstance(err, ClusterError):
            raise err
        hint = ""
        text = (
            f"{type(err).__name__}: {err}"
            if err
            else f"no answer within connect_timeout={timeout:g} s"
        )
        if (
            err is None
            or isinstance(err, ConnectionError)
            or "auth" in text.lower()
            or "token" in text.lower()
        ):
            hint = (
                "; if the cluster uses token authentication, check that RAY_AUTH_MODE=token and "
                "RAY_AUTH_TOKEN match the cluster's token"
            )
        raise ClusterError(f"could not connect to Ray at {self.address!r}: {text}{hint}")

    def _start_workers(self) -> None:
        bundles = [dict(self.resources) for _ in range(self.num_workers)]
        strategy = "SPREAD" if self.placement == "spread" else "PACK"
        timeout = min(self.deadline, 60.0)
        total = ray.cluster_resources()
        short = {
            k: v * self.num_workers
            for k, v in self.resources.items()
            if v * self.num_workers > total.get(k, 0)
        }
        if short:  # can never fit: say so now instead of waiting for the placement group
            raise ClusterError(
                f"cannot place {self.num_workers} workers with {self.resources} each: they need "
                f"{_fmt_resources(short)} but the cluster has {_fmt_resources(total)} in all; lower "
                "num_workers or resources_per_worker"
            )
        self._pg = placement_group(bundles, strategy=strategy)
        try:
            ray.get(self._pg.ready(), timeout=timeout)
        except GetTimeoutError:
            total = ray.cluster_resources()
            remove_placement_group(self._pg)
            self._pg = None
            raise ClusterError(
                f"cannot place {self.num_workers} workers with {self.resources} each within "
                f"{timeout:.0f} s: the cluster has {_fmt_resources(total)}; lower num_workers or "
                "resources_per_worker"
            ) from None
        self.workers = [self._new_worker(i) for i in range(self.num_workers)]
        self.worker_info = fetch([w.info.remote() for w in self.workers], timeout=timeout)

    def _new_worker(self, index: int, in_group: bool = True) -> Any:
        res = dict(self.resources)
        cpus = res.pop("CPU", 0)
        gpus = res.pop("GPU", 0)
        options: dict[str, Any] = {
            "num_cpus": cpus,
            "num_gpus": gpus,
            "resources": res or None,
            "max_restarts": 0,
        }
        if in_group and self._pg is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                self._pg, placement_group_bundle_index=index
            )
        if self.worker_runtime_env:
            options["runtime_env"] = self.worker_runtime_env
        return _WorkerActor.options(**options).remote(index, self.blas_threads, self.ops_modules)

    def _replace_worker(self, index: int) -> None:
        """Start a fresh worker ``index``: in its placement-group bundle if that can still be
        placed (Ray re-places bundles of a lost node), else anywhere the cluster has room."""
        with contextlib.suppress(Exception):
            ray.kill(self.workers[index])
        timeout = min(self.deadline, 60.0)
        for in_group in (True, False):
            worker = self._new_worker(index, in_group)
            try:
                info = fetch(worker.info.remote(), timeout=timeout)
            except (GetTimeoutError, RayActorError):
                with contextlib.suppress(Exception):
                    ray.kill(worker)
                continue
            self.workers[index] = worker
            self.worker_info[index] = info
            self.replacements.append(index)
            log.warning("replaced worker %d; it now runs on node %s", index, info["node_ip"])
            return
        raise WorkerLostError(
            f"worker {index} died and no node has room for a replacement ({self.resources})"
        )

    def _dead_workers(self) -> list[int]:
        probes = [(i, w.info.remote()) for i, w in enumerate(self.workers)]
        dead = []
        for i, ref in probes:
            try:
                fetch(ref, timeout=30)
            except (RayActorError, GetTimeoutError, RayTaskError):
                dead.append(i)
        return dead

    def recover(self) -> list[int]:
        """Replace dead workers and reinstall the run() plans on them; returns their indices."""
        dead = self._dead_workers()
        self._capacity = None  # nodes may have come or gone
        for i in dead:
            self._replace_worker(i)
            for plan, plan_id, resident in self._plans.values():
                self._install(plan, plan_id, resident, only=[i])
        return dead

    @property
    def nodes(self) -> list[str]:
        """Node IP of each worker, by worker index."""
        return [i["node_ip"] for i in self.worker_info]

    def _check_open(self) -> None:
        # Without workers a closed executor failed with a raw IndexError, and a call reaching
        # Ray after the runtime shut down silently started a new one nobody would stop.
        if self._closed:
            raise ConfigError(
                "this RayExecutor is closed (close() or the end of its with block); "
                "create a new RayExecutor to run or train again"
            )

    def close(self) -> None:
        """Stop the actors, release the placement group, and shut down an embedded Ray."""
        self._closed = True
        for w in self.workers:
            with contextlib.suppress(Exception):
                ray.kill(w)
        self.workers = []
        if self._pg is not None:
            with contextlib.suppress(Exception):
                remove_placement_group(self._pg)
            self._pg = None
        self._plans.clear()
        embedded, self._embedded = getattr(self, "_embedded", None), None
        if embedded is not None:  # shut down only when no other executor uses it
            _EmbeddedRuntime.leave(embedded)
        self._owns_ray = False

    # Planning -----------------------------------------------------------------------------------
    def plan(
        self,
        graph: Graph,
        outputs: Sequence[str] | str | None = None,
        grad: str | None = None,
        *,
        training: bool = False,
        wrt: Sequence[str] | None = None,
    ) -> Plan:
        """The plan this executor would run for a request (not installed)."""
        return self._make_plan(self.program(graph, outputs, grad, wrt), training)

    def _make_plan(self, program: Program, training: bool, batch_size: int = 1) -> Plan:
        cost = self.cost
        if batch_size != cost.batch_size:
            cost = CostModel(**{**cost.__dict__, "batch_size": batch_size})
        placement = partition(program, self.num_workers, self.strategy, cost)
        name = self.strategy if isinstance(self.strategy, str) else "custom"
        return build_plan(
            program, placement, self.num_workers, cost, training=training, strategy=name
        )

    def _installed(
        self,
        program: Program,
        training: bool,
        resident_values: Mapping[str, Any],
        batch: int,
        key_extra: Any = None,
    ) -> tuple[Plan, int]:
        strategy = self.strategy if isinstance(self.strategy, str) else id(self.strategy)
        key = (id(program), training, key_extra, strategy)
        hit = self._plans.get(key)
        if hit is not None and hit[0].program is program:
            self._plans[key] = self._plans.pop(key)  # most recently used last
            return hit[0], hit[1]
        plan = self._make_plan(program, training, batch)
        plan_id = next(self._plan_ids)
        self._check_fits(plan, resident_values)
        try:
            self._install(plan, plan_id, resident_values)
        except BaseException:
            # Cache a plan only once every worker holds it; survivors of a failed install
            # forget it (a dead worker's call fails harmlessly).
            self._uninstall(plan_id)
            raise
        self._plans[key] = (plan, plan_id, resident_values)
        while len(self._plans) > self.max_plans:  # forget the oldest, here and on the workers
            _old, (_p, old_id, _r) = next(iter(self._plans.items()))
            del self._plans[_old]
            self._uninstall(old_id)
        return plan, plan_id

    def _uninstall(self, plan_id: int) -> None:
        """Have every worker forget a plan (without waiting)."""
        for w in self.workers:
            w.uninstall.remote(plan_id)

    def _install(
        self,
        plan: Plan,
        plan_id: int,
        resident_values: Mapping[str, Any],
        only: Sequence[int] | None = None,
        replicas: Mapping[int, Any] | None = None,
    ) -> None:
        prog_ref = ray.put(plan.program)
        calls = []
        for w in only if only is not None else range(len(self.workers)):
            tasks = [t for t in plan.tasks if t.worker == w]
            values = {
                n: resident_values[n] if n in resident_values else plan.program.constants[n]
                for n in plan.resident[w]
            }
            threads = self._plan_threads(plan, w)
            replica = replicas.get(w) if replicas else None
            calls.append(
                self.workers[w].install.remote(plan_id, prog_ref, tasks, values, threads, replica)
            )
        self._get(calls, "installing the plan")

    def _plan_threads(self, plan: Plan, worker: int) -> int | None:
        """BLAS threads for ``worker`` under ``plan``: its node's cores shared by the workers the
        plan keeps busy there, so one active worker uses every core and two split them."""
        if self.blas_threads is not None:
            return self.blas_threads
        info = self.worker_info
        active = {t.worker for t in plan.tasks}
        if worker not in active or worker >= len(info) or "cpus" not in info[worker]:
            return None
        node = info[worker]["node_id"]
        sharing = sum(1 for w in active if w < len(info) and info[w]["node_id"] == node)
        return max(1, int(info[worker]["cpus"] or 1) // max(1, sharing))

    def _object_store_capacity(self) -> float:
        """Bytes of object store on the largest node (one value must fit on one node); asked
        of the cluster once and again after a recovery, not on every step."""
        if self._capacity is None:
            per_node = [
                n.get("Resources", {}).get("object_store_memory", 0.0)
                for n in ray.nodes()
                if n.get("Alive")
            ]
            self._capacity = max(
                per_node, default=ray.cluster_resources().get("object_store_memory", 0.0)
            )
        return self._capacity

    def _check_fits(self, plan: Plan, values: Mapping[str, Any]) -> None:
        """Refuse a param or a predicted cross-worker value that cannot fit in the object store."""
        capacity = self._object_store_capacity()
        if not capacity:
            return
        too_big = [
            (n, int(np.asarray(v).nbytes))
            for n, v in values.items()
            if np.asarray(v).nbytes > capacity
        ]
        too_big += [(v, b) for v, _, b in plan.cross_edges if b > capacity]
        if too_big:
            name, nbytes = max(too_big, key=lambda t: t[1])
            raise ClusterError(
                f"{name!r} needs {nbytes:,} bytes but the object store holds at most {int(capacity):,} "
                "bytes per node; shrink the tensor (smaller batch) or start Ray with a larger "
                "object_store_memory"
            )

    # Running ------------------------------------------------------------------------------------
    def run(
        self,
        graph: Graph,
        feeds: Mapping[str, Any] | None = None,
        outputs: Sequence[str] | str | None = None,
        grad: str | None = None,
        *,
        check_finite: bool = False,
        trace: bool = False,
    ) -> Result:
        """Compute ``outputs`` (and gradients of ``grad``) across the workers."""
        self._check_open()
        t0 = time.time()
        prog = self.program(graph, outputs, grad, feeds=feeds)
        arrays = prepare_feeds(prog, feeds or {}, check_finite)
        self._check_feeds_fit(arrays)
        events: list[TraceEvent] = []
        for attempt in range(self.max_recoveries + 1):
            step = next(self._run_steps)
            try:
                # Installing is inside the recovery loop: a worker that died while the executor
                # was idle is found here, replaced, and the plan installed on its successor.
                plan, plan_id = self._installed(
                    prog, False, graph._params, _batch_size(prog, arrays), key_extra=graph.version
                )
                t_submit = time.time()
                refs = self._submit(plan, plan_id, step, arrays, {}, trace, check_finite)
                got = self._finish(plan, plan_id, step, refs, extra=[])
                break
            except WorkerLostError:
                if attempt == self.max_recoveries:
                    raise
                log.warning("a worker died during a run; replacing it and running again")
                self.recover()
        env: dict[str, Any] = {}
        for d in got["driver"]:
            env.update(d)
        env.update(arrays)
        env.update({p: graph._params[p] for p in prog.params})
        env.update(prog.constants)
        if trace:
            events.append(TraceEvent("plan", "call", "plan", -1, "driver", t0, t_submit))
            events.append(
                TraceEvent(f"step {step}", "call", "step", -1, "driver", t_submit, time.time())
            )
            for w in sorted({t.worker for t in plan.tasks}):
                events.extend(fetch(self.workers[w].take_trace.remote(plan_id, step)))
            events.extend(_transfer_events(plan, events))
        return Result(
            values={o: to_python(env[o]) for o in prog.outputs},
            grads={leaf: to_python(env[node]) for leaf, node in prog.grads.items()},
            trace=sorted(events, key=lambda e: e.start),
            placement=dict(plan.placement),
            levels=[list(lv) for lv in prog.levels],
        )

    def _check_feeds_fit(self, arrays: Mapping[str, np.ndarray]) -> None:
        big = {n: a for n, a in arrays.items() if a.nbytes > INLINE_BYTES}
        if big:
            capacity = self._object_store_capacity()
            for name, arr in big.items():
                if capacity and arr.nbytes > capacity:
                    raise ClusterError(
                        f"feed {name!r} is {arr.nbytes:,} bytes but the object store holds at most "
                        f"{int(capacity):,} bytes per node; feed smaller batches or start Ray with a "
                        "larger object_store_memory"
                    )

    def _submit(
        self,
        plan: Plan,
        plan_id: int,
        step: int,
        feeds: Mapping[str, np.ndarray],
        param_updates: Mapping[int, Any],
        trace: bool,
        check_finite: bool,
        training: bool = False,
    ) -> dict[int, list[Any]]:
        """Submit every task of a step; returns each task's output refs. ``training``: ``step``
        is a training step id, which stochastic ops (dropout) draw from (flag bit 4)."""
        small: dict[str, Any] = {}
        big: dict[str, Any] = {}
        for name, arr in feeds.items():
            if isinstance(arr, _RowsFeed):
                small[name], big[name] = Rows(arr.index), arr.ref
            elif arr.nbytes <= INLINE_BYTES:
                small[name] = arr
        refs: dict[int, list[Any]] = {}
        pending_update = dict(param_updates)
        self.last_calls = []
        base_flags = (1 if trace else 0) | (2 if check_finite else 0)
        if self.data_path == "store":
            base_flags |= 8
        if training:
            base_flags |= 16
        for task in plan.tasks:
            args: list[Any] = []
            flags = base_flags
            update = pending_update.pop(task.worker, None)
            if update is not None:
                args.append(update)
                flags |= 4
            for n in task.feeds:
                if n not in small and n not in big:
                    # Put a large feed when its first task goes out, so the first worker can
                    # start while the driver is still putting the other workers' feeds.
                    big[n] = ray.put(feeds[n])
            if task.feeds:
                # Each argument costs Ray a round of bookkeeping: pack the small feeds into one.
                args.append({n: small[n] for n in task.feeds if n in small})
                args.extend(big[n] for n in task.feeds if n in big)
            args.extend(refs[src][slot] for src, slot, _ in task.imports)
            n_out = max(1, len(task.outputs))
            out = (
                self.workers[task.worker]
                .run_task.options(num_returns=n_out)
                .remote(plan_id, step, task.id, flags, *args)
            )
            refs[task.id] = list(out) if n_out > 1 else [out]
            self.last_calls.append(
                (task.worker, task.first_level, task.last_level, tuple(task.phases))
            )
        # Workers with no task this step still take their new params now, so none goes stale.
        for w, update in pending_update.items():
            self.workers[w].set_resident.remote(plan_id, update)
        return refs

    def _finish(
        self, plan: Plan, plan_id: int, step: int, refs: dict[int, list[Any]], extra: list[Any]
    ) -> dict[str, Any]:
        """Wait for the step (bounded by the deadline), then fetch the driver's outputs only."""
        driver = [
            refs[t.id][t.slot(DRIVER)] for t in plan.tasks if any(d == DRIVER for d, _ in t.outputs)
        ]
        try:
            # Every task feeds the driver's outputs or the parameter server (the program holds
            # only needed nodes), so one bounded get waits for the whole step.
            values = self._get(driver + list(extra), "running the step")
        except WaveTimeoutError:
            every = [r for rs in refs.values() for r in rs] + list(extra)
            _ready, pending = ray.wait(every, num_returns=len(every), timeout=0, fetch_local=False)
            for w in self.workers:
                w.drop_step.remote(plan_id, step)
            raise self._timeout_error(plan, plan_id, step, refs, set(pending)) from None
        except BaseException:
            for w in self.workers:
                w.drop_step.remote(plan_id, step)
            raise
        return {"driver": values[: len(driver)], "extra": values[len(driver) :]}

    def _get(self, refs: list[Any], what: str) -> list[Any]:
        try:
            return fetch(refs, timeout=self.deadline)
        except RayTaskError as e:
            cause = _root_cause(e)
            if isinstance(cause, DistgraphError):
                raise cause from None
            if isinstance(cause, RayActorError):
                raise WorkerLostError(f"a worker died while {what}: {cause}") from cause
            if isinstance(cause, ObjectLostError):  # its producer (and owner) died
                raise WorkerLostError(
                    f"a worker's values were lost while {what}: {cause}"
                ) from cause
            raise
        except RayActorError as e:
            raise WorkerLostError(f"a worker died while {what}: {e}") from e
        except GetTimeoutError:
            raise WaveTimeoutError(
                f"no answer within the deadline of {self.deadline:.0f} s while {what}"
            ) from None

    def _timeout_error(
        self, plan: Plan, plan_id: int, step: int, refs: dict[int, list[Any]], pending: set
    ) -> WaveTimeoutError:
        waiting = [t for t in plan.tasks if any(r in pending for r in refs.get(t.id, []))]
        running: list[str] = []
        probes = {t.worker: self.workers[t.worker].progress.remote() for t in waiting}
        for w, ref in probes.items():
            try:
                info = ray.get(ref, timeout=5)
            except Exception:
                info = None
            if (
                info
                and info.get("step") == step
                and info.get("plan") == plan_id
                and info.get("node")
            ):
                node = info["node"]
                phase = plan.program.nodes[node].phase
                running.append(
                    f"node {node!r} ({phase}, level {info['level']}) running on worker {w}"
                )
        pending_nodes = [
            f"{n} (level {plan.program.level[n]}, {plan.program.nodes[n].phase}, worker {t.worker})"
            for t in waiting
            for n in t.nodes
        ]
        first = waiting[0] if waiting else None
        where = (
            f"{'/'.join(first.phases)} wave, levels {first.first_level}-{first.last_level} on worker {first.worker}"
            if first
            else "the parameter server"
        )
        shown = ", ".join(pending_nodes[:12]) + (
            f", ... {len(pending_nodes) - 12} more" if len(pending_nodes) > 12 else ""
        )
        msg = f"step {step} passed its deadline of {self.deadline:g} s in the {where}"
        if running:
            msg += "; " + "; ".join(running)
        msg += f"; nodes still pending: {shown or 'none (waiting for the parameter server)'}"
        return WaveTimeoutError(msg)

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
        self._check_open()
        return _RaySession(self, graph, loss, optimizer, store, check_finite)


class _RaySession(TrainingSession):
    """Training on the executor's workers with a parameter-server actor.

    Recovery: a step that loses a worker is run again (same step id, same feeds) after the
    executor replaces the worker and this session reinstalls its plan with the parameter
    server's current params. A lost parameter server is restarted from its latest checkpoint
    (or the initial state) and the steps it had applied since are replayed through ``replay``
    (the Trainer's deterministic batch order) before the failed step runs again.

    Outcome of a step: it counts (``_done``) from the moment the driver sends its commit, and a
    counted step is applied exactly once (by the commit, or by a replay if the commit finds
    nothing staged). A step that fails before that is aborted: never applied, not counted,
    and the workers are reset to the server's state. If an interrupt lands while the commit
    is being sent, the server's answer decides (``_settle``, ``step_applied``).
    """

    def __init__(
        self,
        ex: RayExecutor,
        graph: Graph,
        loss: str,
        optimizer: Optimizer,
        store: ParameterStore,
        check_finite: bool,
    ):
        self.ex, self.graph, self.optimizer, self.check_finite = ex, graph, optimizer, check_finite
        self._loss_name, self._wrt = loss, list(store.params)
        self._prog: Program | None = None  # compiled by the first use (see ``prog``)
        self.plan: Plan | None = None
        self.plan_id = 0
        self._initial = store.to_checkpoint()
        self.ps: Any = None
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
        self._pending: Any = None  # status ref of the server's latest update, not yet awaited
        self._recovering = False
        #: (step id, ref of the server's answer): a step whose failure came while its commit
        #: was being sent; decided before the session's next step (see ``_settle``).
        self._unsettled: tuple[int, Any] | None = None
        self._unrecovered = False  # a step gave up on a lost worker: recover before the next

    @property
    def prog(self) -> Program:
        """The training program, compiled on first use: opening a session never fails on the
        graph (a loss that is not a scalar is refused by the first step)."""
        if self._prog is None:
            self._prog = self.ex.training_program(self.graph, self._loss_name, self._wrt)
        return self._prog

    @property
    def loss(self) -> str:
        """The loss node's name in the program."""
        return self.prog.outputs[0]

    def _ensure(self, batch: int) -> None:
        if self.plan is not None:
            return
        ex = self.ex
        self.plan = ex._make_plan(self.prog, training=True, batch_size=batch)
        self.plan_id = next(ex._plan_ids)
        ex._check_fits(self.plan, self._initial.params)
        # Clipping needs every gradient's share of the global norm: only the server has them.
        if ex.worker_updates and self.optimizer.clip_norm is None:
            self.replicas, self.pipelined = replica_layout(self.plan)
        #: Workers that take their params from the server after each step: those that keep
        #: params and no replica (the others would only be sent empty updates).
        self.takers = [
            w
            for w in range(ex.num_workers)
            if w not in self.replicas and any(p in self.prog.params for p in self.plan.resident[w])
        ]
        self._start_ps(self._initial)
        try:
            ex._install(
                self.plan,
                self.plan_id,
                self._initial.params,
                replicas=self._replicas(self._initial),
            )
        except WorkerLostError:
            raise  # the step's recovery replaces the worker and installs the plan on it
        except BaseException:
            ex._uninstall(self.plan_id)
            with contextlib.suppress(Exception):
                ray.kill(self.ps)
            self.plan, self.ps = None, None  # nothing half-installed stays: the next step retries
            raise

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
        state = self.ps.checkpoint.remote()
        for w in self.replicas:
            self.ex.workers[w].set_replica.remote(self.plan_id, state)

    def _start_ps(self, ckpt: Checkpoint) -> None:
        """Start the parameter server from ``ckpt``. The first start also claims
        ``checkpoint_dir`` for this run: a directory holding another run's checkpoint is
        refused (a restart would otherwise adopt it), else this run's state is written there."""
        assert self.plan is not None
        first = self.ps is None
        directory = self.ex.checkpoint_dir
        if first and directory and is_checkpoint(directory):
            other = checkpoint_run_id(directory)
            if other != ckpt.run_id:
                self.plan = None  # nothing was started: the next step tries again
                raise foreign_run_error(directory, other)
        routes = {
            w: []
            if w in self.replicas
            else [p for p in self.plan.resident[w] if p in self.prog.params]
            for w in range(self.ex.num_workers)
        }
        self.ps = _ParamServerActor.options(num_cpus=0, max_restarts=0).remote(
            ckpt.params,
            self.optimizer,
            routes,
            self.prog.grads,
            directory,
            self.ex.checkpoint_every,
        )
        calls = [self.ps.restore.remote(ckpt)]
        progress = getattr(self, "_progress", None)
        if progress is not None:  # newer than the checkpoint's: the fit under way
            calls.append(self.ps.set_progress.remote(progress))
        if first and directory:
            calls.append(self.ps.save.remote(directory))
        try:
            self.ex._get(calls, "starting the parameter server")
        except BaseException:
            if first:
                with contextlib.suppress(Exception):
                    ray.kill(self.ps)
                self.ps, self.plan = None, None
            raise

    def set_progress(self, progress: Mapping[str, Any]) -> None:
        """The Trainer's progress (epoch, fit segments, history) for the server's checkpoints;
        sent without waiting (the server takes it in order with the updates)."""
        self._progress = dict(progress)
        if self.ps is not None:
            self.ps.set_progress.remote(self._progress)

    def step(self, step_id: int, feeds: Mapping[str, Any], trace: bool = False) -> float:
        arrays = prepare_feeds(self.prog, feeds, self.check_finite)
        self.ex._check_feeds_fit(arrays)
        return self._run_step(step_id, arrays, trace, _batch_size(self.prog, arrays))

    def attach(self, data: Mapping[str, Any]) -> Any:
        """Check the training arrays once and put the large ones in the object store, so a
        step sends only its row indices (the workers take the rows themselves)."""
        try:
            arrays = prepare_feeds(self.prog, data, self.check_finite)
            self.ex._check_feeds_fit(arrays)
        except DistgraphError:
            return super().attach(data)  # each step then reports its own problem, as before
        large = {k: v for k, v in arrays.items() if v.nbytes > INLINE_BYTES}
        capacity = self.ex._object_store_capacity()
        if capacity and sum(v.nbytes for v in large.values()) > capacity / 4:
            return super().attach(data)  # too big to keep a copy: batches travel per step
        shipped = {k: ray.put(v) for k, v in large.items()}
        return _Attached(arrays, shipped)

    def step_rows(self, step_id: int, data: Any, rows: Any, trace: bool = False) -> float:
        if not isinstance(data, _Attached):
            return super().step_rows(step_id, data, rows, trace)
        index = np.asarray(rows)
        feeds: dict[str, Any] = {
            k: _RowsFeed(data.shipped[k], index) if k in data.shipped else v[index]
            for k, v in data.arrays.items()
        }
        return self._run_step(step_id, feeds, trace, len(index))

    def _run_step(self, step_id: int, arrays: Mapping[str, Any], trace: bool, batch: int) -> float:
        self.ex._check_open()
        if self._unrecovered and self.plan is not None:
            # An earlier step gave up on a lost worker or server (or its recovery failed):
            # recover first, so the workers are whole again and the steps counted that the
            # server never applied are replayed before this one runs.
            self._recover(None)
            self._unrecovered = False
        try:
            for attempt in range(self.ex.max_recoveries + 1):
                try:
                    # Inside the recovery loop: a worker that died while idle fails the
                    # install, and is replaced like one lost during a step.
                    self._ensure(batch)
                    return self._step_once(step_id, arrays, trace)
                except WorkerLostError as e:
                    if attempt == self.ex.max_recoveries:
                        raise
                    log.warning("step %d lost a worker (%s); recovering", step_id, e)
                    self._unrecovered = True  # until the recovery below is complete
                    if self.plan is None:  # lost before the plan was placed: workers only
                        self.ex.recover()
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
        plan, ex = self.plan, self.ex
        assert plan is not None
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
        pending, self._pending = self._pending, None
        committing = False
        try:
            refs = ex._submit(
                plan,
                self.plan_id,
                step_id,
                arrays,
                updates,
                trace,
                self.check_finite,
                training=True,
            )
            grads = [
                refs[t.id][t.slot(PARAM_SERVER)]
                for t in plan.tasks
                if any(d == PARAM_SERVER for d, _ in t.outputs)
            ]
            if self.takers:  # the new params are computed with the update: no extra trip
                out = self.ps.stage.options(num_returns=1 + ex.num_workers).remote(
                    step_id, *grads, routed=True
                )
                staged, routed = out[0], {w: out[1 + w] for w in self.takers}
            else:
                staged, routed = self.ps.stage.remote(step_id, *grads), {}
            extra = [pending] if pending is not None else []
            if not defer:
                extra.append(staged)
            got = ex._finish(plan, self.plan_id, step_id, refs, extra=extra)
            # The step succeeded: from the commit on it counts, and it is applied (now, or by
            # a replay should its gradients never reach the server).
            committing = True
            status_ref = self._commit(step_id)
            if step_id not in self._done:
                self._done.append(step_id)
            # The server's answer to the commit, read only for a trace.
            status: dict[str, Any] = (
                ex._get([status_ref], "applying the update")[0] if trace else {}
            )
        except BaseException as e:
            self._abandon(step_id, committing, pending, e)
            raise
        self._pending = None if trace else status_ref
        self._updates = routed
        if trace:
            self.last_trace = self._step_trace(step_id, t_submit, status)
        return float(next(d[self.loss] for d in got["driver"] if self.loss in d))

    def _commit(self, step_id: int) -> Any:
        """Submit the server's commit of ``step_id``; returns the ref of its status."""
        return self.ps.commit.remote(step_id)

    def _abandon(
        self, step_id: int, committing: bool, pending: Any, error: BaseException | None = None
    ) -> None:
        """After a failed step: make sure it is never applied (or learn that it was), and put
        every worker back in step with the server.

        ``committing``: the failure came after the driver started sending the commit (an
        interrupt), so the server decides; its answer is awaited here (bounded) and otherwise
        before the session's next call."""
        ex, ps = self.ex, self.ps
        assert self.plan is not None
        for w in ex.workers:  # values a failed step left behind (harmless if already gone)
            with contextlib.suppress(Exception):
                w.drop_step.remote(self.plan_id, step_id)
        if ps is None:
            return
        if self._pending is None and not self._reported(pending, error):
            self._pending = pending  # the previous step's commit may not have been awaited
        # Runs after the step's stage and any commit sent: its answer is final, and an update
        # the server still holds (gradients of a step that timed out) is dropped.
        aborted = ps.abort.remote(step_id)
        if committing:
            self._unsettled = (step_id, aborted)
            with contextlib.suppress(Exception):
                self._settle()
        # The workers that take params from the server get its current ones, and replicas are
        # reset to its state: both are read after the abort, whatever the outcome was.
        self._updates = {w: ps.params_of.remote(w) for w in self.takers}
        self._reset_replicas()

    def _reported(self, pending: Any, error: BaseException | None) -> bool:
        """Whether the earlier commit ``pending`` failed with ``error``, the error this failed
        step raises: kept, it would fail every later call of the session with the same error
        (a checkpoint the server could not write made even ``Trainer.close`` raise)."""
        if pending is None or error is None or not ray.wait([pending], timeout=0)[0]:
            return pending is None
        try:
            self.ex._get([pending], "applying the latest update")
        except BaseException as e:  # compared with the step's error, not handled
            return type(e) is type(error) and str(e) == str(error)
        return False

    def _settle(self) -> None:
        """Decide a step whose failure came while its commit was being sent."""
        if self._unsettled is None:
            return
        step_id, answer = self._unsettled
        try:
            applied = self.ex._get([answer], f"settling step {step_id}")[0]
        except WorkerLostError:
            # The server died since: ask the one that replaced it (it restarts from this
            # run's checkpoint and replays the counted steps; the question is still open).
            self._unsettled = None
            try:
                applied = self._ps_call("abort", step_id)
            except BaseException:
                self._unsettled = (step_id, answer)
                raise
        self._unsettled = None
        if applied and step_id not in self._done:
            self._done.append(step_id)

    def step_applied(self, step_id: int) -> bool:
        """Whether step ``step_id`` counts as applied (asked after a step call raised)."""
        self._settle()
        return step_id in self._done

    def _step_trace(
        self, step_id: int, t_submit: float, status: dict[str, Any]
    ) -> list[TraceEvent]:
        plan, ex = self.plan, self.ex
        assert plan is not None
        events = [
            TraceEvent(f"step {step_id}", "call", "step", -1, "driver", t_submit, time.time())
        ]
        for w in sorted({t.worker for t in plan.tasks}):
            events.extend(fetch(ex.workers[w].take_trace.remote(self.plan_id, step_id)))
        events.extend(_transfer_events(plan, events))
        events.append(
            TraceEvent(
                f"apply step {step_id}",
                "update",
                "update",
                -1,
                "parameter server",
                status["start"],
                status["end"],
                args={"version": status["version"]},
            )
        )
        return sorted(events, key=lambda e: e.start)

    def _ps_alive(self) -> bool:
        try:
            fetch(self.ps.status.remote(), timeout=30)
            return True
        except (RayActorError, GetTimeoutError, RayTaskError):
            return False

    def _recover(self, failed_step: int | None) -> None:
        self._recovering = True
        try:
            self._recover_once(failed_step)
        finally:
            self._recovering = False

    def _recover_once(self, failed_step: int | None) -> None:
        ex = self.ex
        assert self.plan is not None
        replaced = ex.recover()
        if replaced:
            self.recoveries.append(f"step {failed_step}: replaced workers {replaced}")
        self._pending = None  # its outcome is read from the server's state below
        if self._ps_alive():
            params = self._ps_call("worker_params")
            state = self._ps_call("checkpoint") if self.replicas else None
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
                ex._install(self.plan, self.plan_id, values, [w], self._replicas(state, [w]))
            # Survivors may or may not have taken the last update before the failure: resend it.
            self._updates = {w: params[w] for w in self.takers}
            self._reset_replicas()
            # A pipelined step can have finished on its worker and still never reached the
            # server (its gradients lost with a node): run it again.
            self._replay(failed_step, self._ps_call("status")["applied"])
            return
        ckpt = self._latest_checkpoint()
        with contextlib.suppress(Exception):
            ray.kill(self.ps)
        self._start_ps(ckpt)
        self.recoveries.append(
            f"step {failed_step}: parameter server restarted from version {ckpt.step}"
        )
        state = self._ps_call("checkpoint")
        ex._install(self.plan, self.plan_id, state.params, replicas=self._replicas(state))
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

    def _latest_checkpoint(self) -> Checkpoint:
        """This run's checkpoint in ``checkpoint_dir`` if there is one, else the initial state
        (another run's checkpoint is never adopted: its steps are not this run's)."""
        path = self.ex.checkpoint_dir
        if path and is_checkpoint(path):
            ckpt = load_checkpoint(path)
            if ckpt.run_id == self._initial.run_id and set(ckpt.params) == set(
                self._initial.params
            ):
                return ckpt
            log.warning("%s holds another run's checkpoint; restarting from this run's start", path)
        return self._initial

    def _drain(self) -> None:
        """Wait for a deferred update, recovering (and replaying) if the server died."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            self.ex._get([pending], "applying the latest update")
        except WorkerLostError as e:
            log.warning("the parameter server was lost after the last step (%s); recovering", e)
            self._recover(None)

    def _ps_call(self, method: str, *args: Any) -> Any:
        if self.ps is None:
            return None
        self._drain()
        what = f"calling the parameter server's {method}"
        try:
            return self.ex._get([getattr(self.ps, method).remote(*args)], what)[0]
        except WorkerLostError as e:
            if self._recovering:
                raise
            # A read after the server died: restart it (checkpoint + replay), then ask again.
            log.warning("the parameter server was lost (%s); recovering", e)
            self._recover(None)
            return self.ex._get([getattr(self.ps, method).remote(*args)], what)[0]

    @property
    def params(self) -> dict[str, Any]:
        if self.ps is None:
            return dict(self._initial.params)
        return self._ps_call("params")

    @property
    def applied_steps(self) -> list[int]:
        if self.ps is None:
            return list(self._initial.applied_steps)
        return self._ps_call("status")["applied"]

    def status(self) -> dict[str, Any]:
        """The parameter server's version, applied step ids and ignored duplicates."""
        return self._ps_call("status")

    def checkpoint(self) -> Checkpoint:
        if self.ps is None:
            return self._initial
        return self._ps_call("checkpoint")

    def save(self, path: str) -> None:
        """Have the parameter server write its checkpoint to ``path`` (on the PS's node)."""
        if self.ps is None:
            save_checkpoint(path, self._initial, same_run=True)
            return
        self._ps_call("save", str(path))

    def restore(self, ckpt: Checkpoint) -> None:
        self._unsettled = None  # the restored state decides every step from here on
        self._done = list(ckpt.applied_steps)
        if self.ps is None:
            self._initial = ckpt
            return
        self._ps_call("restore", ckpt)
        params = self._ps_call("worker_params")
        self._updates = {w: params[w] for w in self.takers}
        self._reset_replicas()

    def close(self) -> None:
        if self.ps is not None:
            with contextlib.suppress(Exception):
                self._drain()  # surface nothing here: the state is read before closing
            with contextlib.suppress(Exception):
                ray.kill(self.ps)
            self.ps = None
        if self.plan is not None:
            for w in self.ex.workers:
                w.uninstall.remote(self.plan_id)
            self.plan = None


# --- helpers ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Attached:
    """A training set checked once: its arrays, and object refs of the large ones."""

    arrays: dict[str, np.ndarray]
    shipped: dict[str, Any]


@dataclass(frozen=True)
class _RowsFeed:
    """A step's feed as rows of a shipped array."""

    ref: Any
    index: np.ndarray


def _batch_size(program: Program, arrays: Mapping[str, np.ndarray]) -> int:
    for name in program.inputs:
        shape = program.nodes[name].shape
        if shape and None in shape and name in arrays:
            return int(arrays[name].shape[list(shape).index(None)])
    return 1


def replica_layout(plan: Plan) -> tuple[dict[int, dict[str, str]], bool]:
    """Which workers can update their own params, and whether steps can be pipelined.

    A worker can when every gradient of the params it keeps is computed on it (its last task
    of a step then holds them all). Steps can be pipelined when every param-holding worker can,
    and every task that sends gradients also answers the driver (so the driver's outputs
    arriving proves the whole step succeeded)."""
    prog = plan.program
    home: dict[str, int] = {}
    for t in plan.tasks:
        for dest, names in t.outputs:
            if dest == PARAM_SERVER:
                home.update(dict.fromkeys(names, t.worker))
    replicas: dict[int, dict[str, str]] = {}
    holders = set()
    for w, names in plan.resident.items():
        params = [p for p in names if p in prog.params and p in prog.grads]
        if not params:
            continue
        holders.add(w)
        if all(home.get(prog.grads[p]) == w for p in params):
            replicas[w] = {p: prog.grads[p] for p in params}
    answers = all(
        any(d == DRIVER for d, _ in t.outputs)
        for t in plan.tasks
        if any(d == PARAM_SERVER for d, _ in t.outputs)
    )
    return replicas, bool(replicas) and holders == set(replicas) and answers


def _root_cause(e: BaseException) -> BaseException:
    seen = 0
    while isinstance(e, RayTaskError) and seen < 32:
        cause = getattr(e, "cause", None)
        if cause is None:
            break
        e = cause
        seen += 1
    return e


#: The HTTP/2 client preface and an empty SETTINGS frame: what a gRPC client sends first.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def _check_reachable(address: str, timeout: float) -> None:
    """Fail within ``timeout`` when nothing at ``address`` answers like Ray's GCS would.

    The GCS is a gRPC server: it sends its HTTP/2 settings as soon as a connection opens. A
    port that accepts and then stays silent would hold Ray's own client for minutes, so
    silence is refused here. Any answer at all (a TLS alert included) passes: ray.init then
    reports in its own words.
    """
    if address in ("auto", "local") or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(
            f"could not connect to Ray at {address!r}: expected 'host:port', 'auto' or 'ray://host:port'"
        )
    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    except TimeoutError:
        raise ClusterError(
            f"could not connect to Ray at {address!r}: the connection did not open within "
            f"connect_timeout={timeout:g} s (is the head node running and reachable?)"
        ) from None
    except OSError as e:
        raise ClusterError(
            f"could not connect to Ray at {address!r}: {e} (is the head node running and reachable?)"
        ) from None
    with sock:
        try:
            sock.sendall(_H2_PREFACE)
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.recv(1)  # b"" (the peer closed) counts as an answer too
        except TimeoutError:
            raise ClusterError(
                f"could not connect to Ray at {address!r}: no answer within "
                f"connect_timeout={timeout:g} s (something accepts connections there but never "
                "answers like a Ray head node; is this the GCS port, 6379 by default?)"
            ) from None
        except OSError:  # reset by the peer, say: an answer of sorts; ray.init will explain
            pass


def _check_token(address: str, timeout: float = 5.0) -> None:
    """Ask the GCS once before ray.init, whose own retries would hide a refused token."""
    if address in ("auto", "local") or address.startswith("ray://"):
        return
    try:
        # Ray's CLI probes the same way (ray health-check). The compiled module has GcsClient
        # (Ray imports it from there too); its _raylet.pyi lists only the id types and ObjectRef.
        from ray._raylet import GcsClient  # type: ignore[attr-defined]
    except ImportError:
        return
    try:
        GcsClient(address=address).internal_kv_get(
            b"distgraph-probe", None, timeout=min(timeout, 5.0)
        )
    except ray.exceptions.AuthenticationError as e:
        raise ClusterError(
            f"could not connect to Ray at {address!r}: the cluster refused the authentication "
            f"token ({str(e).splitlines()[0][:160]}); set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN "
            "to the cluster's token"
        ) from None
    except Exception:  # anything else: let ray.init report it in its own words
        return


def _machine_cpus() -> int:
    """CPUs this process may run on (its affinity mask, where the OS reports one)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _fmt_resources(res: Mapping[str, float]) -> str:
    keep = {
        k: v
        for k, v in res.items()
        if not k.startswith(("node:", "memory", "object_store", "bundle_group"))
        and "_group_" not in k
    }
    return ", ".join(f"{v:g} {k}" for k, v in sorted(keep.items())) or "no resources"


def _transfer_events(plan: Plan, events: list[TraceEvent]) -> list[TraceEvent]:
    """One event per cross-worker value: from the producer's end to the consumer's start."""
    end = {e.name: e.end for e in events if e.kind == "node"}
    start = {(e.name, e.worker): e.start for e in events if e.kind == "node"}
    consumers = plan.program.consumers
    out = []
    for value, dst, nbytes in plan.cross_edges:
        first = [start[(c, dst)] for c in consumers.get(value, []) if (c, dst) in start]
        if value in end and first:
            out.append(
                TraceEvent(
                    f"{value} -> worker {dst}",
                    "transfer",
                    plan.program.nodes[value].phase,
                    plan.program.level[value],
                    f"worker {dst}",
                    end[value],
                    max(end[value], min(first)),
                    worker=dst,
                    args={"bytes": nbytes, "from": plan.placement[value]},
                )
            )
    return out
