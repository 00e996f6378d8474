"""What an executor returns: values, gradients and a trace of what ran where and when."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

EventKind = Literal["node", "call", "transfer", "update"]


@dataclass(frozen=True)
class TraceEvent:
    """One timed event of a run.

    ``start``/``end`` are wall-clock seconds (``time.time()``) so events from different
    processes on one machine line up; ``track`` names the timeline the event belongs to
    (``"worker 0"``, ``"driver"``, ``"parameter server"``).
    """

    name: str
    kind: EventKind
    phase: str
    level: int
    track: str
    start: float
    end: float
    op: str = ""
    worker: int | None = None
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class Result:
    """The outcome of ``Executor.run``.

    ``values`` holds the requested outputs, ``grads`` the gradient of the ``grad=`` output with
    respect to every floating-point input and param, ``trace`` the timed events (empty unless
    ``trace=True``), ``placement`` which worker ran each node (all 0 for the local executor).
    Scalars are returned as Python floats, arrays as numpy arrays.
    """

    values: dict[str, Any]
    grads: dict[str, Any] = field(default_factory=dict)
    trace: list[TraceEvent] = field(default_factory=list)
    placement: dict[str, int] = field(default_factory=dict)
    levels: list[list[str]] = field(default_factory=list)
