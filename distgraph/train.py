"""The Trainer: epochs of shuffled mini-batches through any executor's training session."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import ConfigError, FeedError
from .graph import Graph
from .optim import Optimizer
from .paramstore import ParameterStore
from .runtime.base import Executor, TrainingSession

log = logging.getLogger(__name__)

#: Params with at most this many elements are recorded in ``History.params`` each epoch.
SMALL_PARAM = 16


@dataclass
class History:
    """Per-epoch mean loss, per-step loss and small parameters after each epoch."""

    loss: list[float] = field(default_factory=list)
    step_loss: list[float] = field(default_factory=list)
    params: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.loss)

    def __getitem__(self, i: int) -> float:
        return self.loss[i]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "loss": list(self.loss),
            "step_loss": list(self.step_loss),
            "params": list(self.params),
        }


def batch_indices(
    n: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True
) -> list[np.ndarray]:
    """The mini-batches of one epoch: a permutation that depends only on (seed, epoch)."""
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


class Trainer:
    """Fit a graph's params by minimising output ``loss``.

    ``executor`` defaults to a :class:`~distgraph.LocalExecutor`; with a
    :class:`~distgraph.RayExecutor` the same code trains across Ray actors and the parameter
    server applies the updates.
    """

    def __init__(
        self,
        graph: Graph,
        loss: str,
        optimizer: Optimizer,
        executor: Executor | None = None,
        *,
        check_finite: bool = False,
        progress: bool | None = None,
        trace: bool = False,
    ):
        from .runtime.local import LocalExecutor

        if not isinstance(optimizer, Optimizer):
            raise ConfigError(
                f"optimizer must be a distgraph Optimizer, got {type(optimizer).__name__}"
            )
        if loss not in graph:
            raise ConfigError(f"loss {loss!r} is not a node of the graph")
        self.graph, self.loss, self.optimizer = graph, graph[loss].name, optimizer
        self.executor = executor if executor is not None else LocalExecutor()
        self.check_finite = check_finite
        self.progress = progress
        #: With ``trace=True``, the events of the latest step (see ``distgraph.trace``).
        self.trace = trace
        self.last_trace: list = []
        self.history = History()
        self.epoch = 0
        self._store = ParameterStore(graph.params, optimizer)
        self._steps_done = 0
        #: One entry per fit() call: (first step id, data, batch size, seed, shuffle, first epoch),
        #: so any step's batch can be rebuilt when a parameter server has to replay steps.
        self._segments: list[tuple[int, dict[str, np.ndarray], int, int, bool, int]] = []
        self._session: TrainingSession | None = None
        self._data_n: int | None = None

    @property
    def session(self) -> TrainingSession:
        """The executor's training session (opened on first use)."""
        if self._session is None:
            self._session = self.executor.training_session(
                self.graph, self.loss, self.optimizer, self._store, self.check_finite
            )
        return self._session

    @property
    def params(self) -> dict[str, Any]:
        """Current parameter values (0-d params as Python floats)."""
        src = self._session.params if self._session is not None else self._store.params
        return {
            k: (np.asarray(v).item() if np.ndim(v) == 0 else np.array(v)) for k, v in src.items()
        }

    @property
    def step(self) -> int:
        """Number of training steps taken so far (the last step id)."""
        return self._steps_done

    @property
    def applied_steps(self) -> list[int]:
        """Step ids the parameter store applied, in order."""
        return (
            self._session.applied_steps if self._session is not None else list(self._store.applied)
        )

    def fit(
        self,
        data: Mapping[str, Any],
        epochs: int = 1,
        batch_size: int = 32,
        seed: int = 0,
        shuffle: bool = True,
        callback: Callable[[int, float], None] | None = None,
    ) -> History:
        """Train ``epochs`` more epochs on ``data`` (name -> array, equal first dimensions)."""
        if not isinstance(epochs, int) or epochs < 0:
            raise ConfigError(f"epochs must be an int >= 0, got {epochs!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}")
        arrays = {k: np.asarray(v) for k, v in data.items()}
        sizes = {k: (len(v) if v.ndim else None) for k, v in arrays.items()}
        if not arrays or len(set(sizes.values())) != 1 or None in sizes.values():
            raise FeedError(
                f"training data must be arrays with equal first dimensions, got lengths {sizes}"
            )
        n = next(iter(sizes.values()))
        session = self.session
        self._segments.append((self._steps_done + 1, arrays, batch_size, seed, shuffle, self.epoch))
        if hasattr(session, "replay"):
            session.replay = self.feeds_for_step
        attached = session.attach(arrays)
        bar = self._bar(epochs)
        try:
            for _ in range(epochs):
                losses, weights = [], []
                for idx in batch_indices(n, batch_size, seed, self.epoch, shuffle):
                    step_id = self._steps_done + 1
                    try:
                        loss = session.step_rows(step_id, attached, idx, trace=self.trace)
                        self._steps_done = step_id
                    except BaseException:
                        # Count a failed step exactly when the session applied it (an interrupt
                        # can land after the update), so the next fit neither repeats nor
                        # skips a step id.
                        with contextlib.suppress(Exception):
                            if self._steps_done < step_id and session.step_applied(step_id):
                                self._steps_done = step_id
                        raise
                    if self.trace:
                        self.last_trace = session.last_trace
                    losses.append(loss)
                    weights.append(len(idx))
                    self.history.step_loss.append(loss)
                    if callback is not None:
                        callback(step_id, loss)
                self.epoch += 1
                epoch_loss = float(np.average(losses, weights=weights))
                self.history.loss.append(epoch_loss)
                self.history.params.append(self._small_params())
                log.info("epoch %d: loss %.6g", self.epoch, epoch_loss)
                if bar is not None:
                    bar.set_postfix(step=self.step, loss=f"{epoch_loss:.4g}")
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return self.history

    def feeds_for_step(self, step_id: int) -> dict[str, np.ndarray]:
        """The mini-batch that step ``step_id`` used (deterministic for the data and seed)."""
        for first, arrays, batch_size, seed, shuffle, first_epoch in reversed(self._segments):
            if step_id >= first:
                n = len(next(iter(arrays.values())))
                per_epoch = steps_per_epoch(n, batch_size)
                epoch, index = divmod(step_id - first, per_epoch)
                idx = batch_indices(n, batch_size, seed, first_epoch + epoch, shuffle)[index]
                return {k: v[idx] for k, v in arrays.items()}
        raise ConfigError(f"step {step_id} was not taken by this trainer's fit() calls")

    def _small_params(self) -> dict[str, Any]:
        out = {}
        for k, v in self.params.items():
            if np.size(v) <= SMALL_PARAM:
                out[k] = v if isinstance(v, float) else np.asarray(v).tolist()
        return out

    def _bar(self, epochs: int) -> Any:
        show = (
            self.progress
            if self.progress is not None
            else (sys.stderr.isatty() and not os.environ.get("CI"))
        )
        if not show or epochs == 0:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=epochs, desc="epochs", unit="epoch", leave=False)

    def save(self, path: str | os.PathLike) -> None:
        """Write params, optimizer state and progress to a checkpoint directory."""
        ckpt = (
            self.session.checkpoint() if self._session is not None else self._store.to_checkpoint()
        )
        ckpt.extra = {"epoch": self.epoch, "history": self.history.to_dict()}
        from .checkpoint import save_checkpoint

        save_checkpoint(path, ckpt)

    def load(self, path: str | os.PathLike) -> None:
        """Restore a checkpoint written by :meth:`save` or by the parameter server."""
        store = ParameterStore.load(path, self.graph.params)
        from .checkpoint import load_checkpoint

        ckpt = load_checkpoint(path)
        extra = ckpt.extra
        self._steps_done = max(ckpt.applied_steps, default=ckpt.step)
        self.epoch = int(extra.get("epoch", 0))
        hist = extra.get("history") or {}
        self.history = History(
            hist.get("loss", []), hist.get("step_loss", []), hist.get("params", [])
        )
        if self._session is not None:
            self._session.restore(store.to_checkpoint())
        else:
            self._store = store

    def close(self) -> None:
        """Close the training session (the executor stays open)."""
        if self._session is not None:
            # Keep the trained state: a later fit() reopens a session from this store.
            self._store = ParameterStore.from_checkpoint(self._session.checkpoint())
            self._session.close()
            self._session = None


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Number of mini-batches in an epoch of ``n`` samples."""
    return math.ceil(n / batch_size)
