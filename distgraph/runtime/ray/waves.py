"""Waves: plans installed on the workers, and the calls of one step submitted and awaited.

State:
- ``cluster`` (its workers) and ``options`` (deadline, data path, strategy, cost), shared;
- ``plans``: the installed run() plans, key -> (plan, plan id, resident values to reinstall
  them with), least recently used first, at most ``options.max_plans``;
- ``last_calls``: (worker, first level, last level, phases) of every actor call of the
  latest step.

Order of a step:
1. ``submit``: every task of the step at once, in plan order; each takes its feeds and the
   refs of the values it imports as top-level arguments (see ``runtime/protocol.py``), so
   workers resolve them directly and the driver never touches intermediate tensors;
2. ``finish``: wait once for the step's end, bounded by ``options.deadline``, then fetch only
   the driver's outputs; past the deadline, name the node still running (``progress``) and
   the nodes still pending;
3. ``trace`` (when asked): the workers' events of the step and one transfer event per value
   that crossed workers.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, ObjectLostError, RayActorError, RayTaskError

from ...errors import DistgraphError, WaveTimeoutError, WorkerLostError
from ...plan import DRIVER, Plan, plan_for
from ...program import Program
from ...result import TraceEvent
from ..protocol import CallHeader, Rows, pack
from . import actors
from .cluster import Cluster
from .options import INLINE_BYTES, RayOptions


@dataclass(frozen=True)
class RowsFeed:
    """A step's feed as rows of a shipped array."""

    ref: Any
    index: np.ndarray


def batch_size(program: Program, arrays: Mapping[str, Any]) -> int:
    """The batch size of a request's feeds (1 when no input has a free dimension)."""
    for name in program.inputs:
        shape = program.nodes[name].shape
        if shape and None in shape and name in arrays:
            return int(arrays[name].shape[list(shape).index(None)])
    return 1


class Waves:
    """Installs plans on the cluster's workers and runs their steps."""

    def __init__(self, cluster: Cluster, options: RayOptions) -> None:
        self.cluster = cluster
        self.options = options
        #: Installed run() plans: key -> (plan, plan id, resident values to reinstall them with).
        self.plans: dict[tuple, tuple[Plan, int, Mapping[str, Any]]] = {}
        self._plan_ids = itertools.count(1)
        #: (worker, first level, last level, phases) of every actor call of the latest step.
        self.last_calls: list[tuple[int, int, int, tuple[str, ...]]] = []

    # Plans --------------------------------------------------------------------------------------
    def make_plan(
        self, program: Program, training: bool, batch: int = 1, num_workers: int | None = None
    ) -> Plan:
        """Place ``program`` on the workers (the options' strategy) and group it into tasks;
        ``num_workers``: on the first that many only (one data-parallel replica's)."""
        o = self.options
        return plan_for(
            program,
            num_workers=o.num_workers if num_workers is None else num_workers,
            strategy=o.strategy,
            training=training,
            batch_size=batch,
            cost=o.cost,
        )

    def new_plan_id(self) -> int:
        """A plan id no installed plan uses."""
        return next(self._plan_ids)

    def installed(
        self,
        program: Program,
        training: bool,
        resident_values: Mapping[str, Any],
        batch: int,
        key_extra: Any = None,
    ) -> tuple[Plan, int]:
        """The plan of a run() request and its id, installed on every worker (cached)."""
        strategy = self.options.strategy
        key = (
            id(program),
            training,
            key_extra,
            strategy if isinstance(strategy, str) else id(strategy),
        )
        hit = self.plans.get(key)
        if hit is not None and hit[0].program is program:
            self.plans[key] = self.plans.pop(key)  # most recently used last
            return hit[0], hit[1]
        plan = self.make_plan(program, training, batch)
        plan_id = self.new_plan_id()
        self.cluster.check_fits(plan, resident_values)
        try:
            self.install(plan, plan_id, resident_values)
        except BaseException:
            # Cache a plan only once every worker holds it; survivors of a failed install
            # forget it (a dead worker's call fails harmlessly).
            self.uninstall(plan_id)
            raise
        self.plans[key] = (plan, plan_id, resident_values)
        while len(self.plans) > self.options.max_plans:  # forget the oldest, here and on workers
            _old, (_p, old_id, _r) = next(iter(self.plans.items()))
            del self.plans[_old]
            self.uninstall(old_id)
        return plan, plan_id

    def uninstall(self, plan_id: int) -> None:
        """Have every worker forget a plan (without waiting)."""
        for w in self.cluster.workers:
            w.uninstall.remote(plan_id)

    def install(
        self,
        plan: Plan,
        plan_id: int,
        resident_values: Mapping[str, Any],
        only: Sequence[int] | None = None,
        replicas: Mapping[int, Any] | None = None,
    ) -> None:
        """Install ``plan`` on every worker (or those in ``only``) and wait for them."""
        workers = self.cluster.workers
        prog_ref = ray.put(plan.program)
        calls = []
        for w in only if only is not None else range(len(workers)):
            tasks = [t for t in plan.tasks if t.worker == w]
            values = {
                n: resident_values[n] if n in resident_values else plan.program.constants[n]
                for n in plan.resident[w]
            }
            threads = self._plan_threads(plan, w)
            replica = replicas.get(w) if replicas else None
            calls.append(
                workers[w].install.remote(plan_id, prog_ref, tasks, values, threads, replica)
            )
        self.get(calls, "installing the plan")

    def _plan_threads(self, plan: Plan, worker: int) -> int | None:
        """BLAS threads for ``worker`` under ``plan``: its node's cores shared by the workers the
        plan keeps busy there, so one active worker uses every core and two split them."""
        if self.options.blas_threads is not None:
            return self.options.blas_threads
        info = self.cluster.worker_info
        active = {t.worker for t in plan.tasks}
        if worker not in active or worker >= len(info) or "cpus" not in info[worker]:
            return None
        node = info[worker]["node_id"]
        sharing = sum(1 for w in active if w < len(info) and info[w]["node_id"] == node)
        return max(1, int(info[worker]["cpus"] or 1) // max(1, sharing))

    def recover(self) -> list[int]:
        """Replace dead workers and reinstall the run() plans on them; returns their indices."""
        dead = self.cluster.dead_workers()
        for i in dead:
            self.cluster.replace_worker(i)
            for plan, plan_id, resident in self.plans.values():
                self.install(plan, plan_id, resident, only=[i])
        return dead

    # A step -------------------------------------------------------------------------------------
    def submit(
        self,
        plan: Plan,
        plan_id: int,
        step: int,
        feeds: Mapping[str, Any],
        param_updates: Mapping[int, Any],
        trace: bool,
        check_finite: bool,
        replica_feeds: Sequence[Mapping[str, Any]] = (),
        width: int = 0,
    ) -> dict[int, list[Any]]:
        """Submit every task of a step; returns each task's output refs.

        Data-parallel replicas (see ``replicas.py``) pass ``replica_feeds``, one mapping per
        replica, and ``width``, the workers per replica: a task on worker ``w`` is fed
        ``replica_feeds[w // width]`` instead of ``feeds``."""
        workers = self.cluster.workers
        sources = list(replica_feeds) or [feeds]
        smalls: list[dict[str, Any]] = [{} for _ in sources]
        bigs: list[dict[str, Any]] = [{} for _ in sources]
        for small, big, source in zip(smalls, bigs, sources):
            for name, arr in source.items():
                if isinstance(arr, RowsFeed):
                    small[name], big[name] = Rows(arr.index), arr.ref
                elif arr.nbytes <= INLINE_BYTES:
                    small[name] = arr
        refs: dict[int, list[Any]] = {}
        pending_update = dict(param_updates)
        self.last_calls = []
        for task in plan.tasks:
            update = pending_update.pop(task.worker, None)
            r = task.worker // width if replica_feeds else 0
            small, big = smalls[r], bigs[r]
            for n in task.feeds:
                if n not in small and n not in big:
                    # Put a large feed when its first task goes out, so the first worker can
                    # start while the driver is still putting the other workers' feeds.
                    big[n] = ray.put(sources[r][n])
            header = CallHeader(
                plan_id,
                step,
                task.id,
                trace=trace,
                check_finite=check_finite,
                by_ref=self.options.data_path == "store",
                update=update is not None,
                inline={n: small[n] for n in task.feeds if n in small},
                big=tuple(n for n in task.feeds if n in big),
                imports=len(task.imports),
            )
            args = pack(
                header,
                update,
                [big[n] for n in header.big],
                [refs[src][slot] for src, slot, _ in task.imports],
            )
            n_out = max(1, len(task.outputs))
            out = workers[task.worker].run_task.options(num_returns=n_out).remote(*args)
            refs[task.id] = list(out) if n_out > 1 else [out]
            self.last_calls.append(
                (task.worker, task.first_level, task.last_level, tuple(task.phases))
            )
        # Workers with no task this step still take their new params now, so none goes stale.
        for w, update in pending_update.items():
            workers[w].set_resident.remote(plan_id, update)
        return refs

    def finish(
        self, plan: Plan, plan_id: int, step: int, refs: dict[int, list[Any]], extra: list[Any]
    ) -> dict[str, Any]:
        """Wait for the step (bounded by the deadline), then fetch the driver's outputs only."""
        driver = [
            refs[t.id][t.slot(DRIVER)] for t in plan.tasks if any(d == DRIVER for d, _ in t.outputs)
        ]
        try:
            # Every task feeds the driver's outputs or the parameter server (the program holds
            # only needed nodes), so one bounded get waits for the whole step.
            values = self.get(driver + list(extra), "running the step")
        except WaveTimeoutError:
            every = [r for rs in refs.values() for r in rs] + list(extra)
            _ready, pending = ray.wait(every, num_returns=len(every), timeout=0, fetch_local=False)
            for w in self.cluster.workers:
                w.drop_step.remote(plan_id, step)
            raise self._timeout_error(plan, plan_id, step, refs, set(pending)) from None
        except BaseException:
            for w in self.cluster.workers:
                w.drop_step.remote(plan_id, step)
            raise
        return {"driver": values[: len(driver)], "extra": values[len(driver) :]}

    def get(self, refs: list[Any], what: str) -> list[Any]:
        """Fetch ``refs`` within the deadline; a lost worker or value is a WorkerLostError, a
        distgraph error raised on a worker is raised here as it is."""
        try:
            return actors.fetch(refs, timeout=self.options.deadline)
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
                f"no answer within the deadline of {self.options.deadline:.0f} s while {what}"
            ) from None

    def _timeout_error(
        self, plan: Plan, plan_id: int, step: int, refs: dict[int, list[Any]], pending: set
    ) -> WaveTimeoutError:
        waiting = [t for t in plan.tasks if any(r in pending for r in refs.get(t.id, []))]
        running: list[str] = []
        probes = {t.worker: self.cluster.workers[t.worker].progress.remote() for t in waiting}
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
        msg = f"step {step} passed its deadline of {self.options.deadline:g} s in the {where}"
        if running:
            msg += "; " + "; ".join(running)
        msg += f"; nodes still pending: {shown or 'none (waiting for the parameter server)'}"
        return WaveTimeoutError(msg)

    # Traces -------------------------------------------------------------------------------------
    def trace(self, plan: Plan, plan_id: int, step: int, t_submit: float) -> list[TraceEvent]:
        """The step's events: the driver's wait from ``t_submit``, each active worker's events
        (taken from it) and one transfer event per value that crossed workers."""
        events = [TraceEvent(f"step {step}", "call", "step", -1, "driver", t_submit, time.time())]
        for w in sorted({t.worker for t in plan.tasks}):
            events.extend(actors.fetch(self.cluster.workers[w].take_trace.remote(plan_id, step)))
        events.extend(_transfer_events(plan, events))
        return events


def _root_cause(e: BaseException) -> BaseException:
    seen = 0
    while isinstance(e, RayTaskError) and seen < 32:
        cause = getattr(e, "cause", None)
        if cause is None:
            break
        e = cause
        seen += 1
    return e


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
