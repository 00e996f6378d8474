"""Master parameters, optimizer state and the record of applied steps (pure, no Ray).

The parameter-server actor and the local training session are both thin shells over
``ParameterStore``, so exactly-once semantics are written (and tested) once.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .errors import CheckpointError, ConfigError
from .optim import Optimizer, Update

log = logging.getLogger(__name__)


class ParameterStore:
    """Parameters plus optimizer state; applies each step id at most once.

    ``version`` counts applied updates; ``applied`` lists their step ids in order, and
    ``duplicates`` the step ids that were submitted again and ignored. ``run_id`` names the
    training run (a fresh one unless given); checkpoints carry it.
    """

    def __init__(
        self,
        params: Mapping[str, Any],
        optimizer: Optimizer,
        opt_state: Mapping | None = None,
        run_id: str | None = None,
    ):
        self.run_id = run_id if run_id is not None else uuid.uuid4().hex
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

    def prepare(
        self, step_id: int, grads: Mapping[str, Any], grad_norm: float | None = None
    ) -> Update | None:
        """The update step ``step_id`` would make from the current state (at that step's
        learning rate), or None for a step id already applied; changes nothing (see
        :meth:`install`). ``grad_norm``: the step's global gradient norm when these are only
        some of its gradients (one server shard's), so clipping scales them all alike."""
        if step_id in self._applied_set:
            return None
        return self.optimizer.apply(
            self.params, grads, self.opt_state, step=step_id, grad_norm=grad_norm
        )

    def install(self, step_id: int, update: Update | None) -> bool:
        """Make a prepared update current, as step ``step_id``; returns whether it applied.

        Only valid while nothing else changed the store since :meth:`prepare`."""
        if update is None or step_id in self._applied_set:
            self.duplicates.append(step_id)
            log.warning("step %d was already applied; ignoring the repeated update", step_id)
            return False
        # Every value was built before anything changes.
        self.params, self.opt_state = update.params, update.state
        self.applied.append(step_id)
        self._applied_set.add(step_id)
        return True

    def uninstall(self, step_id: int, params: dict[str, Any], opt_state: dict[str, Any]) -> None:
        """Undo the latest applied step ``step_id``, back to ``params`` / ``opt_state`` (the
        state it was applied to). A sharded server uses it when a step reached only some
        shards, so that every shard runs it again from the same state or none does."""
        if not self.applied or self.applied[-1] != step_id:
            raise AssertionError(f"step {step_id} is not the latest applied step")
        self.params, self.opt_state = params, opt_state
        self.applied.pop()
        self._applied_set.discard(step_id)

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
            run_id=self.run_id,
        )

    def save(self, path: str | os.PathLike, extra: dict | None = None) -> None:
        """Write a checkpoint."""
        save_checkpoint(path, self.to_checkpoint(extra))

    @classmethod
    def from_checkpoint(
        cls, ckpt: Checkpoint, expect: Mapping[str, Any] | None = None
    ) -> ParameterStore:
        """Rebuild a store; with ``expect`` (name -> array, the graph's params) every array is
        validated first (see :func:`validate_checkpoint`)."""
        if expect is not None:
            optimizer = validate_checkpoint(ckpt, expect)
        else:
            optimizer = Optimizer.from_config(ckpt.optimizer)
        store = cls(ckpt.params, optimizer, ckpt.opt_state, run_id=ckpt.run_id)
        store.applied = list(ckpt.applied_steps) or list(range(1, ckpt.step + 1))
        store._applied_set = set(store.applied)
        return store

    @classmethod
    def load(
        cls, path: str | os.PathLike, expect: Mapping[str, Any] | None = None
    ) -> ParameterStore:
        """Read a checkpoint from disk."""
        return cls.from_checkpoint(load_checkpoint(path), expect)


def validate_checkpoint(ckpt: Checkpoint, expect: Mapping[str, Any]) -> Optimizer:
    """Check a checkpoint against the graph's params and its own optimizer; returns that
    optimizer. Raises :class:`CheckpointError` naming the param or field at fault.

    Params: the same names, shapes and float dtypes as the graph's, finite values. Optimizer:
    a valid config; per param exactly the state fields the optimizer keeps, each shaped and
    typed like a fresh state's (so a vector of momentum cannot turn a scalar param into a
    vector), float fields finite, Adam's ``v`` >= 0, integer counters (Adam's ``t``) in [0, step]. Step ids >= 1, unique.
    """
    try:
        optimizer = Optimizer.from_config(ckpt.optimizer)
    except ConfigError as e:
        raise CheckpointError(f"checkpoint field optimizer: {e}") from None
    if set(expect) != set(ckpt.params):
        raise CheckpointError(
            f"checkpoint params {sorted(ckpt.params)} do not match the graph's {sorted(expect)}"
        )
    for name, graph_value in expect.items():
        value, want = np.asarray(ckpt.params[name]), np.asarray(graph_value)
        if value.shape != want.shape:
            raise CheckpointError(
                f"checkpoint param {name!r} has shape {value.shape}, graph has {want.shape}"
            )
        if value.dtype.kind != "f" or value.dtype != want.dtype:
            raise CheckpointError(
                f"checkpoint param {name!r} has dtype {value.dtype}, graph has {want.dtype}"
            )
        if not np.all(np.isfinite(value)):
            raise CheckpointError(f"checkpoint param {name!r} holds NaN or Inf")
    unknown = sorted(set(ckpt.opt_state) - set(expect))
    if unknown:
        raise CheckpointError(f"checkpoint optimizer state names unknown params {unknown}")
    for name in expect:
        fresh = optimizer.init_one(np.asarray(ckpt.params[name]))
        state = ckpt.opt_state.get(name, {})
        if set(state) != set(fresh):
            raise CheckpointError(
                f"checkpoint optimizer state of param {name!r} has fields {sorted(state)}; "
                f"{type(optimizer).__name__} keeps {sorted(fresh)}"
            )
        for k, template in fresh.items():
            value = np.asarray(state[k])
            field = f"optimizer state {name!r}.{k}"
            if value.shape != template.shape:
                raise CheckpointError(
                    f"checkpoint {field} has shape {value.shape}, expected {template.shape}"
                )
            if value.dtype.kind != template.dtype.kind:
                raise CheckpointError(
                    f"checkpoint {field} has dtype {value.dtype}, expected {template.dtype}"
                )
            if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
                raise CheckpointError(f"checkpoint {field} holds NaN or Inf")
            if (value.dtype.kind in "iu" or k in optimizer.nonnegative) and np.any(value < 0):
                raise CheckpointError(f"checkpoint {field} is negative ({value.min()})")
            # A counter (Adam's t) counts applied steps: more than the checkpoint took is
            # tampering, and near 2**63 it would overflow on the next update.
            if value.dtype.kind in "iu" and np.any(value > ckpt.step):
                raise CheckpointError(
                    f"checkpoint {field} is {value.max()}, more than the {ckpt.step} steps "
                    "the checkpoint took"
                )
    steps = list(ckpt.applied_steps)
    if any(int(s) < 1 for s in steps) or len(set(steps)) != len(steps):
        raise CheckpointError("checkpoint field applied_steps: step ids must be unique and >= 1")
    if ckpt.step < 0 or (steps and ckpt.step != len(steps)):
        raise CheckpointError(
            f"checkpoint field step: {ckpt.step} does not count the {len(steps)} applied steps"
        )
    return optimizer
