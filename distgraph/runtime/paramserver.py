"""The parameter server: master parameters, optimizer state, versions and checkpoints.

State: a :class:`~distgraph.paramstore.ParameterStore` (params, optimizer state, the record of
applied step ids), per worker the names of the params that worker keeps resident, and how the
updates it applied were taken (learning rate, gradient norm, clipped step ids).

Where the gradients meet: ``stage`` evaluates the learning-rate schedule at the step id it
stages and clips by the global norm of all the step's gradients, so a replayed step gets the
same rate and the same clipping as its first run. The local training session runs this same
class in-process (see ``runtime/local.py``).

Order of a step (one outcome per step id: applied, and the driver counts it, or never applied):

1. ``stage(step, *grad_dicts)``, submitted with the step's tasks. Ray runs it once every
   gradient ref resolves (never if a producing task failed). It computes the optimizer update
   from the current state and *holds* it; nothing changes yet. Data-parallel replicas send
   their dicts grouped by replica (``replicas``): the server combines them in replica order
   (``dataparallel.combine``) into the one gradient that step's update is computed from.
   With ``routed`` it also returns the new params, one dict per worker; the driver passes
   each to that worker's first call of the next step, but only once it committed this one.
2. ``commit(step)``, submitted by the driver only once it has seen the step succeed. It makes
   the held update current (exactly once per step id), checkpoints every ``checkpoint_every``
   versions, and returns the new version. A commit that finds no update held
   for its step (its gradients were lost with a node, or the server restarted) raises
   :class:`StepNotStagedError`, a :class:`~distgraph.errors.WorkerLostError`: the driver
   recovers and replays the step.
3. ``abort(step)``, submitted instead of ``commit`` when the step failed (error, deadline,
   interrupt): it drops the held update and answers whether the step is applied. Calls from
   the driver run in submission order, so its answer is final: a step aborted before any
   commit was sent is never applied.

Compiled training steps (``runtime/ray/compiled_training.py``) call ``stage_and_commit`` from a
node that runs only once every task of the step succeeded, on the graph's own thread: every
method holds the server's step lock, and a fenced graph's late update raises instead of
applying (``runtime/serial.py``).

This module does not import Ray: ``runtime/ray/actors.py`` wraps ``ParameterServer`` as an actor.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from ..dataparallel import Reduction, combine
from ..errors import ConfigError, WorkerLostError
from ..optim import Optimizer, Update, sum_of_squares
from ..paramstore import ParameterStore
from .serial import Fenced, serial


class StepNotStagedError(WorkerLostError):
    """A commit found no update held for its step: the step must run again (the driver
    recovers and replays it)."""


@dataclass
class _Staged:
    """A step's update, computed and held until the driver commits or aborts it."""

    step: int
    store: ParameterStore  # the store it was computed from (a restore replaces the store)
    version: int
    update: Update | None  # None: the step id was applied before (a duplicate)
    start: float
    ready: float  # when the update was held (the trace's stage span is start..ready)


def combine_replicas(
    grad_dicts: Sequence[Mapping[str, Any]],
    replicas: Sequence[tuple[int, int]] | None,
    kind: Reduction,
) -> dict[str, Any]:
    """The step's gradients from the dicts the workers sent (see :meth:`ParameterServer.stage`):
    merged as they are for one replica, combined in replica order for several."""
    if replicas is None:
        merged: dict[str, Any] = {}
        for d in grad_dicts:
            merged.update(d)
        return merged
    counts = [int(c) for c, _ in replicas]
    if sum(counts) != len(grad_dicts):
        raise ConfigError(
            f"stage: the replicas {list(replicas)} account for {sum(counts)} gradient dicts, but "
            f"{len(grad_dicts)} were sent; pass one (count, rows) per replica"
        )
    per_replica: list[dict[str, Any]] = []
    at = 0
    for count in counts:
        merged = {}
        for d in grad_dicts[at : at + count]:
            merged.update(d)
        per_replica.append(merged)
        at += count
    return combine(per_replica, [int(rows) for _, rows in replicas], kind)


class ParameterServer(Fenced):
    """Thin shell over a ParameterStore, with per-worker routing and periodic checkpoints."""

    def __init__(
        self,
        params: dict[str, Any],
        optimizer: Optimizer,
        routes: dict[int, list[str]],
        grad_names: dict[str, str],
        checkpoint_dir: str | None = None,
        checkpoint_every: int = 0,
        opt_state: dict | None = None,
        keep_undo: bool = False,
    ):
        self._init_fence()  # a compiled graph's step runs on a thread of its own (serial.py)
        self.store = ParameterStore(params, optimizer, opt_state)
        self.routes = routes
        self._grad_names = dict(grad_names)
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_every = checkpoint_every
        #: The Trainer's progress (epoch, fit segments, history), written into checkpoints.
        self.progress: dict[str, Any] = {}
        self._saved_version = -1  # the version last written to checkpoint_dir
        self._staged: _Staged | None = None
        #: Whether to keep the state before the latest step (one shard of several: rollback);
        #: off for a lone server, which would otherwise hold every param twice.
        self.keep_undo = keep_undo
        #: (step id, params, optimizer state) before the latest applied step (see rollback).
        self._before: tuple[int, dict[str, Any], dict[str, Any]] | None = None
        #: Step ids whose gradients were scaled down to ``clip_norm``, in the order applied.
        self.clipped: list[int] = []
        #: Learning rate and gradient norm of the latest applied step (norm: with clip_norm).
        self.last_lr: float | None = None
        self.last_grad_norm: float | None = None

    @classmethod
    def over(cls, store: ParameterStore, grad_names: dict[str, str]) -> ParameterServer:
        """A server in this process over ``store`` (no routes, no checkpoint directory): the
        local training session's, so it applies updates with exactly this code."""
        server = cls({}, store.optimizer, {}, grad_names)
        server.store = store
        return server

    @serial
    def stage(
        self,
        step_id: int,
        *grad_dicts: dict[str, Any],
        routed: bool = False,
        replicas: Sequence[tuple[int, int]] | None = None,
        kind: Reduction = "mean",
        grad_norm: float | None = None,
    ) -> Any:
        """Compute step ``step_id``'s update from its gradients and hold it (apply nothing).

        ``grad_dicts``: gradient node -> array, as the workers sent them. Without ``replicas``
        they are one replica's, merged. Data-parallel replicas pass ``replicas``: one
        ``(count, rows)`` per replica in replica order, meaning the next ``count`` dicts are
        that replica's and it took ``rows`` rows of the batch; each replica's dicts are merged,
        and the replicas' gradients combined by :func:`distgraph.dataparallel.combine` (weights
        rows / batch rows for a ``kind="mean"`` loss, 1 for ``"sum"``; added in replica order
        in float64, so the result does not depend on arrival order) before the optimizer sees
        them once: the step is still staged, committed and applied exactly once.

        Returns the step id; with ``routed``, (step id, the new params for worker 0, 1, ...):
        the driver hands them to the next step only once it commits this one. ``grad_norm``:
        the step's global gradient norm, given when this server is one shard of several (the
        driver combines every shard's :meth:`sum_of_squares`)."""
        start = time.time()
        self._staged = None  # a newer stage replaces whatever an abandoned step left
        grads = self._my_grads(grad_dicts, replicas, kind)
        update = self.store.prepare(step_id, grads, grad_norm)
        self._staged = _Staged(step_id, self.store, self.store.version, update, start, time.time())
        if not routed:
            return step_id
        params = self.store.params if update is None else update.params
        return (step_id, *self._route(params))

    def _my_grads(
        self,
        grad_dicts: Sequence[Mapping[str, Any]],
        replicas: Sequence[tuple[int, int]] | None,
        kind: Reduction,
    ) -> dict[str, Any]:
        """Param -> the step's gradient (replicas combined), for this server's params."""
        grads = combine_replicas(grad_dicts, replicas, kind)
        return {p: grads[g] for p, g in self._grad_names.items()}

    @serial
    def sum_of_squares(
        self,
        *grad_dicts: dict[str, Any],
        replicas: Sequence[tuple[int, int]] | None = None,
        kind: Reduction = "mean",
    ) -> dict[str, float]:
        """Param -> sum of squares of its (combined) gradient: this shard's share of the
        global norm (the same arguments as :meth:`stage`)."""
        return {p: sum_of_squares(g) for p, g in self._my_grads(grad_dicts, replicas, kind).items()}

    @serial
    def commit(self, step_id: int) -> dict[str, Any]:
        """Apply the update held for ``step_id``; returns its status: version, applied, and
        the times (``time.time()``) the stage began (``start``) and held its update
        (``staged``), the commit arrived (``committed``) and ended (``end``)."""
        committed = time.time()
        staged, self._staged = self._staged, None
        if (
            staged is None
            or staged.step != step_id
            or staged.store is not self.store
            or staged.version != self.store.version
        ):
            held = "nothing" if staged is None else f"an update for step {staged.step}"
            raise StepNotStagedError(
                f"the parameter server holds {held}, not step {step_id}'s update (its gradients "
                "never arrived, or the server restarted); the step must run again"
            )
        before = (self.store.params, self.store.opt_state)
        applied = self.store.install(step_id, staged.update)
        if applied and self.keep_undo:  # so a step that reached only some shards is undone
            self._before = (step_id, *before)
        if applied and staged.update is not None:
            self.last_lr, self.last_grad_norm = staged.update.lr, staged.update.grad_norm
            if staged.update.clipped:
                self.clipped.append(step_id)
        if applied and self.checkpoint_every and self.store.version % self.checkpoint_every == 0:
            self.save(self.checkpoint_dir)
        status = {
            "version": self.store.version,
            "applied": applied,
            "step": step_id,
            "start": staged.start,
            "staged": staged.ready,
            "committed": committed,
            "end": time.time(),
        }
        return status

    @serial
    def abort(self, step_id: int) -> bool:
        """Drop any update held for ``step_id``; returns whether that step is applied."""
        if self._staged is not None and self._staged.step == step_id:
            self._staged = None
        return self.store.has_applied(step_id)

    @serial
    def rollback(self, step_id: int) -> bool:
        """Undo step ``step_id`` if it is the latest applied one; returns whether it did.

        One shard of several: the driver calls it when a step was applied by some shards
        and not others (a shard lost or an interrupt between their commits), so the step is
        then applied by none and can run again (or stay unapplied) everywhere alike."""
        before, self._before = self._before, None
        if before is None or before[0] != step_id or not self.store.applied:
            return False
        if self.store.applied[-1] != step_id:
            return False
        self.store.uninstall(step_id, before[1], before[2])
        return True

    @serial
    def params_of(self, worker: int) -> dict[str, Any]:
        """Current values of the params ``worker`` keeps."""
        return {p: self.store.params[p] for p in self.routes.get(worker, [])}

    def _route(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        """``params`` split by the workers that keep them."""
        return [
            {p: params[p] for p in self.routes.get(w, [])}
            for w in range(max(self.routes, default=-1) + 1)
        ]

    @serial
    def worker_params(self) -> list[dict[str, Any]]:
        """Current params split by the workers that keep them."""
        return self._route(self.store.params)

    @serial
    def params(self) -> dict[str, Any]:
        """All current params."""
        return dict(self.store.params)

    @serial
    def checkpoint(self) -> Checkpoint:
        """A snapshot of the store, with the latest progress the driver sent."""
        return self.store.to_checkpoint(dict(self.progress))

    @serial
    def set_progress(self, progress: dict[str, Any]) -> None:
        """Keep the Trainer's progress for the next checkpoints (the driver sends it when a fit
        starts and after each epoch; calls run in order with the updates)."""
        self.progress = dict(progress)
        if self.checkpoint_dir and self._saved_version == self.store.version:
            # The checkpoint of this very version (an epoch's last step) was written before
            # the epoch's history arrived: write it again with it.
            self.save(self.checkpoint_dir)

    @serial
    def save(self, path: str | None) -> str | None:
        """Write a checkpoint to ``path`` (a directory every node can reach); a directory
        holding another run's checkpoint is refused (CheckpointError), never replaced."""
        if not path:
            return None
        save_checkpoint(path, self.checkpoint(), same_run=True)
        if path == self.checkpoint_dir:
            self._saved_version = self.store.version
        return path

    @serial
    def restore(self, ckpt: Checkpoint | str) -> int:
        """Load a checkpoint (an object or a path), validated against the current params;
        returns the version."""
        if isinstance(ckpt, (str, os.PathLike)):
            ckpt = load_checkpoint(ckpt)
        self.store = ParameterStore.from_checkpoint(ckpt, self.store.params)
        self.progress = dict(ckpt.extra)
        return self.store.version

    @serial
    def status(self) -> dict[str, Any]:
        """Version, applied step ids, ignored duplicates, the step ids whose gradients were
        clipped (since this server started), and the latest step's learning rate and gradient
        norm (None before the first update; the norm is computed only with ``clip_norm``)."""
        return {
            "version": self.store.version,
            "applied": list(self.store.applied),
            "duplicates": list(self.store.duplicates),
            "clipped": list(self.clipped),
            "lr": self.last_lr,
            "grad_norm": self.last_grad_norm,
        }

    @serial
    def stage_and_commit(
        self,
        step_id: int,
        grad_dicts: Sequence[dict[str, Any]],
        takers: Sequence[int],
        replicas: Sequence[tuple[int, int]] | None = None,
        kind: Reduction = "mean",
    ) -> Any:
        """A compiled step's update: stage it and commit it at once (the graph runs this only
        once every task of the step succeeded: it takes their outputs as inputs). Returns the
        commit's status, and with ``takers`` (status, the new params of each taker).
        ``replicas`` / ``kind``: data-parallel replicas' gradients, as for :meth:`stage`."""
        staged = self.stage(step_id, *grad_dicts, routed=bool(takers), replicas=replicas, kind=kind)
        status = self.commit(step_id)
        if not takers:
            return status
        return (status, *[staged[1 + w] for w in takers])

    def crash(self) -> None:
        """End the process at once (for failure tests)."""
        os._exit(1)
