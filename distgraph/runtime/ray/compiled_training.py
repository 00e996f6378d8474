"""Training steps on the compiled transport: a session's plan, its parameter server's update
included, compiled into one Ray Compiled Graph.

The graph of a training plan (:class:`TrainingGraph`): the driver's input (step id, trace,
check_finite, feeds) goes to every task, each task is one bind of its worker's
``train_compiled`` (imports bound as arguments, as for run() plans, see ``compiled.py``); then
one node on the parameter server, ``compiled_step``, takes every gradient dict *and every
other output of the step's tasks* (the driver's loss too), so Ray runs it only when every task
of the step succeeded (a node whose input failed is skipped and passes the error on). It
stages and commits the update at once and returns its status plus, for each worker that takes
its params from the server (``takers``), that worker's new params, which a last node on the
worker (``take_params``) makes resident. The driver reads the loss, the status and the takers'
acknowledgements.

Why this keeps the step protocol's guarantees (see ``session.py``):
- exactly once: the commit runs only inside the server node, once per execution, and a step
  id the server applied before is a duplicate it ignores; a step whose execution failed is
  decided by the server (``abort`` answers whether it is applied, after the fence below), as
  an interrupted commit is with calls;
- never half-updated: the server node runs only if every task succeeded, and applies the
  update within one call holding its step lock;
- order: the graph's loop runs on a thread of its own in each actor, beside ordinary calls.
  Every method touching step state holds the actor's step lock (``runtime/serial.py``), and
  the driver sends out-of-band calls (install, new params after a recovery, replica resets,
  progress, reads) only between executions and waits for all of them before the next one;
- a failed execution: the graph is fenced on each of its actors (a late task of it raises
  instead of changing state; a running one finishes first) and torn down in the background;
  the session then recovers as with calls and the next step compiles a new graph (same step
  id, same batch).

Refused (transport="compiled": ConfigError; "auto": actor calls, said in the log and in
``RaySession.explain_transport``): data-parallel replicas, parameter-server shards, pipelined
micro-batches, asynchronous steps. Per plan, as for run(): ``data_path="store"``, workers on
several nodes under "auto", channels over ``MAX_BUFFER``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import ray
from ray.dag import InputNode, MultiOutputNode
from ray.exceptions import (
    GetTimeoutError,
    ObjectLostError,
    RayActorError,
    RayChannelError,
)

from ...cost import node_bytes
from ...errors import DistgraphError, WaveTimeoutError, WorkerLostError
from ...plan import DRIVER, PARAM_SERVER, Plan
from ..serial import StaleGraphError
from .compiled import (
    HEADROOM,
    MIN_BUFFER,
    PER_ARRAY,
    ChannelSizeError,
    message_bytes,
    name_running,
    own,
    refusal,
    root_cause,
    set_buffer_size,
    slot_of,
)
from .options import RayOptions
from .waves import RowsFeed

log = logging.getLogger(__name__)

#: Compiled graph generations, unique in this process (fences compare them).
_GENERATIONS = itertools.count(1)


def training_buffer_bytes(
    plan: Plan, feeds: Mapping[str, Any], params: Mapping[str, Any], takers: Sequence[int]
) -> int:
    """Channel buffer for a training graph: its largest message (a task's output at the plan's
    batch, the feeds, or a taker's new params), doubled, plus headroom."""
    sizes = node_bytes(plan.program, plan.cost)
    largest = sum(message_bytes(v) for v in feeds.values())
    for task in plan.tasks:
        for _dest, names in task.outputs:
            largest = max(largest, sum(int(sizes.get(n, 0)) + PER_ARRAY for n in names))
    for w in takers:
        mine = [p for p in plan.resident.get(w, ()) if p in params]
        largest = max(largest, PER_ARRAY + sum(message_bytes(params[p]) for p in mine))
    return max(MIN_BUFFER, 2 * largest + HEADROOM)


class TrainingGraph:
    """One training plan compiled on a cluster's workers and a parameter-server actor."""

    def __init__(
        self,
        workers: Sequence[Any],
        server: Any,
        plan: Plan,
        plan_id: int,
        takers: Sequence[int],
        buffer_bytes: int,
    ) -> None:
        self.plan, self.plan_id, self.buffer_bytes = plan, plan_id, buffer_bytes
        self.workers, self.server = list(workers), server
        self.takers = tuple(takers)
        self.generation = next(_GENERATIONS)
        self.torn_down = False
        self._teardown: threading.Thread | None = None
        gen = self.generation
        actors = sorted({t.worker for t in plan.tasks} | set(self.takers))
        self.actors = [self.workers[w] for w in actors] + [server]
        # Every process that creates channels sizes them (see compiled.py's docstring).
        set_buffer_size(None, buffer_bytes)
        ray.get(
            [a.__ray_call__.remote(set_buffer_size, buffer_bytes) for a in self.actors],
            timeout=60,
        )
        consumed = {(src, slot) for t in plan.tasks for src, slot, _ in t.imports}
        outs: dict[int, list[Any]] = {}
        with InputNode() as inp:
            for task in plan.tasks:
                k = max(1, len(task.outputs))
                method = self.workers[task.worker].train_compiled
                if k > 1:
                    method = method.options(num_returns=k)
                args = [outs[src][slot] for src, slot, _ in task.imports]
                node = method.bind(plan_id, task.id, gen, inp, *args)
                outs[task.id] = list(node) if k > 1 else [node]
            grads, gates, driver = [], [], []
            for task in plan.tasks:
                for slot, node in enumerate(outs[task.id]):
                    dest = task.outputs[slot][0] if task.outputs else None
                    if dest == PARAM_SERVER:
                        grads.append(node)  # in plan order, as ServerLink.stage sends them
                    elif (task.id, slot) not in consumed:
                        gates.append(node)  # the driver's outputs and any other leaf
                        if dest == DRIVER:
                            driver.append(node)
            n = 1 + len(self.takers)
            update = server.compiled_step
            if n > 1:
                update = update.options(num_returns=n)
            srv = update.bind(gen, inp, self.takers, len(grads), *grads, *gates)
            srv_outs = list(srv) if n > 1 else [srv]
            takes = [
                self.workers[w].take_params.bind(plan_id, gen, srv_outs[1 + i])
                for i, w in enumerate(self.takers)
            ]
            dag = MultiOutputNode(gates + [srv_outs[0]] + takes)
        self.n_gates = len(gates)
        self.driver_at = [gates.index(d) for d in driver]
        self.dag = dag.experimental_compile(_max_inflight_executions=1)

    def run(
        self, step: int, feeds: Mapping[str, Any], trace: bool, check_finite: bool, timeout: float
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Execute step ``step``: (the driver's outputs in plan order, the commit's status)."""
        ref = self.dag.execute((step, trace, check_finite, dict(feeds)))
        values = ray.get(ref, timeout=timeout)
        driver = [own(values[i]) for i in self.driver_at]
        return driver, dict(values[self.n_gates])

    def retire(self) -> list[Any]:
        """Abandon the graph: fence its generation on every actor (their late calls change
        nothing) and tear it down in the background; returns the fences' refs."""
        if self.torn_down:
            return []
        self.torn_down = True
        fences = []
        for a in self.actors:
            with contextlib.suppress(Exception):
                fences.append(a.fence.remote(self.generation))
        self._teardown = threading.Thread(target=self._quiet_teardown, daemon=True)
        self._teardown.start()
        return fences

    def _quiet_teardown(self) -> None:
        with contextlib.suppress(Exception):
            self.dag.teardown()

    def join(self, timeout: float) -> bool:
        """Wait for a background teardown; whether it ended."""
        if self._teardown is None:
            return True
        self._teardown.join(timeout)
        return not self._teardown.is_alive()


class CompiledTraining:
    """The compiled transport of one training session: when it applies, its graph, and why a
    plan stays on actor calls (see the module docstring)."""

    def __init__(self, cluster: Any, options: RayOptions) -> None:
        self.cluster, self.options = cluster, options
        self.slot = slot_of(cluster)
        self.graph: TrainingGraph | None = None
        #: Why the latest step ran on calls ("" when it ran compiled).
        self.last_reason = ""
        #: (transport, plan id, reason): a plan refused under a transport stays on calls.
        self.refused: tuple[str, int, str] | None = None
        self._runs = 0  # this session's steps in a row on these workers
        self._previous: TrainingGraph | None = None  # retired, its teardown maybe under way
        self._shipped: dict[Any, np.ndarray] = {}  # attached arrays read once per ref

    # Whether and how --------------------------------------------------------------------------
    def wants(self, plan_id: int) -> bool:
        """Whether this step should run compiled (counts steps in a row; the first of a plan
        runs on calls, and installs it)."""
        transport = self.options.transport
        if transport == "calls":
            self.last_reason = 'transport="calls"'
            return False
        in_a_row = self.slot.touch(self)
        self._runs = self._runs + 1 if in_a_row else 1
        refused = self.refused
        if refused is not None and refused[0] == transport and refused[1] == plan_id:
            self.last_reason = refused[2]
            return False
        live = self.graph is not None and not self.graph.torn_down
        if not live and self._runs < 2:  # reaped while idle counts as none
            self.last_reason = "first step in a row on these workers (compiled from its second)"
            return False
        return True

    def why_not(self, plan: Plan, buffer_bytes: int) -> str:
        """Why ``plan`` cannot be compiled here ("" when it can)."""
        return refusal(self.cluster, self.options, plan, buffer_bytes)

    def refuse(self, plan_id: int, reason: str) -> None:
        """Keep ``plan_id`` on actor calls under the current transport, saying why."""
        self.refused = (self.options.transport, plan_id, reason)
        self.last_reason = reason
        level = logging.WARNING if self.options.transport == "compiled" else logging.INFO
        log.log(level, "training plan %d runs on actor calls, not compiled: %s", plan_id, reason)

    def feeds(self, arrays: Mapping[str, Any]) -> dict[str, Any]:
        """The step's feeds as arrays (rows of an attached array are taken here: a graph's
        input travels in a channel, not by object reference)."""
        out: dict[str, Any] = {}
        for k, v in arrays.items():
            if isinstance(v, RowsFeed):
                whole = self._shipped.get(v.ref)
                if whole is None:
                    whole = self._shipped[v.ref] = ray.get(v.ref)
                out[k] = whole[v.index]
            else:
                out[k] = v
        return out

    def graph_for(
        self,
        plan: Plan,
        plan_id: int,
        server: Any,
        takers: Sequence[int],
        feeds: Mapping[str, Any],
        params: Mapping[str, Any],
    ) -> TrainingGraph | None:
        """The live graph of ``plan`` (compiled now if needed); None: refused, use calls."""
        need = training_buffer_bytes(plan, feeds, params, takers)
        graph = self.graph
        if graph is not None and (
            graph.torn_down
            or graph.plan_id != plan_id
            or graph.workers != list(self.cluster.workers)
            or graph.server is not server
            or need > graph.buffer_bytes
        ):
            # Another user took the workers, a replaced worker or server, a larger batch.
            self.drop()
            graph = None
        if graph is not None:
            return graph
        reason = self.why_not(plan, need)
        if not reason:
            self.settle_previous()
            self.slot.claim(self)
            try:
                graph = TrainingGraph(self.cluster.workers, server, plan, plan_id, takers, need)
            except Exception as e:  # an unsupported shape: say so, stay on calls
                reason = f"Ray could not compile it: {type(e).__name__}: {e}"
        if graph is None:
            self.refuse(plan_id, reason)
            return None
        self.graph = graph
        log.info(
            "compiled training plan %d (%d tasks and the server's update) into a Ray Compiled "
            "Graph, channels of %d bytes",
            plan_id,
            len(plan.tasks),
            need,
        )
        return graph

    # Failures -----------------------------------------------------------------------------------
    def failed(self, graph: TrainingGraph, step: int, error: BaseException) -> BaseException:
        """Retire the graph after a failed execution; the error the step raises (a
        ChannelSizeError asks for calls: the caller runs the step again there)."""
        if self.graph is graph:
            self.graph = None
        self._previous = graph
        graph.retire()
        cause = root_cause(error)
        if isinstance(cause, ChannelSizeError):
            self.refuse(graph.plan_id, str(cause))
            return cause
        if isinstance(cause, StaleGraphError):  # cannot happen to a live graph: say so
            return WorkerLostError(f"a compiled step met a fenced graph: {cause}")
        if isinstance(cause, DistgraphError):
            return cause
        if isinstance(error, (GetTimeoutError, TimeoutError)):
            running = name_running(graph.plan, graph.workers, step)
            msg = (
                f"step {step} passed its deadline of {self.options.deadline:g} s (compiled "
                "training step)"
            )
            if running:
                return WaveTimeoutError(msg + "; " + "; ".join(running))
            return WaveTimeoutError(msg + "; no node running: waiting for the parameter server")
        if isinstance(cause, (RayActorError, ObjectLostError, RayChannelError)):
            return WorkerLostError(f"a worker or the parameter server died during a step: {cause}")
        return error

    def settle_previous(self) -> None:
        """Wait (bounded by the deadline) for a retired graph's teardown: an actor holds one
        compiled graph at a time."""
        previous, self._previous = self._previous, None
        if previous is not None and not previous.join(self.options.deadline):
            raise WaveTimeoutError(
                f"the compiled graph of an abandoned step still runs after the deadline of "
                f"{self.options.deadline:g} s (a node of it is still computing); "
                "nothing new was started"
            )

    def drop(self) -> None:
        """Abandon the live graph (recovery, another plan): fenced, torn down in the
        background, and waited for before the next compile."""
        graph, self.graph = self.graph, None
        if graph is not None:
            graph.retire()
            self._previous = graph
        self.slot.release(self)

    def release(self) -> None:
        """Another user of the workers compiles: tear this session's graph down now."""
        self.drop()
        with contextlib.suppress(Exception):
            self.settle_previous()

    def close(self) -> None:
        """Tear the graph down (the session closes)."""
        self.release()

    def describe(self) -> str:
        """One line: how this session's steps travel."""
        transport = self.options.transport
        if transport == "calls":
            return 'transport: actor calls (transport="calls")'
        if self.graph is not None and not self.graph.torn_down:
            return (
                f"transport: compiled graph (the server's update included), channels of "
                f"{self.graph.buffer_bytes:,} B"
            )
        if self.last_reason:
            return f"transport: actor calls ({transport}: {self.last_reason})"
        return f"transport: {transport}, compiled from the second step in a row"
