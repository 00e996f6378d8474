"""The worker: runs its share of each plan's tasks and keeps values until the step ends.

State, per installed plan: the program, the plan's tasks, and the resident values (params and
constants this worker reads). A training plan may also give a worker a *replica* of the
parameter store for the params it keeps: when every gradient of those params is computed here,
the worker applies the same optimizer step as the parameter server at the end of its step, so
the new params need not travel back from the server (identical inputs, identical arithmetic). Per running step: ``env``, every value computed or received in
that step, so activations stay here for the backward wave. A step's env is dropped when its
last task on this worker finishes (or when the driver abandons the step).

Call order: a step's calls on this worker must run in plan order (the first one takes the new
params and starts the env; later ones read values earlier ones left in it). The Ray actor runs
them in submission order (see ``runtime/ray/actors.py``), and each call checks it: call k of a step
runs only right after call k - 1 of that step finished here. A call that finds its predecessor
missing raises :class:`CallOrderError` (or the error its predecessor failed with) instead of
computing from an incomplete env; it never waits, since the predecessor either failed (its
input failed, so it will never run) or could only run on the thread the waiting call holds.

Threads: a compiled graph's calls (``runtime/ray/compiled.py``) run on a thread of their own
beside ordinary calls, so every method touching step state holds the worker's step lock, and
a fenced graph's late calls change nothing (``runtime/serial.py``).

This module does not import Ray: ``runtime/ray/actors.py`` wraps ``Worker`` as an actor, and
the call's arguments are read with :mod:`distgraph.runtime.protocol`.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

from ..checkpoint import Checkpoint
from ..errors import ExecutionError
from ..interpret import run_nodes
from ..nnops import step_scope
from ..paramstore import ParameterStore
from ..plan import DRIVER, Task
from ..program import Program
from ..result import TraceEvent
from .actions import ActionRunner
from .protocol import CallHeader, unpack
from .serial import Fenced, serial


class CallOrderError(ExecutionError):
    """A step's call ran before the call that must precede it on the same worker finished."""


class Worker(ActionRunner, Fenced):
    """Holds partitions and runs tasks (and pipelined steps' actions: ``actions.py``); one
    instance per Ray worker actor."""

    def __init__(
        self, index: int, blas_threads: int | None = None, ops_modules: Sequence[str] = ()
    ):
        self.index = index
        self.track = f"worker {index}"
        self.programs: dict[int, Program] = {}
        self.tasks: dict[int, dict[int, Task]] = {}
        self.resident: dict[int, dict[str, Any]] = {}
        #: plan id -> (store replica, param -> gradient node) for workers that update locally.
        self.replicas: dict[int, tuple[ParameterStore, dict[str, str]]] = {}
        self.envs: dict[tuple[int, int], dict[str, Any]] = {}
        #: plan id -> task id -> its position among this worker's calls of a step.
        self.positions: dict[int, dict[int, int]] = {}
        #: (plan, step) -> how many of its calls have finished here (the next one's position).
        self._calls: dict[tuple[int, int], int] = {}
        #: (plan, step) -> the error that ended it here; its later calls raise it again.
        self._failed: dict[tuple[int, int], BaseException] = {}
        self.traces: dict[tuple[int, int], list[TraceEvent]] = {}
        self._current: tuple[int, int] | None = None  # (plan, step) of the running task
        self._node = [""]  # the node running now; run_nodes writes it, progress() reads it
        self._lock = threading.Lock()
        self._init_fence()  # a compiled graph's calls run on a thread of their own (serial.py)
        self._blas_threads: int | None = None
        self._plan_threads: dict[int, int | None] = {}
        self._controller: Any = None
        self._where: dict[str, str] | None = None  # host and node id, asked of Ray once
        if blas_threads is not None:
            self._limit_blas(blas_threads)
        for module in ops_modules:  # custom ops are registered by importing code, never by name
            importlib.import_module(module)

    def _limit_blas(self, threads: int | None) -> None:
        """Set the BLAS thread pools' size (kept until changed; a no-op when unchanged)."""
        if threads is None or threads == self._blas_threads:
            return
        if self._controller is None:
            try:
                from threadpoolctl import ThreadpoolController
            except ImportError:  # env vars only help before numpy loads: go on without
                return
            self._controller = ThreadpoolController()
        self._controller.limit(limits=threads)
        self._blas_threads = threads

    def info(self) -> dict[str, Any]:
        """Where this worker runs."""
        node_id, node_ip = self._location()
        return {
            "index": self.index,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "node_id": node_id,
            "node_ip": node_ip,
            "cpus": len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count(),
        }

    def _location(self) -> tuple[str, str]:
        """(node id, node IP) of this process; the Ray actor asks Ray (a worker run in-process
        has no cluster node)."""
        return "", "127.0.0.1"

    @serial
    def install(
        self,
        plan_id: int,
        program: Program,
        tasks: list[Task],
        resident: dict[str, Any],
        blas_threads: int | None = None,
        replica: tuple[Checkpoint, dict[str, str]] | None = None,
    ) -> bool:
        """Load a plan's program, this worker's tasks, its resident values, and how many BLAS
        threads its calls may use (the driver divides each node's cores among active workers).
        ``replica``: (state of this worker's params, param -> gradient node) to update locally."""
        self._plan_threads[plan_id] = blas_threads
        self.programs[plan_id] = program
        self.tasks[plan_id] = {t.id: t for t in tasks}
        self.positions[plan_id] = {t.id: i for i, t in enumerate(tasks)}
        self.resident[plan_id] = dict(resident)
        self.replicas.pop(plan_id, None)
        if replica is not None:
            self.set_replica(plan_id, replica[0], replica[1])
        return True

    @serial
    def set_replica(
        self, plan_id: int, state: Checkpoint, grad_of: dict[str, str] | None = None
    ) -> int:
        """Replace this worker's replica (and resident params) with its params' part of the
        server's ``state``."""
        if grad_of is None:
            grad_of = self.replicas[plan_id][1]
        mine = Checkpoint(
            params={p: state.params[p] for p in grad_of},
            opt_state={p: state.opt_state[p] for p in grad_of},
            optimizer=state.optimizer,
            step=state.step,
            applied_steps=list(state.applied_steps),
        )
        store = ParameterStore.from_checkpoint(mine)
        self.replicas[plan_id] = (store, dict(grad_of))
        self.resident[plan_id].update(store.params)
        return store.version

    @serial
    def uninstall(self, plan_id: int) -> None:
        """Forget a plan and any of its unfinished steps."""
        self.programs.pop(plan_id, None)
        self.tasks.pop(plan_id, None)
        self.resident.pop(plan_id, None)
        self.replicas.pop(plan_id, None)
        self.positions.pop(plan_id, None)
        self.drop_actions(plan_id)
        for table in (self.envs, self._calls, self._failed):
            for key in [k for k in table if k[0] == plan_id]:
                del table[key]

    @serial
    def set_resident(self, plan_id: int, values: Any) -> None:
        """Replace resident values (a new parameter version, possibly sent by reference)."""
        self.resident[plan_id].update(self._receive([values])[0])

    def _send(self, values: dict[str, Any]) -> Any:
        """What a task returns for another worker or the server: here the values themselves;
        the Ray actor puts them in the object store and returns the reference, so they travel
        between workers without passing through the driver."""
        return values

    def _receive(self, items: list[Any]) -> list[Any]:
        """Value dicts from ``items`` as sent by ``_send`` (here, already the values)."""
        return items

    @serial
    def run_task(self, header: CallHeader, *args: Any) -> Any:
        """Run one task: ``header`` says which and how, ``args`` are its param update, large
        feeds and imported value dicts (see :mod:`distgraph.runtime.protocol`).

        Returns one dict per output of the task (a bare dict when it has one, None for none).
        """
        plan_id, step, task_id = header.plan_id, header.step, header.task_id
        task = self.tasks[plan_id][task_id]
        program = self.programs[plan_id]
        key = (plan_id, step)
        position = self.positions[plan_id][task_id]
        if position > 0:
            self._check_order(key, position, task)
        self._limit_blas(self._plan_threads.get(plan_id))
        call = unpack(header, args)
        try:
            # What other workers and the server sent may come by reference: fetch it at once.
            received = self._receive(([call.update] if header.update else []) + call.imported)
        except BaseException as e:
            self._end_step(key, None if task.last_on_worker else e)
            raise
        if header.update:
            self.resident[plan_id].update(received[0])
            received = received[1:]
        if position == 0:
            # The first call starts the step afresh: a step id run again after a failed attempt
            # must not read values (or old params) that attempt left behind.
            self._failed.pop(key, None)
            self._calls[key] = 0
            self.envs[key] = dict(self.resident[plan_id])
        env = self.envs[key]
        env.update(call.feeds)
        for (_src, _slot, names), values in zip(task.imports, received):
            for name in names:
                env[name] = values[name]
        events = self.traces.setdefault(key, []) if header.trace else None
        start = time.time()
        try:
            with self._lock:
                self._current = (plan_id, step)
                self._node[0] = ""
            # A training step's id is what stochastic ops (dropout) draw from.
            with step_scope(step if header.training else None):
                run_nodes(
                    program,
                    task.nodes,
                    env,
                    check_finite=header.check_finite,
                    trace=events,
                    track=self.track,
                    worker=self.index,
                    current=self._node,
                )
        except BaseException as e:
            self._end_step(key, None if task.last_on_worker else e)
            raise
        finally:
            with self._lock:
                self._current = None
        replica = self.replicas.get(plan_id) if task.last_on_worker else None
        if replica is not None:
            self._update_replica(plan_id, step, env, replica, events)
        self._calls[key] = position + 1
        if events is not None:
            events.append(
                TraceEvent(
                    f"call {task_id}",
                    "call",
                    "/".join(task.phases),
                    task.first_level,
                    self.track,
                    start,
                    time.time(),
                    worker=self.index,
                    args={"levels": [task.first_level, task.last_level], "nodes": len(task.nodes)},
                )
            )
        # The driver is the caller of every task, and Ray keeps a caller's small results in
        # its process: with header.by_ref, values for other workers or the server leave by _send.
        by_ref = header.by_ref
        outputs = tuple(
            self._send({n: env[n] for n in names})
            if by_ref and dest != DRIVER
            else {n: env[n] for n in names}
            for dest, names in task.outputs
        )
        if task.last_on_worker:
            self._end_step(key)
        if not outputs:
            return None
        return outputs[0] if len(outputs) == 1 else outputs

    def _check_order(self, key: tuple[int, int], position: int, task: Task) -> None:
        """Refuse call ``position`` of a step unless call ``position - 1`` just finished here."""
        failed = self._failed.get(key)
        if failed is not None:
            if task.last_on_worker:
                self._end_step(key)
            raise failed  # the step already failed here: report that error, not a new one
        done = self._calls.get(key)
        if done != position:
            plan_id, step = key
            seen = "none" if done is None else f"{done}"
            raise CallOrderError(
                f"worker {self.index}: call {position} of step {step} (plan {plan_id}, task "
                f"{task.id}, levels {task.first_level}-{task.last_level}) ran when {seen} of its "
                f"earlier calls had finished here; call {position - 1} failed before it started "
                "(an input it waited for failed: see that error) or calls arrived out of order. "
                "Nothing was computed; the step failed"
            )

    def _end_step(self, key: tuple[int, int], error: BaseException | None = None) -> None:
        """Forget a step's values here; with ``error``, its later calls raise that error."""
        self.envs.pop(key, None)
        self._calls.pop(key, None)
        if error is not None:
            self._failed[key] = error
        else:
            self._failed.pop(key, None)

    def _update_replica(
        self,
        plan_id: int,
        step: int,
        env: dict[str, Any],
        replica: tuple[ParameterStore, dict[str, str]],
        events: list[TraceEvent] | None,
    ) -> None:
        """Apply step ``step`` to the local replica, exactly as the parameter server will."""
        store, grad_of = replica
        start = time.time()
        try:
            applied = store.apply(step, {p: env[g] for p, g in grad_of.items()})
        except BaseException:
            self._end_step((plan_id, step))
            raise
        if applied:
            self.resident[plan_id].update(store.params)
        if events is not None:
            events.append(
                TraceEvent(
                    f"update step {step}",
                    "update",
                    "update",
                    -1,
                    self.track,
                    start,
                    time.time(),
                    worker=self.index,
                    args={"version": store.version, "params": len(grad_of)},
                )
            )

    def progress(self) -> dict[str, Any] | None:
        """The node running right now (answered from a separate thread while a task runs)."""
        cur, node = self._current, self._node[0]
        if cur is None or not node:
            return None
        level = self.programs[cur[0]].level.get(node, -1) if cur[0] in self.programs else -1
        return {"plan": cur[0], "step": cur[1], "node": node, "level": level, "worker": self.index}

    @serial
    def take_trace(self, plan_id: int, step: int) -> list[TraceEvent]:
        """Hand over (and forget) a step's trace events, each marked with where it ran:
        ``args["host"]`` (the node's IP) and ``args["node_id"]`` (Ray's id of the node)."""
        events = self.traces.pop((plan_id, step), [])
        if not events:
            return events
        if self._where is None:
            info = self.info()
            self._where = {"host": info["node_ip"], "node_id": info["node_id"]}
        return [dataclasses.replace(e, args={**e.args, **self._where}) for e in events]

    @serial
    def drop_step(self, plan_id: int, step: int) -> None:
        """Forget a step that failed or was abandoned."""
        self._end_step((plan_id, step))
        self.drop_actions(plan_id, step)
        self.traces.pop((plan_id, step), None)

    @serial
    def held_plans(self) -> list[int]:
        """Ids of the installed plans (for leak checks)."""
        return list(self.programs)

    @serial
    def replica(self, plan_id: int) -> dict[str, Any] | None:
        """This worker's replica of a training plan: version, applied steps and params."""
        if plan_id not in self.replicas:
            return None
        store = self.replicas[plan_id][0]
        return {"version": store.version, "applied": list(store.applied), "params": store.params}

    @serial
    def held_steps(self) -> list[tuple[int, int]]:
        """Steps whose values are still held (for leak checks)."""
        return list(self.envs)

    def crash(self) -> None:
        """End this worker's process at once (for failure tests)."""
        os._exit(1)
