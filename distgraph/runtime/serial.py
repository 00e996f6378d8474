"""One lock per actor for the calls that touch step state, and the fence that retires a
compiled graph's late work.

Why: a Ray Compiled Graph runs its loop on a thread of its own in each actor (Ray's
``_ray_system`` concurrency group), beside the thread that runs ordinary actor calls. A
worker's or server's step state (envs, resident params, its replica; the server's store) is
therefore touched from two threads when a compiled step and an out-of-band call (install,
reset a replica, drop a step, read a checkpoint, abort) meet. Every such method holds the
actor's ``step lock`` for its whole run (:func:`serial`), so they never interleave; the
driver orders them (it waits for the out-of-band calls before the next compiled step).

A graph that failed (deadline, a lost actor, an interrupt) may still have work under way:
a node still computing, a later task waiting for its input. The driver *fences* its
generation on every actor of the graph (:meth:`Fenced.fence`, holding the lock, so after any
running task); a compiled call of a fenced generation that starts later raises
:class:`StaleGraphError` instead of touching state, so the late work of an abandoned step can
never apply an update or change a replica after the driver reset them.

This module does not import Ray.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from ..errors import ExecutionError

F = TypeVar("F", bound=Callable[..., Any])


class StaleGraphError(ExecutionError):
    """A compiled graph's call ran after the driver had abandoned that graph (fenced it)."""


def serial(method: F) -> F:
    """Run ``method`` holding its instance's step lock (see the module docstring)."""

    @functools.wraps(method)
    def locked(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self.step_lock:
            return method(self, *args, **kwargs)

    return locked  # type: ignore[return-value]


class Fenced:
    """The step lock and the highest fenced (retired) compiled-graph generation of an actor."""

    def _init_fence(self) -> None:
        #: Held by every call that touches step state (re-entrant: such calls nest).
        self.step_lock = threading.RLock()
        self.retired = 0

    def fence(self, generation: int) -> int:
        """Retire every compiled graph of generation <= ``generation`` (after any call that is
        running); returns the fence."""
        with self.step_lock:
            self.retired = max(self.retired, int(generation))
            return self.retired

    def check_generation(self, generation: int, what: str) -> None:
        """Refuse a compiled call of a retired graph (the caller holds the step lock)."""
        if generation <= self.retired:
            raise StaleGraphError(
                f"{what}: compiled graph {generation} was abandoned by the driver (fenced at "
                f"{self.retired}); this late call changed nothing"
            )
