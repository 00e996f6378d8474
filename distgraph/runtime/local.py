"""The in-process reference executor: the oracle every other executor is held to.

It walks the program level by level, exactly as the Ray driver orders its waves; with
``threads > 1`` the independent nodes of a level run on a thread pool (numpy releases the GIL
in heavy ops), and results are identical to ``threads=1`` because every node computes the same
values from the same inputs in any order.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..checkpoint import Checkpoint
from ..errors import ConfigError
from ..graph import Graph
from ..nnops import step_scope
from ..optim import Optimizer
from ..paramstore import ParameterStore
from ..program import Program, prepare_feeds, run_nodes, to_python
from ..result import Result, TraceEvent
from .base import Executor, TrainingSession


class LocalExecutor(Executor):
    """Run graphs in this process; ``threads`` > 1 runs each level's nodes in parallel.

    ``max_bytes`` limits a request's estimated memory (default: half of physical memory)."""

    def __init__(self, threads: int = 1, *, max_bytes: int | None = None):
        super().__init__(max_bytes)
        if not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"LocalExecutor.threads must be an int >= 1, got {threads!r}")
        self.threads = threads
        self._pool = (
            ThreadPoolExecutor(threads, thread_name_prefix="distgraph") if threads > 1 else None
        )

    def run(
        self,
        graph: Graph,
        feeds: Mapping[str, Any] | None = None,
        outputs: Sequence[str] | str | None = None,
        grad: str | None = None,
        *,
        check_finite: bool = False,
        trace: bool = False,
    ) -> Result:
        """Compute ``outputs`` and, with ``grad``, the gradients of that output."""
        prog = self.program(graph, outputs, grad, feeds=feeds)
        env: dict[str, Any] = dict(prepare_feeds(prog, feeds or {}, check_finite))
        env.update({p: graph._params[p] for p in prog.params})
        env.update(prog.constants)
        events: list[TraceEvent] | None = [] if trace else None
        self.execute(prog, env, check_finite, events)
        return Result(
            values={o: to_python(env[o]) for o in prog.outputs},
            grads={leaf: to_python(env[node]) for leaf, node in prog.grads.items()},
            trace=events or [],
            placement=dict.fromkeys(prog.order, 0),
            levels=[list(lv) for lv in prog.levels],
        )

    def execute(
        self,
        prog: Program,
        env: dict[str, Any],
        check_finite: bool,
        events: list[TraceEvent] | None,
    ) -> None:
        """Evaluate every node of ``prog`` into ``env``, level by level."""
        for level in prog.levels:
            if self._pool is None or len(level) == 1:
                run_nodes(prog, level, env, check_finite=check_finite, trace=events)
            else:
                # Each task runs in a copy of this context: a training step's id reaches the
                # pool's threads (see nnops.step_scope).
                futures = [
                    self._pool.submit(
                        contextvars.copy_context().run,
                        run_nodes,
                        prog,
                        [n],
                        env,
                        check_finite=check_finite,
                        trace=events,
                    )
                    for n in level
                ]
                for f in futures:
                    f.result()  # re-raises the first failure with its node name

    def training_session(
        self,
        graph: Graph,
        loss: str,
        optimizer: Optimizer,
        store: ParameterStore,
        check_finite: bool = False,
    ) -> TrainingSession:
        """A session whose steps run here and update ``store`` directly."""
        return _LocalSession(self, graph, loss, store, check_finite)

    def close(self) -> None:
        """Stop the thread pool."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


class _LocalSession(TrainingSession):
    def __init__(
        self, ex: LocalExecutor, graph: Graph, loss: str, store: ParameterStore, check_finite: bool
    ):
        self.ex, self.graph, self.store, self.check_finite = ex, graph, store, check_finite
        self.prog = ex.training_program(graph, loss, list(store.params))
        self.loss = self.prog.outputs[0]
        self.last_trace: list[TraceEvent] = []

    def step(self, step_id: int, feeds: Mapping[str, Any], trace: bool = False) -> float:
        env: dict[str, Any] = dict(prepare_feeds(self.prog, feeds, self.check_finite))
        env.update({p: self.store.params[p] for p in self.prog.params})
        env.update(self.prog.constants)
        events: list[TraceEvent] | None = [] if trace else None
        with step_scope(step_id):  # stochastic ops (dropout) draw from the step id
            self.ex.execute(self.prog, env, self.check_finite, events)
        start = time.time()
        self.store.apply(step_id, {p: env[self.prog.grads[p]] for p in self.store.params})
        if events is not None:
            events.append(
                TraceEvent(
                    f"apply step {step_id}",
                    "update",
                    "update",
                    -1,
                    "parameter server",
                    start,
                    time.time(),
                )
            )
            self.last_trace = events
        return float(env[self.loss])

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.store.params)

    @property
    def applied_steps(self) -> list[int]:
        return list(self.store.applied)

    def checkpoint(self) -> Checkpoint:
        return self.store.to_checkpoint()

    def restore(self, ckpt: Checkpoint) -> None:
        self.store = ParameterStore.from_checkpoint(ckpt, self.store.params)
