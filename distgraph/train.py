"""The Trainer: epochs of shuffled mini-batches through any executor's training session."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeAlias, overload

import numpy as np

from .errors import CheckpointError, ConfigError, FeedError, ShapeError
from .graph import Graph
from .optim import Optimizer
from .paramstore import ParameterStore
from .runtime.base import Executor, TrainingSession

log = logging.getLogger(__name__)

#: Params with at most this many elements are recorded in ``History.params`` each epoch.
SMALL_PARAM = 16

#: A metric: ``"loss"``, ``"accuracy"``, or ``f(predictions, targets) -> float``.
Metric: TypeAlias = "str | Callable[[np.ndarray, np.ndarray], float]"


@dataclass
class History:
    """Per-epoch mean loss, per-step loss and small parameters after each epoch.

    With validation data, ``val_loss`` and ``val_metrics`` (``"val_accuracy"`` and so on) hold
    one value per epoch too (NaN for an epoch that had none); ``history.val_accuracy`` and
    ``history["val_accuracy"]`` read the latter."""

    loss: list[float] = field(default_factory=list)
    step_loss: list[float] = field(default_factory=list)
    params: list[dict[str, Any]] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_metrics: dict[str, list[float]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.loss)

    @overload
    def __getitem__(self, key: int) -> float: ...

    @overload
    def __getitem__(self, key: str) -> list[float]: ...

    def __getitem__(self, key: int | str) -> float | list[float]:
        """``history[i]``: epoch ``i``'s loss; ``history["val_loss"]`` and the like: a series."""
        if isinstance(key, str):
            if key == "val_loss":
                return self.val_loss
            if key in self.val_metrics:
                return self.val_metrics[key]
            if key in ("loss", "step_loss"):
                return list(getattr(self, key))
            raise KeyError(f"no series {key!r} in the history; it has {self._series()}")
        return self.loss[key]

    def __getattr__(self, name: str) -> list[float]:
        # Only reached for names that are not fields: the validation metrics by name.
        metrics = self.__dict__.get("val_metrics", {})
        if name in metrics:
            return metrics[name]
        raise AttributeError(f"History has no attribute {name!r} (series: {self._series()})")

    def _series(self) -> list[str]:
        return ["loss", "step_loss", "val_loss", *self.__dict__.get("val_metrics", {})]

    def _record_validation(self, epoch: int, values: Mapping[str, float]) -> None:
        """Validation results of epoch ``epoch`` (0-based): series stay aligned with epochs."""
        nan = float("nan")
        for key, value in values.items():
            series = self.val_loss if key == "val_loss" else self.val_metrics.setdefault(key, [])
            series.extend([nan] * (epoch - len(series)))
            series.append(value)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "loss": list(self.loss),
            "step_loss": list(self.step_loss),
            "params": list(self.params),
            "val_loss": list(self.val_loss),
            "val_metrics": {k: list(v) for k, v in self.val_metrics.items()},
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

    State: one training session (:attr:`session`, opened from the executor on first use) that
    holds the params, the optimizer state and the applied step ids, whatever the executor;
    until it opens (and after :meth:`close` or :meth:`load`) the state it will open from. Here:
    the step and epoch counters, the history, and one segment per :meth:`fit` call, enough to
    rebuild the batch of any step it took (a parameter server that lost steps replays them).
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
        self._steps_done = 0
        #: One entry per fit() call, so any step's batch can be rebuilt when a parameter server
        #: has to replay steps, and a fit stopped mid-epoch can finish that epoch.
        self._segments: list[_Segment] = []
        #: Async: losses of steps applied beyond the counted prefix by a run that stopped.
        self._async_losses: dict[int, float] = {}
        self._session: TrainingSession | None = None
        #: The state the session opens from; handed over (and dropped) when it opens.
        self._unopened: ParameterStore | None = ParameterStore(graph.params, optimizer)
        self._run_id = self._unopened.run_id

    @property
    def session(self) -> TrainingSession:
        """The executor's training session (opened on first use): it holds the state."""
        if self._session is None:
            store = self._unopened
            assert store is not None  # kept whenever no session is open
            self._session = self.executor.training_session(
                self.graph, self.loss, self.optimizer, store, self.check_finite
            )
            self._session.replay = self.feeds_for_step
            self._unopened = None
        return self._session

    @property
    def params(self) -> dict[str, Any]:
        """Current parameter values (0-d params as Python floats)."""
        return {
            k: (np.asarray(v).item() if np.ndim(v) == 0 else np.array(v))
            for k, v in self.session.params.items()
        }

    @property
    def run_id(self) -> str:
        """The training run this trainer continues: fresh per Trainer, adopted by :meth:`load`.

        Checkpoints carry it; a parameter server only restarts from its own run's checkpoint."""
        return self._run_id

    @property
    def step(self) -> int:
        """Number of training steps taken so far (the last step id)."""
        return self._steps_done

    @property
    def applied_steps(self) -> list[int]:
        """Step ids the parameter server applied, in order."""
        return self.session.applied_steps

    def fit(
        self,
        data: Mapping[str, Any],
        epochs: int = 1,
        batch_size: int = 32,
        seed: int = 0,
        shuffle: bool = True,
        callback: Callable[[int, float], None] | None = None,
        *,
        validation: Mapping[str, Any] | None = None,
        validation_split: float | None = None,
        metric: Metric = "loss",
    ) -> History:
        """Train ``epochs`` more epochs on ``data`` (name -> array, equal first dimensions).

        When the last step stopped inside an epoch (an error or interrupt mid-fit, or a
        checkpoint taken mid-epoch and loaded), a fit with the same number of rows, batch size,
        seed and shuffle first finishes that epoch, skipping its batches already applied; it
        counts as one of ``epochs``. Otherwise (a warning is logged) a new epoch starts.

        Validation: after each epoch, :meth:`evaluate` on ``validation`` (arrays like
        ``data``), or on the last ``validation_split`` fraction of ``data``'s rows (held out
        before shuffling; the rest is trained on), records ``history.val_loss`` and, for a
        ``metric`` other than ``"loss"``, ``history.val_<metric>`` (``val_accuracy``, or
        ``val_<callable's name>``). See :meth:`evaluate` for ``metric``.
        """
        if not _is_int(epochs) or epochs < 0:
            raise ConfigError(f"epochs must be an int >= 0, got {epochs!r}")
        if not _is_int(batch_size) or batch_size < 1:
            raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if not _is_int(seed) or seed < 0:  # numpy's generators take only non-negative ints
            raise ConfigError(f"seed must be an int >= 0, got {seed!r}")
        epochs, batch_size, seed = int(epochs), int(batch_size), int(seed)
        arrays, n = _rows(data, "training data")
        val_arrays: dict[str, np.ndarray] | None = None
        if validation is not None and validation_split is not None:
            raise ConfigError("give validation data or validation_split, not both")
        if validation_split is not None:
            arrays, val_arrays = _split(arrays, n, validation_split)
            n = len(next(iter(arrays.values())))
        elif validation is not None:
            val_arrays = _rows(validation, "validation data")[0]
            if set(val_arrays) != set(arrays):  # found now, not after an epoch of training
                raise FeedError(
                    f"validation data has inputs {sorted(val_arrays)}, the training data "
                    f"{sorted(arrays)}; give both the same inputs"
                )
        scorer = self._scorer(metric) if val_arrays is not None else None
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
        session.set_progress(self._progress())
        attached = session.attach(arrays)
        bar = self._bar(epochs * steps_per_epoch(n, batch_size) - skip)
        try:
            for e in range(epochs):
                batches = batch_indices(n, batch_size, seed, self.epoch, shuffle)
                # Batches applied before a resume count with the losses recorded for them
                # (a server's checkpoint may lack some: those are left out of the mean).
                before = self.history.step_loss[len(self.history.step_loss) - skip :]
                known = [i for i, v in enumerate(before) if not math.isnan(v)]
                losses = [before[i] for i in known]
                weights = [len(batches[i]) for i in known]
                # The bar's running loss, kept incrementally (a mean over the list per step
                # would cost O(steps) each).
                run_sum = sum(v * w for v, w in zip(losses, weights))
                run_rows = sum(weights)
                if bar is not None:
                    bar.set_description(f"epoch {e + 1}/{epochs}", refresh=False)
                todo = batches[skip:]
                if getattr(session, "consistency", "sync") == "async":
                    # Bounded staleness: the epoch's steps run at once, applied as they arrive.
                    ran = self._fit_async(session, attached, todo, callback)
                    todo = []
                    for idx, loss in ran:
                        if math.isnan(loss):  # applied by a stopped run, its loss unknown
                            continue
                        losses.append(loss)
                        weights.append(len(idx))
                    if bar is not None:
                        bar.update(len(ran))
                for idx in todo:
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
                    run_sum, run_rows = run_sum + loss * len(idx), run_rows + len(idx)
                    if bar is not None:
                        bar.set_postfix(
                            loss=f"{run_sum / run_rows:.4g}",
                            **self._latest_validation(),
                            refresh=False,
                        )
                        bar.update(1)
                    if callback is not None:
                        callback(step_id, loss)
                self.epoch += 1
                skip = 0
                epoch_loss = float(np.average(losses, weights=weights))
                self.history.loss.append(epoch_loss)
                self.history.params.append(self._small_params())
                if val_arrays is not None and scorer is not None:
                    scores = self._score(val_arrays, scorer)
                    self.history._record_validation(
                        self.epoch - 1, {f"val_{k}": v for k, v in scores.items()}
                    )
                session.set_progress(self._progress())
                log.info(
                    "epoch %d: loss %.6g%s",
                    self.epoch,
                    epoch_loss,
                    "".join(f", {k} {v}" for k, v in self._latest_validation().items()),
                )
                if bar is not None:
                    bar.set_postfix(loss=f"{epoch_loss:.4g}", **self._latest_validation())
        finally:
            if bar is not None:
                bar.close()
        return self.history

    def _fit_async(
        self,
        session: Any,
        attached: Any,
        batches: list[np.ndarray],
        callback: Callable[[int, float], None] | None,
    ) -> list[tuple[np.ndarray, float]]:
        """One epoch's ``batches`` as asynchronous steps (``consistency="async"``); returns
        (rows, loss) per step in step order. Steps apply out of order: the steps counted
        (``_steps_done``, ``history.step_loss``) are the applied prefix, also after an error;
        a step applied beyond it is skipped by a later fit (its loss kept until it counts)."""
        first = self._steps_done + 1
        steps = [(first + i, idx) for i, idx in enumerate(batches)]
        got: dict[int, float] = dict(self._async_losses)
        try:
            session.run_async(
                steps, attached, on_applied=lambda s, v: got.__setitem__(s, v), trace=self.trace
            )
        finally:
            if self.trace:
                self.last_trace = list(session.last_trace)
            # Count the steps applied in order from the first; losses in step order.
            done: list[tuple[np.ndarray, float]] = []
            for step_id, idx in steps:
                if step_id not in got:
                    with contextlib.suppress(Exception):
                        if session.step_applied(step_id):  # applied, its loss unknown
                            got[step_id] = float("nan")
                if step_id not in got:
                    break
                done.append((idx, got[step_id]))
                self._steps_done = step_id
                self.history.step_loss.append(got[step_id])
                if callback is not None:
                    callback(step_id, got[step_id])
            self._async_losses = {k: v for k, v in got.items() if k > self._steps_done}
        return done

    def evaluate(
        self, data: Mapping[str, Any], metric: Metric = "loss", batch_size: int = 1024
    ) -> dict[str, float]:
        """The loss, and ``metric``, of the current params on ``data`` (forward only).

        Runs the executor's ``run`` (on Ray: across its workers) on a copy of the graph that
        holds the session's params, ``batch_size`` rows per request; nothing is trained.
        Returns ``{"loss": ...}`` and, unless ``metric`` is ``"loss"``, ``{name: value}``.
        The loss is the row-weighted mean of the requests' losses: the loss of the whole set
        for a loss that is a mean over rows.

        ``metric``: ``"loss"``; ``"accuracy"`` (the fraction of rows whose highest class score
        is the label: integer labels, or probability rows compared by their highest entry); or
        a callable ``f(predictions, targets) -> float`` named by its ``__name__``.
        Predictions and targets are the two inputs of the loss's one ``cross_entropy`` or
        ``mse`` node (say logits and labels), concatenated over the requests.
        """
        if not _is_int(batch_size) or batch_size < 1:
            raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}")
        scorer = self._scorer(metric)
        return self._score(_rows(data, "evaluation data")[0], scorer, int(batch_size))

    def _scorer(self, metric: Metric) -> _Scorer:
        """Check ``metric`` (before anything runs) and find what it compares."""
        if metric == "loss":
            return _Scorer("loss", None, None, None)
        fn: Callable[[np.ndarray, np.ndarray], float]
        if metric == "accuracy":
            name, fn = "accuracy", accuracy
        elif callable(metric) and not isinstance(metric, str):
            name = getattr(metric, "__name__", "")
            name = name if name.isidentifier() else "metric"
            if name == "loss":
                raise ConfigError("a callable metric cannot be named 'loss' (the loss is kept)")
            fn = metric
        else:
            raise ConfigError(
                f"metric must be 'loss', 'accuracy' or a callable f(predictions, targets) -> "
                f"float, got {metric!r}"
            )
        prediction, target = self._prediction_and_target(name)
        return _Scorer(name, fn, prediction, target)

    def _prediction_and_target(self, metric: str) -> tuple[str, str]:
        """The inputs of the one cross_entropy or mse node the loss is computed from."""
        nodes = {n.name: n for n in self.graph.nodes}
        found, seen, stack = [], set(), [self.loss]
        while stack:
            name = stack.pop()
            if name in seen or name not in nodes:
                continue
            seen.add(name)
            node = nodes[name]
            if node.op in ("cross_entropy", "mse"):
                found.append(node)
            stack.extend(node.inputs)
        if len(found) != 1:
            where = ", ".join(f"{n.name!r} ({n.op})" for n in found) or "none"
            raise ConfigError(
                f"metric {metric!r} compares predictions with targets, taken from the one "
                f"cross_entropy or mse node the loss {self.loss!r} is computed from; it has "
                f"{where}. Use metric='loss', or build the loss on one such node"
            )
        return found[0].inputs[0], found[0].inputs[1]

    def _score(
        self, arrays: Mapping[str, np.ndarray], scorer: _Scorer, batch_size: int = 1024
    ) -> dict[str, float]:
        graph = self.graph.with_params(self.session.params)
        wanted = [self.loss]
        for name in (scorer.prediction, scorer.target):
            if name is not None and name not in arrays and name not in wanted:
                wanted.append(name)
        n = len(next(iter(arrays.values())))
        losses: list[float] = []
        weights: list[int] = []
        got: dict[str, list[np.ndarray]] = {"prediction": [], "target": []}
        for start in range(0, n, batch_size):
            feeds = {k: v[start : start + batch_size] for k, v in arrays.items()}
            values = self.executor.run(
                graph, feeds, outputs=wanted, check_finite=self.check_finite
            ).values
            loss = np.asarray(values[self.loss])
            if loss.ndim != 0:
                raise ShapeError(
                    f"loss {self.loss!r} has shape {loss.shape}; evaluate needs a scalar loss"
                )
            losses.append(float(loss))
            weights.append(len(next(iter(feeds.values()))))
            for key, name in (("prediction", scorer.prediction), ("target", scorer.target)):
                if name is not None:
                    got[key].append(np.asarray(feeds[name] if name in feeds else values[name]))
        out = {"loss": float(np.average(losses, weights=weights))}
        if scorer.fn is not None:
            pred = _concat(got["prediction"], str(scorer.prediction))
            target = _concat(got["target"], str(scorer.target))
            out[scorer.name] = float(scorer.fn(pred, target))
        return out

    def _latest_validation(self) -> dict[str, str]:
        """The latest validation results, formatted for the progress bar."""
        series = {"val_loss": self.history.val_loss, **self.history.val_metrics}
        return {k: f"{v[-1]:.4g}" for k, v in series.items() if v}

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

    def _bar(self, steps: int) -> Any:
        """A progress bar over this fit's steps (tqdm), showing the epoch's running loss and
        the latest validation results; None when off (``progress=False``, or by default when
        stderr is not a terminal or under CI)."""
        show = (
            self.progress
            if self.progress is not None
            else (sys.stderr.isatty() and not os.environ.get("CI"))
        )
        if not show or steps <= 0:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=steps, unit="step", leave=False, dynamic_ncols=True)

    def save(self, path: str | os.PathLike) -> None:
        """Write params, optimizer state and progress to checkpoint directory ``path``.

        Crash-safe: the previous checkpoint stays current until the new one is complete. A
        non-empty ``path`` that is not a checkpoint is refused (nothing there is deleted)."""
        from .checkpoint import save_checkpoint

        save_checkpoint(
            path, dataclasses.replace(self.session.checkpoint(), extra=self._progress())
        )

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

        def floats(values: list[float | None], length: int, pad: bool = True) -> list[float]:
            out = [nan if v is None else float(v) for v in values[:length]]
            return out + [nan] * (length - len(out)) if pad else out

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
        self._unopened, self.optimizer, self._run_id = store, store.optimizer, store.run_id
        self._steps_done, self.epoch, self._segments = steps, epoch, segments
        self.history = History(
            floats(hist.loss, epoch),
            floats(hist.step_loss, steps),
            list(hist.params[:epoch]),
            floats(hist.val_loss, epoch, pad=False),
            {k: floats(v, epoch, pad=False) for k, v in hist.val_metrics.items()},
        )

    def close(self) -> None:
        """Close the training session (the executor stays open)."""
        if self._session is not None:
            # Keep the trained state: a later fit() opens a session from it again.
            state = ParameterStore.from_checkpoint(self._session.checkpoint())
            self._session.close()
            self._session, self._unopened = None, state


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


class _Scorer(NamedTuple):
    """A checked metric: its name, function, and the prediction and target node names."""

    name: str
    fn: Callable[[np.ndarray, np.ndarray], float] | None
    prediction: str | None
    target: str | None


def accuracy(predictions: np.ndarray, targets: np.ndarray) -> float:
    """Fraction of rows whose highest score (last axis of ``predictions``) is the target:
    a class index, or the highest entry of a probability row."""
    predictions, targets = np.asarray(predictions), np.asarray(targets)
    if predictions.ndim < 2:
        raise ShapeError(
            f"accuracy needs class scores of shape (rows, classes), got shape {predictions.shape}"
        )
    guess = predictions.argmax(axis=-1)
    truth = targets.argmax(axis=-1) if targets.shape == predictions.shape else targets
    if truth.shape != guess.shape:
        raise ShapeError(
            f"accuracy: targets of shape {targets.shape} do not match scores of shape "
            f"{predictions.shape} (give class indices or probability rows)"
        )
    return float(np.mean(guess == truth))


def _rows(data: Mapping[str, Any], what: str) -> tuple[dict[str, np.ndarray], int]:
    """``data`` as arrays with a common, non-zero first dimension, and that length."""
    if not isinstance(data, Mapping):
        raise FeedError(
            f"{what} must be a mapping of input name -> array, got {type(data).__name__}"
        )
    arrays = {k: np.asarray(v) for k, v in data.items()}
    sizes = {k: (len(v) if v.ndim else None) for k, v in arrays.items()}
    if not arrays or len(set(sizes.values())) != 1 or None in sizes.values():
        raise FeedError(f"{what} must be arrays with equal first dimensions, got lengths {sizes}")
    n = len(next(iter(arrays.values())))  # the common length (not a 0-d array: checked)
    if n == 0:
        raise FeedError(f"{what} has no rows (lengths {sizes}); give at least one")
    return arrays, n


def _split(
    arrays: dict[str, np.ndarray], n: int, fraction: Any
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(training rows, the last ``fraction`` of the rows held out for validation)."""
    if not (
        isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and 0 < fraction < 1
    ):
        raise ConfigError(f"validation_split must be a fraction in (0, 1), got {fraction!r}")
    keep = math.floor(n * (1 - fraction))
    if keep < 1 or keep == n:
        raise FeedError(
            f"validation_split={fraction} of {n} rows leaves {keep} to train on and {n - keep} "
            "to validate on; each needs at least one row"
        )
    return {k: v[:keep] for k, v in arrays.items()}, {k: v[keep:] for k, v in arrays.items()}


def _concat(parts: list[np.ndarray], node: str) -> np.ndarray:
    if any(p.ndim == 0 for p in parts):
        raise ShapeError(f"a metric needs one value per row; node {node!r} is a scalar")
    return np.concatenate(parts)
