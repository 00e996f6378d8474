"""Learning-rate schedules: pure functions of the step id, stored as plain data.

A schedule maps the step id an update is applied as (1, 2, 3, ...) to a learning rate. The
parameter server evaluates it for the step it applies, so a replayed or recovered step, a worker
replica and the local session all use the same rate for the same step. A schedule is a frozen
dataclass (its ``kind`` plus numbers), written into checkpoints by :meth:`LRSchedule.config`
and read back by :meth:`LRSchedule.from_config`; nothing in it is a closure.

    Adam(lr=WarmupLR(100, CosineLR(3e-3, steps=900, final=1e-5)))   # warm-up, then cosine
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from .errors import ConfigError


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class LRSchedule:
    """Base class: a learning rate per step id (``schedule(step)``), plain data."""

    kind: ClassVar[str] = "schedule"

    def __call__(self, step: int) -> float:
        """The learning rate of step ``step`` (step ids start at 1)."""
        if not _count(step):
            raise ConfigError(
                f"{type(self).__name__}: step ids start at 1, got {step!r} (a learning rate is "
                "asked for the step an update is applied as)"
            )
        return float(self._at(step))

    def _at(self, step: int) -> float:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """``{"kind": ..., <fields>}``, nested schedules as their configs (JSON-able)."""
        out: dict[str, Any] = {"kind": self.kind}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.config() if isinstance(value, LRSchedule) else value
        return out

    @staticmethod
    def from_config(config: Mapping[str, Any], where: str = "lr") -> LRSchedule:
        """Inverse of :meth:`config`; raises :class:`ConfigError` naming the field at fault."""
        if not isinstance(config, Mapping):
            raise ConfigError(f"{where}: a schedule is a mapping with a kind, got {config!r:.80}")
        cfg = dict(config)
        kind = cfg.pop("kind", None)
        if kind not in SCHEDULES:
            raise ConfigError(
                f"{where}.kind: unknown schedule {kind!r}; known: {sorted(SCHEDULES)}"
            )
        if isinstance(cfg.get("then"), Mapping):
            cfg["then"] = LRSchedule.from_config(cfg["then"], f"{where}.then")
        try:
            return SCHEDULES[kind](**cfg)
        except TypeError as e:
            raise ConfigError(f"{where}: {e}") from None

    def _check(self, field: str, ok: bool, need: str) -> None:
        if not ok:
            raise ConfigError(
                f"{type(self).__name__}.{field} must be {need}, got {getattr(self, field)!r}"
            )


@dataclass(frozen=True)
class ConstantLR(LRSchedule):
    """The same rate at every step."""

    kind: ClassVar[str] = "constant"
    value: float

    def __post_init__(self) -> None:
        self._check("value", _number(self.value) and self.value > 0, "a finite number > 0")

    def _at(self, step: int) -> float:
        return self.value


@dataclass(frozen=True)
class StepDecayLR(LRSchedule):
    """``value * factor ** ((step - 1) // every)``: steps 1..every use ``value``, the next
    ``every`` steps ``value * factor``, and so on."""

    kind: ClassVar[str] = "step"
    value: float
    every: int
    factor: float = 0.1

    def __post_init__(self) -> None:
        self._check("value", _number(self.value) and self.value > 0, "a finite number > 0")
        self._check("every", _count(self.every), "an int >= 1 (steps between decays)")
        self._check("factor", _number(self.factor) and 0 < self.factor <= 1, "in (0, 1]")

    def _at(self, step: int) -> float:
        return self.value * self.factor ** ((step - 1) // self.every)


@dataclass(frozen=True)
class CosineLR(LRSchedule):
    """Cosine decay from ``value`` at step 1 to ``final`` at step ``steps + 1``, then
    ``final``: ``final + (value - final) * (1 + cos(pi * min(step - 1, steps) / steps)) / 2``."""

    kind: ClassVar[str] = "cosine"
    value: float
    steps: int
    final: float = 0.0

    def __post_init__(self) -> None:
        self._check("value", _number(self.value) and self.value > 0, "a finite number > 0")
        self._check("steps", _count(self.steps), "an int >= 1 (steps of the decay)")
        self._check("final", _number(self.final) and 0 <= self.final <= self.value, "in [0, value]")

    def _at(self, step: int) -> float:
        done = min(step - 1, self.steps) / self.steps
        return self.final + (self.value - self.final) * 0.5 * (1.0 + math.cos(math.pi * done))


@dataclass(frozen=True)
class WarmupLR(LRSchedule):
    """Linear warm-up over ``steps`` steps to the rate ``then`` starts at, then ``then`` with
    its clock started after the warm-up: ``then(1) * step / steps`` for ``step <= steps``,
    else ``then(step - steps)``. ``then`` is a schedule or a number (a constant rate)."""

    kind: ClassVar[str] = "warmup"
    steps: int
    then: LRSchedule | float

    def __post_init__(self) -> None:
        self._check("steps", _count(self.steps), "an int >= 1 (steps of the warm-up)")
        if _number(self.then) and not isinstance(self.then, LRSchedule):
            object.__setattr__(self, "then", ConstantLR(float(self.then)))
        self._check("then", isinstance(self.then, LRSchedule), "a schedule or a learning rate > 0")

    def _at(self, step: int) -> float:
        after = self.then
        assert isinstance(after, LRSchedule)  # normalised in __post_init__
        if step <= self.steps:
            return after(1) * step / self.steps
        return after(step - self.steps)


#: Schedules by ``kind`` (what :meth:`LRSchedule.from_config` can rebuild).
SCHEDULES: dict[str, type[LRSchedule]] = {
    c.kind: c for c in (ConstantLR, StepDecayLR, CosineLR, WarmupLR)
}
