"""The step-time predictor: a step's wall time from its calls, as the Ray runtime runs them.

A step is a list of actor calls in the order the driver submits them (:class:`Call`: the
worker, its compute, the results of other calls it takes and their bytes). The model of the
runtime (its constants in a :class:`~distgraph.cost.Calibration`):

* the driver submits the calls one by one, ``submit_s`` each (Python, before any waiting);
* every call passes through the driver once more: when it is submitted with nothing to wait
  for, or when the last result it waits for has reached the driver (Ray's owner of every
  result), the driver dispatches it, ``driver_s`` each, one at a time. So a step with many
  calls at once queues at the driver: the per-call overhead grows with the workers;
* a dispatched call reaches its worker ``hop_s - call_overhead_s - driver_s`` later (the rest
  of a dependent hop), a value of ``b`` bytes ``b * seconds_per_byte`` later;
* a worker runs its calls one at a time in submission order, each taking
  ``call_overhead_s`` plus its compute;
* the step ends when the driver has the results it waits for (the same latency back), plus
  one more submission (the commit).

:func:`simulate_calls` runs that model; :func:`pipeline_calls` and :func:`plan_calls` turn a
schedule or a plan's tasks into calls. Nothing here imports the runtime.
"""

from __future__ import annotations

import heapq
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
    "Call",
    "Prediction",
    "pipeline_calls",
    "plan_calls",
    "server_seconds",
    "simulate_calls",
]

#: The worker name of the parameter server's call in a list of calls.
SERVER = "ps"


@dataclass(frozen=True)
class Call:
    """One actor call of a step, in submission order."""

    #: Worker index, or :data:`SERVER`.
    worker: int | str
    #: Compute seconds of the call (its nodes' estimate).
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
        }
    )
    n = len(calls)
    for k, c in enumerate(calls):
        if any(not 0 <= d < k for d, _ in c.deps):
            raise ConfigError(
                f"call {k} ({c.label or c.worker}) takes the result of a call not submitted "
                f"before it: {[d for d, _ in c.deps]}; list calls in submission order"
            )
    latency = max(0.0, cal.hop_s - cal.call_overhead_s - cal.driver_s)
    ready = [
        (k + 1) * cal.submit_s + c.feed_bytes * cal.seconds_per_byte for k, c in enumerate(calls)
    ]
    waiting = [len(c.deps) for c in calls]
    dependents: list[list[int]] = [[] for _ in calls]
    for k, c in enumerate(calls):
        for d, _ in c.deps:
            dependents[d].append(k)
    queue: dict[int | str, list[int]] = {}
    for k, c in enumerate(calls):
        queue.setdefault(c.worker, []).append(k)
    head = dict.fromkeys(queue, 0)
    free = dict.fromkeys(queue, 0.0)
    arrive: list[float | None] = [None] * n
    times: list[tuple[float, float]] = [(0.0, 0.0)] * n
    heap = [(ready[k], k) for k in range(n) if waiting[k] == 0]
    heapq.heapify(heap)
    driver_free = 0.0
    done = 0

    def finish(k: int) -> None:
        nonlocal done
        done += 1
        end = times[k][1]
        for j in dependents[k]:
            nbytes = next(b for d, b in calls[j].deps if d == k)
            ready[j] = max(ready[j], end + nbytes * cal.seconds_per_byte)
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(heap, (ready[j], j))

    def run_worker(w: int | str) -> None:
        # Calls start in submission order once dispatched and the worker is free.
        order = queue[w]
        while head[w] < len(order) and arrive[order[head[w]]] is not None:
            k = order[head[w]]
            start = max(arrive[k] or 0.0, free[w])
            end = start + _duration(calls[k], cal)
            times[k] = (start, end)
            free[w] = end
            head[w] += 1
            finish(k)

    while heap:
        t, k = heapq.heappop(heap)
        driver_free = max(driver_free, t) + cal.driver_s
        arrive[k] = driver_free + latency
        run_worker(calls[k].worker)
    if done != n:
        raise ConfigError(
            "the calls deadlock: a worker's next call (in submission order) waits for a "
            "call queued after it on the same worker"
        )
    awaited = [k for k, c in enumerate(calls) if c.awaited] or list(range(n))
    end = max((times[k][1] for k in awaited), default=0.0)
    seconds = end + latency + cal.submit_s if n else 0.0
    busy: dict[int | str, float] = {}
    for c in calls:
        busy[c.worker] = busy.get(c.worker, 0.0) + _duration(c, cal)
    return Prediction(seconds, tuple(times), n * cal.driver_s, max(busy.values(), default=0.0))


def _duration(call: Call, cal: Calibration) -> float:
    """A call's time on its worker once it started."""
    return (
        cal.call_overhead_s + call.objects * cal.object_s + call.nodes * cal.node_s + call.seconds
    )


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
    order: Iterable[Act],
    worker_of: Callable[[Act], int],
    seconds_of: Callable[[Act], float],
    deps_of: Callable[[Act], Iterable[tuple[Act, int]]],
    awaited: Callable[[Act], bool],
    server: tuple[float, Callable[[Act], int], int] | None = None,
    nodes_of: Callable[[Act], int] = lambda a: 0,
) -> list[Call]:
    """Calls of a schedule's actions in submission ``order``: each action's worker, compute
    and the (action, bytes) it takes from other workers; ``server`` = (its compute, bytes an
    action sends it, workers it returns new params to) adds the parameter server's staging
    call after every action."""
    acts = list(order)
    index = {a: i for i, a in enumerate(acts)}
    calls = [
        Call(
            worker_of(a),
            seconds_of(a),
            tuple((index[d], b) for d, b in deps_of(a)),
            awaited=awaited(a),
            label=str(a),
            nodes=nodes_of(a),
        )
        for a in acts
    ]
    if server is not None:
        secs, sent, takers = server
        deps = tuple((i, sent(a)) for i, a in enumerate(acts) if sent(a) > 0)
        calls.append(
            Call(
                SERVER,
                secs,
                deps,
                awaited=True,
                label="ps.stage",
                objects=_server_objects(len(deps), takers),
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
            )
        )
    return calls


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
