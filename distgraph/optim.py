"""Optimizers as pure functions: ``(param, grad, state) -> (param, state)``.

An optimizer object only holds hyperparameters (validated on construction). ``update`` builds
every new value before returning any, so a step that fails part-way changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np

from .errors import ConfigError, NonFiniteError, ShapeError

State = dict[str, np.ndarray]


@dataclass(frozen=True)
class Optimizer:
    """Base class: subclasses define ``init_one`` and ``update_one``."""

    kind: ClassVar[str] = "optimizer"
    #: State fields that can never be negative (checked when a checkpoint is loaded).
    nonnegative: ClassVar[tuple[str, ...]] = ()

    def init_one(self, param: np.ndarray) -> State:
        """Fresh state for one parameter."""
        return {}

    def update_one(
        self, param: np.ndarray, grad: np.ndarray, state: State
    ) -> tuple[np.ndarray, State]:
        """New value and state for one parameter (inputs are never modified)."""
        raise NotImplementedError

    def init(self, params: Mapping[str, np.ndarray]) -> dict[str, State]:
        """Fresh state for every parameter."""
        return {k: self.init_one(np.asarray(v)) for k, v in params.items()}

    def update(
        self,
        params: Mapping[str, np.ndarray],
        grads: Mapping[str, Any],
        state: Mapping[str, State],
    ) -> tuple[dict[str, np.ndarray], dict[str, State]]:
        """Apply one step to all parameters; checks every gradient before changing anything."""
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
        new_params: dict[str, np.ndarray] = {}
        new_state: dict[str, State] = {}
        for k, p in params.items():
            new_params[k], new_state[k] = self.update_one(
                np.asarray(p), checked[k], dict(state.get(k, {}))
            )
        return new_params, new_state

    def config(self) -> dict[str, Any]:
        """Hyperparameters as JSON-able data (stored in checkpoints)."""
        return {"kind": self.kind, **asdict(self)}

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
        try:
            return classes[kind](**cfg)
        except TypeError as e:
            raise ConfigError(f"optimizer: {e}") from None

    def _positive(self, field: str, allow_zero: bool = False) -> None:
        value = getattr(self, field)
        ok = (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        )
        ok = ok and (value >= 0 if allow_zero else value > 0)
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
    lr: float = 0.01
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        self._positive("lr")
        self._positive("weight_decay", allow_zero=True)

    def update_one(
        self, param: np.ndarray, grad: np.ndarray, state: State
    ) -> tuple[np.ndarray, State]:
        if self.weight_decay:
            grad = grad + self.weight_decay * param
        return param - self.lr * grad, state


@dataclass(frozen=True)
class Momentum(Optimizer):
    """Heavy-ball momentum, or Nesterov's variant with ``nesterov=True``."""

    kind: ClassVar[str] = "momentum"
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        self._positive("lr")
        self._fraction("momentum")
        self._positive("weight_decay", allow_zero=True)
        if not isinstance(self.nesterov, bool):
            raise ConfigError(f"Momentum.nesterov must be a bool, got {self.nesterov!r}")

    def init_one(self, param: np.ndarray) -> State:
        return {"velocity": np.zeros_like(param)}

    def update_one(
        self, param: np.ndarray, grad: np.ndarray, state: State
    ) -> tuple[np.ndarray, State]:
        if self.weight_decay:
            grad = grad + self.weight_decay * param
        v = self.momentum * state["velocity"] + grad
        step = grad + self.momentum * v if self.nesterov else v
        return param - self.lr * step, {"velocity": v}


@dataclass(frozen=True)
class Adam(Optimizer):
    """Adam with bias correction (Kingma & Ba, 2015)."""

    kind: ClassVar[str] = "adam"
    nonnegative: ClassVar[tuple[str, ...]] = ("v",)  # a running mean of squared gradients
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        self._positive("lr")
        self._fraction("beta1")
        self._fraction("beta2")
        self._positive("eps")
        self._positive("weight_decay", allow_zero=True)

    def init_one(self, param: np.ndarray) -> State:
        return {"m": np.zeros_like(param), "v": np.zeros_like(param), "t": np.zeros((), np.int64)}

    def update_one(
        self, param: np.ndarray, grad: np.ndarray, state: State
    ) -> tuple[np.ndarray, State]:
        if self.weight_decay:
            grad = grad + self.weight_decay * param
        t = int(state["t"]) + 1
        m = self.beta1 * state["m"] + (1 - self.beta1) * grad
        v = self.beta2 * state["v"] + (1 - self.beta2) * grad * grad
        m_hat = m / (1 - self.beta1**t)
        v_hat = v / (1 - self.beta2**t)
        new = param - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)
        return new.astype(param.dtype, copy=False), {"m": m, "v": v, "t": np.asarray(t, np.int64)}
