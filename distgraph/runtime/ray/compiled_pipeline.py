"""Pipelined training steps on the compiled transport: a micro-batch schedule (GPipe, 1F1B),
replicas of the pipeline and the parameter server's update compiled into one Ray Compiled
Graph.

The graph of a pipelined step (:class:`PipelineGraph`): one node per (worker, schedule
action), bound through the actor's ``__ray_call__`` to :func:`action_node`, which runs the
action with the worker's own code (``ActionRunner.run_action_alone``). A hand-off between
stages is a channel from the producing action's node to the consuming action's node (same
micro-batch), so no mailbox is needed; each action also passes a token to its worker's next
action, so a failed action fails the rest of its worker's list (Ray skips a node whose input
failed and passes the error on). Each worker's last action returns its gradients combined over
its micro-batches (weighted by rows) and the loss, as on calls. One node on the parameter
server (:func:`update_node`) takes every worker's gradient dicts, in (replica, stage) order,
and every other leaf output, so it runs only if every action succeeded; it combines the
replicas' gradients by rows (as ``ParameterServer.stage`` does on calls), stages and commits
the update at once, and returns the status plus each taker's new params, which a last node on
the taker (``take_params``) makes resident.

Sharded parameter servers (``ps_shards=S``): each worker's last action sends each shard the
gradients of the params it owns (the session's ``_ends``, routed as ``ShardedServer.route_plan``
routes plain plans), and the server's update is the plain graphs' per-shard nodes
(``compiled_training.shard_nodes``): a stage node per shard taking its gradient dicts in
(replica, stage) order and every other leaf, with ``clip_norm`` a sums-of-squares node per
shard feeding every stage (the one global norm), and a commit node per shard taking every
shard's stage output. Each shard's control, ``(step, split)``, is an input of its own: the
split is the one ``ShardedServer.stage_splits`` passes on calls (per replica, how many of the
shard's dicts are its and its rows), built from the step's rows, so the result is identical
to calls. The driver merges the shards' statuses (``shards.merge_commits``).

Order on a worker (Ray 2.60): the compiled graph runs an actor's nodes in the order they were
bound (``compiled_dag_node.py`` sorts an actor's tasks by ``bind_index`` and
``dag_node_operation._build_dag_node_operation_graph`` adds an edge from each COMPUTE to the
actor's next one), so the graph binds every action in the plan's ``submission_order``: each
worker's actions in its schedule's order (1F1B's memory bound is kept) and every action after
the actions it imports from.

What a graph is compiled for: one plan, its workers and server, and the step's *shape* (how
many micro-batches each active replica splits into). Rows per micro-batch travel with the
step's input, so uneven batches run on the same graph; a step of another shape (a batch with
fewer rows than replicas x micro-batches) runs on actor calls and leaves the graph in place.
Everything else (the protocol's guarantees, the fence, teardown, recovery, buffer sizing, the
idle reaper) is the one of compiled training steps (``compiled_training.py``).

Refused (transport="compiled": ConfigError; "auto": actor calls, said why), per plan: what
:func:`~distgraph.runtime.ray.compiled.refusal` refuses.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ray
from ray.dag import InputNode, MultiOutputNode

from ...cost import node_bytes
from ...plan import DRIVER, PARAM_SERVER, Task
from ...stageplan import StagePlan
from ..actions import ActionCall
from ..protocol import CallHeader
from .compiled import (
    HEADROOM,
    MIN_BUFFER,
    PER_ARRAY,
    ChannelSizeError,
    message_bytes,
    own,
    set_buffer_size,
)
from .compiled_training import CompiledTraining, TrainingGraph, next_generation, shard_nodes
from .shards import ShardedServer, merge_commits

log = logging.getLogger(__name__)

#: (replica, kind, stage, micro-batch): one action of one replica's pipeline.
ActionKey = tuple[int, str, int, int]
#: What the step's last actions send: stage -> (destination, names) per output.
Ends = Callable[[int], list[tuple[int | str, list[str]]]]


@dataclass(frozen=True)
class PipelineSpec:
    """What a pipelined session compiles, besides the step's shape (see module doc)."""

    #: The replicated stage plan and one replica's.
    plan: StagePlan
    one: StagePlan
    plan_id: int
    takers: tuple[int, ...]
    ends: Ends
    #: How the loss reduces rows ("mean" / "sum"), for combining micro-batches.
    reduction: str
    #: How replicas combine at the server (None: one replica, nothing split).
    kind: str | None


# Actor side (run through ``__ray_call__``) ------------------------------------------------------
@dataclass(frozen=True)
class ActionNode:
    """One node of a compiled pipeline: one action of one worker, as data."""

    generation: int
    replica: int
    call: ActionCall
    #: The action's task call (plan, task, imports); step, flags and feeds are the step's.
    header: CallHeader
    #: The task's feeds, taken from the micro-batch's.
    feeds: tuple[str, ...]
    #: The first input is the worker's previous action's token.
    token_in: bool
    #: The first output is a token for the worker's next action.
    token_out: bool


def action_node(worker: Any, node: ActionNode, control: tuple, *inputs: Any) -> Any:
    """Run one schedule action as a node of a compiled pipeline (in the worker's actor):
    ``control`` is the step's input (step, trace, check_finite, per replica its micro-batches'
    feeds, per replica its micro-batches' rows, per replica its rows); ``inputs`` the token,
    then the imported value dicts. Returns the token, then the action's outputs."""
    from ray.dag.context import DAGContext

    step, trace, check_finite, feeds, rows = control[:5]
    call = node.call
    what = f"worker {worker.index}, {call.label} of stage {call.stage}"
    with worker.step_lock:
        worker.check_generation(node.generation, what)
        mine = feeds[node.replica][call.microbatch]
        header = dataclasses.replace(
            node.header,
            step=int(step),
            trace=bool(trace),
            check_finite=bool(check_finite),
            inline={n: own(mine[n]) for n in node.feeds},
        )
        action = dataclasses.replace(call, rows=tuple(rows[node.replica]))
        # Arrays read from a channel are views of its buffer: copy what the env keeps.
        imported = [own(d) for d in inputs[1 if node.token_in else 0 :]]
        out = worker.run_action_alone(action, header, imported)
        limit = DAGContext.get_current().buffer_size_bytes - HEADROOM
        for (dest, names), message in zip(call.outputs, out):
            size = message_bytes(message)
            if size > limit:  # a channel that resized would hang the teardown: refuse
                worker.drop_step(header.plan_id, header.step)
                raise ChannelSizeError(
                    f"{what}: its message to {dest} ({', '.join(names)}) is {size:,} bytes, "
                    f"more than its compiled channel holds ({limit:,}); the pipeline goes "
                    "back to actor calls (or is compiled again for the larger batch)"
                )
    values = ([None] if node.token_out else []) + list(out)
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def update_node(
    server: Any,
    generation: int,
    control: tuple,
    takers: tuple[int, ...],
    counts: tuple[int, ...] | None,
    kind: str,
    n_grads: int,
    *inputs: Any,
) -> Any:
    """The parameter server's update as a node of a compiled pipeline (in the server's actor):
    ``inputs`` are the step's gradient dicts (the first ``n_grads``, in replica then stage
    order) and every other leaf output, taken so that this runs only once every action
    succeeded. With ``counts`` (gradient dicts per replica), the replicas are combined by
    their rows (``control[5]``), as ``ParameterServer.stage`` combines them on calls. Returns
    the commit's status, and with ``takers`` (status, each taker's new params)."""
    with server.step_lock:
        server.check_generation(generation, "the parameter server's update")
        step = int(control[0])
        grads = [own(d) for d in inputs[:n_grads]]
        replicas = None if counts is None else list(zip(counts, control[5]))
        staged = server.stage(step, *grads, routed=bool(takers), replicas=replicas, kind=kind)
        status = server.commit(step)
    if not takers:
        return status
    return (status, *[staged[1 + w] for w in takers])


# Driver side ------------------------------------------------------------------------------------
def pipeline_buffer_bytes(spec: PipelineSpec, control: tuple, params: Mapping[str, Any]) -> int:
    """Channel buffer for a compiled pipeline: its largest message (the step's input, an
    action's values for another stage at the largest micro-batch's rows, a worker's combined
    gradients, or a taker's new params), doubled, plus headroom."""
    largest_mb = max((max(r, default=1) for r in control[4]), default=1)
    cost = dataclasses.replace(spec.plan.cost, batch_size=max(1, int(largest_mb)))
    sizes = node_bytes(spec.plan.program, cost)
    largest = message_bytes(control[3])
    one = spec.one
    messages = [list(names) for t in one.tasks for _dest, names in t.outputs]
    messages += [names for s in range(one.num_stages) for _dest, names in spec.ends(s)]
    for names in messages:
        largest = max(largest, sum(int(sizes.get(n, 0)) + PER_ARRAY for n in names))
    for w in spec.takers:
        mine = [p for p in spec.plan.resident.get(w, ()) if p in params]
        largest = max(largest, PER_ARRAY + sum(message_bytes(params[p]) for p in mine))
    return max(MIN_BUFFER, 2 * largest + HEADROOM)


class PipelineGraph(TrainingGraph):
    """One pipelined training step compiled on a cluster's workers and its parameter-server
    actor(s), for one shape (micro-batches per active replica); see the module doc.

    ``servers``: the server's actor, or each shard's in shard order; ``dests``: the plan
    destination of each one's gradients; ``serves``: per server actor, the takers it sends
    new params to; ``clip``: sharded servers clip by the global norm (``clip_norm``)."""

    def __init__(
        self,
        workers: Sequence[Any],
        servers: Sequence[Any],
        dests: Sequence[str],
        serves: Sequence[Sequence[int]],
        spec: PipelineSpec,
        shape: tuple[int, ...],
        buffer_bytes: int,
        clip: bool = False,
    ) -> None:
        # TrainingGraph's teardown, fence and join apply as they are; the graph is built here.
        plan, one = spec.plan, spec.one
        self.plan, self.plan_id, self.buffer_bytes = plan, spec.plan_id, buffer_bytes
        self.workers, self.servers = list(workers), list(servers)
        self.serves = [tuple(ws) for ws in serves]
        self.takers = spec.takers
        self.shape = shape
        self.kind = spec.kind
        n_servers = len(self.servers)
        self.generation = next_generation()
        self.torn_down = False
        self._teardown = None
        gen = self.generation
        p, count = one.num_stages, len(one.tasks)
        lists = {
            (r, s): stage_actions_of(spec, r, s, shape[r])
            for r in range(len(shape))
            for s in range(p)
        }
        by_key: dict[ActionKey, tuple[ActionCall, Task]] = {}
        for (r, _s), acts in lists.items():
            for call, task in acts:
                by_key[(r, call.label[0], call.stage, call.microbatch)] = (call, task)
        used = {t.worker for acts in lists.values() for _c, t in acts} | set(self.takers)
        self.actors = [self.workers[w] for w in sorted(used)] + self.servers
        # Every process that creates channels sizes them (see compiled.py's docstring).
        set_buffer_size(None, buffer_bytes)
        ray.get(
            [a.__ray_call__.remote(set_buffer_size, buffer_bytes) for a in self.actors],
            timeout=60,
        )
        outs: dict[ActionKey, list[Any]] = {}
        offset: dict[ActionKey, int] = {}  # 1 when the first output is a token
        consumed: set[tuple[ActionKey, int]] = set()
        last: dict[int, ActionKey] = {}  # worker -> its latest bound action
        with InputNode() as inp:
            # The step's control (every action's and one server's), then each shard's own.
            control = inp[0]
            for r in range(len(shape)):
                # Bound in submission order: each worker's actions in its schedule's order
                # (Ray runs an actor's nodes in bind order), each after what it imports.
                for act in one.submission_order(shape[r]):
                    key = (r, act.kind, act.stage, act.microbatch)
                    call, task = by_key[key]
                    w = task.worker
                    args: list[Any] = []
                    prev = last.get(w)
                    if prev is not None:
                        args.append(outs[prev][0])
                        consumed.add((prev, 0))
                    for src, slot, _names in task.imports:
                        local = src - r * count
                        producer = (r, "F" if local % 2 == 0 else "B", local // 2, act.microbatch)
                        args.append(outs[producer][offset[producer] + slot])
                        consumed.add((producer, offset[producer] + slot))
                    passes = call.position < call.count - 1
                    node = ActionNode(
                        generation=gen,
                        replica=r,
                        call=call,
                        header=CallHeader(
                            spec.plan_id, 0, task.id, training=True, imports=len(task.imports)
                        ),
                        feeds=tuple(task.feeds),
                        token_in=prev is not None,
                        token_out=passes,
                    )
                    n = (1 if passes else 0) + len(call.outputs)
                    method = self.workers[w].__ray_call__
                    if n > 1:
                        method = method.options(num_returns=n)
                    bound = method.bind(action_node, node, control, *args)
                    outs[key] = list(bound) if n > 1 else [bound]
                    offset[key] = 1 if passes else 0
                    last[w] = key
            # The step's ends, in (replica, stage) order as the calls path stages them: per
            # server actor its gradient dicts, and how many of them each replica sent.
            grads: list[list[Any]] = [[] for _ in self.servers]
            counts = [[0] * len(shape) for _ in self.servers]
            gates, driver = [], []
            self.answering: list[int] = []  # the worker of each driver output
            sent: list[Task] = []
            for (r, s), acts in sorted(lists.items()):
                call, task = acts[-1]
                key = (r, call.label[0], call.stage, call.microbatch)
                sent.append(Task(id=len(sent), worker=task.worker, outputs=spec.ends(s)))
                for i, (dest, _) in enumerate(call.outputs):
                    at = offset[key] + i
                    if isinstance(dest, str) and dest in dests:
                        k = list(dests).index(dest)
                        grads[k].append(outs[key][at])
                        consumed.add((key, at))
                        counts[k][r] += 1
                    elif dest == DRIVER:
                        driver.append(outs[key][at])
                        self.answering.append(task.worker)
            for key, nodes in outs.items():
                for i, node in enumerate(nodes):
                    if (key, i) not in consumed:
                        gates.append(node)  # the driver's outputs and any other leaf
            if n_servers == 1:
                statuses, params = self._update(control, grads[0], counts[0], gates)
            else:
                # Each shard's (step, split) is an input of its own (see ``execute``).
                controls = [inp[1 + k] for k in range(n_servers)]
                statuses, params = shard_nodes(
                    self.servers, self.serves, gen, controls, grads, gates, clip
                )
            takes = [
                self.workers[w].take_params.bind(spec.plan_id, gen, node) for w, node in params
            ]
            dag = MultiOutputNode(gates + statuses + takes)
        #: Per shard, how many of its gradient dicts each replica sends (its stage split).
        self.shard_counts = [tuple(c) for c in counts]
        self.n_gates = len(gates)
        self.driver_at = [gates.index(d) for d in driver]
        #: One task per (replica, stage) that ran, saying what it sends (as on calls).
        self.sent = dataclasses.replace(plan, tasks=sent)
        self.n_actions = len(outs)
        self.dag = dag.experimental_compile(_max_inflight_executions=1)

    def _update(
        self, control: Any, grads: list[Any], counts: list[int], gates: list[Any]
    ) -> tuple[list[Any], list[tuple[int, Any]]]:
        """One server: one node combines, stages and commits (:func:`update_node`). Returns
        (its status node, (taker, its new params' node) per taker)."""
        takers = self.serves[0]
        m = 1 + len(takers)
        update = self.servers[0].__ray_call__
        if m > 1:
            update = update.options(num_returns=m)
        grouped = tuple(counts) if self.kind is not None else None
        srv = update.bind(
            update_node,
            self.generation,
            control,
            takers,
            grouped,
            self.kind or "mean",
            len(grads),
            *grads,
            *gates,
        )
        outs = list(srv) if m > 1 else [srv]
        return [outs[0]], [(w, outs[1 + i]) for i, w in enumerate(takers)]

    def shard_controls(self, control: tuple) -> list[tuple[int, dict[str, Any]]]:
        """Each shard's ``(step, split)`` for the step of ``control``: the data-parallel
        stage arguments ``ShardedServer.stage_splits`` gives it on calls (per replica, how
        many of the shard's gradient dicts are its and its rows; ``{}`` with one replica)."""
        if len(self.servers) == 1:
            return []
        step, rows = control[0], [int(r) for r in control[5]]
        if self.kind is None:
            return [(step, {}) for _ in self.servers]
        return [
            (step, {"replicas": list(zip(c, rows)), "kind": self.kind}) for c in self.shard_counts
        ]

    def execute(
        self, control: tuple, timeout: float
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Execute one step: (the driver's outputs in (replica, stage) order, the commit's
        status; with shards, theirs merged as ``ShardedServer.commit`` merges them)."""
        ref = self.dag.execute(control, *self.shard_controls(control))
        values = ray.get(ref, timeout=timeout)
        driver = [own(values[i]) for i in self.driver_at]
        statuses = [dict(v) for v in values[self.n_gates : self.n_gates + len(self.servers)]]
        return driver, statuses[0] if len(statuses) == 1 else merge_commits(statuses)

    def layout(self) -> str:
        """What the graph holds besides its actions, in words."""
        if len(self.servers) > 1:
            return f"{len(self.servers)} parameter-server shards' stage and commit included"
        return "the server's update included"


def stage_actions_of(
    spec: PipelineSpec, replica: int, stage: int, microbatches: int
) -> list[tuple[ActionCall, Task]]:
    """Replica ``replica``'s stage ``stage``'s actions (``pipelined.stage_actions``)."""
    from .pipelined import stage_actions  # pipelined.py imports this module

    return stage_actions(
        spec.plan, spec.one, replica, stage, microbatches, spec.ends, spec.reduction
    )


class CompiledPipeline(CompiledTraining):
    """The compiled transport of a pipelined session: :class:`CompiledTraining`'s policy
    (compiled from the second step in a row, refusals, failures, the graph slot) over
    :class:`PipelineGraph`."""

    graph: PipelineGraph | None
    #: The session's sharded servers (None: one server); set by the session with its plan.
    sharded: ShardedServer | None = None

    def pipeline_for(
        self,
        spec: PipelineSpec,
        server: Any,
        shape: tuple[int, ...],
        control: tuple,
        params: Mapping[str, Any],
    ) -> PipelineGraph | None:
        """The live graph for this step (compiled now if needed); None: the step runs on
        calls (refused, or a step of another shape than the live graph's). ``server``: the
        parameter-server actor (with :attr:`sharded` set, the shards' actors are used)."""
        need = pipeline_buffer_bytes(spec, control, params)
        sharded = self.sharded
        if sharded is not None:
            handles, dests = list(sharded.handles), list(sharded.dests)
            serves = sharded.serves(spec.takers)
            clip = sharded.optimizer.clip_norm is not None  # one global norm over the shards
        else:
            handles, dests, serves, clip = [server], [PARAM_SERVER], [list(spec.takers)], False
        graph = self.graph
        if graph is not None and (
            graph.torn_down
            or graph.plan_id != spec.plan_id
            or graph.workers != list(self.cluster.workers)
            or len(graph.servers) != len(handles)
            or any(a is not b for a, b in zip(graph.servers, handles))
            or need > graph.buffer_bytes
        ):
            self.drop()  # another user took the workers, a replaced actor, a larger batch
            graph = None
        if graph is not None and graph.shape != shape:
            # A short batch (fewer rows than micro-batches): one step on calls, the graph stays.
            self.last_reason = (
                f"this step splits into {list(shape)} micro-batches per replica, the compiled "
                f"graph into {list(graph.shape)}"
            )
            return None
        if graph is not None:
            return graph
        reason = self.why_not(spec.plan, need)
        if not reason:
            self.settle_previous()
            self.slot.claim(self)
            try:
                graph = PipelineGraph(
                    self.cluster.workers, handles, dests, serves, spec, shape, need, clip
                )
            except Exception as e:  # an unsupported shape: say so, stay on calls
                reason = f"Ray could not compile it: {type(e).__name__}: {e}"
        if graph is None:
            self.refuse(spec.plan_id, reason)
            return None
        self.graph = graph
        log.info(
            "compiled pipelined training plan %d (%d actions of %s micro-batches, schedule %r, "
            "%s) into a Ray Compiled Graph, channels of %d bytes",
            spec.plan_id,
            graph.n_actions,
            list(shape),
            spec.one.schedule_name,
            graph.layout(),
            need,
        )
        return graph

    def describe(self) -> str:
        """One line: how this session's pipelined steps travel."""
        graph = self.graph
        if self.options.transport == "calls" or graph is None or graph.torn_down:
            return super().describe()
        one = graph.plan
        assert isinstance(one, StagePlan)
        return (
            f"transport: compiled graph of the pipeline ({len(graph.shape)} replica(s) x "
            f"{one.num_stages} stages, {list(graph.shape)} micro-batches, schedule "
            f"{one.schedule_name!r}: one node per action, {graph.layout()}), "
            f"channels of {graph.buffer_bytes:,} B"
        )
