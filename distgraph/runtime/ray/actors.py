"""The actors: ``Worker`` and ``ParameterServer`` as Ray actors, and the driver's one way to
read values (:func:`fetch`). Thin shells: the work is done by the Ray-free classes they wrap."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ray

from ...dataparallel import Reduction
from ...optim import global_norm
from ..actions import ActionRunner
from ..paramserver import ParameterServer
from ..worker import Worker
from .compiled import own, run_compiled_task


def fetch(refs: Any, timeout: float | None = None) -> Any:
    """The driver's only way to read values (one place to instrument in tests)."""
    return ray.get(refs, timeout=timeout)


def resolve(items: Sequence[Any]) -> list[Any]:
    """``items`` with every ObjectRef replaced by its value, fetched in one ``ray.get``."""
    at = [i for i, v in enumerate(items) if isinstance(v, ray.ObjectRef)]
    out = list(items)
    if at:
        for i, value in zip(at, ray.get([out[i] for i in at])):
            out[i] = value
    return out


class _RayWorker(Worker):
    # progress() must answer while run_task is busy, so it gets its own concurrency group.
    # ray.method returns the function it tags, but its stub types it as an actor handle's method.
    @ray.method(concurrency_group="control")
    def progress(self) -> dict[str, Any] | None:  # type: ignore[override]
        return Worker.progress(self)

    # Ray keeps a task's results of up to 100 KiB in the caller's process, and the driver is
    # the caller of every task: with data_path="store", values for other workers and the
    # server are put in the object store here instead (owned by this worker) and only their
    # reference is returned, which the receiver, given it as a top-level argument, finds
    # nested and fetches itself.
    def _send(self, values: dict[str, Any]) -> Any:
        return ray.put(values)

    # A pipelined step's values for the next stage go straight to that worker, whose step
    # call waits for them: received on the "mail" thread, beside the step (actions.py).
    @ray.method(concurrency_group="mail")
    def deliver(self, key: tuple[int, int, int, int], values: Any) -> None:  # type: ignore[override]
        ActionRunner.deliver(self, key, values)

    @ray.method(concurrency_group="mail")
    def cancel_actions(self, plan_id: int, attempt: int) -> None:  # type: ignore[override]
        ActionRunner.cancel_actions(self, plan_id, attempt)

    def _deliver(self, peer: Any, key: tuple[int, int, int, int], values: Any) -> None:
        peer.deliver.remote(key, values)  # not awaited: the receiver's step waits for it

    def _receive(self, items: list[Any]) -> list[Any]:
        return resolve(items)

    def _location(self) -> tuple[str, str]:
        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()

    def run_compiled(self, plan_id: int, task_id: int, control: Any, *imported: Any) -> Any:
        """A task as a node of a Compiled Graph (see ``compiled.py``)."""
        return run_compiled_task(self, plan_id, task_id, control, imported)

    def train_compiled(
        self, plan_id: int, task_id: int, generation: int, control: Any, *imported: Any
    ) -> Any:
        """A training step's task as a node of compiled graph ``generation`` (refused once the
        driver fenced that graph; see ``runtime/serial.py``)."""
        with self.step_lock:
            self.check_generation(generation, f"worker {self.index}, task {task_id}")
            return run_compiled_task(self, plan_id, task_id, control, imported, training=True)

    def take_params(self, plan_id: int, generation: int, params: dict[str, Any]) -> None:
        """A compiled step's last node here: the new params the server committed."""
        with self.step_lock:
            self.check_generation(generation, f"worker {self.index}, new params")
            self.resident[plan_id].update(own(params))


class _RayParamServer(ParameterServer):
    """The server as an actor. With data_path="store" gradients arrive by reference from the
    workers, and each worker's new params leave the same way, so neither is stored in the
    driver (the caller of ``stage``)."""

    def stage(
        self,
        step_id: int,
        *grad_dicts: Any,
        routed: bool = False,
        replicas: Sequence[tuple[int, int]] | None = None,
        kind: Reduction = "mean",
        grad_norm: float | None = None,
        grad_refs: Sequence[Any] = (),
        wait: float | None = None,
    ) -> Any:
        # ``grad_refs``: the workers' gradient outputs, passed nested so that Ray sends this
        # call at once and the server fetches them itself as they finish (bounded by
        # ``wait`` seconds), instead of the driver holding the call back until they exist.
        if grad_refs:
            grad_dicts = (*grad_dicts, *ray.get(list(grad_refs), timeout=wait))
        by_ref = any(isinstance(g, ray.ObjectRef) for g in grad_dicts)  # data_path="store"
        out = ParameterServer.stage(
            self,
            step_id,
            *resolve(grad_dicts),
            routed=routed,
            replicas=replicas,
            kind=kind,
            grad_norm=grad_norm,
        )
        if not (routed and by_ref):
            return out
        step, *params = out  # answer the way the gradients came
        return (step, *[ray.put(p) if p else p for p in params])

    def compiled_step(
        self, generation: int, control: Any, takers: tuple[int, ...], n_grads: int, *inputs: Any
    ) -> Any:
        """A compiled training step's update (``stage_and_commit``): ``inputs`` are the step's
        gradient dicts (the first ``n_grads``) and every other output of its tasks, taken only
        so that this node runs once all of them succeeded (Ray skips a node whose input
        failed)."""
        with self.step_lock:
            self.check_generation(generation, "the parameter server's update")
            grads = [own(d) for d in inputs[:n_grads]]
            step, split = control  # split: the data-parallel stage's arguments, as with calls
            return self.stage_and_commit(int(step), grads, takers, **split)

    # A step over sharded servers is two-phase inside the graph too: every shard's stage node
    # runs once every task succeeded, and each shard's commit node takes every shard's stage
    # output, so no shard commits unless every shard staged (see compiled_training.py).
    def compiled_sums(self, generation: int, control: Any, *grad_dicts: Any) -> dict[str, float]:
        """A compiled step's share of the global gradient norm on this shard (``clip_norm``)."""
        with self.step_lock:
            self.check_generation(generation, "a parameter-server shard's gradient norm")
            return ParameterServer.sum_of_squares(self, *[own(d) for d in grad_dicts], **control[1])

    def compiled_stage(
        self, generation: int, control: Any, n_grads: int, n_sums: int, *inputs: Any
    ) -> int:
        """A compiled step's stage on this shard: ``inputs`` are its gradient dicts (the first
        ``n_grads``), then every shard's sums of squares (``n_sums``, for clipping: the one
        global norm, combined as with calls), then every other output of the step's tasks
        (taken so this node runs only once all of them succeeded)."""
        with self.step_lock:
            self.check_generation(generation, "a parameter-server shard's stage")
            step, split = control
            grads = [own(d) for d in inputs[:n_grads]]
            sums = [own(d) for d in inputs[n_grads : n_grads + n_sums]]
            norm = global_norm({p: v for d in sums for p, v in d.items()}) if sums else None
            ParameterServer.stage(self, int(step), *grads, grad_norm=norm, **split)
            return int(step)

    def compiled_commit(
        self, generation: int, control: Any, takers: tuple[int, ...], *staged: Any
    ) -> Any:
        """A compiled step's commit on this shard, once every shard staged (``staged``: their
        stage nodes' outputs); returns its status, and with ``takers`` (status, the new params
        of each taker this shard serves)."""
        with self.step_lock:
            self.check_generation(generation, "a parameter-server shard's commit")
            status = ParameterServer.commit(self, int(control[0]))
            if not takers:
                return status
            routed = self._route(self.store.params)  # the committed params (the staged ones)
            return (status, *[routed[w] for w in takers])

    def sum_of_squares(
        self,
        *grad_dicts: Any,
        replicas: Sequence[tuple[int, int]] | None = None,
        kind: Reduction = "mean",
    ) -> dict[str, float]:
        return ParameterServer.sum_of_squares(
            self, *resolve(grad_dicts), replicas=replicas, kind=kind
        )


# Step calls must run in submission order (the worker checks it: see worker.py). Ray documents
# that order for single-threaded actors; a concurrency group makes the actor threaded, so the
# order is pinned explicitly: in-order submission and execution (Ray refuses this setting
# together with max_concurrency > 1), every order-sensitive method in the default group of one
# thread, all called by this driver; only progress() and the pipelined mail (deliver, called
# by other workers, and cancel_actions) run beside them.
# (Ray's stub for ray.remote lacks these two actor options; its docstring and runtime take them.)
WorkerActor = ray.remote(  # type: ignore[call-overload]
    concurrency_groups={"control": 1, "mail": 1}, allow_out_of_order_execution=False
)(_RayWorker)
ParamServerActor = ray.remote(_RayParamServer)
