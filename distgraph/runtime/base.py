"""What every executor offers: ``run`` a request, and open a training session.

``Executor.run`` is written once, here: compile the request (cached) -> check and convert the
feeds -> assemble the values the request knows (feeds, params, constants) -> the executor's own
``_evaluate``, which adds every computed value -> the :class:`~distgraph.result.Result`.
"""

from __future__ import annotations

import abc
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..checkpoint import Checkpoint
from ..graph import Graph
from ..interpret import prepare_feeds, to_python
from ..memory import check_max_bytes, check_program_memory
from ..optim import Optimizer
from ..paramstore import ParameterStore
from ..program import Program, check_scalar_loss, compile_program, feed_signature
from ..result import Result, TraceEvent


class TrainingSession(abc.ABC):
    """A graph, a loss and an optimizer bound to an executor, stepping by step id.

    The one interface the Trainer talks to, whatever the executor: the local session applies
    updates in this process, the Ray session on a parameter-server actor. A session holds the
    training state (params, optimizer state, applied step ids); opening one is cheap and never
    fails on the graph (the program is compiled by the first step).
    """

    #: step id -> that step's feeds: set by the Trainer, so a session that lost applied steps
    #: (a parameter server restarted from an older checkpoint) can run them again.
    replay: Callable[[int], Mapping[str, Any]] | None = None

    @abc.abstractmethod
    def step(self, step_id: int, feeds: Mapping[str, Any], trace: bool = False) -> float:
        """Forward, backward and one optimizer update as step ``step_id``; returns the loss.

        With ``trace=True`` the step's events (nodes, calls, transfers, the parameter update)
        are kept in ``last_trace``.
        """

    @property
    @abc.abstractmethod
    def params(self) -> dict[str, Any]:
        """Current parameter values."""

    @abc.abstractmethod
    def checkpoint(self) -> Checkpoint:
        """A snapshot of params, optimizer state and applied steps."""

    @abc.abstractmethod
    def restore(self, ckpt: Checkpoint) -> None:
        """Replace params, optimizer state and the applied-step record."""

    @abc.abstractmethod
    def save(self, path: str) -> None:
        """Write the session's checkpoint (with the latest progress) to directory ``path``;
        a directory holding another run's checkpoint is refused."""

    @abc.abstractmethod
    def status(self) -> dict[str, Any]:
        """``version``, ``applied`` and ``duplicates`` step ids, ``clipped`` step ids, and the
        latest step's ``lr`` and ``grad_norm`` (see ``ParameterServer.status``)."""

    @abc.abstractmethod
    def set_progress(self, progress: Mapping[str, Any]) -> None:
        """The Trainer's progress (epoch, fit segments, history), kept for checkpoints."""

    @property
    @abc.abstractmethod
    def applied_steps(self) -> list[int]:
        """Step ids applied so far, in order."""

    last_trace: list[TraceEvent] = []

    def step_applied(self, step_id: int) -> bool:
        """Whether step ``step_id`` counts as applied; asked after a step call raised (an
        interrupt can land after the update was made). A step that does not count is never
        applied later."""
        return step_id in self.applied_steps

    def attach(self, data: Mapping[str, Any]) -> Any:
        """Keep a training set where the steps run; returns a handle for :meth:`step_rows`.

        The default keeps the arrays here; a distributed session ships them once."""
        return dict(data)

    def step_rows(self, step_id: int, data: Any, rows: Any, trace: bool = False) -> float:
        """:meth:`step` on rows ``rows`` (indices along the first axis) of attached ``data``."""
        return self.step(step_id, {k: v[rows] for k, v in data.items()}, trace)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources held for the session."""


@dataclass(frozen=True)
class Evaluation:
    """What an executor reports of one evaluated request besides the values."""

    trace: list[TraceEvent]  # in the order the Result shows them
    placement: dict[str, int]  # node -> worker that computed it


class Executor(abc.ABC):
    """Base class; compiled programs are cached per (graph version, request, feed signature).

    ``max_bytes`` limits a request's estimated memory (see :mod:`distgraph.memory`; default:
    half of this machine's physical memory): a request above it is refused with a
    ``ResourceError`` before anything is allocated.
    """

    _cache_size = 16

    def __init__(self, max_bytes: int | None = None) -> None:
        self._programs: OrderedDict[tuple, tuple[Graph, Program]] = OrderedDict()
        self.max_bytes = check_max_bytes(max_bytes)

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
        """Compute ``outputs`` (default: the graph's outputs) and, with ``grad``, gradients."""
        self._check_open()
        started = time.time()
        prog = self.program(graph, outputs, grad, feeds=feeds)
        arrays = prepare_feeds(prog, feeds or {}, check_finite)
        env: dict[str, Any] = dict(arrays)
        env.update({p: graph.param_values[p] for p in prog.params})
        env.update(prog.constants)
        done = self._evaluate(
            graph, prog, arrays, env, check_finite=check_finite, trace=trace, started=started
        )
        return Result(
            values={o: to_python(env[o]) for o in prog.outputs},
            grads={leaf: to_python(env[node]) for leaf, node in prog.grads.items()},
            trace=done.trace,
            placement=done.placement,
            levels=[list(lv) for lv in prog.levels],
        )

    def _check_open(self) -> None:  # noqa: B027 - optional hook
        """Refuse to run when this executor was closed (the default never refuses)."""

    @abc.abstractmethod
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
        """Compute every node ``prog`` needs into ``env``, which holds the request's feeds
        (also given alone, checked and converted), params and constants; ``started`` is when
        the run began (for a trace)."""

    @abc.abstractmethod
    def training_session(
        self,
        graph: Graph,
        loss: str,
        optimizer: Optimizer,
        store: ParameterStore,
        check_finite: bool = False,
    ) -> TrainingSession:
        """Bind a graph, its loss and parameter store for repeated training steps."""

    def program(
        self,
        graph: Graph,
        outputs: Sequence[str] | str | None = None,
        grad: str | None = None,
        wrt: Sequence[str] | None = None,
        feeds: Mapping[str, Any] | None = None,
    ) -> Program:
        """The compiled program for a request (cached while the graph is unchanged).

        With ``feeds``, inputs declared without a dtype or shape are compiled for the dtype and
        rank they are fed (one cached program per such signature); without, they stay open and
        each new signature is checked when fed."""
        fed = feed_signature(graph, feeds)
        key = (
            id(graph),
            graph.version,
            None if outputs is None else tuple([outputs] if isinstance(outputs, str) else outputs),
            grad,
            None if wrt is None else tuple(wrt),
            fed,
        )
        hit = self._programs.get(key)
        if hit is not None and hit[0] is graph:
            self._programs.move_to_end(key)
            prog = hit[1]
        else:
            prog = compile_program(graph, outputs, grad, wrt, fed)
            self._programs[key] = (graph, prog)
            while len(self._programs) > self._cache_size:
                self._programs.popitem(last=False)
        check_program_memory(prog, self.max_bytes)
        return prog

    def training_program(self, graph: Graph, loss: str, wrt: Sequence[str]) -> Program:
        """The program of a training step: ``loss`` and its gradients for ``wrt`` (every param
        a session trains: one with no path to the loss gets a zero gradient). A loss whose
        shape is known not to be a scalar is refused here, before any step runs."""
        prog = self.program(graph, [loss], grad=loss, wrt=wrt)
        check_scalar_loss(prog, prog.outputs[0])
        return prog

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (Ray actors, an embedded Ray runtime)."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
