"""The parameter server: master parameters, optimizer state, versions and checkpoints.

State: a :class:`~distgraph.paramstore.ParameterStore` (params, optimizer state, the record of
applied step ids) and, per worker, the names of the params that worker keeps resident.

Order of a step: the driver submits ``apply(step, *grad_dicts)`` right after the backward wave;
Ray runs it once every gradient ref resolves (it never runs if any producing task failed, so a
failed step's partial gradients are never applied). ``apply`` updates the store exactly once
per step id, checkpoints every ``checkpoint_every`` versions, and returns the new version plus
one dict of fresh params per worker; each worker's first call of the next step takes its dict.

This module does not import Ray: ``runtime/ray.py`` wraps ``ParameterServer`` as an actor.
"""

from __future__ import annotations

import os
import time
from typing import Any

from ..checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from ..optim import Optimizer
from ..paramstore import ParameterStore


class ParameterServer:
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
    ):
        self.store = ParameterStore(params, optimizer, opt_state)
        self.routes = routes
        self._grad_names = dict(grad_names)
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_every = checkpoint_every
        #: The Trainer's progress (epoch, fit segments, history), written into checkpoints.
        self.progress: dict[str, Any] = {}
        self._saved_version = -1  # the version last written to checkpoint_dir

    def apply(self, step_id: int, *grad_dicts: dict[str, Any]) -> tuple:
        """Apply one step's gradients once; returns (status, params for worker 0, 1, ...)."""
        start = time.time()
        grads: dict[str, Any] = {}
        for d in grad_dicts:
            grads.update(d)
        applied = self.store.apply(step_id, {p: grads[g] for p, g in self._grad_names.items()})
        if applied and self.checkpoint_every and self.store.version % self.checkpoint_every == 0:
            self.save(self.checkpoint_dir)
        status = {
            "version": self.store.version,
            "applied": applied,
            "step": step_id,
            "start": start,
            "end": time.time(),
        }
        return (status, *self.worker_params())

    def worker_params(self) -> list[dict[str, Any]]:
        """Current params split by the workers that keep them."""
        return [
            {p: self.store.params[p] for p in self.routes.get(w, [])}
            for w in range(max(self.routes, default=-1) + 1)
        ]

    def params(self) -> dict[str, Any]:
        """All current params."""
        return dict(self.store.params)

    def checkpoint(self) -> Checkpoint:
        """A snapshot of the store, with the latest progress the driver sent."""
        return self.store.to_checkpoint(dict(self.progress))

    def set_progress(self, progress: dict[str, Any]) -> None:
        """Keep the Trainer's progress for the next checkpoints (the driver sends it when a fit
        starts and after each epoch; calls run in order with the updates)."""
        self.progress = dict(progress)
        if self.checkpoint_dir and self._saved_version == self.store.version:
            # The checkpoint of this very version (an epoch's last step) was written before
            # the epoch's history arrived: write it again with it.
            self.save(self.checkpoint_dir)

    def save(self, path: str | None) -> str | None:
        """Write a checkpoint to ``path`` (a directory every node can reach); a directory
        holding another run's checkpoint is refused (CheckpointError), never replaced."""
        if not path:
            return None
        save_checkpoint(path, self.checkpoint(), same_run=True)
        if path == self.checkpoint_dir:
            self._saved_version = self.store.version
        return path

    def restore(self, ckpt: Checkpoint | str) -> int:
        """Load a checkpoint (an object or a path), validated against the current params;
        returns the version."""
        if isinstance(ckpt, (str, os.PathLike)):
            ckpt = load_checkpoint(ckpt)
        self.store = ParameterStore.from_checkpoint(ckpt, self.store.params)
        self.progress = dict(ckpt.extra)
        return self.store.version

    def status(self) -> dict[str, Any]:
        """Version, applied step ids and ignored duplicates."""
        return {
            "version": self.store.version,
            "applied": list(self.store.applied),
            "duplicates": list(self.store.duplicates),
        }

    def crash(self) -> None:
        """End the process at once (for failure tests)."""
        os._exit(1)
