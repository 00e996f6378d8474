"""The worker's side of a pipelined step: one call per schedule action (F or B of a micro-batch).

A pipelined call is ``run_action(action, header, *values)``: ``header`` and ``values`` are an
ordinary task call (:mod:`distgraph.runtime.protocol`: the param update, the micro-batch's
feeds, the imported values of the same micro-batch); :class:`ActionCall` says which action it
is. State per running step (plan, step): one env per micro-batch whose forward ran here and
backward did not yet (its activations: their count is the memory the schedule costs), the
recorded per-micro-batch gradients and outputs, and the position of the next action.

Order: a worker's actions run in its schedule order (the actor runs calls in submission
order); each call checks it is the next one, as task calls do, and a step that failed here
makes its later actions raise that error. A micro-batch's env starts at its F action from the
resident values and is dropped at its B action; the worker's last action of the step combines
the recorded values in micro-batch order, weighted by rows, and ends the step here.

No Ray here: :class:`ActionRunner` is mixed into :class:`~distgraph.runtime.worker.Worker`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..dataparallel import combine
from ..errors import ExecutionError
from ..interpret import run_nodes
from ..plan import DRIVER
from ..result import TraceEvent
from .protocol import CallHeader, unpack

#: How many finished steps' memory peaks a worker remembers.
KEEP_PEAKS = 256


@dataclass(frozen=True)
class ActionCall:
    """Which schedule action a call is, and what it returns."""

    #: ``"F3"``: kind and micro-batch.
    label: str
    microbatch: int
    stage: int
    #: Its position among this worker's actions of the step, and how many there are.
    position: int
    count: int
    #: Drop the micro-batch's env after this action (its backward).
    release: bool
    #: Values recorded after the action for the step's combination (gradients, the loss).
    record: tuple[str, ...] = ()
    #: (destination, names) of each returned dict: a worker index (this micro-batch's values),
    #: or the server (or a shard of it) / driver (the recorded values combined over the
    #: micro-batches).
    outputs: tuple[tuple[int | str, tuple[str, ...]], ...] = ()
    #: Rows of each micro-batch of the step and how the loss reduces them ("mean" / "sum").
    rows: tuple[int, ...] = ()
    reduction: str = "mean"


@dataclass
class _ActionStep:
    envs: dict[int, dict[str, Any]] = field(default_factory=dict)
    recorded: dict[int, dict[str, Any]] = field(default_factory=dict)
    next: int = 0
    peak: int = 0
    failed: BaseException | None = None


class ActionRunner:
    """Worker methods for pipelined steps (mixed into ``Worker``, whose state they use)."""

    # Provided by Worker.
    index: int
    track: str
    programs: dict[int, Any]
    tasks: dict[int, dict[int, Any]]
    resident: dict[int, dict[str, Any]]
    traces: dict[tuple[int, int], list[TraceEvent]]
    _node: list[str]

    def _send(self, values: dict[str, Any]) -> Any:  # pragma: no cover - Worker's
        raise NotImplementedError

    def _receive(self, items: list[Any]) -> list[Any]:  # pragma: no cover - Worker's
        raise NotImplementedError

    def _limit_blas(self, threads: int | None) -> None:  # pragma: no cover - Worker's
        raise NotImplementedError

    @property
    def _action_steps(self) -> dict[tuple[int, int], _ActionStep]:
        steps = self.__dict__.get("_action_steps_")
        if steps is None:
            steps = self.__dict__["_action_steps_"] = {}
        return steps

    @property
    def _peaks(self) -> dict[tuple[int, int], int]:
        peaks = self.__dict__.get("_peaks_")
        if peaks is None:
            peaks = self.__dict__["_peaks_"] = {}
        return peaks

    def run_action(self, action: ActionCall, header: CallHeader, *args: Any) -> Any:
        """Run one schedule action; returns one dict per entry of ``action.outputs`` (a bare
        dict for one, None for none)."""
        plan_id, step = header.plan_id, header.step
        key = (plan_id, step)
        task = self.tasks[plan_id][header.task_id]
        if action.position == 0:
            # The first action starts the step afresh (a retried step id leaves nothing behind).
            self._action_steps[key] = _ActionStep()
        st = self._action_steps.get(key)
        if st is None or st.failed is not None or st.next != action.position:
            if st is not None and st.failed is not None:
                err = st.failed
                if action.position == action.count - 1:
                    self._action_steps.pop(key, None)
                raise err
            raise ExecutionError(
                f"worker {self.index}: action {action.label} of stage {action.stage} (step "
                f"{step}, plan {plan_id}) is its call {action.position} of the step, but "
                f"{'none' if st is None else st.next} of its earlier calls finished here: one "
                "failed before it (see that error) or calls arrived out of order"
            )
        try:
            out = self._run_action(action, header, args, task, st, key)
        except BaseException as e:
            st.failed = e
            st.envs.clear()
            if action.position == action.count - 1:
                self._action_steps.pop(key, None)
            raise
        st.next += 1
        if action.position == action.count - 1:
            self._action_steps.pop(key, None)
            self._peaks[key] = st.peak
            while len(self._peaks) > KEEP_PEAKS:
                del self._peaks[next(iter(self._peaks))]
        return out

    def _run_action(
        self,
        action: ActionCall,
        header: CallHeader,
        args: Sequence[Any],
        task: Any,
        st: _ActionStep,
        key: tuple[int, int],
    ) -> Any:
        plan_id = header.plan_id
        program = self.programs[plan_id]
        call = unpack(header, args)
        received = self._receive(([call.update] if header.update else []) + call.imported)
        if header.update:
            self.resident[plan_id].update(received[0])
            received = received[1:]
        mb = action.microbatch
        env = st.envs.get(mb)
        if env is None:
            env = st.envs[mb] = dict(self.resident[plan_id])
            st.peak = max(st.peak, len(st.envs))
        env.update(call.feeds)
        for (_src, _slot, names), values in zip(task.imports, received):
            for name in names:
                env[name] = values[name]
        events = self.traces.setdefault(key, []) if header.trace else None
        start = time.time()
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
        end = time.time()
        st.recorded.setdefault(mb, {}).update({n: env[n] for n in action.record})
        outputs = []
        for dest, names in action.outputs:
            if not isinstance(dest, int):  # the driver, the server or one of its shards
                values = self._combined(st, names, action)
            else:
                values = {n: env[n] for n in names}
            outputs.append(self._send(values) if header.by_ref and dest != DRIVER else values)
        if action.release:
            del st.envs[mb]
        if events is not None:
            events.append(
                TraceEvent(
                    action.label,
                    "call",
                    "/".join(task.phases),
                    task.first_level,
                    self.track,
                    start,
                    end,
                    worker=self.index,
                    args={
                        "action": action.label,
                        "microbatch": mb,
                        "stage": action.stage,
                        "nodes": len(task.nodes),
                        "held": len(st.envs) + (1 if action.release else 0),
                    },
                )
            )
        if not outputs:
            return None
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def _combined(
        self, st: _ActionStep, names: Sequence[str], action: ActionCall
    ) -> dict[str, Any]:
        """``names`` combined over the step's micro-batches, in micro-batch order, weighted by
        rows (exactly the full-batch value for a mean or sum loss)."""
        mbs = range(len(action.rows))
        missing = [(i, n) for i in mbs for n in names if n not in st.recorded.get(i, {})]
        if missing:
            i, n = missing[0]
            raise ExecutionError(
                f"worker {self.index}: {n!r} of micro-batch {i} was never recorded before "
                f"{action.label}, the step's last action here (a schedule that ends a stage "
                "before all its backwards)"
            )
        return combine(
            [{n: st.recorded[i][n] for n in names} for i in mbs],
            list(action.rows),
            "sum" if action.reduction == "sum" else "mean",
        )

    def drop_actions(self, plan_id: int, step: int | None = None) -> None:
        """Forget a pipelined step (or every step of a plan when ``step`` is None)."""
        for key in [k for k in self._action_steps if k[0] == plan_id and step in (None, k[1])]:
            del self._action_steps[key]

    def microbatch_peaks(self, plan_id: int) -> dict[int, int]:
        """Step -> the most micro-batches whose activations this worker held at once in it."""
        return {s: n for (p, s), n in self._peaks.items() if p == plan_id}
