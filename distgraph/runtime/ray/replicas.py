"""Data-parallel replicas of a training plan on the cluster's workers.

State: none in the functions over plans and feeds; :class:`ReplicaSteps`, the data-parallel
part of a training session (a mixin of ``RaySession``), reads the session's ``layout`` and
keeps its ``replica_steps``. A session with ``R`` replicas on ``N``
workers places its training program over ``W = N / R`` workers once (the executor's
strategy), then :func:`replicate` copies that plan ``R`` times: replica ``r`` runs on workers
``r*W .. r*W + W - 1``, its tasks numbered after replica ``r - 1``'s, so the copies form one
plan that installs, submits, waits and recovers like any other (a worker belongs to one
replica, so its tasks and resident values are its replica's alone).

Order of a step with ``R > 1`` (see ``session.py``): the batch's rows are split by
:func:`split_rows` (sizes differ by at most one; a batch with fewer rows than replicas leaves
the last replicas out of that step, :func:`active_view`), each replica is fed its rows of
every batch input (shared inputs whole; a pipelined replica splits its rows again into
micro-batches with the same helper, see ``pipelined.py``), and
the server is asked to combine the replicas' gradient dicts in replica order
(:func:`replica_groups`, ``ParameterServer.stage(..., replicas=, kind=)``) and apply the result
once; the step's loss combines the replicas' with the same weights (:func:`combine_losses`).
``ReplicaSteps`` does each of these for the session's step. A compiled step
(``compiled_steps.py``) splits and groups with these same methods, so it is bit-identical to
actor calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypeVar

import numpy as np

from ...cost import CostModel
from ...dataparallel import (
    Reduction,
    RowSplit,
    analyze_rows,
    choose_layout,
    explain_layout,
    shard_rows,
    shard_weights,
)
from ...errors import ConfigError, DistgraphError
from ...plan import DRIVER, PARAM_SERVER, Plan, Task
from ...program import Program
from ...result import TraceEvent
from .cluster import Cluster
from .options import RayOptions
from .waves import RowsFeed

#: A plan, or a subclass of it (a pipelined StagePlan is replicated the same way).
P = TypeVar("P", bound=Plan)


def replicate(plan: P, replicas: int) -> P:
    """``replicas`` copies of ``plan`` (placed over ``plan.num_workers`` workers) as one plan
    over ``replicas * plan.num_workers`` workers, replica-major. ``placement`` stays replica
    0's (a node's worker in replica r is that plus ``r * width``)."""
    if replicas == 1:
        return plan
    width, count = plan.num_workers, len(plan.tasks)
    tasks: list[Task] = []
    cross: list[tuple[str, int, int]] = []
    resident: dict[int, list[str]] = {}
    for r in range(replicas):
        wo, to = r * width, r * count
        for t in plan.tasks:
            tasks.append(
                dataclasses.replace(
                    t,
                    id=t.id + to,
                    worker=t.worker + wo,
                    nodes=list(t.nodes),
                    phases=list(t.phases),
                    feeds=list(t.feeds),
                    imports=[(src + to, slot, list(names)) for src, slot, names in t.imports],
                    outputs=[
                        (d + wo if isinstance(d, int) else d, list(names)) for d, names in t.outputs
                    ],
                )
            )
        cross.extend((v, dst + wo, b) for v, dst, b in plan.cross_edges)
        resident.update({w + wo: list(names) for w, names in plan.resident.items()})
    return dataclasses.replace(
        plan,
        num_workers=width * replicas,
        tasks=tasks,
        cross_edges=cross,
        resident=resident,
    )


def active_view(plan: Plan, width: int, active: int) -> Plan:
    """The tasks of the first ``active`` replicas only (same ids: the workers keep the whole
    plan installed), for a batch with fewer rows than replicas."""
    keep = active * width
    if keep >= plan.num_workers:
        return plan
    return dataclasses.replace(plan, tasks=[t for t in plan.tasks if t.worker < keep])


def rows_of(feed: Any) -> int:
    """The number of rows of a batch feed (an array or rows of a shipped one)."""
    if isinstance(feed, RowsFeed):
        return len(feed.index)
    return int(np.shape(feed)[0])


def split_rows(
    feeds: Mapping[str, Any], batch_inputs: Sequence[str], parts: int
) -> tuple[list[slice], list[dict[str, Any]]]:
    """Split a step's feeds by rows into ``parts`` (data-parallel replicas, or one replica's
    micro-batches): the row slices (:func:`~distgraph.dataparallel.shard_rows`: in order,
    sizes differ by at most one, fewer parts than asked when there are fewer rows) and each
    part's feeds (its rows of every batch input, every other feed whole). The rows are those
    of the first batch input present."""
    n_rows = next((rows_of(feeds[n]) for n in batch_inputs if n in feeds), 1)
    slices = shard_rows(n_rows, parts)
    out = []
    for s in slices:
        mine: dict[str, Any] = {}
        for name, value in feeds.items():
            if name not in batch_inputs:
                mine[name] = value
            elif isinstance(value, RowsFeed):
                mine[name] = RowsFeed(value.ref, value.index[s])
            else:
                mine[name] = value[s]
        out.append(mine)
    return slices, out


def replica_groups(plan: Plan, width: int, rows: Sequence[int]) -> list[tuple[int, int]]:
    """``(gradient dicts, rows)`` per replica, in the order ``plan``'s tasks send them."""
    counts = [0] * len(rows)
    for t in plan.tasks:
        if any(d == PARAM_SERVER for d, _ in t.outputs):
            counts[t.worker // width] += 1
    return list(zip(counts, (int(r) for r in rows)))


def combine_losses(losses: Sequence[float], rows: Sequence[int], kind: Reduction) -> float:
    """The full batch's loss from the replicas' (same weights as their gradients, in replica
    order, in float64)."""
    total = 0.0
    for loss, w in zip(losses, shard_weights(rows, kind)):
        total += float(loss) * w
    return total


@dataclasses.dataclass(frozen=True)
class Replicas:
    """A training session's data-parallel layout: ``count`` replicas of ``width`` workers."""

    count: int
    width: int
    #: How the batch splits (None with one replica: nothing is split).
    split: RowSplit | None
    #: What was chosen and why (``explain_layout``), or why nothing was chosen.
    explanation: str


def choose_replicas(
    program: Program,
    num_workers: int,
    replicas: int | str,
    strategy: Any,
    cost: CostModel,
    batch: int,
) -> Replicas:
    """The layout a training session runs: ``replicas`` as given (an int dividing
    ``num_workers``; more than one needs a loss that splits by rows, else the
    :class:`~distgraph.errors.GraphError` of :func:`~distgraph.dataparallel.analyze_rows`
    naming the node is raised) or, for ``"auto"``, the cost model's choice
    (:func:`~distgraph.dataparallel.choose_layout`: more replicas only when estimated
    ``AUTO_MARGIN`` faster, extra calls and the combine included), which keeps one replica
    and says why when the loss couples rows or no estimate can be made."""
    if replicas == 1:
        return Replicas(1, num_workers, None, "layout: 1 replica (replicas=1)")
    named = isinstance(strategy, str) or callable(strategy)
    if replicas == "auto":
        if not named:
            return Replicas(
                1,
                num_workers,
                None,
                "layout: 1 replica (replicas='auto' keeps a {node: worker} placement as given)",
            )
        try:
            layout = choose_layout(program, cost, num_workers, batch, strategy=strategy)
        except DistgraphError as e:  # "auto" never fails a step: one replica always runs
            return Replicas(
                1, num_workers, None, f"layout: 1 replica (replicas='auto' made no estimate: {e})"
            )
        text = explain_layout(layout)
        if layout.replicas == 1:
            return Replicas(1, num_workers, None, text)
        return Replicas(layout.replicas, layout.width, analyze_rows(program), text)
    assert isinstance(replicas, int)
    split = analyze_rows(program)  # refuses a loss that couples rows, naming the node
    text = f"layout: {replicas} replicas x {num_workers // replicas} workers (replicas={replicas})"
    if named:
        with contextlib.suppress(DistgraphError):  # the estimate is for reading, not a gate
            text = explain_layout(
                choose_layout(
                    program, cost, num_workers, batch, strategy=strategy, replicas=replicas
                )
            )
    return Replicas(replicas, num_workers // replicas, split, text)


def check_replicas(replicas: Any, num_workers: int) -> None:
    """Refuse a ``replicas`` setting that is not ``"auto"`` or an int dividing ``num_workers``."""
    if replicas == "auto":
        return
    choices = [d for d in range(1, num_workers + 1) if num_workers % d == 0]
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
        raise ConfigError(
            f"replicas must be 'auto' or an int >= 1 dividing num_workers={num_workers} "
            f"(one of {choices}), got {replicas!r}"
        )
    if num_workers % replicas:
        raise ConfigError(
            f"replicas={replicas} does not divide num_workers={num_workers}: each replica is "
            f"partitioned over num_workers / replicas workers; choose replicas from {choices} "
            "or change num_workers"
        )


def replica_events(
    events: Sequence[TraceEvent], width: int, rows: Sequence[tuple[int, int]], t_submit: float
) -> list[TraceEvent]:
    """A step's trace with replicas shown: each worker event tagged with its replica
    (``args["replica"]``), and per replica one event on track ``"replica r"`` from the
    step's submission to the replica's last event, named after the rows it took."""
    out: list[TraceEvent] = []
    last: dict[int, float] = {}
    for e in events:
        if e.worker is None:
            out.append(e)
            continue
        r = e.worker // width
        last[r] = max(last.get(r, t_submit), e.end)
        out.append(dataclasses.replace(e, args={**e.args, "replica": r}))
    for r, (a, b) in enumerate(rows):
        out.append(
            TraceEvent(
                f"replica {r}: rows {a}:{b}",
                "call",
                "replica",
                -1,
                f"replica {r}",
                t_submit,
                last.get(r, t_submit),
                args={
                    "replica": r,
                    "rows": [a, b],
                    "workers": [r * width + i for i in range(width)],
                },
            )
        )
    return out


#: The training update schemes of ``RayExecutor(consistency=...)``.
CONSISTENCIES = ("sync", "async")


def check_consistency(
    consistency: Any, staleness: Any, replicas: Any, slow: Mapping[int, float] | None
) -> dict[int, float]:
    """Refuse a bad ``consistency`` / ``staleness`` / slow-replica hook; returns the hook."""
    if consistency not in CONSISTENCIES:
        raise ConfigError(
            f"consistency must be one of {', '.join(map(repr, CONSISTENCIES))}, got {consistency!r}"
        )
    if not isinstance(staleness, int) or isinstance(staleness, bool) or staleness < 0:
        raise ConfigError(f"staleness must be an int >= 0, got {staleness!r}")
    if consistency == "async" and (
        not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 2
    ):
        raise ConfigError(
            f"consistency='async' needs replicas=R with R >= 2 (each replica runs whole steps), "
            f"got replicas={replicas!r}; set replicas=2 or more, or use consistency='sync'"
        )
    if staleness and consistency != "async":
        raise ConfigError(
            f"staleness={staleness} applies to consistency='async' only; "
            "set consistency='async' or leave staleness at 0"
        )
    out: dict[int, float] = {}
    for r, f in dict(slow or {}).items():
        if not isinstance(r, int) or not isinstance(f, (int, float)) or not f >= 1.0:
            raise ConfigError(
                f"_slow_replicas maps a replica index to a factor >= 1, got {r!r}: {f!r}"
            )
        out[r] = float(f)
    return out


# --- A training session's data-parallel part --------------------------------------------------

#: How many steps' replica rows a session's ``status()`` keeps.
REPLICA_HISTORY = 10_000


class _ReplicaHost(Protocol):
    """What :class:`ReplicaSteps` reads of its session (``RaySession``'s state)."""

    @property
    def options(self) -> RayOptions: ...
    @property
    def cluster(self) -> Cluster: ...
    @property
    def loss(self) -> str: ...
    @property
    def layout(self) -> Replicas | None: ...
    @property
    def replica_steps(self) -> dict[int, list[dict[str, Any]]]: ...


class ReplicaSteps:
    """The data-parallel part of a training session (a mixin of ``RaySession``, see
    ``session.py``): how a step's rows split over its ``layout``'s replicas, what the server's
    stage is told to combine, the step's loss from the replicas' and the record of which rows
    each replica took where (``replica_steps``, for ``status()``). With one replica nothing is
    split: a step's ``rows`` are ``[]`` and its loss is the driver's."""

    def _split_rows(
        self: _ReplicaHost, arrays: Mapping[str, Any]
    ) -> tuple[list[tuple[int, int]], list[dict[str, Any]]]:
        """Each active replica's rows (start, stop) of the step's batch and its feeds (none
        with one replica). The same rows on a retry or a replay; a batch with fewer rows than
        replicas leaves the last replicas out."""
        layout = self.layout
        assert layout is not None  # chosen with the plan
        if layout.split is None:
            return [], []
        slices, parts = split_rows(arrays, layout.split.batch_inputs, layout.count)
        return [(sl.start, sl.stop) for sl in slices], parts

    def _stage_split(
        self: _ReplicaHost, plan: Plan, rows: Sequence[tuple[int, int]]
    ) -> dict[str, Any]:
        """The server's stage arguments that combine the replicas' gradients of a step whose
        calls are ``plan``'s tasks: ``replicas`` (gradient dicts and rows per replica, in
        replica order) and ``kind`` (how they are weighted); none with one replica."""
        if not rows:
            return {}
        layout = self.layout
        assert layout is not None and layout.split is not None
        counts = [b - a for a, b in rows]
        return {"replicas": replica_groups(plan, layout.width, counts), "kind": layout.split.kind}

    def _step_loss(
        self: _ReplicaHost,
        plan: Plan,
        driver: Sequence[Mapping[str, Any]],
        rows: Sequence[tuple[int, int]],
    ) -> float:
        """The step's loss from the driver's outputs (one dict per task of ``plan`` that
        answers the driver, in task order): with replicas, theirs combined in replica order."""
        if not rows:
            return float(next(d[self.loss] for d in driver if self.loss in d))
        layout = self.layout
        assert layout is not None and layout.split is not None
        answering = [t for t in plan.tasks if any(d == DRIVER for d, _ in t.outputs)]
        losses: dict[int, float] = {}
        for t, values in zip(answering, driver):
            if self.loss in values:
                losses[t.worker // layout.width] = values[self.loss]
        return combine_losses(
            [losses[r] for r in range(len(rows))], [b - a for a, b in rows], layout.split.kind
        )

    def _straggle(self: _ReplicaHost, t_submit: float, rows: Sequence[tuple[int, int]]) -> None:
        """Test hook ``slow_replicas``: a step with a slowed replica among its active ones
        lasts that factor times what it took (the step waits for its slowest replica)."""
        slow = self.options.slow_replicas
        if not slow:
            return
        active = range(len(rows) or 1)
        factor = max([slow.get(r, 1.0) for r in active], default=1.0)
        if factor > 1.0:
            time.sleep((factor - 1.0) * (time.time() - t_submit))

    def _record_rows(
        self: _ReplicaHost, step_id: int, plan: Plan, rows: Sequence[tuple[int, int]]
    ) -> None:
        """Keep which rows each replica took in step ``step_id`` and on which workers (and
        nodes) it ran: the step succeeded, so every task of ``plan`` ran (each one feeds the
        driver or the server, and the step waited for both)."""
        assert self.layout is not None
        width = self.layout.width
        info = self.cluster.worker_info
        entries = []
        # One replica: its rows are the whole batch (None: not split).
        for r, span in enumerate(rows or [None]):
            workers = sorted({t.worker for t in plan.tasks if t.worker // width == r})
            entries.append(
                {
                    "replica": r,
                    "rows": None if span is None else list(span),
                    "workers": workers,
                    # Ray node ids (several nodes of one machine share an IP) and their IPs.
                    "nodes": sorted({info[w]["node_id"] for w in workers if w < len(info)}),
                    "ips": sorted({info[w]["node_ip"] for w in workers if w < len(info)}),
                }
            )
        self.replica_steps[step_id] = entries
        while len(self.replica_steps) > REPLICA_HISTORY:
            del self.replica_steps[next(iter(self.replica_steps))]

    def _replica_status(self: _ReplicaHost) -> dict[str, Any] | None:
        """``status()["replicas"]``: the layout and the latest steps' rows (None before the
        first step placed the plan)."""
        layout = self.layout
        if layout is None:
            return None
        last = next(reversed(self.replica_steps), None)
        return {
            "count": layout.count,
            "width": layout.width,
            "kind": None if layout.split is None else layout.split.kind,
            "last_step": last,
            "rows": None if last is None else [e["rows"] for e in self.replica_steps[last]],
            "steps": {k: list(v) for k, v in self.replica_steps.items()},
        }
