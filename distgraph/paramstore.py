"""Master parameters, optimizer state and the record of applied steps (pure, no Ray).

The parameter-server actor and the local training session are both thin shells over
``ParameterStore``, so exactly-once semantics are written (and tested) once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .errors import CheckpointError
from .optim import Optimizer

log = logging.getLogger(__name__)


class ParameterStore:
    """Parameters plus optimizer state; applies each step id at most once.

    ``version`` counts applied updates; ``applied`` lists their step ids in order, and
    ``duplicates`` the step ids that were submitted again and ignored.
    """

    def __init__(
        self, params: Mapping[str, Any], optimizer: Optimizer, opt_state: Mapping | None = None
    ):
        self.optimizer = optimizer
        self.params = {k: np.array(v) for k, v in params.items()}
        self.opt_state = dict(opt_state) if opt_state is not None else optimizer.init(self.params)
        self.applied: list[int] = []
        self.duplicates: list[int] = []
        self._applied_set: set[int] = set()

    @property
    def version(self) -> int:
        """How many updates have been applied."""
        return len(self.applied)

    def apply(self, step_id: int, grads: Mapping[str, Any]) -> bool:
        """Apply ``grads`` as step ``step_id``; a step id seen before changes nothing."""
        return self.install(step_id, self.prepare(step_id, grads))

    def prepare(self, step_id: int, grads: Mapping[str, Any]) -> tuple[dict, dict] | None:
        """The (params, optimizer state) step ``step_id`` would produce from the current ones,
        or None for a step id already applied; changes nothing (see :meth:`install`)."""
        if step_id in self._applied_set:
            return None
        return self.optimizer.update(self.params, grads, self.opt_state)

    def install(self, step_id: int, update: tuple[dict, dict] | None) -> bool:
        """Make a prepared update current, as step ``step_id``; returns whether it applied.

        Only valid while nothing else changed the store since :meth:`prepare`."""
        if update is None or step_id in self._applied_set:
            self.duplicates.append(step_id)
            log.warning("step %d was already applied; ignoring the repeated update", step_id)
            return False
        self.params, self.opt_state = update  # every value was built before anything changes
        self.applied.append(step_id)
        self._applied_set.add(step_id)
        return True

    def has_applied(self, step_id: int) -> bool:
        """Whether step ``step_id`` has been applied."""
        return step_id in self._applied_set

    def to_checkpoint(self, extra: dict | None = None) -> Checkpoint:
        """A snapshot (arrays shared: the store never mutates them in place)."""
        return Checkpoint(
            params=dict(self.params),
            opt_state={k: dict(v) for k, v in self.opt_state.items()},
            optimizer=self.optimizer.config(),
            step=self.version,
            applied_steps=list(self.applied),
            extra=extra or {},
        )

    def save(self, path: str | os.PathLike, extra: dict | None = None) -> None:
        """Write a checkpoint."""
        save_checkpoint(path, self.to_checkpoint(extra))

    @classmethod
    def from_checkpoint(
        cls, ckpt: Checkpoint, expect: Mapping[str, Any] | None = None
    ) -> ParameterStore:
        """Rebuild a store; ``expect`` (name -> array) checks names and shapes match the graph."""
        if expect is not None:
            if set(expect) != set(ckpt.params):
                raise CheckpointError(
                    f"checkpoint params {sorted(ckpt.params)} do not match the graph's {sorted(expect)}"
                )
            for k, v in expect.items():
                if np.shape(v) != ckpt.params[k].shape:
                    raise CheckpointError(
                        f"checkpoint param {k!r} has shape {ckpt.params[k].shape}, graph has {np.shape(v)}"
                    )
        store = cls(ckpt.params, Optimizer.from_config(ckpt.optimizer), ckpt.opt_state)
        store.applied = list(ckpt.applied_steps) or list(range(1, ckpt.step + 1))
        store._applied_set = set(store.applied)
        return store

    @classmethod
    def load(
        cls, path: str | os.PathLike, expect: Mapping[str, Any] | None = None
    ) -> ParameterStore:
        """Read a checkpoint from disk."""
        return cls.from_checkpoint(load_checkpoint(path), expect)
