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
3. training only: submit ``ps.apply(step, *gradient refs)``; its per-worker results are passed
   to each worker's first task of the next step;
4. wait once for the step's end, bounded by ``deadline``; fetch only the requested outputs.
Only this module imports ``ray``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ..checkpoint import Checkpoint
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
from .worker import Worker

log = logging.getLogger(__name__)

#: Arrays bigger than this are put in the object store once instead of inlined per call.
INLINE_BYTES = 100 * 1024


class _RayWorker(Worker):
    # progress() must answer while run_task is busy, so it gets its own concurrency group.
    @ray.method(concurrency_group="control")
    def progress(self) -> dict[str, Any] | None:
        return Worker.progress(self)


_WorkerActor = ray.remote(concurrency_groups={"control": 1})(_RayWorker)
_ParamServerActor = ray.remote(ParameterServer)


def fetch(refs: Any, timeout: float | None = None) -> Any:
    """The driver's only way to read values (one place to instrument in tests)."""
    return ray.get(refs, timeout=timeout)


class RayExecutor(Executor):
    """Run graphs on ``num_workers`` Ray worker actors.

    ``address=None`` (and no ``RAY_ADDRESS``) starts an embedded local Ray and shuts it down on
    ``close()``; ``"auto"`` or ``"host:port"`` joins a running cluster and leaves it running; an
    already initialised Ray is reused as it is. ``strategy`` is ``"mincut"``, ``"level"``,
    ``"round_robin"``, a callable or a ``{node: worker}`` dict. ``placement="spread"`` asks Ray
    to put workers on distinct nodes, ``"pack"`` on as few as possible.
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
        ray_init_kwargs: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 1:
            raise ConfigError(f"num_workers must be an int >= 1, got {num_workers!r}")
        if placement not in ("spread", "pack"):
            raise ConfigError(f"placement must be 'spread' or 'pack', got {placement!r}")
        if not (isinstance(deadline, (int, float)) and deadline > 0):
            raise ConfigError(f"deadline must be a positive number of seconds, got {deadline!r}")
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
        self.address = address if address is not None else os.environ.get("RAY_ADDRESS") or None
        self._owns_ray = False
        self._plans: dict[tuple, tuple[Plan, int]] = {}
        self._plan_ids = itertools.count(1)
        self._run_steps = itertools.count(1)
        #: (worker, first level, last level, phases) of every actor call of the latest step.
        self.last_calls: list[tuple[int, int, int, tuple[str, ...]]] = []
        self.worker_info: list[dict[str, Any]] = []
        self._pg = None
        self.workers: list[Any] = []
        self._connect(connect_timeout, dict(ray_init_kwargs or {}))
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
            need = int(np.ceil(self.resources.get("CPU", 1) * self.num_workers))
            init_kwargs.setdefault("num_cpus", max(os.cpu_count() or 1, need))
            ray.init(**init_kwargs)
            self._owns_ray = True
            return
        _check_reachable(self.address, timeout)
        _check_token(self.address)
        done: dict[str, Any] = {}

        def connect() -> None:
            try:
                ray.init(address=self.address, **init_kwargs)
                done["ok"] = True
            except BaseException as e:  # reported to the caller below
                done["error"] = e

        t = threading.Thread(target=connect, daemon=True, name="distgraph-connect")
        t.start()
        t.join(timeout)
        if "ok" in done:
            return
        err = done.get("error")
        hint = ""
        text = f"{type(err).__name__}: {err}" if err else f"no answer within {timeout:.0f} s"
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

    def _new_worker(self, index: int) -> Any:
        res = dict(self.resources)
        cpus = res.pop("CPU", 0)
        gpus = res.pop("GPU", 0)
        return _WorkerActor.options(
            num_cpus=cpus,
            num_gpus=gpus,
            resources=res or None,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                self._pg, placement_group_bundle_index=index
            ),
            max_restarts=0,
        ).remote(index, self.blas_threads)

    @property
    def nodes(self) -> list[str]:
        """Node IP of each worker, by worker index."""
        return [i["node_ip"] for i in self.worker_info]

    def close(self) -> None:
        """Stop the actors, release the placement group, and shut down an embedded Ray."""
        for w in self.workers:
            with contextlib.suppress(Exception):
                ray.kill(w)
        self.workers = []
        if self._pg is not None:
            with contextlib.suppress(Exception):
                remove_placement_group(self._pg)
            self._pg = None
        self._plans.clear()
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
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
            return hit
        plan = self._make_plan(program, training, batch)
        plan_id = next(self._plan_ids)
        self._install(plan, plan_id, resident_values)
        self._plans[key] = (plan, plan_id)
        return plan, plan_id

    def _install(self, plan: Plan, plan_id: int, resident_values: Mapping[str, Any]) -> None:
        prog_ref = ray.put(plan.program)
        calls = []
        for w, worker in enumerate(self.workers):
            tasks = [t for t in plan.tasks if t.worker == w]
            values = {
                n: resident_values[n] if n in resident_values else plan.program.constants[n]
                for n in plan.resident[w]
            }
            calls.append(worker.install.remote(plan_id, prog_ref, tasks, values))
        self._get(calls, "installing the plan")

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
        t0 = time.time()
        prog = self.program(graph, outputs, grad)
        arrays = prepare_feeds(prog, feeds or {}, check_finite)
        plan, plan_id = self._installed(
            prog, False, graph._params, _batch_size(prog, arrays), key_extra=graph.version
        )
        step = next(self._run_steps)
        events: list[TraceEvent] = []
        t_submit = time.time()
        refs = self._submit(plan, plan_id, step, arrays, {}, trace, check_finite)
        got = self._finish(plan, plan_id, step, refs, extra=[])
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

    def _submit(
        self,
        plan: Plan,
        plan_id: int,
        step: int,
        feeds: Mapping[str, np.ndarray],
        param_updates: Mapping[int, Any],
        trace: bool,
        check_finite: bool,
    ) -> dict[int, list[Any]]:
        """Submit every task of a step; returns each task's output refs."""
        feed_args: dict[str, Any] = {}
        for name, arr in feeds.items():
            feed_args[name] = ray.put(arr) if arr.nbytes > INLINE_BYTES else arr
        refs: dict[int, list[Any]] = {}
        pending_update = dict(param_updates)
        self.last_calls = []
        base_flags = (1 if trace else 0) | (2 if check_finite else 0)
        for task in plan.tasks:
            args: list[Any] = []
            flags = base_flags
            update = pending_update.pop(task.worker, None)
            if update is not None:
                args.append(update)
                flags |= 4
            args.extend(feed_args[n] for n in task.feeds)
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
        every = [r for rs in refs.values() for r in rs] + list(extra)
        try:
            _ready, pending = ray.wait(
                every, num_returns=len(every), timeout=self.deadline, fetch_local=False
            )
            if pending:
                raise self._timeout_error(plan, plan_id, step, refs, set(pending))
            driver = [
                refs[t.id][t.slot(DRIVER)]
                for t in plan.tasks
                if any(d == DRIVER for d, _ in t.outputs)
            ]
            values = self._get(driver + list(extra), "running the step")
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
        return _RaySession(self, graph, loss, optimizer, store, check_finite)


class _RaySession(TrainingSession):
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
        self.prog = ex.program(graph, [loss], grad=loss, wrt=list(store.params))
        self.loss = self.prog.outputs[0]
        self.plan: Plan | None = None
        self.plan_id = 0
        self._initial = store.to_checkpoint()
        self.ps: Any = None
        self._updates: dict[int, Any] = {}
        self.last_trace: list[TraceEvent] = []

    def _ensure(self, batch: int) -> None:
        if self.plan is not None:
            return
        ex = self.ex
        self.plan = ex._make_plan(self.prog, training=True, batch_size=batch)
        self.plan_id = next(ex._plan_ids)
        routes = {
            w: [p for p in self.plan.resident[w] if p in self.prog.params]
            for w in range(ex.num_workers)
        }
        self.ps = _ParamServerActor.options(num_cpus=0).remote(
            self._initial.params,
            self.optimizer,
            routes,
            self.prog.grads,
            ex.checkpoint_dir,
            ex.checkpoint_every,
        )
        ex._get([self.ps.restore.remote(self._initial)], "starting the parameter server")
        ex._install(self.plan, self.plan_id, self._initial.params)

    def step(self, step_id: int, feeds: Mapping[str, Any]) -> float:
        arrays = prepare_feeds(self.prog, feeds, self.check_finite)
        self._ensure(_batch_size(self.prog, arrays))
        plan, ex = self.plan, self.ex
        assert plan is not None
        refs = ex._submit(
            plan, self.plan_id, step_id, arrays, self._updates, False, self.check_finite
        )
        self._updates = {}
        grads = [
            refs[t.id][t.slot(PARAM_SERVER)]
            for t in plan.tasks
            if any(d == PARAM_SERVER for d, _ in t.outputs)
        ]
        out = self.ps.apply.options(num_returns=1 + ex.num_workers).remote(step_id, *grads)
        status_ref, worker_refs = out[0], out[1:]
        got = ex._finish(plan, self.plan_id, step_id, refs, extra=[status_ref])
        self._updates = dict(enumerate(worker_refs))
        loss = next(d[self.loss] for d in got["driver"] if self.loss in d)
        return float(loss)

    def _ps_call(self, method: str, *args: Any) -> Any:
        if self.ps is None:
            return None
        return self.ex._get(
            [getattr(self.ps, method).remote(*args)], f"calling the parameter server's {method}"
        )[0]

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
            from ..checkpoint import save_checkpoint

            save_checkpoint(path, self._initial)
            return
        self._ps_call("save", str(path))

    def restore(self, ckpt: Checkpoint) -> None:
        if self.ps is None:
            self._initial = ckpt
            return
        self._ps_call("restore", ckpt)
        self._updates = dict(enumerate(self._ps_call("worker_params")))

    def close(self) -> None:
        if self.ps is not None:
            with contextlib.suppress(Exception):
                ray.kill(self.ps)
            self.ps = None
        if self.plan is not None:
            for w in self.ex.workers:
                w.uninstall.remote(self.plan_id)
            self.plan = None


# --- helpers ----------------------------------------------------------------------------------


def _batch_size(program: Program, arrays: Mapping[str, np.ndarray]) -> int:
    for name in program.inputs:
        shape = program.nodes[name].shape
        if shape and None in shape and name in arrays:
            return int(arrays[name].shape[list(shape).index(None)])
    return 1


def _root_cause(e: BaseException) -> BaseException:
    seen = 0
    while isinstance(e, RayTaskError) and seen < 32:
        cause = getattr(e, "cause", None)
        if cause is None:
            break
        e = cause
        seen += 1
    return e


def _check_reachable(address: str, timeout: float) -> None:
    """Fail in seconds, not minutes, when nothing listens at ``address``."""
    if address in ("auto", "local") or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(
            f"could not connect to Ray at {address!r}: expected 'host:port', 'auto' or 'ray://host:port'"
        )
    try:
        with socket.create_connection((host, int(port)), timeout=min(timeout, 5.0)):
            pass
    except OSError as e:
        raise ClusterError(
            f"could not connect to Ray at {address!r}: {e} (is the head node running and reachable?)"
        ) from None


def _check_token(address: str) -> None:
    """Ask the GCS once before ray.init, whose own retries would hide a refused token."""
    if address in ("auto", "local") or address.startswith("ray://"):
        return
    try:
        from ray._raylet import GcsClient  # Ray's CLI probes the same way (ray health-check)
    except ImportError:
        return
    try:
        GcsClient(address=address).internal_kv_get(b"distgraph-probe", None, timeout=5)
    except ray.exceptions.AuthenticationError as e:
        raise ClusterError(
            f"could not connect to Ray at {address!r}: the cluster refused the authentication "
            f"token ({str(e).splitlines()[0][:160]}); set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN "
            "to the cluster's token"
        ) from None
    except Exception:  # anything else: let ray.init report it in its own words
        return


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
