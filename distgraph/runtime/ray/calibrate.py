"""The calibration probe: what calls, the driver and transfers cost on an executor's workers.

A few actor calls and one transfer of a known size, run on the executor's own worker
actors through Ray's ``__ray_call__`` (a function run inside the actor, in its default
concurrency group, queued behind its other calls like any task), each probe repeated and its
median kept. The constants (a :class:`~distgraph.cost.Calibration`) feed the step-time
predictor (:mod:`distgraph.predict`):

* ``submit_s``: the driver's time per ``.remote()`` while submitting a burst;
* ``driver_s``: a burst of ``calls`` empty calls per worker on every worker at once, from the
  first submission to the last result, per call: the driver (Ray's owner of every result)
  and the machine handle the calls one after another at this rate at best;
* ``call_overhead_s``: ``calls`` calls queued on one worker, per call, less the
  :data:`BLOCK_S` each blocks for. They are shaped like a pipeline's actions (the runtime's
  call objects and small arrays in, a dict of arrays out) and block like a kernel: on a busy
  machine a process that gave up its core waits to get it back, and an empty call would not
  show what a real one pays;
* ``hop_s``: a chain of ``calls`` such calls alternating between two workers, each taking
  the previous one's result as an argument (relayed by the driver), per call, less the block;
* ``object_s``: one call taking ``calls`` small dicts and returning ``calls + 1``, against
  one taking one and returning two, per extra object (the parameter server's staging call
  takes a gradient dict per sender and returns params per worker);
* ``node_s``: on every worker at once, one call running :data:`NODES` kernels that each
  block for :data:`BLOCK_S`, against one call running one, until the last worker is done,
  per extra kernel less its block: what a node that gives up its core pays to get it back
  when the step's workers wake together and share the cores (the simulated kernels sleep;
  on a busy machine a real kernel waits for its turn too);
* ``deliver_s``: a pipelined step's hand-off, measured the way the runtime makes it: two
  workers each run one call (like a step's one call per worker) and pass a small value dict
  back and forth ``calls`` times, each side delivering to the other's mailbox (an actor call
  on the peer's ``deliver``, run on its mail thread) and then waiting in its own mailbox for
  the answer (``ActionRunner.take_mail``, as a waiting action does); the time of the
  exchanges after the first (which waits for the peer's call to start), per hand-off;
* ``action_s``: on the two probe workers at once, one call each running ``calls``
  action-shaped steps (a kernel that blocks for :data:`BLOCK_S`, a copy of a small env, a
  small dict delivered to the other's mailbox, submitted from the worker as an action hands
  its values on), until both are done, per step less the block. Two, not every worker: in
  a pipelined step only the stages holding a micro-batch run actions at once, and a probe
  of 32 workers each flooding the others' mailboxes measured 54 ms per action on 2 cores;
* ``seconds_per_byte``: a value of ``nbytes`` made on one worker and taken by a call on
  another, minus the same chain with an empty value, per byte.

Results are cached per cluster (its GCS address) and worker count: the probe takes about a
second, and the constants describe the machine, not one executor.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import ray

from ...cost import Calibration
from ...errors import ConfigError

#: Calls per probe, repeats per probe, bytes of the transfer probe.
CALLS = 16
#: How long each probe call of :func:`_work` blocks (subtracted from the measured times).
BLOCK_S = 0.002
#: Kernels in the node probe's call.
NODES = 8
REPEATS = 5
NBYTES = 4 << 20

_CACHE: dict[tuple[str, int], Calibration] = {}


def _noop(actor: Any, *args: Any) -> None:
    """An empty call (``__ray_call__`` passes the actor instance first)."""
    return None


def _work(actor: Any, call: Any, *values: Any) -> dict[str, np.ndarray]:
    """A call shaped like a pipeline action: the runtime's call objects and small arrays in,
    a dict of small arrays out, and a kernel that blocks for :data:`BLOCK_S` (a real kernel
    or a simulated one gives up the core, and on a busy machine waits to get it back)."""
    time.sleep(BLOCK_S)
    return {"a": np.ones((16, 1)), "b": np.ones((16, 1))}


def _blocks(actor: Any, count: int) -> None:
    """``count`` kernels that each block for :data:`BLOCK_S`."""
    for _ in range(count):
        time.sleep(BLOCK_S)


def _fan(actor: Any, *values: Any) -> tuple[dict[str, np.ndarray], ...]:
    """Take many small dicts, return as many plus one (a server's staging call's shape)."""
    return tuple({"p": np.ones((16, 1))} for _ in range(len(values) + 1))


def _call_args() -> tuple[Any, ...]:
    from ..actions import ActionCall
    from ..protocol import CallHeader

    header = CallHeader(0, 0, 0, inline={"x": np.ones((16, 1))}, imports=1)
    action = ActionCall("F0", 0, 0, 0, 2, False, outputs=((1, ("h",)),), rows=(8, 8))
    return (action, header)


#: The plan id the hand-off probe's mail is keyed by (real plans are numbered from 1).
PROBE_PLAN = -1


def _handoffs(actor: Any, peer: Any, me: int, count: int, attempt: int) -> float:
    """Pass a small dict to ``peer`` and wait for its answer ``count`` times, worker to
    worker through the runtime's own mailbox; returns the seconds of the exchanges after
    the first. ``me`` (0 or 1) says who sends first; mail is keyed by the sender."""
    from ..actions import ActionCall, StepActions

    call = StepActions(PROBE_PLAN, 0, attempt, (), deadline=60.0)
    value = {"h": np.ones((16, 1))}
    start = 0.0
    try:
        for i in range(count):
            if i == 1:
                start = time.perf_counter()
            wait = ActionCall(f"F{i}", i, 0, i, count, False)
            # As a worker's action hands a value on (actors.py ``_deliver``): not awaited.
            if me == 0:
                peer.deliver.remote((PROBE_PLAN, attempt, 0, i), value)
                actor.take_mail(call, wait, 1, 1)
            else:
                actor.take_mail(call, wait, 0, 0)
                peer.deliver.remote((PROBE_PLAN, attempt, 1, i), value)
        return time.perf_counter() - start
    finally:
        actor.drop_actions(PROBE_PLAN)


def _actions(actor: Any, peer: Any, count: int, attempt: int) -> None:
    """``count`` action-shaped steps in one call: a blocking kernel, a copy of a small env
    (each action starts its micro-batch from the resident values) and a value delivered to
    ``peer``'s mailbox (nobody waits for it; the peer's probe call drops it)."""
    env = {f"p{i}": np.ones((16, 1)) for i in range(8)}
    for i in range(count):
        local = dict(env)
        time.sleep(BLOCK_S)
        peer.deliver.remote((PROBE_PLAN, attempt, 2, i), {"h": local["p0"]})


def _drop_probe(actor: Any) -> None:
    actor.drop_actions(PROBE_PLAN)


def _make(actor: Any, nbytes: int) -> np.ndarray:
    return np.zeros(nbytes, dtype=np.uint8)


def _size(actor: Any, value: np.ndarray) -> int:
    return int(value.nbytes)


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    ray.get(fn())
    return time.perf_counter() - start


def _median(fn: Callable[[], float], repeats: int) -> float:
    return statistics.median(fn() for _ in range(repeats))


def probe(
    workers: Sequence[Any], calls: int = CALLS, repeats: int = REPEATS, nbytes: int = NBYTES
) -> Calibration:
    """Measure a :class:`Calibration` on ``workers`` (worker actor handles; see module doc)."""
    if not workers:
        raise ConfigError("calibration needs at least one worker actor; the executor has none")
    if calls < 2 or repeats < 1 or nbytes < 1:
        raise ConfigError(
            f"calibration needs calls >= 2, repeats >= 1 and nbytes >= 1, got {calls}, "
            f"{repeats}, {nbytes}"
        )
    n = len(workers)
    a, b = workers[0], workers[1 % n]
    ray.get([w.__ray_call__.remote(_noop) for w in workers])  # every worker awake

    submit: list[float] = []

    def burst() -> float:
        start = time.perf_counter()
        refs = [workers[i % n].__ray_call__.remote(_noop) for i in range(calls * n)]
        submit.append((time.perf_counter() - start) / len(refs))
        ray.get(refs)
        return (time.perf_counter() - start) / len(refs)

    args = _call_args()

    def queued() -> float:
        per = _timed(lambda: [a.__ray_call__.remote(_work, *args) for _ in range(calls)]) / calls
        return max(0.0, per - BLOCK_S)

    def chain() -> float:
        def run() -> Any:
            ref = a.__ray_call__.remote(_work, *args)
            for i in range(calls - 1):
                ref = (b if i % 2 == 0 else a).__ray_call__.remote(_work, *args, ref)
            return ref

        return max(0.0, _timed(run) / calls - BLOCK_S)

    def fan() -> float:
        # Many small dicts into one call and as many plus one out, against one in and one
        # out; the inputs exist before the timing starts.
        inputs = [b.__ray_call__.remote(_work, *args) for _ in range(calls)]
        ray.wait(inputs, num_returns=len(inputs))
        one = _timed(lambda: a.__ray_call__.options(num_returns=2).remote(_fan, inputs[0]))
        many = _timed(lambda: a.__ray_call__.options(num_returns=calls + 1).remote(_fan, *inputs))
        return max(0.0, many - one) / (2 * (calls - 1))

    def blocks() -> float:
        # On every worker at once (as a step's workers wake together and share the cores):
        # one call of NODES blocking kernels each, against one call of a single kernel each,
        # until the last worker is done.
        many = _timed(lambda: [w.__ray_call__.remote(_blocks, NODES) for w in workers])
        one = _timed(lambda: [w.__ray_call__.remote(_blocks, 1) for w in workers])
        return max(0.0, many - one - (NODES - 1) * BLOCK_S) / (NODES - 1)

    attempts = iter(range(1, 1 << 30))

    def handoff() -> float:
        # The answering side starts first, so only the first exchange waits for a call to
        # start; both sides time their own exchanges after it, the initiator's count.
        k = next(attempts)
        answer = b.__ray_call__.remote(_handoffs, a, 1, calls + 1, k)
        first = a.__ray_call__.remote(_handoffs, b, 0, calls + 1, k)
        return ray.get([first, answer])[0] / (2 * calls)

    def actions() -> float:
        k = next(attempts)
        pair = [a, b] if n > 1 else [a]
        spent = _timed(
            lambda: [
                w.__ray_call__.remote(_actions, pair[(i + 1) % len(pair)], calls, k)
                for i, w in enumerate(pair)
            ]
        )
        ray.get([w.__ray_call__.remote(_drop_probe) for w in pair])
        return max(0.0, spent / calls - BLOCK_S)

    def transfer(size: int) -> float:
        return _timed(lambda: b.__ray_call__.remote(_size, a.__ray_call__.remote(_make, size)))

    driver_s = _median(burst, repeats)
    call_s = _median(queued, repeats)
    hop_s = _median(chain, repeats)
    object_s = _median(fan, repeats)
    node_s = _median(blocks, repeats)
    moved = _median(lambda: transfer(nbytes) - transfer(0), repeats)
    deliver_s = _median(handoff, repeats) if n > 1 else hop_s
    action_s = _median(actions, repeats)
    return Calibration(
        call_overhead_s=call_s,
        seconds_per_byte=max(0.0, moved) / nbytes,
        hop_s=hop_s,
        driver_s=driver_s,
        submit_s=statistics.median(submit),
        object_s=object_s,
        node_s=node_s,
        deliver_s=deliver_s,
        action_s=action_s,
        workers=n,
        measured=True,
        load=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    )


def calibrate(workers: Sequence[Any], refresh: bool = False) -> Calibration:
    """The cached calibration of this cluster at ``len(workers)`` workers, measured by
    :func:`probe` on ``workers`` the first time (or again with ``refresh``)."""
    key = (ray.get_runtime_context().gcs_address, len(workers))
    if refresh or key not in _CACHE:
        _CACHE[key] = probe(workers)
    return _CACHE[key]
