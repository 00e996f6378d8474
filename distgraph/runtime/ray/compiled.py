"""The compiled transport: a run() plan that runs again is compiled into a Ray Compiled Graph.

A Compiled Graph (``ray.dag`` + ``experimental_compile``) runs a fixed DAG of actor methods
over pre-allocated shared-memory channels: one step costs a write per message instead of an
actor call, an object-store put and a scheduler round trip per task.

State (:class:`CompiledRuns`, one per executor):
- ``cluster`` and ``options`` (shared with the executor; ``options.transport`` is read live);
- ``graphs``: plan id -> :class:`CompiledPlan`, the compiled graphs alive on the workers;
- ``runs``: plan id -> how many times in a row the plan ran (a plan is compiled on its second
  run in a row: compiling costs ~0.1-2 s, a one-off run would never earn that back, and an
  actor holds one compiled graph at a time, so alternating plans stay on calls);
- ``refused``: plan id -> (transport, why the plan stays on actor calls under it), said in
  ``explain_transport`` and the log;
- ``choices``: plan id -> its :class:`~.transport_choice.TransportChoice` under
  ``transport="auto"``: the executor reports each run's time (``record``), and a plan runs
  compiled only while its compiled steps measure faster than its calls steps (switching to
  calls tears its graph down).

The graph of a plan: the driver's input (``InputNode``: step id, flags and the feeds) goes to
every task; each task is one bind of its worker's ``run_compiled`` with one return per
output (``num_returns``), imported outputs are bound as arguments, and the driver's outputs
plus every output no task imports form the ``MultiOutputNode``. Bound in plan order, so each
worker runs its tasks in plan order, as with calls.

Why channels are sized up front (the teardown hang, ray 2.60): a channel's buffer is
``DAGContext.buffer_size_bytes`` *of the process that creates it* (the writer actor; the
``_buffer_size_bytes`` compile argument does not reach shared-memory channels). A message
larger than the buffer makes the writer resize its channel locally, and ``teardown()`` then
closes the pre-resize channel (the driver's pickled copy) while the reader blocks on the new
one, forever. So before compiling, the driver and every worker set ``buffer_size_bytes`` to
the plan's largest message (cost-model bytes at the run's batch, doubled, plus headroom), and
a worker refuses to write a message that would not fit (:class:`ChannelSizeError`), so no
channel ever resizes; the plan then goes back to calls, or is compiled again with larger
buffers for a larger batch.

Arrays read from a channel are views of its shared memory, and keeping one blocks the writer
(ray-project/ray#46055): a worker copies every imported value and feed it keeps, the driver
copies the outputs it hands back.

Costs: a compiled graph's loop polls its input channel (Ray 2.60's reader spins on
``sched_yield``; measured here: ~0.4 of a core for the worker holding the seed graph's task,
~0.15 under heavy load), so a graph unused for ``IDLE_TEARDOWN_S`` seconds is torn down by
its slot's reaper (:class:`GraphSlot`) and compiled again when its plan runs twice in a row
once more. A graph is also torn down by ``close()``, a recovery, another plan's (or a training
session's) compile, or a failed step (a node's error too: Ray 2.60 times out the execution
after one that raised, so the next run compiles anew). A step past its deadline names the
node still running (asked of the workers' ``progress``) and tears the graph down in the
background, without killing the actors.

Training steps are compiled too (``compiled_training.py``: the server's update is a node of
the graph). Not compiled (stay on actor calls): workers on more than one node under "auto",
``data_path="store"``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
from ray.dag import InputNode, MultiOutputNode
from ray.exceptions import (
    GetTimeoutError,
    ObjectLostError,
    RayActorError,
    RayChannelError,
    RayTaskError,
)

from ...cost import node_bytes
from ...errors import DistgraphError, ExecutionError, WaveTimeoutError, WorkerLostError
from ...plan import DRIVER, Plan
from ..protocol import CallHeader
from .options import RayOptions
from .transport_choice import CALLS, COMPILED, TransportChoice

if TYPE_CHECKING:  # cluster.py imports actors.py, which imports this module
    from .cluster import Cluster

log = logging.getLogger(__name__)

TRANSPORTS = ("calls", "compiled", "auto")
#: Smallest channel buffer (Ray's default); every channel is at least this large.
MIN_BUFFER = 1_000_000
#: Room kept in a buffer for pickling a message's dict and array headers.
HEADROOM = 256 * 1024
#: Per-array framing allowance when a worker checks that a message fits.
PER_ARRAY = 1024
#: A compiled graph unused this long (seconds) is torn down (see :class:`GraphSlot`).
IDLE_TEARDOWN_S = 5.0
#: Plans whose largest message needs a bigger buffer stay on calls (each channel holds one
#: buffer of this size in shared memory, per reader node).
MAX_BUFFER = 256 * 1024 * 1024
#: How many run() plans' transport choices (``transport="auto"``) are kept.
MAX_CHOICES = 256


class ChannelSizeError(ExecutionError):
    """A compiled task's message would not fit its channel (it would resize and hang)."""


# Worker side ------------------------------------------------------------------------------------
def set_buffer_size(_actor: Any, nbytes: int) -> int:
    """Run in an actor (``__ray_call__``): size the channels this process creates from now on."""
    from ray.dag.context import DAGContext

    DAGContext.get_current().buffer_size_bytes = int(nbytes)
    return int(nbytes)


def own(value: Any) -> Any:
    """``value`` with every array copied out of a channel's shared memory (dicts, tuples too)."""
    if isinstance(value, np.ndarray):
        return np.array(value, copy=True)
    if isinstance(value, dict):
        return {k: own(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(own(v) for v in value)
    return value


def message_bytes(value: Any) -> int:
    """Approximate serialized size of a task output (array bytes plus framing)."""
    if isinstance(value, np.ndarray):
        return int(value.nbytes) + PER_ARRAY
    if isinstance(value, dict):
        return PER_ARRAY + sum(message_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return PER_ARRAY + sum(message_bytes(v) for v in value)
    return 64


def run_compiled_task(
    worker: Any,
    plan_id: int,
    task_id: int,
    control: tuple,
    imported: tuple,
    training: bool = False,
) -> Any:
    """A worker's compiled call: the task's feeds from the driver's input ``control`` (step,
    trace, check_finite, feeds), imported value dicts from channels; runs it like a call.
    ``training``: the step id is a training step's (see :attr:`CallHeader.training`)."""
    from ray.dag.context import DAGContext

    step, trace, check_finite, feeds = control
    task = worker.tasks[plan_id][task_id]
    header = CallHeader(
        plan_id,
        step,
        task_id,
        trace=trace,
        check_finite=check_finite,
        training=training,
        inline={n: own(feeds[n]) for n in task.feeds},
        imports=len(imported),
    )
    out = worker.run_task(header, *[own(d) for d in imported])
    limit = DAGContext.get_current().buffer_size_bytes - HEADROOM
    outputs = out if isinstance(out, tuple) else (out,)
    for (dest, names), message in zip(task.outputs, outputs):
        size = message_bytes(message)
        if size > limit:
            worker.drop_step(plan_id, step)
            raise ChannelSizeError(
                f"worker {worker.index}: task {task_id}'s message to {dest} ({', '.join(names)}) "
                f"is {size:,} bytes, more than its compiled channel holds ({limit:,}); the plan "
                "goes back to actor calls (or is compiled again for the larger batch)"
            )
    return out


# Driver side ------------------------------------------------------------------------------------
class GraphSlot:
    """The one compiled graph a cluster's workers hold at a time (Ray runs one compiled graph
    per actor): run() plans (:class:`CompiledRuns`) and training sessions take turns.

    ``holder``: what owns the live graph (has ``release()``, which tears it down);
    ``user``: what ran the latest step on these workers, compiled or not, and ``last_use``
    when (a plan counts as running "in a row" only while nobody else ran between and its
    runs come less than ``idle_s`` apart); ``graph_use``: when the live graph last ran a
    step (or was compiled) -- what the reaper goes by, so steps of other plans on calls do
    not keep an unused graph spinning.

    Idle graphs are torn down: a graph's loop polls its input channel (Ray 2.60's reader
    spins on ``sched_yield``, ~0.4 of a core per reading actor here), so a graph unused for
    ``idle_s`` seconds is released by a reaper thread (``reaped`` counts them). Steps and
    compiles hold ``lock``, so the reaper never tears a graph down under a running step."""

    def __init__(self, idle_s: float | None = None) -> None:
        self.holder: Any = None
        self.user: Any = None
        self.idle_s = IDLE_TEARDOWN_S if idle_s is None else idle_s
        self.lock = threading.RLock()
        self.last_use = 0.0
        self.graph_use = 0.0
        self.reaped = 0
        self._reaper: threading.Thread | None = None

    def claim(self, holder: Any) -> None:
        """Make ``holder`` the owner of the workers' graph; the previous owner's goes."""
        with self.lock:
            if self.holder is not None and self.holder is not holder:
                previous, self.holder = self.holder, None
                previous.release()
            self.holder = holder
            self.last_use = self.graph_use = time.monotonic()
            if self._reaper is None or not self._reaper.is_alive():
                self._reaper = threading.Thread(
                    target=self._reap, name="distgraph-graph-reaper", daemon=True
                )
                self._reaper.start()

    def touch(self, user: Any) -> bool:
        """Record that ``user`` runs a step now; whether it also ran the previous one, less
        than ``idle_s`` ago."""
        with self.lock:
            now = time.monotonic()
            same = self.user is user and now - self.last_use < self.idle_s
            self.user, self.last_use = user, now
            return same

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Hold the slot for a compiled step (the reaper waits)."""
        with self.lock:
            try:
                yield
            finally:
                self.last_use = self.graph_use = time.monotonic()

    def release(self, holder: Any) -> None:
        """``holder`` gave its graph up."""
        with self.lock:
            if self.holder is holder:
                self.holder = None

    def _reap(self) -> None:
        while True:
            time.sleep(max(0.05, min(1.0, self.idle_s / 4)))
            with self.lock:
                if self.holder is None:
                    return
                idle = time.monotonic() - self.graph_use
                if idle < self.idle_s:
                    continue
                holder, self.holder = self.holder, None
                self.user = None  # the next run of any plan counts as a first one
                self.reaped += 1
                log.info("tearing down a compiled graph unused for %.1f s (its loop polls)", idle)
                with contextlib.suppress(Exception):
                    holder.release()
                return


_SLOTS: weakref.WeakKeyDictionary[Any, GraphSlot] = weakref.WeakKeyDictionary()


def slot_of(cluster: Any) -> GraphSlot:
    """The graph slot of ``cluster``'s workers."""
    slot = _SLOTS.get(cluster)
    if slot is None:
        slot = _SLOTS[cluster] = GraphSlot()
    return slot


def root_cause(e: BaseException) -> BaseException:
    """The error a node raised, unwrapped from Ray's task errors."""
    return _root_cause(e)


def name_running(plan: Plan, workers: list[Any], step: int) -> list[str]:
    """ "node 'x' (phase, level l) running on worker w" for every worker of ``plan`` that is
    computing a node of step ``step`` now (asked of the workers' ``progress``)."""
    running = []
    for w in sorted({t.worker for t in plan.tasks}):
        try:
            info = ray.get(workers[w].progress.remote(), timeout=5)
        except Exception:
            info = None
        if info and info.get("step") == step and info.get("node"):
            node = info["node"]
            running.append(
                f"node {node!r} ({plan.program.nodes[node].phase}, level {info['level']}) "
                f"running on worker {w}"
            )
    return running


def plan_buffer_bytes(plan: Plan, feeds: Mapping[str, Any]) -> int:
    """Channel buffer size for ``plan``: its largest message (cost-model bytes at the plan's
    batch, or the feeds' actual bytes), doubled, plus headroom; at least Ray's default."""
    sizes = node_bytes(plan.program, plan.cost)
    largest = sum(message_bytes(v) for v in feeds.values())
    for task in plan.tasks:
        for _dest, names in task.outputs:
            largest = max(largest, sum(int(sizes.get(n, 0)) + PER_ARRAY for n in names))
    return max(MIN_BUFFER, 2 * largest + HEADROOM)


class CompiledPlan:
    """One plan compiled into a Compiled Graph on the cluster's workers."""

    def __init__(self, cluster: Cluster, plan: Plan, plan_id: int, buffer_bytes: int) -> None:
        self.plan, self.plan_id, self.buffer_bytes = plan, plan_id, buffer_bytes
        workers = cluster.workers
        self.workers = list(workers)
        active = sorted({t.worker for t in plan.tasks})
        # Every process that creates channels sizes them (see the module docstring).
        set_buffer_size(None, buffer_bytes)
        ray.get(
            [workers[w].__ray_call__.remote(set_buffer_size, buffer_bytes) for w in active],
            timeout=60,
        )
        outs: dict[int, list[Any]] = {}
        consumed = {(src, slot) for t in plan.tasks for src, slot, _ in t.imports}
        driver: list[Any] = []
        dangling: list[Any] = []
        with InputNode() as inp:
            for task in plan.tasks:
                k = max(1, len(task.outputs))
                method = workers[task.worker].run_compiled
                if k > 1:
                    method = method.options(num_returns=k)
                args = [outs[src][slot] for src, slot, _ in task.imports]
                node = method.bind(plan_id, task.id, inp, *args)
                outs[task.id] = list(node) if k > 1 else [node]
            for task in plan.tasks:
                for slot, node in enumerate(outs[task.id]):
                    dest = task.outputs[slot][0] if task.outputs else None
                    if dest == DRIVER:
                        driver.append(node)
                    elif (task.id, slot) not in consumed:
                        dangling.append(node)  # every leaf must be an output of the graph
            dag = MultiOutputNode(driver + dangling)
        self.n_driver = len(driver)
        # One execution in flight (run() waits for each), so each channel holds one buffer.
        self.dag = dag.experimental_compile(_max_inflight_executions=1)
        self.torn_down = False

    def run(
        self, step: int, feeds: Mapping[str, Any], trace: bool, check_finite: bool, timeout: float
    ) -> list[dict[str, Any]]:
        """Execute one step; the driver's outputs (copied out of the channels), in plan order."""
        ref = self.dag.execute((step, trace, check_finite, dict(feeds)))
        values = ray.get(ref, timeout=timeout)
        return [own(v) for v in values[: self.n_driver]]

    def teardown(self, wait: bool = True) -> None:
        """Stop the graph's loops on the workers (the actors stay); ``wait=False`` tears down on
        a background thread (a worker still computing a timed-out step ends its loop when the
        node finishes)."""
        if self.torn_down:
            return
        self.torn_down = True
        if wait:
            with contextlib.suppress(Exception):
                self.dag.teardown()
        else:
            threading.Thread(target=self._quiet_teardown, daemon=True).start()

    def _quiet_teardown(self) -> None:
        with contextlib.suppress(Exception):
            self.dag.teardown()


def refusal(cluster: Cluster, options: RayOptions, plan: Plan, buffer_bytes: int) -> str:
    """Why ``plan`` cannot be compiled on ``cluster`` under ``options`` ("" when it can): run()
    plans and training steps refuse alike."""
    if options.data_path != "inline":
        return f'data_path={options.data_path!r} (compiled values travel in channels; use "inline")'
    nodes = {cluster.worker_info[t.worker]["node_id"] for t in plan.tasks}
    if len(nodes) > 1 and options.transport == "auto":
        return (
            f"the plan's workers run on {len(nodes)} nodes (auto compiles single-node "
            'plans only; transport="compiled" tries it across nodes)'
        )
    if buffer_bytes > MAX_BUFFER:
        return (
            f"its largest message needs a {buffer_bytes:,}-byte channel, more than {MAX_BUFFER:,}"
        )
    if not plan.tasks:
        return "the plan has no tasks"
    return ""


class CompiledRuns:
    """The compiled run() plans of one executor (see the module docstring)."""

    def __init__(self, cluster: Cluster, options: RayOptions) -> None:
        self.cluster, self.options = cluster, options
        self.graphs: dict[int, CompiledPlan] = {}
        self.runs: dict[int, int] = {}
        self.refused: dict[int, tuple[str, str]] = {}
        #: Why the latest plan ran on calls ("" when it ran compiled).
        self.last_reason = ""
        #: plan id -> its measured choice under transport="auto" (transport_choice.py).
        self.choices: dict[int, TransportChoice] = {}
        self._previous = -1  # the plan of the latest step
        self._cold = False  # the latest step compiled its graph (not a steady step's time)
        self.slot = slot_of(cluster)

    def why_not(self, plan: Plan, buffer_bytes: int) -> str:
        """Why ``plan`` cannot be compiled here ("" when it can)."""
        return refusal(self.cluster, self.options, plan, buffer_bytes)

    def step(
        self,
        plan: Plan,
        plan_id: int,
        step: int,
        feeds: Mapping[str, Any],
        trace: bool,
        check_finite: bool,
    ) -> list[dict[str, Any]] | None:
        """Run a step of ``plan`` compiled when the transport allows it; None: use calls."""
        transport = self.options.transport
        self._cold = False
        if transport == "calls":
            self.last_reason = 'transport="calls"'
            return None
        # Runs in a row: plans that alternate stay on calls rather than tear down and compile
        # each other's graph on every switch (an actor holds one compiled graph at a time).
        in_a_row = self.slot.touch(self) and plan_id == self._previous
        self.runs[plan_id] = self.runs.get(plan_id, 0) + 1 if in_a_row else 1
        self._previous = plan_id
        refused = self.refused.get(plan_id)
        if refused is not None and refused[0] == transport:  # asked again under another one
            self.last_reason = refused[1]
            return None
        need = plan_buffer_bytes(plan, feeds)
        if transport == "auto" and plan_id not in self.graphs:
            reason = self.why_not(plan, need)  # said at once, not after the calls probe
            if reason:
                self._refuse(plan_id, reason)
                return None
        if transport == "auto" and self.choice(plan_id).choose() == CALLS:
            self.drop(plan_id)  # measured slower (or not yet measured): no reader spins idle
            self.last_reason = self.choices[plan_id].status()  # describe() adds the numbers
            return None
        compiled = self.graphs.get(plan_id)
        if compiled is not None and (
            need > compiled.buffer_bytes
            or compiled.workers != self.cluster.workers
            or compiled.torn_down
        ):
            # A larger batch than compiled for, a replaced worker, or a training session took
            # the workers for its graph: compile again.
            self.drop(plan_id)
            compiled = None
        if compiled is None:
            if self.runs[plan_id] < 2:
                self.last_reason = "first run of the plan in a row (compiled from its second)"
                return None
            reason = self.why_not(plan, need)
            if not reason:
                try:
                    compiled = self._compile(plan, plan_id, need)
                except Exception as e:  # an unsupported shape: say so, stay on calls
                    reason = f"Ray could not compile it: {type(e).__name__}: {e}"
            if compiled is None:
                self._refuse(plan_id, reason)
                return None
        try:
            with self.slot.running():
                if compiled.torn_down:  # reaped while idle: compile it again
                    self.graphs.pop(plan_id, None)
                    compiled = self._compile(plan, plan_id, need)
                got = compiled.run(step, feeds, trace, check_finite, self.options.deadline)
        except BaseException as e:
            raise self._failed(plan_id, compiled, step, e) from None
        self.last_reason = ""
        return got

    def _compile(self, plan: Plan, plan_id: int, buffer_bytes: int) -> CompiledPlan:
        # Ray allows one compiled graph per actor at a time: the previous plan's goes.
        for other in list(self.graphs):
            self.drop(other)
        self.slot.claim(self)
        self._cold = True
        compiled = CompiledPlan(self.cluster, plan, plan_id, buffer_bytes)
        self.graphs[plan_id] = compiled
        log.info(
            "compiled plan %d (%d tasks) into a Ray Compiled Graph, channels of %d bytes",
            plan_id,
            len(plan.tasks),
            buffer_bytes,
        )
        return compiled

    def choice(self, plan_id: int) -> TransportChoice:
        """The measured transport choice of ``plan_id`` (``transport="auto"``)."""
        choice = self.choices.get(plan_id)
        if choice is None:
            while len(self.choices) >= MAX_CHOICES:  # the oldest plan's goes
                del self.choices[next(iter(self.choices))]
            choice = self.choices[plan_id] = TransportChoice(f"run() plan {plan_id}")
        return choice

    def record(self, plan_id: int, seconds: float) -> None:
        """The latest step of ``plan_id`` took ``seconds`` (from submission to its outputs
        read): under ``transport="auto"`` its choice learns which transport ran and how fast."""
        if self.options.transport != "auto":
            return
        ran = COMPILED if not self.last_reason else CALLS
        self.choice(plan_id).record(ran, seconds, cold=self._cold, why=self.last_reason)

    def _refuse(self, plan_id: int, reason: str) -> None:
        self.refused[plan_id] = (self.options.transport, reason)
        self.last_reason = reason
        level = logging.WARNING if self.options.transport == "compiled" else logging.INFO
        log.log(level, "plan %d runs on actor calls, not compiled: %s", plan_id, reason)

    def _failed(
        self, plan_id: int, compiled: CompiledPlan, step: int, error: BaseException
    ) -> BaseException:
        """Tear the graph down after a failed step and say what failed, as calls would."""
        cause = _root_cause(error)
        for w in compiled.workers:  # values the failed step left behind
            with contextlib.suppress(Exception):
                w.drop_step.remote(plan_id, step)
        if isinstance(cause, ChannelSizeError):
            self.drop(plan_id)
            self._refuse(plan_id, str(cause))
            return _Retry(str(cause))
        if isinstance(cause, DistgraphError):
            # A node's own error. Ray 2.60 passes it to the driver, but the graph's next
            # execution then times out on its channels: drop it, the next run compiles anew.
            self.drop(plan_id)
            return cause
        if isinstance(error, (GetTimeoutError, TimeoutError)):
            # A worker is still computing: its loop ends when the node does.
            self.graphs.pop(plan_id, None)
            compiled.teardown(wait=False)
            return self._timeout(compiled, step)
        self.drop(plan_id)
        if isinstance(cause, (RayActorError, ObjectLostError, RayChannelError)):
            return WorkerLostError(f"a worker died during a compiled step: {cause}")
        return error

    def _timeout(self, compiled: CompiledPlan, step: int) -> WaveTimeoutError:
        """Name the node still running, asked of every worker of the plan."""
        running = name_running(compiled.plan, compiled.workers, step)
        msg = f"step {step} passed its deadline of {self.options.deadline:g} s (compiled)"
        return WaveTimeoutError(msg + ("; " + "; ".join(running) if running else ""))

    def drop(self, plan_id: int) -> None:
        """Tear down ``plan_id``'s graph (the workers stay)."""
        compiled = self.graphs.pop(plan_id, None)
        if compiled is not None:
            compiled.teardown()

    def release(self) -> None:
        """Tear down this executor's run() graphs (another user of the workers compiles)."""
        for plan_id in list(self.graphs):
            self.drop(plan_id)
        self.slot.release(self)

    def close(self) -> None:
        """Tear down every graph on these workers, a training session's too (before the actors
        are killed or replaced)."""
        self.release()
        holder = self.slot.holder
        if holder is not None:
            self.slot.release(holder)
            holder.release()

    def describe(self, plan_id: int) -> str:
        """One line for ``explain``: how this plan's steps travel."""
        transport = self.options.transport
        if transport == "calls":
            return 'transport: actor calls (transport="calls")'
        choice = self.choices.get(plan_id) if transport == "auto" else None
        if plan_id in self.graphs and not self.graphs[plan_id].torn_down:
            line = f"transport: compiled graph, channels of {self.graphs[plan_id].buffer_bytes:,} B"
        elif plan_id in self.refused:
            line = f"transport: actor calls ({transport}: {self.refused[plan_id][1]})"
        elif choice is not None:
            line = "transport: actor calls"
        elif transport == "auto":
            return (
                "transport: auto, measured: the plan's first runs on actor calls, the next "
                "compiled, then the faster of the two"
            )
        else:
            return f"transport: {transport}, compiled from the plan's second run in a row"
        return line if choice is None else f"{line}; {choice.explain()}"


class _Retry(DistgraphError):
    """The compiled step did not run to the end for a reason calls do not have: run it on
    calls (the executor catches this and runs the step again there)."""


def is_retry(error: BaseException) -> bool:
    """Whether a compiled step asks to be run again on calls."""
    return isinstance(error, _Retry)


def _root_cause(e: BaseException) -> BaseException:
    seen = 0
    while isinstance(e, RayTaskError) and seen < 32:
        cause = getattr(e, "cause", None)
        if cause is None:
            break
        e = cause
        seen += 1
    return e
