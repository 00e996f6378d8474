"""The in-process reference executor: the oracle every other executor is held to.

It walks the program level by level, exactly as the Ray driver orders its waves; with
``threads > 1`` the independent nodes of a level run on a thread pool (numpy releases the GIL
in heavy ops), and results are identical to ``threads=1`` because every node computes the same
values from the same inputs in any order.
"""

from __future__ import annotations

import contextvars
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..checkpoint import Checkpoint
from ..errors import ConfigError
from ..graph import Graph
from ..interpret import prepare_feeds, run_nodes
from ..nnops import step_scope
from ..optim import Optimizer
from ..paramstore import ParameterStore
from ..program import Program
from ..result import TraceEvent
from .base import Evaluation, Executor, TrainingSession
from .paramserver import ParameterServer


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

    def _evaluate(
        self,
        graph: Graph,
        prog: Program,
        feeds: Mapping[str, Any],
        env: dict[str, Any],
        *,
        check_finite: bool,
        trace: bool,
        started: float,
    ) -> Evaluation:
        """Run every level here (see :meth:`execute`); every node counts as worker 0's."""
        events: list[TraceEvent] | None = [] if trace else None
        self.execute(prog, env, check_finite, events)
        return Evaluation(events or [], dict.fromkeys(prog.order, 0))

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
        """A session whose steps run here; its updates start from ``store`` (which it keeps)."""
        return LocalSession(self, graph, loss, store, check_finite)

    def close(self) -> None:
        """Stop the thread pool."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


class LocalSession(TrainingSession):
    """Training in this process: forward and backward on the executor, updates applied by an
    in-process :class:`~distgraph.runtime.paramserver.ParameterServer` (the same code the Ray
    parameter-server actor runs: learning-rate schedule, clipping, exactly-once step ids).

    State: the server (params, optimizer state, applied steps, the Trainer's progress) and the
    training program, compiled by the first step. Order of a step: feeds checked, every node
    evaluated level by level, the gradients staged on the server, then committed.
    """

    def __init__(
        self, ex: LocalExecutor, graph: Graph, loss: str, store: ParameterStore, check_finite: bool
    ):
        self.ex, self.graph, self.check_finite = ex, graph, check_finite
        self._loss_name, self._wrt = loss, list(store.params)
        self._prog: Program | None = None
        # Gradients are handed over by param name (no routes: nothing is sent anywhere).
        self.server = ParameterServer.over(store, {p: p for p in store.params})
        self.last_trace: list[TraceEvent] = []

    @property
    def prog(self) -> Program:
        """The training program, compiled on first use (as the Ray session's)."""
        if self._prog is None:
            self._prog = self.ex.training_program(self.graph, self._loss_name, self._wrt)
        return self._prog

    def step(self, step_id: int, feeds: Mapping[str, Any], trace: bool = False) -> float:
        prog = self.prog
        env: dict[str, Any] = dict(prepare_feeds(prog, feeds, self.check_finite))
        params = self.server.params()
        env.update({p: params[p] for p in prog.params})
        env.update(prog.constants)
        events: list[TraceEvent] | None = [] if trace else None
        with step_scope(step_id):  # stochastic ops (dropout) draw from the step id
            self.ex.execute(prog, env, self.check_finite, events)
        self.server.stage(step_id, {p: env[prog.grads[p]] for p in self._wrt})
        status = self.server.commit(step_id)
        if events is not None:
            events.append(
                TraceEvent(
                    f"apply step {step_id}",
                    "update",
                    "update",
                    -1,
                    "parameter server",
                    status["start"],
                    status["end"],
                    args={"version": status["version"]},
                )
            )
            self.last_trace = events
        return float(env[prog.outputs[0]])

    @property
    def params(self) -> dict[str, Any]:
        return self.server.params()

    @property
    def applied_steps(self) -> list[int]:
        return self.server.status()["applied"]

    def status(self) -> dict[str, Any]:
        """Version, applied, duplicate and clipped step ids, the latest lr and gradient norm."""
        return self.server.status()

    def checkpoint(self) -> Checkpoint:
        return self.server.checkpoint()

    def save(self, path: str) -> None:
        self.server.save(str(path))

    def restore(self, ckpt: Checkpoint) -> None:
        self.server.restore(ckpt)

    def set_progress(self, progress: Mapping[str, Any]) -> None:
        self.server.set_progress(dict(progress))
