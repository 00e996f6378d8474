"""Training steps on the compiled transport: a session's plan, its parameter server's update
included, compiled into one Ray Compiled Graph.

The graph of a training plan (:class:`TrainingGraph`): the driver's input holds one control
per server actor (step id, its data-parallel stage arguments) and one per replica (step id,
trace, check_finite, that replica's feeds); each is a channel of its own, read by that server
or by that replica's tasks only. Each task (of every replica: the ``replicate()``d plan) is one
bind of its worker's ``train_compiled`` (imports bound as arguments, as for run() plans, see
``compiled.py``). With one server, one node on it, ``compiled_step``, takes every gradient
dict *and every other output of the step's tasks* (the driver's loss too), so Ray runs it only
when every task of the step succeeded (a node whose input failed is skipped and passes the
error on). It stages and commits the update at once and returns its status plus, for each
worker that takes its params from the server (``takers``), that worker's new params, which a
last node on the worker (``take_params``) makes resident. The driver reads the loss, the
status and the takers' acknowledgements.

Data-parallel replicas (``replicas.py``): the step's rows are split by ``split_rows`` as with
calls (a batch with fewer rows than replicas runs on calls), each replica's tasks read their
own rows, and the server combines the replicas' gradient dicts, sent in plan order
(replica-major), with the same ``(count, rows)`` groups and weights as the calls path
(``replica_groups``): the result is bit-identical to calls.

Sharded servers (``shards.py``): the plan's gradients are routed per shard (``route_plan``).
Each shard has a stage node (its gradients, every other output of the step's tasks, and with
``clip_norm`` every shard's ``compiled_sums`` node, combined into the one global norm as
with calls) and a commit node that takes *every* shard's stage output: no shard commits
unless every shard staged, the two phases of the calls path (:func:`shard_nodes` binds them,
for pipelined graphs too). A taker gets its params from the
commit node of each shard that holds some of them.

Why this keeps the step protocol's guarantees (see ``session.py``):
- exactly once: the commit runs only inside the server's nodes, once per execution, and a step
  id the server applied before is a duplicate it ignores; a step whose execution failed is
  decided by the server (``abort`` answers whether it is applied, after the fence below), as
  an interrupted commit is with calls;
- never half-updated: the update runs only if every task succeeded, within one call holding
  the server's step lock; with shards, commits run only once every shard staged, and a step
  that a failure left committed on some shards only is rolled back there by the abort's
  settlement (``ShardedServer.settle``), as with calls;
- order: the graph's loop runs on a thread of its own in each actor, beside ordinary calls.
  Every method touching step state holds the actor's step lock (``runtime/serial.py``), and
  the driver sends out-of-band calls (install, new params after a recovery, replica resets,
  progress, reads) only between executions and waits for all of them before the next one;
- a failed execution: the graph is fenced on each of its actors (a late task of it raises
  instead of changing state; a running one finishes first) and torn down in the background;
  the session then recovers as with calls and the next step compiles a new graph (same step
  id, same batch).

Refused (transport="compiled": ConfigError; "auto": actor calls, said in the log and in
``RaySession.explain_transport``): asynchronous steps (``consistency="async"``). Pipelined
micro-batch steps compile as one node per worker action (``compiled_pipeline.py``, which
builds on the classes here). Per plan, as for run(): ``data_path="store"``, workers on several
nodes under "auto", channels over ``MAX_BUFFER``.
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
from ...plan import DRIVER, Plan
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


def next_generation() -> int:
    """A new compiled graph's generation, unique in this process (one counter for every kind
    of compiled training graph: fences compare generations)."""
    return next(_GENERATIONS)


def training_buffer_bytes(
    plan: Plan,
    feeds: Sequence[Mapping[str, Any]],
    params: Mapping[str, Any],
    takers: Sequence[int],
) -> int:
    """Channel buffer for a training graph: its largest message (a task's output at the plan's
    batch, one replica's feeds, or a taker's new params), doubled, plus headroom."""
    sizes = node_bytes(plan.program, plan.cost)
    largest = max((sum(message_bytes(v) for v in part.values()) for part in feeds), default=0)
    for task in plan.tasks:
        for _dest, names in task.outputs:
            largest = max(largest, sum(int(sizes.get(n, 0)) + PER_ARRAY for n in names))
    for w in takers:
        mine = [p for p in plan.resident.get(w, ()) if p in params]
        largest = max(largest, PER_ARRAY + sum(message_bytes(params[p]) for p in mine))
    return max(MIN_BUFFER, 2 * largest + HEADROOM)


def shard_nodes(
    shards: Sequence[Any],
    serves: Sequence[Sequence[int]],
    generation: int,
    controls: Sequence[Any],
    grads: Sequence[Sequence[Any]],
    gates: Sequence[Any],
    clip: bool,
) -> tuple[list[Any], list[tuple[int, Any]]]:
    """Bind a step's update over sharded servers into a compiled graph under construction
    (used by plain, replicated and pipelined training graphs alike).

    Two phases, as with calls: a stage node per shard (its gradient dicts ``grads[s]`` in
    the order the calls path stages them, with ``clip`` every shard's ``compiled_sums`` node,
    and every leaf of the step, ``gates``, so it runs only once every task succeeded), then a
    commit node per shard taking *every* shard's stage output, so a shard commits only once
    every shard staged. ``shards``: the shards' actors; ``serves[s]``: the takers shard ``s``
    sends new params to; ``controls[s]``: shard ``s``'s input node, ``(step, split)``.
    Returns (each shard's status node, (taker, new params' node) per taker and serving shard,
    in shard order)."""
    sums = []
    if clip:
        sums = [
            s.compiled_sums.bind(generation, controls[i], *grads[i]) for i, s in enumerate(shards)
        ]
    staged = [
        s.compiled_stage.bind(
            generation, controls[i], len(grads[i]), len(sums), *grads[i], *sums, *gates
        )
        for i, s in enumerate(shards)
    ]
    statuses: list[Any] = []
    params: list[tuple[int, Any]] = []
    for i, s in enumerate(shards):
        takers = tuple(serves[i])
        n = 1 + len(takers)
        commit = s.compiled_commit
        if n > 1:
            commit = commit.options(num_returns=n)
        node = commit.bind(generation, controls[i], takers, *staged)
        outs = list(node) if n > 1 else [node]
        statuses.append(outs[0])
        params.extend((w, outs[1 + j]) for j, w in enumerate(takers))
    return statuses, params


class TrainingGraph:
    """One training plan compiled on a cluster's workers and its parameter-server actor(s).

    The graph's input is one control per server actor, ``(step, split)`` (``split``: that
    actor's data-parallel stage arguments, as the calls path passes them), then one per
    replica, ``(step, trace, check_finite, feeds)`` with that replica's rows: each is its
    own channel, read only by its replica's tasks (or its server)."""

    def __init__(
        self,
        workers: Sequence[Any],
        servers: Sequence[Any],
        dests: Sequence[str],
        plan: Plan,
        plan_id: int,
        serves: Sequence[Sequence[int]],
        buffer_bytes: int,
        width: int,
        clip: bool = False,
    ) -> None:
        self.plan, self.plan_id, self.buffer_bytes = plan, plan_id, buffer_bytes
        self.workers, self.servers = list(workers), list(servers)
        self.serves = [tuple(ws) for ws in serves]
        self.takers = tuple(sorted({w for ws in self.serves for w in ws}))
        self.width = width
        self.replicas = -(-plan.num_workers // width)
        self.generation = next_generation()
        self.torn_down = False
        self._teardown: threading.Thread | None = None
        gen = self.generation
        actors = sorted({t.worker for t in plan.tasks} | set(self.takers))
        self.actors = [self.workers[w] for w in actors] + self.servers
        # Every process that creates channels sizes them (see compiled.py's docstring).
        set_buffer_size(None, buffer_bytes)
        ray.get(
            [a.__ray_call__.remote(set_buffer_size, buffer_bytes) for a in self.actors],
            timeout=60,
        )
        n_servers = len(self.servers)
        consumed = {(src, slot) for t in plan.tasks for src, slot, _ in t.imports}
        outs: dict[int, list[Any]] = {}
        with InputNode() as inp:
            controls = [inp[i] for i in range(n_servers + self.replicas)]
            for task in plan.tasks:
                k = max(1, len(task.outputs))
                method = self.workers[task.worker].train_compiled
                if k > 1:
                    method = method.options(num_returns=k)
                args = [outs[src][slot] for src, slot, _ in task.imports]
                control = controls[n_servers + task.worker // width]
                node = method.bind(plan_id, task.id, gen, control, *args)
                outs[task.id] = list(node) if k > 1 else [node]
            # Per server actor, its gradient dicts in plan order (replica-major: the order
            # the calls path stages them in), and the leaves every update waits for.
            grads: list[list[Any]] = [[] for _ in self.servers]
            gates, driver = [], []
            for task in plan.tasks:
                for slot, node in enumerate(outs[task.id]):
                    dest = task.outputs[slot][0] if task.outputs else None
                    if isinstance(dest, str) and dest in dests:
                        grads[list(dests).index(dest)].append(node)
                    elif (task.id, slot) not in consumed:
                        gates.append(node)  # the driver's outputs and any other leaf
                        if dest == DRIVER:
                            driver.append(node)
            if n_servers == 1:
                statuses, params = self._one_server(gen, controls[0], grads[0], gates)
            else:
                statuses, params = shard_nodes(
                    self.servers, self.serves, gen, controls[:n_servers], grads, gates, clip
                )
            takes = [self.workers[w].take_params.bind(plan_id, gen, node) for w, node in params]
            dag = MultiOutputNode(gates + statuses + takes)
        self.n_gates = len(gates)
        self.driver_at = [gates.index(d) for d in driver]
        self.dag = dag.experimental_compile(_max_inflight_executions=1)

    def _one_server(
        self, gen: int, control: Any, grads: list[Any], gates: list[Any]
    ) -> tuple[list[Any], list[tuple[int, Any]]]:
        """One node stages and commits at once; it takes every gradient dict and every other
        leaf of the step, so it runs only once every task succeeded. Returns (its status
        node, (taker, its new params' node) per taker)."""
        takers = self.serves[0]
        n = 1 + len(takers)
        update = self.servers[0].compiled_step
        if n > 1:
            update = update.options(num_returns=n)
        node = update.bind(gen, control, takers, len(grads), *grads, *gates)
        outs = list(node) if n > 1 else [node]
        return [outs[0]], [(w, outs[1 + i]) for i, w in enumerate(takers)]

    def layout(self) -> str:
        """What the graph holds, in words (for ``explain_transport`` and the log)."""
        replicas = f"{self.replicas} replicas, " if self.replicas > 1 else ""
        if len(self.servers) > 1:
            return (
                f"{replicas}{len(self.servers)} parameter-server shards' stage and commit included"
            )
        return f"{replicas}the server's update included"

    def run(
        self,
        step: int,
        splits: Sequence[Mapping[str, Any]],
        feeds: Sequence[Mapping[str, Any]],
        trace: bool,
        check_finite: bool,
        timeout: float,
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Execute step ``step`` (``splits``: each server actor's data-parallel stage arguments,
        ``feeds``: each replica's): (the driver's outputs in plan order, each server actor's
        commit status)."""
        controls: list[tuple[Any, ...]] = [(step, dict(sp)) for sp in splits]
        controls += [(step, trace, check_finite, dict(f)) for f in feeds]
        ref = self.dag.execute(*controls)
        values = ray.get(ref, timeout=timeout)
        driver = [own(values[i]) for i in self.driver_at]
        statuses = values[self.n_gates : self.n_gates + len(self.servers)]
        return driver, [dict(s) for s in statuses]

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
        feeds: Sequence[Mapping[str, Any]],
        params: Mapping[str, Any],
        width: int,
        clip: bool = False,
    ) -> TrainingGraph | None:
        """The live graph of ``plan`` (compiled now if needed); None: refused, use calls.
        ``server``: the session's ServerLink or ShardedServer; ``feeds``: each replica's;
        ``width``: workers per replica; ``clip``: sharded servers clip by the global norm."""
        need = training_buffer_bytes(plan, feeds, params, takers)
        handles = list(server.handles)
        graph = self.graph
        if graph is not None and (
            graph.torn_down
            or graph.plan_id != plan_id
            or graph.workers != list(self.cluster.workers)
            or len(graph.servers) != len(handles)
            or any(a is not b for a, b in zip(graph.servers, handles))
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
                graph = TrainingGraph(
                    self.cluster.workers,
                    handles,
                    server.dests,
                    plan,
                    plan_id,
                    server.serves(takers),
                    need,
                    width,
                    clip,
                )
            except Exception as e:  # an unsupported shape: say so, stay on calls
                reason = f"Ray could not compile it: {type(e).__name__}: {e}"
        if graph is None:
            self.refuse(plan_id, reason)
            return None
        self.graph = graph
        log.info(
            "compiled training plan %d (%d tasks: %s) into a Ray Compiled Graph, channels of "
            "%d bytes",
            plan_id,
            len(plan.tasks),
            graph.layout(),
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
                f"transport: compiled graph ({self.graph.layout()}), channels of "
                f"{self.graph.buffer_bytes:,} B"
            )
        if self.last_reason:
            return f"transport: actor calls ({transport}: {self.last_reason})"
        return f"transport: {transport}, compiled from the second step in a row"
