"""Choosing a layout: how many data-parallel replicas R, each over N / R workers.

Owns :func:`choose_layout` (every divisor R of the worker count, costed: one replica's plan
estimate on its shard, the gradient push/pull to the servers, the extra calls and the combine),
the constants that bias it (:data:`AUTO_MARGIN`, :data:`CALL_ROUND_TRIP`,
:data:`COMBINE_FLOPS_PER_ELEMENT`), the memory fallback :func:`stage_placement`, and
:func:`explain_layout` (what was chosen, why, and every alternative's estimate). Kept apart
because it is a cost-model policy: it reads plans and costs, and changes when the runtime's
measured costs do, not when the row rules or the gradient arithmetic do.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..cost import CostModel, itemsize
from ..errors import ConfigError, GraphError, ResourceError
from ..ops import LEAF_OPS
from ..program import Program
from .rows import Reduction, RowSplit, analyze_rows, shard_rows


@dataclass(frozen=True)
class LayoutOption:
    """One candidate layout: ``replicas`` replicas, each partitioned over ``width`` workers."""

    replicas: int
    width: int
    strategy: str
    #: Estimated seconds of one training step (``compute + transfer + overhead``); inf if
    #: the layout is not possible.
    step_seconds: float
    #: One replica's plan estimate on its shard (compute, its calls and cross-worker values).
    compute_seconds: float = 0.0
    #: Gradients pushed to and params pulled from the servers by every replica.
    transfer_seconds: float = 0.0
    #: The driver's calls for the other replicas, the servers' calls, combining gradients.
    overhead_seconds: float = 0.0
    #: Largest estimated bytes held by one worker.
    worker_bytes: int = 0
    rows_per_replica: tuple[int, ...] = ()
    #: Why the layout is not possible (empty when it is).
    refused: str = ""
    #: With R > 1: the estimated step of one replica on ``width`` workers taking the whole
    #: batch (the other workers idle), which splitting the rows must beat.
    solo_seconds: float = math.inf

    @property
    def feasible(self) -> bool:
        """Whether this layout can run."""
        return not self.refused


@dataclass(frozen=True)
class Layout:
    """The chosen replicas × width, why, and every alternative considered."""

    replicas: int
    width: int
    num_workers: int
    strategy: str
    step_seconds: float
    reason: str
    #: The loss's reduction when it splits by rows (None when it does not).
    kind: Reduction | None
    rows_per_replica: tuple[int, ...]
    options: list[LayoutOption] = field(default_factory=list)
    ps_shards: int = 1


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def choose_layout(
    program: Program,
    cost: CostModel,
    num_workers: int,
    batch_size: int,
    *,
    strategy: str | Callable[..., Any] = "mincut",
    ps_shards: int = 1,
    memory_per_worker: int | None = None,
    replicas: int | None = None,
) -> Layout:
    """Choose how many data-parallel replicas (R) of ``program`` to run on ``num_workers``.

    Every divisor R of ``num_workers`` is considered, each replica partitioned over
    ``num_workers / R`` workers by ``strategy`` for a shard of ``ceil(batch_size / R)`` rows.
    Its estimated step time is

    * compute: :meth:`Plan.estimate` of one replica's plan (per-level makespan, its actor
      calls, values crossing its workers) — what ``plan.explain()`` reports today;
    * transfer: each replica pushes every param's gradient and pulls every param back, the
      ``ps_shards`` servers receiving and sending in parallel: ``2 * R * G / S`` bytes at the
      cost model's bandwidth (G = bytes of all params);
    * overhead: the calls of the other R-1 replicas' tasks and one call per server, each
      costed as an actor round trip (at least :data:`CALL_ROUND_TRIP`, whatever the cost
      model's pipelined ``call_overhead``), and combining R gradients on the servers
      (:data:`COMBINE_FLOPS_PER_ELEMENT` per gradient element and replica).

    R > 1 needs a loss that splits by rows (:func:`analyze_rows`) and at least R rows. With
    ``memory_per_worker`` (bytes), a layout whose busiest worker holds more (its params, the
    values of the nodes placed on it for its shard, and values it receives) is refused; when
    ``strategy`` keeps too much on one worker the other built-in strategies are tried.

    More replicas must pay clearly: going through the possible layouts by R, one with more
    replicas replaces the current choice only when its estimate is at least
    :data:`AUTO_MARGIN` below the current choice's *and* below that of one replica on the
    same width taking the whole batch (``solo_seconds``: splitting the rows must be what
    pays, not merely a narrower partition dodging a spreading strategy's calls), since R > 1
    gives up bit-identity with the full batch (shard gradients summed in another order equal
    it only to rounding). So tiny graphs, where calls dominate, keep one replica under every
    strategy. ``replicas`` forces R (refused with
    the reason when it is not possible). No possible layout raises
    :class:`~distgraph.errors.ResourceError`.
    """
    from ..partition import STRATEGIES  # partition imports plan imports program: no cycle here

    if not isinstance(num_workers, int) or num_workers < 1:
        raise ConfigError(f"num_workers must be an int >= 1, got {num_workers!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not isinstance(ps_shards, int) or ps_shards < 1:
        raise ConfigError(f"ps_shards must be an int >= 1, got {ps_shards!r}")
    if replicas is not None and (
        not isinstance(replicas, int) or replicas < 1 or num_workers % replicas
    ):
        raise ConfigError(
            f"replicas={replicas!r} must divide num_workers={num_workers} "
            f"(choose from {_divisors(num_workers)}, or 'auto')"
        )
    split: RowSplit | None = None
    split_error = ""
    try:
        split = analyze_rows(program)
    except GraphError as e:
        split_error = str(e)
    name = strategy if isinstance(strategy, str) else "custom"
    tries: list[Any] = [strategy]
    if isinstance(strategy, str) and memory_per_worker is not None:
        tries += [s for s in ("mincut", "level", "round_robin") if s != strategy]
        tries.append(_STAGES)
    grad_bytes = _param_bytes(program)
    options: list[LayoutOption] = []
    for r in _divisors(num_workers):
        width = num_workers // r
        rows = tuple(s.stop - s.start for s in shard_rows(batch_size, r)) if r <= batch_size else ()
        if r > 1 and split is None:
            options.append(
                _refused(r, width, name, f"the loss does not split by rows: {split_error}")
            )
            continue
        if r > batch_size:
            options.append(
                _refused(r, width, name, f"a batch of {batch_size} rows cannot feed {r} replicas")
            )
            continue
        best: LayoutOption | None = None
        best_attempt: Any = strategy
        for attempt in tries if width > 1 else [strategy]:
            option = _evaluate(
                program, cost, r, width, rows, attempt, grad_bytes, ps_shards, STRATEGIES
            )
            if memory_per_worker is not None and option.worker_bytes > memory_per_worker:
                option = dataclasses.replace(
                    option,
                    step_seconds=math.inf,
                    refused=(
                        f"a worker would hold {_fmt_bytes(option.worker_bytes)}, more than the "
                        f"{_fmt_bytes(memory_per_worker)} per worker"
                    ),
                )
            if best is None or (option.feasible, -option.worker_bytes) > (
                best.feasible,
                -best.worker_bytes,
            ):
                best, best_attempt = option, attempt
            if option.feasible:
                break
        assert best is not None
        if r > 1 and best.feasible:
            # What splitting rows is measured against: one replica on this width, whole batch.
            solo = _evaluate(
                program,
                cost,
                1,
                width,
                (batch_size,),
                best_attempt,
                grad_bytes,
                ps_shards,
                STRATEGIES,
            )
            best = dataclasses.replace(best, solo_seconds=solo.step_seconds)
        options.append(best)
    feasible = [o for o in options if o.feasible]
    if replicas is not None:
        chosen = next(o for o in options if o.replicas == replicas)
        if not chosen.feasible:
            raise ConfigError(f"replicas={replicas} is not possible: {chosen.refused}")
        reason = f"replicas={replicas} was requested"
    else:
        if not feasible:
            why = "; ".join(f"R={o.replicas}: {o.refused}" for o in options)
            raise ResourceError(f"no layout of {num_workers} workers is possible: {why}")
        chosen, reason = _auto_choice(feasible)
        if chosen.replicas == 1 and split is None and num_workers > 1:
            reason += " (the loss does not split by rows)"
    return Layout(
        replicas=chosen.replicas,
        width=chosen.width,
        num_workers=num_workers,
        strategy=chosen.strategy,
        step_seconds=chosen.step_seconds,
        reason=reason,
        kind=split.kind if split is not None else None,
        rows_per_replica=chosen.rows_per_replica,
        options=options,
        ps_shards=ps_shards,
    )


#: ``replicas="auto"`` takes more replicas only for an estimated step this much shorter
#: (a fraction of the current choice's): R > 1 equals the full batch to rounding only, and the
#: estimate is rough, so a near tie keeps fewer replicas.
AUTO_MARGIN = 0.25

#: Seconds of one more actor call (a round trip): measured 0.9-1.3 ms on a 2-core machine
#: (issue #16). The planner's ``call_overhead`` is a pipelined call's share, too low for the
#: extra replicas' calls, which the driver submits and waits for on top of one replica's.
CALL_ROUND_TRIP = 1e-3

#: Work per gradient element and replica of :func:`combine` (cast to float64, scale, add:
#: memory-bound passes numpy ran at 1.2-2.6 ns per element on this machine), in flops at the
#: cost model's rate.
COMBINE_FLOPS_PER_ELEMENT = 12.0


def _pays(o: LayoutOption, than: float) -> bool:
    return o.step_seconds <= (1.0 - AUTO_MARGIN) * than


def _auto_choice(feasible: Sequence[LayoutOption]) -> tuple[LayoutOption, str]:
    """The ``auto`` choice among possible layouts (in increasing R) and why."""
    chosen = feasible[0]
    for o in feasible[1:]:
        if _pays(o, chosen.step_seconds) and _pays(o, o.solo_seconds):
            chosen = o
    others = [o for o in feasible if o is not chosen]
    if not others:
        return chosen, "the only possible layout"
    # Faster only because each replica is narrower (a strategy that spreads a small graph
    # with many calls), not because splitting the rows pays: keep the layout asked for.
    narrower = [
        o
        for o in others
        if o.replicas > chosen.replicas
        and _pays(o, chosen.step_seconds)
        and not _pays(o, o.solo_seconds)
    ]
    if narrower:
        o = min(narrower, key=lambda o: (o.step_seconds, o.replicas))
        return chosen, (
            f"{_shape_words(o.replicas, o.width)} is estimated at {_ms(o.step_seconds)}, "
            f"but one replica on {o.width} worker{'s' if o.width != 1 else ''} at "
            f"{_ms(o.solo_seconds)}: splitting the rows would not pay "
            f"(less than {AUTO_MARGIN:.0%} faster), narrower replicas would only avoid "
            f"the {chosen.strategy!r} partition's calls; "
            + (
                "one replica keeps results bit-identical to one process on the full batch"
                if chosen.replicas == 1
                else "a near tie keeps fewer replicas"
            )
        )
    faster = [o for o in others if o.step_seconds < chosen.step_seconds]
    if faster:
        best = min(faster, key=lambda o: (o.step_seconds, o.replicas))
        keep = (
            "one replica keeps results bit-identical to one process on the full batch"
            if chosen.replicas == 1
            else "a near tie keeps fewer replicas"
        )
        return chosen, (
            f"{_shape_words(best.replicas, best.width)} is estimated at "
            f"{_ms(best.step_seconds)} against {_ms(chosen.step_seconds)}, less than "
            f"{AUTO_MARGIN:.0%} faster: {keep}"
        )
    runner = min(others, key=lambda o: (o.step_seconds, o.replicas))
    why = (
        f"lowest estimated step time: {_ms(chosen.step_seconds)} against "
        f"{_ms(runner.step_seconds)} for {_shape_words(runner.replicas, runner.width)}"
    )
    if chosen is not feasible[0]:
        why += f" (more replicas are taken only when {AUTO_MARGIN:.0%} faster)"
    return chosen, why


def _refused(r: int, width: int, strategy: str, why: str) -> LayoutOption:
    return LayoutOption(r, width, strategy, math.inf, refused=why)


def _param_bytes(program: Program, elements: bool = False) -> int:
    """Bytes (or elements) of every trained param (its gradient is as large)."""
    total = 0
    for p in program.grads:
        node = program.nodes[p]
        if node.shape is not None and None not in node.shape:
            n = math.prod(node.shape)  # type: ignore[arg-type]
            total += n if elements else n * itemsize(node.dtype)
    return total


def _evaluate(
    program: Program,
    cost: CostModel,
    r: int,
    width: int,
    rows: tuple[int, ...],
    strategy: Any,
    grad_bytes: int,
    ps_shards: int,
    strategies: Mapping[str, Any],
) -> LayoutOption:
    """Estimate one layout (see :func:`choose_layout`)."""
    from ..cost import bytes_array
    from ..partition import partition
    from ..plan import build_plan

    shard_cost = dataclasses.replace(cost, batch_size=max(rows))
    name = strategy if isinstance(strategy, str) else "custom"
    if strategy is _STAGES:
        placement = partition(program, width, stage_placement(program, width, shard_cost))
    else:
        placement = partition(program, width, strategy, shard_cost)
    plan = build_plan(program, placement, width, shard_cost, training=True, strategy=name)
    compute = plan.estimate_levels()
    transfer = cost.transfer_seconds(2 * r * grad_bytes // ps_shards)
    call = max(cost.call_overhead, CALL_ROUND_TRIP)
    combine_flops = r * _param_bytes(program, elements=True) * COMBINE_FLOPS_PER_ELEMENT
    overhead = (
        (r - 1) * len(plan.tasks) * call
        + ps_shards * cost.call_overhead
        + (combine_flops / ps_shards / cost.flops_per_second if r > 1 else 0.0)
    )
    nbytes = bytes_array(program, shard_cost)
    held = [0] * width
    for i, n in enumerate(program.order):
        held[placement[n]] += int(nbytes[i])
    for _, dst, b in plan.cross_edges:
        held[dst] += b
    return LayoutOption(
        replicas=r,
        width=width,
        strategy=name,
        step_seconds=compute + transfer + overhead,
        compute_seconds=compute,
        transfer_seconds=transfer,
        overhead_seconds=overhead,
        worker_bytes=max(held),
        rows_per_replica=rows,
    )


#: The memory fallback of :func:`choose_layout`: contiguous stages balanced by bytes.
_STAGES = "stages"


def stage_placement(program: Program, width: int, cost: CostModel) -> dict[str, int]:
    """Forward ops cut into ``width`` contiguous runs (in topological order) holding about
    equal bytes, counting with each op the params it reads and the backward nodes that
    differentiate it: a placement that spreads memory (a pipeline's stages) where the
    speed-minded strategies keep a chain on one worker. Returns the forward ops' workers;
    ``partition(program, width, placement)`` places leaves and backward nodes with them."""
    from ..cost import bytes_array

    nbytes = dict(zip(program.order, bytes_array(program, cost).tolist()))
    weight: dict[str, int] = {}
    forward = [
        n
        for n in program.order
        if program.nodes[n].phase == "forward" and program.nodes[n].op not in LEAF_OPS
    ]
    for n in forward:
        node = program.nodes[n]
        own = nbytes[n] + sum(
            nbytes[i] for i in node.inputs if program.nodes[i].op in ("param", "const")
        )
        weight[n] = own
    for n in program.order:
        origin = program.nodes[n].origin
        if program.nodes[n].phase == "backward" and origin in weight:
            weight[origin] += nbytes[n]
    total = sum(weight.values())
    placement, done = {}, 0
    for n in forward:
        # The stage holding the middle of this op's bytes.
        mid = done + weight[n] / 2
        placement[n] = min(width - 1, int(mid * width / total)) if total else 0
        done += weight[n]
    return placement


def _shape_words(replicas: int, width: int) -> str:
    """'2 replicas x 1 worker'."""
    return (
        f"{replicas} replica{'s' if replicas != 1 else ''} x "
        f"{width} worker{'s' if width != 1 else ''}"
    )


def _ms(seconds: float) -> str:
    return "n/a" if math.isinf(seconds) else f"{seconds * 1e3:.3f} ms"


def _fmt_bytes(n: float) -> str:
    from ..memory import format_bytes

    return format_bytes(n)


def explain_layout(layout: Layout) -> str:
    """What was chosen and why, with every alternative's estimated step time."""
    shape = (
        "data parallel"
        if layout.width == 1 and layout.replicas > 1
        else "partitioned"
        if layout.replicas == 1 and layout.width > 1
        else "replicas x partitions"
        if layout.replicas > 1
        else "one worker"
    )
    lines = [
        f"layout: {_shape_words(layout.replicas, layout.width)} each ({shape}) on "
        f"{layout.num_workers} worker{'s' if layout.num_workers != 1 else ''}, "
        f"strategy {layout.strategy!r}, "
        f"est. step {_ms(layout.step_seconds)}",
        f"  why: {layout.reason}",
    ]
    if layout.replicas > 1:
        total = sum(layout.rows_per_replica)
        weight = f"rows / {total}" if layout.kind == "mean" else "1 (a sum over rows)"
        lines.append(
            f"  rows per replica: {list(layout.rows_per_replica)}; gradients weighted by "
            f"{weight}, added in replica order"
        )
    servers = f"{layout.ps_shards} server shard{'s' if layout.ps_shards != 1 else ''}"
    lines.append(
        f"alternatives (est. step = compute + gradient push/pull to {servers} + overhead):"
    )
    for o in layout.options:
        mark = "*" if (o.replicas, o.width) == (layout.replicas, layout.width) else " "
        head = f"  {mark} R={o.replicas} x {o.width} worker{'s' if o.width != 1 else ''}"
        if not o.feasible:
            lines.append(f"{head}: not possible: {o.refused}")
            continue
        solo = (
            f"; one replica on {o.width} worker{'s' if o.width != 1 else ''}: {_ms(o.solo_seconds)}"
            if o.replicas > 1
            else ""
        )
        lines.append(
            f"{head}: {_ms(o.step_seconds)} (compute {_ms(o.compute_seconds)}, transfer "
            f"{_ms(o.transfer_seconds)}, overhead {_ms(o.overhead_seconds)}; busiest worker "
            f"holds {_fmt_bytes(o.worker_bytes)}; strategy {o.strategy!r}{solo})"
        )
    return "\n".join(lines)
