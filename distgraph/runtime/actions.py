"""The worker's side of a pipelined step: the worker's whole action list in one call.

A pipelined step is one call per worker: ``run_actions(StepActions, *values)``. The
:class:`StepActions` lists the worker's schedule actions in order (each an
:class:`ActionCall` saying which action it is, and a task-call header,
:mod:`distgraph.runtime.protocol`, with the micro-batch's feeds); ``values`` are, action by
action, the param update (first action only) and the large feeds. Values crossing stages do
not pass through the driver: an action that computes values for another worker hands them to
that worker at once (``_deliver``: a direct call on the peer's ``deliver``, which runs on a
thread of its own beside the step), and an action that needs them waits in its worker's
mailbox for them. Mail is keyed by (plan, the step attempt's number, source task,
micro-batch): a retried step (a new attempt) never reads an abandoned attempt's values.

State per running step (plan, step): one env per micro-batch whose forward ran here and
backward did not yet (its activations: their count is the memory the schedule costs), and the
recorded per-micro-batch gradients and outputs. A micro-batch's env starts at its F action
from the resident values and is dropped at its B action; the last action combines the
recorded values in micro-batch order, weighted by rows, and the call returns them (one dict
per server shard and the driver's outputs). The mailbox (shared with the delivering thread,
under a lock): values delivered, per plan the latest attempt started here (older mail is
dropped), and the attempts the driver cancelled (a wait for their mail ends with an error).

No Ray here: :class:`ActionRunner` is mixed into :class:`~distgraph.runtime.worker.Worker`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
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

#: Guards the lazy creation of a worker's mailbox (two threads may ask for it first).
_MAILBOX_INIT = threading.Lock()


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
    #: The worker each of the task's imports comes from (in import order).
    sources: tuple[int, ...] = ()


@dataclass(frozen=True)
class StepActions:
    """One worker's share of a pipelined step: its actions in schedule order."""

    plan_id: int
    step: int
    #: This submission of the step (a retried step id gets a new one): keys the mail.
    attempt: int
    #: (action, its task call's header) in the order the worker runs them.
    actions: tuple[tuple[ActionCall, CallHeader], ...]
    #: Worker index -> handle to deliver values to, for each worker this one sends to.
    peers: Mapping[int, Any] = field(default_factory=dict)
    #: Seconds an action waits for a value from another worker before failing the step.
    deadline: float = 600.0


@dataclass
class _Mailbox:
    cond: threading.Condition = field(default_factory=threading.Condition)
    #: (plan, attempt, source task, micro-batch) -> the value dict delivered.
    mail: dict[tuple[int, int, int, int], Any] = field(default_factory=dict)
    #: plan -> the latest attempt started here; mail of older attempts is dropped.
    floor: dict[int, int] = field(default_factory=dict)
    #: (plan, attempt) the driver cancelled.
    cancelled: set[tuple[int, int]] = field(default_factory=set)


@dataclass
class _ActionStep:
    envs: dict[int, dict[str, Any]] = field(default_factory=dict)
    recorded: dict[int, dict[str, Any]] = field(default_factory=dict)
    peak: int = 0


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
    _lock: threading.Lock
    _current: tuple[int, int] | None

    def _send(self, values: dict[str, Any]) -> Any:  # pragma: no cover - Worker's
        raise NotImplementedError

    def _deliver(self, peer: Any, key: tuple[int, int, int, int], values: Any) -> None:
        """Hand ``values`` to another worker's mailbox without waiting (the Ray actor calls
        the peer's ``deliver``); here, for a peer in this process, directly."""
        peer.deliver(key, values)

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

    @property
    def _mailbox(self) -> _Mailbox:
        box = self.__dict__.get("_mailbox_")
        if box is None:
            with _MAILBOX_INIT:
                box = self.__dict__.setdefault("_mailbox_", _Mailbox())
        return box

    def deliver(self, key: tuple[int, int, int, int], values: Any) -> None:
        """Take a value dict another worker computed for one of this worker's actions (runs
        beside the step, on the actor's mail thread)."""
        box = self._mailbox
        with box.cond:
            plan_id, attempt = key[0], key[1]
            if attempt < box.floor.get(plan_id, 0) or (plan_id, attempt) in box.cancelled:
                return  # an abandoned attempt's value: nobody will read it
            box.mail[key] = values
            box.cond.notify_all()

    def cancel_actions(self, plan_id: int, attempt: int) -> None:
        """The driver gave up on this attempt: an action waiting for its mail fails now."""
        box = self._mailbox
        with box.cond:
            box.cancelled.add((plan_id, attempt))
            for k in [k for k in box.mail if k[:2] == (plan_id, attempt)]:
                del box.mail[k]
            box.cond.notify_all()

    def _open_mail(self, plan_id: int, attempt: int) -> None:
        """Start an attempt: forget the mail and cancellations of this plan's older ones."""
        box = self._mailbox
        with box.cond:
            box.floor[plan_id] = max(attempt, box.floor.get(plan_id, 0))
            for k in [k for k in box.mail if k[0] == plan_id and k[1] < attempt]:
                del box.mail[k]
            box.cancelled = {c for c in box.cancelled if c[0] != plan_id or c[1] >= attempt}

    def _take_mail(self, call: StepActions, action: ActionCall, src: int, src_worker: int) -> Any:
        """Wait for the value dict task ``src`` sends this action (same micro-batch)."""
        box = self._mailbox
        key = (call.plan_id, call.attempt, src, action.microbatch)
        end = time.monotonic() + call.deadline
        with box.cond:
            while key not in box.mail:
                if (call.plan_id, call.attempt) in box.cancelled:
                    raise ExecutionError(
                        f"worker {self.index}: step {call.step} was abandoned by the driver "
                        f"while {action.label} of stage {action.stage} waited for worker "
                        f"{src_worker}'s values (an earlier failure says why)"
                    )
                left = end - time.monotonic()
                if left <= 0:
                    raise ExecutionError(
                        f"worker {self.index}: {action.label} of stage {action.stage} (step "
                        f"{call.step}) waited {call.deadline:g} s for the values of worker "
                        f"{src_worker} (task {src}) and none came"
                    )
                box.cond.wait(left)
            return box.mail.pop(key)

    def take_mail(self, call: StepActions, action: ActionCall, src: int, src_worker: int) -> Any:
        """Wait for task ``src``'s value for ``action`` as a running action does (the
        calibration probe, ``runtime/ray/calibrate.py``, times hand-offs through it)."""
        return self._take_mail(call, action, src, src_worker)

    def run_actions(self, call: StepActions, *values: Any) -> Any:
        """Run this worker's actions of a pipelined step, in order (see module doc); returns
        one dict per output of the last action that goes to the server or the driver (a
        bare dict for one, None for none)."""
        key = (call.plan_id, call.step)
        tasks = self.tasks[call.plan_id]
        self._open_mail(call.plan_id, call.attempt)
        st = self._action_steps[key] = _ActionStep()  # a retried step id starts afresh
        out: list[Any] = []
        i = 0
        try:
            for action, header in call.actions:
                task = tasks[header.task_id]
                n = (1 if header.update else 0) + len(header.big)
                mine = list(values[i : i + n])
                i += n
                for (src, _slot, _names), peer in zip(task.imports, action.sources):
                    mine.append(self._take_mail(call, action, src, peer))
                out = self._run_action(call, action, header, mine, task, st, key)
        except BaseException:
            st.envs.clear()
            raise
        finally:
            self._action_steps.pop(key, None)
        self._keep_peak(key, st.peak)
        if not out:
            return None
        return out[0] if len(out) == 1 else tuple(out)

    def _keep_peak(self, key: tuple[int, int], peak: int) -> None:
        self._peaks[key] = peak
        while len(self._peaks) > KEEP_PEAKS:
            del self._peaks[next(iter(self._peaks))]

    def run_action_alone(
        self, action: ActionCall, header: CallHeader, imported: Sequence[Any]
    ) -> list[Any]:
        """Run one action of a pipelined step on its own: a node of a compiled pipeline
        (``runtime/ray/compiled_pipeline.py``), whose graph runs this worker's nodes in
        schedule order. The worker's first action of the step starts its state, its last
        ends it. Returns the action's outputs in order: values for other workers (returned,
        not delivered: the graph's channels carry them), then the server's and driver's."""
        key = (header.plan_id, header.step)
        if action.position == 0:
            self._action_steps[key] = _ActionStep()  # a retried step id starts afresh
        st = self._action_steps.get(key)
        if st is None:
            raise ExecutionError(
                f"worker {self.index}: {action.label} of stage {action.stage} (step "
                f"{header.step}) ran without the step's earlier actions here"
            )
        task = self.tasks[header.plan_id][header.task_id]
        handed: list[Any] = []
        with self._lock:  # progress() names the running node (a compiled step's deadline)
            self._current = key
            self._node[0] = ""
        try:
            out = self._run_action(None, action, header, imported, task, st, key, handed)
        except BaseException:
            self._action_steps.pop(key, None)
            raise
        finally:
            with self._lock:
                self._current = None
        if action.position == action.count - 1:
            self._action_steps.pop(key, None)
            self._keep_peak(key, st.peak)
        return handed + out

    def _run_action(
        self,
        call: StepActions | None,
        action: ActionCall,
        header: CallHeader,
        args: Sequence[Any],
        task: Any,
        st: _ActionStep,
        key: tuple[int, int],
        handoff: list[Any] | None = None,
    ) -> list[Any]:
        """Run one action; deliver its values for other workers (or, given ``handoff``,
        append them there), and return what it sends the server and the driver."""
        plan_id = header.plan_id
        program = self.programs[plan_id]
        got = unpack(header, args)
        received = self._receive(([got.update] if header.update else []) + got.imported)
        if header.update:
            self.resident[plan_id].update(received[0])
            received = received[1:]
        mb = action.microbatch
        env = st.envs.get(mb)
        if env is None:
            env = st.envs[mb] = dict(self.resident[plan_id])
            st.peak = max(st.peak, len(st.envs))
        env.update(got.feeds)
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
        # The next stage waits for these: sent first.
        for dest, names in action.outputs:
            if isinstance(dest, int):
                values = {n: env[n] for n in names}
                if handoff is not None:
                    handoff.append(values)
                    continue
                assert call is not None  # a call delivers; an action alone hands off
                mail = (plan_id, call.attempt, task.id, mb)
                self._deliver(call.peers[dest], mail, values)
        st.recorded.setdefault(mb, {}).update({n: env[n] for n in action.record})
        outputs = []
        for dest, names in action.outputs:
            if isinstance(dest, int):
                continue
            # The driver, the server or one of its shards.
            values = self._combined(st, names, action)
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
        return outputs

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
        if step is None:  # the plan is gone: so is any mail for it
            box = self._mailbox
            with box.cond:
                for k in [k for k in box.mail if k[0] == plan_id]:
                    del box.mail[k]
                box.floor.pop(plan_id, None)
                box.cancelled = {c for c in box.cancelled if c[0] != plan_id}

    def microbatch_peaks(self, plan_id: int) -> dict[int, int]:
        """Step -> the most micro-batches whose activations this worker held at once in it."""
        return {s: n for (p, s), n in self._peaks.items() if p == plan_id}
