"""The Trainer: epochs of shuffled mini-batches through any executor's training session."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import CheckpointError, ConfigError, FeedError
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
        #: One entry per fit() call, so any step's batch can be rebuilt when a parameter server
        #: has to replay steps, and a fit stopped mid-epoch can finish that epoch.
        self._segments: list[_Segment] = []
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
    def run_id(self) -> str:
        """The training run this trainer continues: fresh per Trainer, adopted by :meth:`load`.

        Checkpoints carry it; a parameter server only restarts from its own run's checkpoint."""
        return self._store.run_id

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
        """Train ``epochs`` more epochs on ``data`` (name -> array, equal first dimensions).

        When the last step stopped inside an epoch (an error or interrupt mid-fit, or a
        checkpoint taken mid-epoch and loaded), a fit with the same number of rows, batch size,
        seed and shuffle first finishes that epoch, skipping its batches already applied; it
        counts as one of ``epochs``. Otherwise (a warning is logged) a new epoch starts.
        """
        if not _is_int(epochs) or epochs < 0:
            raise ConfigError(f"epochs must be an int >= 0, got {epochs!r}")
        if not _is_int(batch_size) or batch_size < 1:
            raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if not _is_int(seed) or seed < 0:  # numpy's generators take only non-negative ints
            raise ConfigError(f"seed must be an int >= 0, got {seed!r}")
        epochs, batch_size, seed = int(epochs), int(batch_size), int(seed)
        arrays = {k: np.asarray(v) for k, v in data.items()}
        sizes = {k: (len(v) if v.ndim else None) for k, v in arrays.items()}
        if not arrays or len(set(sizes.values())) != 1 or None in sizes.values():
            raise FeedError(
                f"training data must be arrays with equal first dimensions, got lengths {sizes}"
            )
        n = len(next(iter(arrays.values())))  # the common length (not a 0-d array: checked)
        if n == 0:
            raise FeedError(f"training data has no rows (lengths {sizes}); give at least one")
        self._close_finished_epoch()
        segment = _Segment(self._steps_done + 1, n, batch_size, seed, shuffle, self.epoch, arrays)
        # A fit stopped mid-epoch (by an error, or a checkpoint taken mid-epoch) is finished first:
        # the same batches of the same epoch, skipping those already applied.
        done = self._position()
        skip = 0
        if done is not None:
            last, skip = done
            if (last.n, last.batch_size, last.seed, last.shuffle) == (n, batch_size, seed, shuffle):
                segment.first -= skip  # step ids of the epoch's first batches, already applied
            else:
                log.warning(
                    "the last fit stopped after %d of the %d batches of epoch %d; this fit's data "
                    "or batching differs, so it starts a new epoch instead of finishing that one",
                    skip,
                    steps_per_epoch(last.n, last.batch_size),
                    self.epoch,
                )
                skip = 0
        session = self.session
        self._segments.append(segment)
        if hasattr(session, "replay"):
            session.replay = self.feeds_for_step
        if hasattr(session, "set_progress"):
            session.set_progress(self._progress())
        attached = session.attach(arrays)
        bar = self._bar(epochs)
        try:
            for _ in range(epochs):
                batches = batch_indices(n, batch_size, seed, self.epoch, shuffle)
                # Batches applied before a resume count with the losses recorded for them
                # (a server's checkpoint may lack some: those are left out of the mean).
                before = self.history.step_loss[len(self.history.step_loss) - skip :]
                known = [i for i, v in enumerate(before) if not math.isnan(v)]
                losses = [before[i] for i in known]
                weights = [len(batches[i]) for i in known]
                for idx in batches[skip:]:
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
                                # Its loss never arrived: keep step_loss aligned with step ids.
                                self.history.step_loss.append(float("nan"))
                        raise
                    if self.trace:
                        self.last_trace = session.last_trace
                    losses.append(loss)
                    weights.append(len(idx))
                    self.history.step_loss.append(loss)
                    if callback is not None:
                        callback(step_id, loss)
                self.epoch += 1
                skip = 0
                epoch_loss = float(np.average(losses, weights=weights))
                self.history.loss.append(epoch_loss)
                self.history.params.append(self._small_params())
                if hasattr(session, "set_progress"):
                    session.set_progress(self._progress())
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
        for seg in reversed(self._segments):
            if step_id >= seg.first:
                if seg.arrays is None:
                    break  # taken before a checkpoint was loaded: its data is not here
                per_epoch = steps_per_epoch(seg.n, seg.batch_size)
                epoch, index = divmod(step_id - seg.first, per_epoch)
                idx = batch_indices(
                    seg.n, seg.batch_size, seg.seed, seg.first_epoch + epoch, seg.shuffle
                )[index]
                return {k: v[idx] for k, v in seg.arrays.items()}
        raise ConfigError(f"step {step_id} was not taken by this trainer's fit() calls")

    def _position(self) -> tuple[_Segment, int] | None:
        """(segment, batches done) when the last step stopped inside an epoch, else None."""
        step = self._steps_done
        for seg in reversed(self._segments):
            if step >= seg.first:
                _, pos = divmod(step - seg.first + 1, steps_per_epoch(seg.n, seg.batch_size))
                return (seg, pos) if pos else None
        return None

    def _close_finished_epoch(self) -> None:
        """Count an epoch whose last step was applied but whose fit stopped before counting it.

        An interrupt (or a callback's error) after an epoch's last step leaves ``self.epoch``
        behind ``_steps_done``; the next fit would otherwise shuffle that epoch's batches again
        instead of the next epoch's and end elsewhere than an uninterrupted run."""
        step = self._steps_done
        for seg in reversed(self._segments):
            if step >= seg.first:
                per_epoch = steps_per_epoch(seg.n, seg.batch_size)
                full, pos = divmod(step - seg.first + 1, per_epoch)
                if pos or seg.first_epoch + full != self.epoch + 1:
                    return
                sizes = [seg.batch_size] * (per_epoch - 1) + [
                    seg.n - seg.batch_size * (per_epoch - 1)
                ]
                last = self.history.step_loss[len(self.history.step_loss) - per_epoch :]
                known = [i for i, v in enumerate(last) if not math.isnan(v)]
                self.history.loss.append(
                    float(np.average([last[i] for i in known], weights=[sizes[i] for i in known]))
                    if known and len(last) == per_epoch
                    else float("nan")
                )
                self.history.params.append(self._small_params())
                self.epoch += 1
                return

    def _progress(self) -> dict[str, Any]:
        """The Trainer's part of a checkpoint: epoch, fit segments (without data), history."""
        return {
            "epoch": self.epoch,
            "segments": [seg.meta() for seg in self._segments],
            "history": self.history.to_dict(),
        }

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
        """Write params, optimizer state and progress to checkpoint directory ``path``.

        Crash-safe: the previous checkpoint stays current until the new one is complete. A
        non-empty ``path`` that is not a checkpoint is refused (nothing there is deleted)."""
        ckpt = (
            self.session.checkpoint() if self._session is not None else self._store.to_checkpoint()
        )
        ckpt.extra = self._progress()
        from .checkpoint import save_checkpoint

        save_checkpoint(path, ckpt)

    def load(self, path: str | os.PathLike, *, max_bytes: int | None = None) -> None:
        """Continue the run checkpointed in ``path`` (by :meth:`save` or the parameter server).

        Every array is validated against the graph and the checkpoint's optimizer before
        anything changes; on error (:class:`~distgraph.CheckpointError`) this trainer is left
        as it was. The checkpoint's optimizer wins: its state only makes sense with its
        hyperparameters, so ``trainer.optimizer`` becomes the checkpoint's (with a warning when
        it differs from the one given). The trainer adopts the checkpoint's run id, so an
        executor's ``checkpoint_dir`` holding that run is resumed rather than refused. A
        checkpoint taken mid-epoch makes the next :meth:`fit` (same data, batch size, seed)
        finish that epoch first. ``max_bytes`` bounds the arrays read (default 1 GiB).
        """
        from .checkpoint import Progress, load_checkpoint
        from .npzio import MAX_BYTES

        ckpt = load_checkpoint(path, max_bytes=MAX_BYTES if max_bytes is None else max_bytes)
        store = ParameterStore.from_checkpoint(ckpt, self.graph.params)
        try:
            progress = Progress.model_validate(ckpt.extra)
        except ValueError as e:
            raise CheckpointError(f"checkpoint {path}: field extra: {e}") from None
        steps = max(ckpt.applied_steps, default=ckpt.step)
        segments = [
            _Segment(s.first, s.n, s.batch_size, s.seed, s.shuffle, s.first_epoch)
            for s in progress.segments
            if s.first <= steps + 1
        ]
        epoch = progress.epoch
        for seg in reversed(segments):  # the server's checkpoints know the step, not the epoch
            if steps >= seg.first:
                epoch = seg.first_epoch + (steps - seg.first + 1) // steps_per_epoch(
                    seg.n, seg.batch_size
                )
                break
        hist = progress.history
        nan = float("nan")

        def floats(values: list[float | None], length: int) -> list[float]:
            out = [nan if v is None else float(v) for v in values[:length]]
            return out + [nan] * (length - len(out))

        # Everything is checked: replace the state (an open session is rebuilt from it).
        if store.optimizer != self.optimizer:
            warnings.warn(
                f"Trainer.load: the checkpoint's optimizer {store.optimizer} replaces "
                f"{self.optimizer} (its state belongs to its hyperparameters)",
                UserWarning,
                stacklevel=2,
            )
        if self._session is not None:
            self._session.close()
            self._session = None
        self._store, self.optimizer = store, store.optimizer
        self._steps_done, self.epoch, self._segments = steps, epoch, segments
        self.history = History(
            floats(hist.loss, epoch), floats(hist.step_loss, steps), list(hist.params[:epoch])
        )

    def close(self) -> None:
        """Close the training session (the executor stays open)."""
        if self._session is not None:
            # Keep the trained state: a later fit() reopens a session from this store.
            self._store = ParameterStore.from_checkpoint(self._session.checkpoint())
            self._session.close()
            self._session = None


def _is_int(value: Any) -> bool:
    # bool is an int to Python, but epochs=True is a mistake, not a count.
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass
class _Segment:
    """One fit() call: its first step id, its data and how it cut the data into batches."""

    first: int
    n: int
    batch_size: int
    seed: int
    shuffle: bool
    first_epoch: int
    arrays: dict[str, np.ndarray] | None = None  # None when restored from a checkpoint

    def meta(self) -> dict[str, Any]:
        """JSON-able, without the data."""
        return {
            "first": self.first,
            "n": self.n,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "first_epoch": self.first_epoch,
        }


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Number of mini-batches in an epoch of ``n`` samples."""
    return math.ceil(n / batch_size)
