"""Optimizers as pure functions: ``(param, grad, state, lr) -> (param, state)``.

An optimizer object only holds hyperparameters (validated on construction): the learning rate
``lr`` (a number, or an :class:`~distgraph.lr.LRSchedule` evaluated at the step id being
applied) and ``clip_norm`` (clip the gradients by their global norm). ``apply`` builds every
new value before returning any, so a step that fails part-way changes nothing.

Clipping: the global norm is ``sqrt(sum over params of sum(grad ** 2))``. Each param's sum of
squares is computed on its own (:func:`sum_of_squares`) and the sums are combined exactly
(:func:`global_norm`, ``math.fsum``), so the norm does not depend on the order params are held
in, and servers that each hold some params can combine their sums into the same norm.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass, fields
from typing import Any, ClassVar, NamedTuple

import numpy as np

from .errors import ConfigError, NonFiniteError, ShapeError
from .lr import LRSchedule

State = dict[str, np.ndarray]


def sum_of_squares(grad: Any) -> float:
    """``sum(grad ** 2)`` in float64: one param's share of the global norm.

    The same array gives the same sum in any process (a contiguous float64 copy is reduced)."""
    g = np.ascontiguousarray(grad, dtype=np.float64)
    return float(np.sum(np.square(g)))


def global_norm(sums: Mapping[str, float]) -> float:
    """The global norm from per-param sums of squares (name -> sum), combined exactly, so the
    result is the same whatever order or grouping (one server or several) the sums come in."""
    return math.sqrt(math.fsum(sums[k] for k in sorted(sums)))


class Update(NamedTuple):
    """What one optimizer step produces: new params and state, and how it was taken."""

    params: dict[str, np.ndarray]
    state: dict[str, State]
    lr: float
    #: The gradients' global norm before clipping (None when the optimizer does not clip).
    grad_norm: float | None
    #: Whether the gradients were scaled down to ``clip_norm``.
    clipped: bool


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Optimizer:
    """Base class: subclasses define ``init_one`` and ``update_one``.

    ``clip_norm`` (keyword only, default None: no clipping): before the update, gradients whose
    global norm exceeds it are scaled by ``clip_norm / norm``."""

    kind: ClassVar[str] = "optimizer"
    #: State fields that can never be negative (checked when a checkpoint is loaded).
    nonnegative: ClassVar[tuple[str, ...]] = ()
    _: KW_ONLY
    clip_norm: float | None = None

    def __post_init__(self) -> None:
        name = type(self).__name__
        lr: Any = getattr(self, "lr", None)
        if not isinstance(lr, LRSchedule) and not (_finite_number(lr) and lr > 0):
            what = (
                f"the callable {getattr(lr, '__name__', type(lr).__name__)!r}"
                if callable(lr)
                else repr(lr)
            )
            raise ConfigError(
                f"{name}.lr must be a finite number > 0 or a schedule (ConstantLR, StepDecayLR, "
                f"CosineLR, WarmupLR from distgraph.lr: plain data, so checkpoints keep it and "
                f"every executor applies the same rate), got {what}"
            )
        clip = self.clip_norm
        if clip is not None and not (_finite_number(clip) and clip > 0):
            raise ConfigError(
                f"{name}.clip_norm must be a finite number > 0 (or None: no clipping), got {clip!r}"
            )
        self._validate()

    def _validate(self) -> None:
        """Check the subclass's own hyperparameters."""

    def lr_at(self, step: int) -> float:
        """The learning rate applied as step ``step`` (step ids start at 1)."""
        lr = getattr(self, "lr", None)
        return lr(step) if isinstance(lr, LRSchedule) else float(lr)  # type: ignore[arg-type]

    def init_one(self, param: np.ndarray) -> State:
        """Fresh state for one parameter."""
        return {}

    def update_one(
        self, param: np.ndarray, grad: np.ndarray, state: State, lr: float
    ) -> tuple[np.ndarray, State]:
        """New value and state for one parameter at learning rate ``lr`` (inputs are never
        modified)."""
        raise NotImplementedError

    def init(self, params: Mapping[str, np.ndarray]) -> dict[str, State]:
        """Fresh state for every parameter."""
        return {k: self.init_one(np.asarray(v)) for k, v in params.items()}

    def apply(
        self,
        params: Mapping[str, np.ndarray],
        grads: Mapping[str, Any],
        state: Mapping[str, State],
        step: int = 1,
        grad_norm: float | None = None,
    ) -> Update:
        """Step ``step`` on all parameters: check every gradient, clip, update.

        Nothing changes before every gradient is checked. ``grad_norm``: the global norm when
        it was combined elsewhere (servers that each hold some params); by default it is
        computed from ``grads``."""
        missing = [k for k in params if k not in grads]
        if missing:
            raise ShapeError(f"{type(self).__name__}: no gradient for params {missing}")
        checked: dict[str, np.ndarray] = {}
        for k, p in params.items():
            g = np.asarray(grads[k])
            if g.shape != np.shape(p):
                raise ShapeError(
                    f"{type(self).__name__}: gradient of param {k!r} has shape {g.shape}, param has {np.shape(p)}"
                )
            if not np.all(np.isfinite(g)):
                raise NonFiniteError(
                    f"{type(self).__name__}: gradient of param {k!r} holds NaN or Inf; no parameter was changed"
                )
            checked[k] = g.astype(np.asarray(p).dtype, copy=False)
        lr = self.lr_at(step)
        clipped = False
        if self.clip_norm is not None:
            if grad_norm is None:
                grad_norm = global_norm({k: sum_of_squares(g) for k, g in checked.items()})
            if grad_norm > self.clip_norm:
                scale = self.clip_norm / grad_norm
                checked = {k: g * np.asarray(scale, g.dtype) for k, g in checked.items()}
                clipped = True
        new_params: dict[str, np.ndarray] = {}
        new_state: dict[str, State] = {}
        for k, p in params.items():
            new_params[k], new_state[k] = self.update_one(
                np.asarray(p), checked[k], dict(state.get(k, {})), lr
            )
        return Update(new_params, new_state, lr, grad_norm, clipped)

    def update(
        self,
        params: Mapping[str, np.ndarray],
        grads: Mapping[str, Any],
        state: Mapping[str, State],
        step: int = 1,
    ) -> tuple[dict[str, np.ndarray], dict[str, State]]:
        """:meth:`apply`, returning only the new params and state."""
        out = self.apply(params, grads, state, step)
        return out.params, out.state

    def config(self) -> dict[str, Any]:
        """Hyperparameters as JSON-able data (stored in checkpoints); a schedule as its config."""
        out: dict[str, Any] = {"kind": self.kind}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.config() if isinstance(value, LRSchedule) else value
        return out

    @staticmethod
    def from_config(config: Mapping[str, Any]) -> Optimizer:
        """Inverse of :meth:`config`."""
        cfg = dict(config)
        kind = cfg.pop("kind", None)
        classes = {c.kind: c for c in (SGD, Momentum, Adam)}
        if kind not in classes:
            raise ConfigError(
                f"optimizer.kind: unknown optimizer {kind!r}; known: {sorted(classes)}"
            )
        if isinstance(cfg.get("lr"), Mapping):
            cfg["lr"] = LRSchedule.from_config(cfg["lr"], "optimizer.lr")
        try:
            return classes[kind](**cfg)
        except TypeError as e:
            raise ConfigError(f"optimizer: {e}") from None

    def _positive(self, field: str, allow_zero: bool = False) -> None:
        value = getattr(self, field)
        ok = _finite_number(value) and (value >= 0 if allow_zero else value > 0)
        if not ok:
            need = "a finite number >= 0" if allow_zero else "a finite number > 0"
            raise ConfigError(f"{type(self).__name__}.{field} must be {need}, got {value!r}")

    def _fraction(self, field: str) -> None:
        value = getattr(self, field)
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1):
            raise ConfigError(f"{type(self).__name__}.{field} must be in [0, 1), got {value!r}")


@dataclass(frozen=True)
class SGD(Optimizer):
    """Plain gradient descent: ``p -= lr * (g + weight_decay * p)``."""

    kind: ClassVar[str] = "sgd"
    lr: float | LRSchedule = 0.01
    weight_decay: float = 0.0

    def _validate(self) -> None:
        self._positive("weight_decay", allow_zero=True)

    def update_one(
        self, param: np.ndarray, grad: np.ndarray, state: State, lr: float
    ) -> tuple[np.ndarray, State]:
        if self.weight_decay:
            grad = grad + self.weight_decay * param
        return param - lr * grad, state


@dataclass(frozen=True)
class Momentum(Optimizer):
    """Heavy-ball momentum, or Nesterov's variant with ``nesterov=True``."""

    kind: ClassVar[str] = "momentum"
    lr: float | LRSchedule = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0

    def _validate(self) -> None:
        self._fraction("momentum")
        self._positive("weight_decay", allow_zero=True)
        if not isinstance(self.nesterov, bool):
            raise ConfigError(f"Momentum.nesterov must be a bool, got {self.nesterov!r}")

    def init_one(self, param: np.ndarray) -> State:
        return {"velocity": np.zeros_like(param)}

    def update_one(
        self, param: np.ndarray, grad: np.ndarray, state: State, lr: float
    ) -> tuple[np.ndarray, State]:
        if self.weight_decay:
            grad = grad + self.weight_decay * param
        v = self.momentum * state["velocity"] + grad
        step = grad + self.momentum * v if self.nesterov else v
        return param - lr * step, {"velocity": v}


@dataclass(frozen=True)
class Adam(Optimizer):
    """Adam with bias correction (Kingma & Ba, 2015)."""

    kind: ClassVar[str] = "adam"
    nonnegative: ClassVar[tuple[str, ...]] = ("v",)  # a running mean of squared gradients
    lr: float | LRSchedule = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0

    def _validate(self) -> None:
        self._fraction("beta1")
        self._fraction("beta2")
        self._positive("eps")
        self._positive("weight_decay", allow_zero=True)

    def init_one(self, param: np.ndarray) -> State:
        return {"m": np.zeros_like(param), "v": np.zeros_like(param), "t": np.zeros((), np.int64)}

    def update_one(
        self, param: np.ndarray, grad: np.ndarray, state: State, lr: float
    ) -> tuple[np.ndarray, State]:
        if self.weight_decay:
            grad = grad + self.weight_decay * param
        t = int(state["t"]) + 1
        m = self.beta1 * state["m"] + (1 - self.beta1) * grad
        v = self.beta2 * state["v"] + (1 - self.beta2) * grad * grad
        m_hat = m / (1 - self.beta1**t)
        v_hat = v / (1 - self.beta2**t)
        new = param - lr * m_hat / (np.sqrt(v_hat) + self.eps)
        return new.astype(param.dtype, copy=False), {"m": m, "v": v, "t": np.asarray(t, np.int64)}
