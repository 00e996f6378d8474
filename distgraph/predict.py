"""The step-time predictor: a step's wall time from its calls, as the Ray runtime runs them.

A step is a list of actor calls in the order the driver submits them (:class:`Call`: the
worker, its compute, the results of other calls it takes and their bytes). A call may hold a
list of actions (:class:`ActionCost`) that its worker runs in order inside that one call, as
a pipelined step does: one call per worker holding the worker's whole action list, a value
for another stage handed straight to that worker's mailbox (``deliver``) and the receiving
action waiting there for it. The model of the runtime (its constants in a
:class:`~distgraph.cost.Calibration`):

* the driver submits the calls one by one, ``submit_s`` each (Python, before any waiting);
* every call passes through the driver once more: when it is submitted with nothing to wait
  for, or when the last result it waits for has reached the driver (Ray's owner of every
  result), the driver dispatches it, ``driver_s`` each, one at a time. So a step with many
  calls at once queues at the driver: the per-call overhead grows with the workers. A call
  that takes its inputs as nested references (``Call.nested``: the data-parallel server's
  staging call) is dispatched at once and waits on its worker for each of them instead;
* a dispatched call reaches its worker ``hop_s - call_overhead_s - driver_s`` later (the rest
  of a dependent hop), a value of ``b`` bytes ``b * seconds_per_byte`` later;
* a worker runs its calls one at a time in submission order, each taking
  ``call_overhead_s`` plus its compute (``node_s`` per node), then its actions in order: an
  action costs ``action_s`` (taking its values, handing its results on), its nodes' compute
  and ``node_s`` per node (no call overhead), and starts when
  the previous one ended and every value it takes from another worker's action has arrived:
  ``deliver_s`` (plus its bytes) after the producing action ended;
* the step ends when the driver has the results it waits for (the same latency back), plus
  one more submission (the commit).

:func:`simulate_calls` runs that model; :func:`pipeline_calls` and :func:`plan_calls` turn a
schedule or a plan's tasks into calls. Nothing here imports the runtime.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from .cost import Calibration, CostModel, node_bytes, node_seconds
from .errors import ConfigError
from .ops import LEAF_OPS

#: An action of a schedule (any hashable: the predictor only orders and looks them up).
Act = TypeVar("Act", bound=Hashable)

__all__ = [
    "SERVER",
    "ActionCost",
    "Call",
    "Prediction",
    "pipeline_calls",
    "plan_calls",
    "replicated",
    "server_seconds",
    "simulate_calls",
]

#: The worker name of the parameter server's call in a list of calls.
SERVER = "ps"


@dataclass(frozen=True)
class ActionCost:
    """One action run inside a call (a pipelined step's schedule action)."""

    #: Compute seconds of the action (its nodes' estimate).
    seconds: float
    #: Nodes it runs (each pays ``Calibration.node_s``).
    nodes: int = 0
    #: (call index, action position in that call, bytes) of each value another worker's
    #: action delivers to it (worker to worker, not through the driver).
    deps: tuple[tuple[int, int, int], ...] = ()
    label: str = ""


@dataclass(frozen=True)
class Call:
    """One actor call of a step, in submission order."""

    #: Worker index, or :data:`SERVER`.
    worker: int | str
    #: Compute seconds of the call (its nodes' estimate), before its actions.
    seconds: float
    #: (index of an earlier call, bytes) for each result of another worker it takes.
    deps: tuple[tuple[int, int], ...] = ()
    #: Bytes the driver sends with the call (inline feeds).
    feed_bytes: int = 0
    #: Whether the driver waits for this call's result (outputs, the staged update).
    awaited: bool = False
    label: str = ""
    #: Objects the call takes and returns beyond one each (see ``Calibration.object_s``).
    objects: int = 0
    #: Nodes the call runs (each pays ``Calibration.node_s``).
    nodes: int = 0
    #: Actions the call runs in order after its own compute (see :class:`ActionCost`).
    actions: tuple[ActionCost, ...] = ()
    #: Whether ``deps`` are passed nested: the driver dispatches the call at once and the
    #: call waits on its worker for each result (``hop`` latency after it was made).
    nested: bool = False


@dataclass(frozen=True)
class Prediction:
    """A predicted step (seconds)."""

    seconds: float
    #: Each call's (start, end) on its worker.
    times: tuple[tuple[float, float], ...]
    #: Time the driver spent dispatching (its serial share of the step).
    driver_busy: float
    #: The busiest worker's calls: compute plus per-call overhead.
    busiest: float
    #: Per call, each of its actions' (start, end).
    action_times: tuple[tuple[tuple[float, float], ...], ...] = ()

    @property
    def calls(self) -> int:
        """How many calls the step makes."""
        return len(self.times)


def simulate_calls(calls: Sequence[Call], cal: Calibration) -> Prediction:
    """Predict a step's wall time from its calls (see the module doc for the model)."""
    _check(
        {
            "call_overhead_s": cal.call_overhead_s,
            "seconds_per_byte": cal.seconds_per_byte,
            "hop_s": cal.hop_s,
            "driver_s": cal.driver_s,
            "submit_s": cal.submit_s,
            "object_s": cal.object_s,
            "node_s": cal.node_s,
            "deliver_s": cal.deliver_s,
            "action_s": cal.action_s,
        }
    )
    n = len(calls)
    for k, c in enumerate(calls):
        if not c.nested and any(not 0 <= d < k for d, _ in c.deps):
            raise ConfigError(
                f"call {k} ({c.label or c.worker}) takes the result of a call not submitted "
                f"before it: {[d for d, _ in c.deps]}; list calls in submission order"
            )
        for a in c.actions:
            for d, at, _ in a.deps:
                if not (0 <= d < n and 0 <= at < len(calls[d].actions)) or d == k:
                    raise ConfigError(
                        f"action {a.label or '?'} of call {k} ({c.label or c.worker}) takes "
                        f"a value from action {at} of call {d}, which is not an action of "
                        "another call of the step"
                    )
    spb = cal.seconds_per_byte
    latency = max(0.0, cal.hop_s - cal.call_overhead_s - cal.driver_s)
    ready = [(k + 1) * cal.submit_s + c.feed_bytes * spb for k, c in enumerate(calls)]
    waiting = [0 if c.nested else len(c.deps) for c in calls]
    dependents: list[list[int]] = [[] for _ in calls]
    for k, c in enumerate(calls):
        if not c.nested:
            for d, _ in c.deps:
                dependents[d].append(k)
    queue: dict[int | str, list[int]] = {}
    for k, c in enumerate(calls):
        queue.setdefault(c.worker, []).append(k)
    head = dict.fromkeys(queue, 0)
    free = dict.fromkeys(queue, 0.0)
    #: Per worker: the position of the next action of its current call (-1: not started).
    pos = dict.fromkeys(queue, -1)
    arrive: list[float | None] = [None] * n
    times: list[tuple[float, float]] = [(0.0, 0.0)] * n
    ends: list[float | None] = [None] * n
    acts: list[list[tuple[float, float] | None]] = [[None] * len(c.actions) for c in calls]
    #: What a blocked worker waits for: a call's end, or an action's (call, position).
    blocked: dict[object, list[int | str]] = {}
    runnable: deque[int | str] = deque()
    heap = [(ready[k], k) for k in range(n) if waiting[k] == 0]
    heapq.heapify(heap)
    driver_free = 0.0
    done = 0

    def finish(k: int) -> None:
        nonlocal done
        done += 1
        end = times[k][1]
        ends[k] = end
        runnable.extend(blocked.pop(k, ()))
        for j in dependents[k]:
            nbytes = next(b for d, b in calls[j].deps if d == k)
            ready[j] = max(ready[j], end + nbytes * spb)
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(heap, (ready[j], j))

    def run_worker(w: int | str) -> None:
        # Calls start in submission order once dispatched and the worker is free; a call's
        # actions run in order, each once the values it takes have arrived.
        order = queue[w]
        while head[w] < len(order):
            k = order[head[w]]
            c = calls[k]
            if pos[w] < 0:
                got = arrive[k]
                if got is None:
                    return
                start = max(got, free[w])
                if c.nested:
                    for d, b in c.deps:
                        end = ends[d]
                        if end is None:
                            blocked.setdefault(d, []).append(w)
                            return
                        start = max(start, end + latency + b * spb)
                times[k] = (start, start + _duration(c, cal))
                pos[w] = 0
            now = times[k][1]
            while pos[w] < len(c.actions):
                a = c.actions[pos[w]]
                start = now
                for d, p, b in a.deps:
                    got_act = acts[d][p]
                    if got_act is None:
                        blocked.setdefault((d, p), []).append(w)
                        times[k] = (times[k][0], now)
                        return
                    start = max(start, got_act[1] + cal.deliver_s + b * spb)
                now = start + _action_duration(a, cal)
                acts[k][pos[w]] = (start, now)
                runnable.extend(blocked.pop((k, pos[w]), ()))
                pos[w] += 1
                times[k] = (times[k][0], now)
            free[w] = now
            head[w] += 1
            pos[w] = -1
            finish(k)

    def drain() -> None:
        while runnable:
            run_worker(runnable.popleft())

    for w in queue:  # nested calls with nothing to wait for
        runnable.append(w)
    drain()
    while heap:
        t, k = heapq.heappop(heap)
        driver_free = max(driver_free, t) + cal.driver_s
        arrive[k] = driver_free + latency
        runnable.append(calls[k].worker)
        drain()
    if done != n:
        raise ConfigError(
            "the calls deadlock: a worker's next call (in submission order) or action waits "
            "for a call or action that can only run after it"
        )
    awaited = [k for k, c in enumerate(calls) if c.awaited] or list(range(n))
    end = max((times[k][1] for k in awaited), default=0.0)
    seconds = end + latency + cal.submit_s if n else 0.0
    busy: dict[int | str, float] = {}
    for c in calls:
        busy[c.worker] = (
            busy.get(c.worker, 0.0)
            + _duration(c, cal)
            + sum(_action_duration(a, cal) for a in c.actions)
        )
    return Prediction(
        seconds,
        tuple(times),
        n * cal.driver_s,
        max(busy.values(), default=0.0),
        tuple(tuple(t or (0.0, 0.0) for t in row) for row in acts),
    )


def _duration(call: Call, cal: Calibration) -> float:
    """A call's own time on its worker once it started (before its actions)."""
    return (
        cal.call_overhead_s + call.objects * cal.object_s + call.nodes * cal.node_s + call.seconds
    )


def _action_duration(action: ActionCost, cal: Calibration) -> float:
    """An action's time inside its call once its values are in: its own setup and hand-on
    (``action_s``) and its nodes, no call."""
    return cal.action_s + action.nodes * cal.node_s + action.seconds


def server_seconds(grad_bytes: int, gradient_dicts: int, cost: CostModel) -> float:
    """The parameter server's compute for one step: add ``gradient_dicts`` gradients of
    ``grad_bytes`` in all (float64 elements) and apply an optimizer step (a few flops per
    element)."""
    elements = grad_bytes / 8
    return (
        cost.node_overhead * gradient_dicts
        + (gradient_dicts + 4) * elements / cost.flops_per_second
    )


def pipeline_calls(
    lists: Sequence[Sequence[Act]],
    worker_of: Callable[[int], int],
    seconds_of: Callable[[Act], float],
    deps_of: Callable[[Act], Iterable[tuple[Act, int]]],
    server: tuple[float, Callable[[int], int], int] | None = None,
    nodes_of: Callable[[Act], int] = lambda a: 0,
    nested: bool = False,
    label_of: Callable[[Act], str] = str,
) -> list[Call]:
    """Calls of a pipelined step as the runtime submits it: one call per worker holding its
    whole action list (``lists``, one per call in submission order; ``worker_of(i)`` is
    list ``i``'s worker), each action its compute, nodes and the (action, bytes) it takes
    from other workers' actions, delivered worker to worker. The driver waits for every
    call. ``server`` = (its compute, bytes call ``i`` sends it, workers it returns new params
    to) adds the parameter server's staging call after them, taking each sending call's
    result (``nested``: by nested reference, as for data-parallel replicas)."""
    where = {a: (i, j) for i, acts in enumerate(lists) for j, a in enumerate(acts)}
    calls = [
        Call(
            worker_of(i),
            0.0,
            awaited=True,
            label=f"worker {worker_of(i)}",
            actions=tuple(
                ActionCost(
                    seconds_of(a),
                    nodes_of(a),
                    tuple((*where[d], b) for d, b in deps_of(a)),
                    label=label_of(a),
                )
                for a in acts
            ),
        )
        for i, acts in enumerate(lists)
    ]
    if server is not None:
        secs, sent, takers = server
        deps = tuple((i, sent(i)) for i in range(len(lists)) if sent(i) > 0)
        calls.append(
            Call(
                SERVER,
                secs,
                deps,
                awaited=True,
                label="ps.stage",
                objects=_server_objects(len(deps), takers),
                nested=nested,
            )
        )
    return calls


def plan_calls(plan: object, cost: CostModel) -> list[Call]:
    """Calls of a :class:`~distgraph.plan.Plan`'s tasks: each task's node estimate, its
    imports (bytes under ``cost``), its inline feeds; for a training plan (tasks sending to
    the parameter server) the server's staging call, combining one gradient dict per task
    that sends one."""
    from .plan import DRIVER, PARAM_SERVER, Plan

    assert isinstance(plan, Plan)
    program = plan.program
    secs = node_seconds(program, cost)
    nbytes = node_bytes(program, cost)
    index = {t.id: i for i, t in enumerate(plan.tasks)}
    calls: list[Call] = []
    grads: list[tuple[int, int]] = []
    for i, t in enumerate(plan.tasks):
        deps = tuple(
            (index[src], sum(nbytes[v] for v in names))
            for src, _slot, names in t.imports
            if src in index
        )
        outputs = dict(t.outputs)
        if PARAM_SERVER in outputs:
            grads.append((i, sum(nbytes[v] for v in outputs[PARAM_SERVER])))
        calls.append(
            Call(
                t.worker,
                sum(secs[n] for n in t.nodes if program.nodes[n].op not in LEAF_OPS),
                deps,
                feed_bytes=sum(nbytes[v] for v in t.feeds),
                awaited=DRIVER in outputs,
                label=f"task {t.id}",
                nodes=sum(1 for n in t.nodes if program.nodes[n].op not in LEAF_OPS),
            )
        )
    if grads:
        total = sum(b for _, b in grads)
        takers = sum(1 for names in plan.resident.values() if names)
        calls.append(
            Call(
                SERVER,
                server_seconds(total, len(grads), cost),
                tuple(grads),
                awaited=True,
                label="ps.stage",
                objects=_server_objects(len(grads), takers),
                nested=replicated(plan),
            )
        )
    return calls


def replicated(plan: object) -> bool:
    """Whether ``plan`` holds data-parallel replicas: some gradient goes to the server from
    more than one task (each replica sends its own). The runtime then passes the server the
    gradients as nested references (``Call.nested``)."""
    from .plan import PARAM_SERVER, Plan

    assert isinstance(plan, Plan)
    sent = [n for t in plan.tasks for d, names in t.outputs if d == PARAM_SERVER for n in names]
    return len(sent) > len(set(sent))


def _server_objects(gradient_dicts: int, takers: int) -> int:
    """Objects of the server's staging call beyond one in and one out: a gradient dict from
    each sender, new params for each worker that takes them, the staged update."""
    return max(0, gradient_dicts - 1) + takers


def _check(values: Mapping[str, float]) -> None:
    bad = {k: v for k, v in values.items() if not (v >= 0 and v < float("inf"))}
    if bad:
        raise ConfigError(
            f"calibration constants must be finite and >= 0, got {bad}: measure them again "
            "(RayExecutor.calibrate(refresh=True)) or build a Calibration from a cost model"
        )
