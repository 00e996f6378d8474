"""Pipeline parallelism as pure data: stage cuts, micro-batch schedules, their simulation.

* :func:`pipeline` — a partition strategy: the forward ops, in topological order, are cut into
  ``p`` contiguous stages (one per worker) by dynamic programming, minimising the slowest stage's
  time; a stage's time is its forward and backward compute plus the transfer time of what it
  receives (activations from earlier stages, gradients from later ones), as in PipeDream's
  partitioner. Backward nodes go with the forward node they differentiate, leaves with their
  first consumer.
* Schedules: per worker, an ordered list of :class:`Action` (F or B of micro-batch ``i`` on a
  stage, with the workers it sends to and receives from). :func:`gpipe` and
  :func:`one_f_one_b` build them; :data:`SCHEDULES` names them, so adding a schedule is adding a
  function ``(stages, microbatches) -> list[list[Action]]``.
* :func:`validate` refuses a schedule with a missing, repeated or unreachable action;
  :func:`simulate` times one (each action starts when its worker is free and its inputs have
  arrived); :func:`grid` draws it; :func:`peak_inflight` counts the micro-batches whose
  activations a worker holds; :func:`estimate_step` predicts a step's wall time from stage
  costs, call overhead and transfer sizes.

Nothing here imports Ray: the runtime executes the action lists (see the report of issue 15).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .cost import CostModel
from .errors import ConfigError
from .ops import LEAF_OPS
from .program import Program

__all__ = [
    "SCHEDULES",
    "Action",
    "ScheduleError",
    "SimResult",
    "StageCut",
    "StageProfile",
    "StepEstimate",
    "estimate_step",
    "gpipe",
    "grid",
    "make_schedule",
    "one_f_one_b",
    "peak_inflight",
    "pipeline",
    "pipeline_stages",
    "simulate",
    "stage_profile",
    "stage_times",
    "validate",
]


class ScheduleError(ConfigError):
    """A pipeline schedule is malformed: an action is missing, repeated, or can never run."""


# --- the partition strategy --------------------------------------------------------------------

#: Cuts are chosen among at most this many positions; longer programs are first grouped into
#: this many runs of consecutive forward ops (the stage-cost matrix is quadratic in it).
MAX_CUT_POSITIONS = 1024


@dataclass(frozen=True)
class StageCut:
    """The result of the pipeline partitioner (times in seconds, per micro-batch of the cost
    model's ``batch_size``)."""

    #: ``cuts[j]`` is the position (in :attr:`forward`) where stage ``j`` starts; stage ``j``
    #: holds ``forward[cuts[j]:cuts[j + 1]]`` (the last one runs to the end).
    cuts: tuple[int, ...]
    #: The forward ops in topological order: the positions the stages are cut from.
    forward: tuple[str, ...]
    #: Forward plus backward compute per stage.
    compute: tuple[float, ...]
    #: Transfer time of the values each stage receives (activations and gradients).
    receive: tuple[float, ...]
    #: Node -> stage (= worker).
    placement: Mapping[str, int] = field(repr=False)

    @property
    def stage_time(self) -> tuple[float, ...]:
        """Compute plus receive time of each stage."""
        return tuple(c + r for c, r in zip(self.compute, self.receive))

    @property
    def bottleneck(self) -> float:
        """The slowest stage's time: what the partitioner minimises."""
        return max(self.stage_time)


def pipeline(program: Program, num_workers: int, cost: CostModel) -> dict[str, int]:
    """Partition strategy ``"pipeline"``: contiguous stages, one per worker (see module doc)."""
    return dict(pipeline_stages(program, num_workers, cost).placement)


def pipeline_stages(program: Program, num_workers: int, cost: CostModel) -> StageCut:
    """Cut ``program`` into ``num_workers`` contiguous stages minimising the slowest stage.

    A program with fewer forward ops ``n`` than workers gets ``n`` stages (one op each) and
    leaves the other workers idle, as ``mincut`` keeps a tiny graph on one worker.
    """
    if not isinstance(num_workers, int) or num_workers < 1:
        raise ConfigError(f"num_workers must be an int >= 1, got {num_workers!r}")
    fwd, anchor = _anchors(program)
    n = len(fwd)
    p = max(1, min(num_workers, n))
    if n == 0:  # nothing to cut: leaves (and their gradients) only
        placement = dict.fromkeys(program.order, 0)
        compute, receive = stage_times(program, placement, num_workers, cost)
        return StageCut((0,), (), compute, receive, placement)
    weight, rects = _stage_inputs(program, cost, anchor, n)
    # Group positions into blocks when there are too many for the quadratic matrix.
    blocks = min(n, MAX_CUT_POSITIONS)
    p = min(p, blocks)  # every stage holds at least one block
    block_of = np.arange(n, dtype=np.int64) * blocks // n
    first = np.searchsorted(block_of, np.arange(blocks + 1))  # first position of each block
    bweight = np.bincount(block_of, weights=weight, minlength=blocks)
    recv = _receive_matrix(rects, first, cost)
    cum = np.r_[0.0, np.cumsum(bweight)]
    # stage[i, k]: time of a stage holding blocks i..k-1 (infinite where i >= k).
    stage = cum[None, :] - cum[:, None] + recv
    stage[np.tril_indices(blocks + 1)] = np.inf
    best = stage[0].copy()  # best[k]: slowest stage of blocks 0..k-1 cut into j stages
    choice = np.zeros((p, blocks + 1), dtype=np.int64)
    for j in range(1, p):
        cand = np.maximum(best[:, None], stage)  # cand[i, k]: last stage is blocks i..k-1
        choice[j] = np.argmin(cand, axis=0)  # the earliest cut among equals
        best = cand[choice[j], np.arange(blocks + 1)]
    cuts = [blocks]
    for j in range(p - 1, 0, -1):
        cuts.append(int(choice[j, cuts[-1]]))
    cuts.append(0)
    bcuts = cuts[::-1][:-1]
    pos_cuts = tuple(int(first[b]) for b in bcuts)
    stage_of_pos = np.searchsorted(np.asarray(pos_cuts), np.arange(n), side="right") - 1
    placement = {name: int(stage_of_pos[a]) for name, a in zip(program.order, anchor.tolist())}
    compute, receive = stage_times(program, placement, num_workers, cost)
    return StageCut(pos_cuts, tuple(fwd), compute, receive, placement)


def stage_times(
    program: Program, placement: Mapping[str, int], num_workers: int, cost: CostModel
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per worker: (compute seconds of its nodes, transfer seconds of the values it receives).

    A value is received once by each worker other than its producer's that runs a consumer of
    it; leaves are not counted (feeds come from the driver, params are resident).
    """
    nodes = program.nodes
    compute = [0.0] * num_workers
    received = [0] * num_workers
    for name in program.order:
        node = nodes[name]
        if node.op in LEAF_OPS:
            continue
        w = placement[name]
        compute[w] += cost.seconds(node, [nodes[i] for i in node.inputs])
        dests = {placement[c] for c in program.consumers.get(name, ())} - {w}
        for d in dests:
            received[d] += cost.nbytes(node)
    return tuple(compute), tuple(cost.transfer_seconds(b) for b in received)


@dataclass(frozen=True)
class StageProfile:
    """What the step-time predictor needs from a placed program, per micro-batch (the cost
    model's ``batch_size``): compute per stage and phase, bytes over each stage boundary."""

    forward: tuple[float, ...]
    backward: tuple[float, ...]
    #: ``boundary_bytes[s]``: bytes of the forward values that cross from stages ``<= s`` to
    #: stages ``> s`` (their gradients cross back).
    boundary_bytes: tuple[int, ...]


def stage_profile(
    program: Program, placement: Mapping[str, int], num_stages: int, cost: CostModel
) -> StageProfile:
    """Forward and backward seconds per stage and bytes per boundary, for :func:`estimate_step`."""
    nodes = program.nodes
    fwd = [0.0] * num_stages
    bwd = [0.0] * num_stages
    crossing = [0] * max(num_stages - 1, 0)
    for name in program.order:
        node = nodes[name]
        if node.op in LEAF_OPS:
            continue
        s = placement[name]
        secs = cost.seconds(node, [nodes[i] for i in node.inputs])
        if node.phase == "forward":
            fwd[s] += secs
            later = [placement[c] for c in program.consumers.get(name, ()) if placement[c] > s]
            for b in range(s, max(later, default=s)):
                crossing[b] += cost.nbytes(node)
        else:
            bwd[s] += secs
    return StageProfile(tuple(fwd), tuple(bwd), tuple(crossing))


def _anchors(program: Program) -> tuple[list[str], np.ndarray]:
    """The forward ops in order, and each node's position among them (its stage follows it).

    Forward ops anchor themselves; leaves follow their first forward consumer; backward nodes
    follow the node they differentiate (their ``origin``), else their first anchored input.
    """
    nodes = program.nodes
    order = program.order
    index = {n: i for i, n in enumerate(order)}
    fwd = [n for n in order if nodes[n].phase == "forward" and nodes[n].op not in LEAF_OPS]
    anchor = np.full(len(order), -1, dtype=np.int64)
    for pos, n in enumerate(fwd):
        anchor[index[n]] = pos
    for n in order:
        if nodes[n].op in LEAF_OPS:
            firsts = [
                anchor[index[c]] for c in program.consumers.get(n, ()) if anchor[index[c]] >= 0
            ]
            if firsts:
                anchor[index[n]] = min(firsts)
    for _ in range(2):  # a second pass places leaves read only by backward nodes
        for i, n in enumerate(order):
            if anchor[i] >= 0:
                continue
            node = nodes[n]
            origin = node.origin
            if origin is not None and origin in index and anchor[index[origin]] >= 0:
                anchor[i] = anchor[index[origin]]
                continue
            near = [anchor[index[x]] for x in node.inputs if anchor[index[x]] >= 0]
            near += [
                anchor[index[c]] for c in program.consumers.get(n, ()) if anchor[index[c]] >= 0
            ]
            if near:
                anchor[i] = near[0]
    anchor[anchor < 0] = 0
    return fwd, anchor


def _stage_inputs(
    program: Program, cost: CostModel, anchor: np.ndarray, n: int
) -> tuple[np.ndarray, list[tuple[int, int, int, int, float]]]:
    """Compute seconds per position, and the receive rectangles of every non-leaf value.

    A stage is a position range ``[i, k)``. A value anchored at ``a`` and read at positions
    ``C`` is received by the stage iff ``a`` is outside it and some ``c`` in ``C`` inside: a
    union of rectangles in the ``(i, k)`` plane, one per distinct consumer position. Each is
    ``(i_lo, i_hi, k_lo, k_hi, bytes)`` with inclusive bounds.
    """
    nodes = program.nodes
    index = {name: i for i, name in enumerate(program.order)}
    weight = np.zeros(n)
    rects: list[tuple[int, int, int, int, float]] = []
    for i, name in enumerate(program.order):
        node = nodes[name]
        if node.op in LEAF_OPS:
            continue
        a = int(anchor[i])
        weight[a] += cost.seconds(node, [nodes[x] for x in node.inputs])
        at = {int(anchor[index[c]]) for c in program.consumers.get(name, ())}
        if not at - {a}:
            continue
        size = float(cost.nbytes(node))
        # Later stages: a stage starting in (previous consumer, c] and ending past c reads it.
        prev = a
        for c in sorted(x for x in at if x > a):
            rects.append((prev + 1, c, c + 1, n, size))
            prev = c
        # Earlier stages (gradients flowing back): ending in (c, previous] and starting <= c.
        prev = a
        for c in sorted((x for x in at if x < a), reverse=True):
            rects.append((0, c, c + 1, prev, size))
            prev = c
    return weight, rects


def _receive_matrix(
    rects: list[tuple[int, int, int, int, float]], first: np.ndarray, cost: CostModel
) -> np.ndarray:
    """Receive seconds of the stage holding blocks ``i..k-1``, as a ``(blocks+1)^2`` matrix;
    ``first[b]`` is the first position of block ``b`` (``first[blocks]`` the end)."""
    size = len(first) + 1
    diff = np.zeros((size, size))
    if rects:
        r = np.array(rects)
        # A stage starts and ends at block starts: keep the block starts inside each rectangle.
        i_lo = np.searchsorted(first, r[:, 0], side="left")
        i_hi = np.searchsorted(first, r[:, 1], side="right") - 1
        k_lo = np.searchsorted(first, r[:, 2], side="left")
        k_hi = np.searchsorted(first, r[:, 3], side="right") - 1
        ok = (i_lo <= i_hi) & (k_lo <= k_hi)
        w = r[ok, 4]
        a, b, c, d = i_lo[ok], i_hi[ok] + 1, k_lo[ok], k_hi[ok] + 1
        np.add.at(diff, (a, c), w)
        np.add.at(diff, (b, c), -w)
        np.add.at(diff, (a, d), -w)
        np.add.at(diff, (b, d), w)
    nbytes = np.cumsum(np.cumsum(diff, axis=0), axis=1)[: size - 1, : size - 1]
    nbytes = np.maximum(nbytes, 0.0)  # float round-off of the sums
    if type(cost).transfer_seconds is CostModel.transfer_seconds:
        return nbytes / cost.bytes_per_second
    return np.vectorize(lambda x: cost.transfer_seconds(round(x)))(nbytes)


# --- schedules ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Action:
    """One step of a worker's schedule: forward (``"F"``) or backward (``"B"``) of one
    micro-batch on one stage. ``receives``/``sends`` list the other workers its input comes
    from and its result goes to (activations forward, gradients backward)."""

    worker: int
    stage: int
    kind: str
    microbatch: int
    sends: tuple[int, ...] = ()
    receives: tuple[int, ...] = ()

    @property
    def label(self) -> str:
        """``F3``, ``B1``: kind and micro-batch (the grid's cell)."""
        return f"{self.kind}{self.microbatch}"

    def __str__(self) -> str:
        return f"{self.label} of stage {self.stage} on worker {self.worker}"


Schedule = list[list[Action]]
ScheduleFn = Callable[[int, int], Schedule]


def _action(kind: str, stage: int, mb: int, p: int) -> Action:
    """An action of the one-stage-per-worker layout, with its neighbours as peers."""
    prev = (stage - 1,) if stage > 0 else ()
    nxt = (stage + 1,) if stage < p - 1 else ()
    if kind == "F":
        return Action(stage, stage, "F", mb, sends=nxt, receives=prev)
    return Action(stage, stage, "B", mb, sends=prev, receives=nxt)


def _check_sizes(stages: int, microbatches: int) -> None:
    for name, v in (("stages", stages), ("microbatches", microbatches)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{name} must be an int >= 1, got {v!r}")


def gpipe(stages: int, microbatches: int) -> Schedule:
    """GPipe: every worker runs all forwards, then all backwards (activations of all ``m``
    micro-batches are held at once)."""
    _check_sizes(stages, microbatches)
    p, m = stages, microbatches
    return [
        [_action("F", s, i, p) for i in range(m)] + [_action("B", s, i, p) for i in range(m)]
        for s in range(p)
    ]


def one_f_one_b(stages: int, microbatches: int) -> Schedule:
    """1F1B (PipeDream-flush): stage ``s`` runs ``p - s - 1`` warm-up forwards, then alternates
    one forward and one backward, then drains; it holds at most ``p - s`` micro-batches."""
    _check_sizes(stages, microbatches)
    p, m = stages, microbatches
    out = []
    for s in range(p):
        warm = min(p - s - 1, m)
        acts = [_action("F", s, i, p) for i in range(warm)]
        for i in range(m - warm):
            acts += [_action("F", s, warm + i, p), _action("B", s, i, p)]
        acts += [_action("B", s, i, p) for i in range(m - warm, m)]
        out.append(acts)
    return out


#: Schedules by name: each is a function ``(stages, microbatches) -> per-worker action lists``.
SCHEDULES: dict[str, ScheduleFn] = {"gpipe": gpipe, "1f1b": one_f_one_b}


def make_schedule(name: str, stages: int, microbatches: int) -> Schedule:
    """The schedule ``name`` (a key of :data:`SCHEDULES`) for ``stages`` x ``microbatches``,
    validated."""
    fn = SCHEDULES.get(name)
    if fn is None:
        raise ConfigError(f"unknown pipeline schedule {name!r}; choose from {sorted(SCHEDULES)}")
    sched = fn(stages, microbatches)
    validate(sched)
    return sched


def _deps(act: Action, num_stages: int) -> list[tuple[str, int, int]]:
    """(kind, stage, micro-batch) of the actions ``act`` needs first."""
    s, i = act.stage, act.microbatch
    if act.kind == "F":
        return [("F", s - 1, i)] if s > 0 else []
    deps = [("F", s, i)]
    if s < num_stages - 1:
        deps.append(("B", s + 1, i))
    return deps


def _index(schedule: Schedule) -> tuple[dict[tuple[str, int, int], Action], int, int]:
    """Every action by (kind, stage, micro-batch), checked for shape; and (stages, micro-batches)."""
    if not isinstance(schedule, Sequence) or not schedule:
        raise ScheduleError("a schedule is a non-empty list with one action list per worker")
    by_key: dict[tuple[str, int, int], Action] = {}
    workers = len(schedule)
    for w, acts in enumerate(schedule):
        for pos, act in enumerate(acts):
            if not isinstance(act, Action):
                raise ScheduleError(f"worker {w}, position {pos}: {act!r} is not an Action")
            if act.worker != w:
                raise ScheduleError(f"{act} is listed for worker {w} (position {pos})")
            if act.kind not in ("F", "B"):
                raise ScheduleError(f"{act}: kind must be 'F' or 'B', got {act.kind!r}")
            if act.stage < 0 or act.microbatch < 0:
                raise ScheduleError(f"{act}: stage and micro-batch must be >= 0")
            bad = [x for x in act.sends + act.receives if not 0 <= x < workers]
            if bad:
                raise ScheduleError(f"{act} names worker {bad[0]}, outside 0..{workers - 1}")
            key = (act.kind, act.stage, act.microbatch)
            if key in by_key:
                raise ScheduleError(f"{act} appears twice (also as {by_key[key]})")
            by_key[key] = act
    if not by_key:
        raise ScheduleError("the schedule has no actions")
    num_stages = 1 + max(k[1] for k in by_key)
    num_mb = 1 + max(k[2] for k in by_key)
    return by_key, num_stages, num_mb


def validate(schedule: Schedule) -> tuple[int, int]:
    """Check ``schedule`` and return its (stages, micro-batches).

    Every stage runs F and B of every micro-batch exactly once; each dependency (F of stage s
    needs F of s-1; B of s needs B of s+1 and F of s) that crosses workers is listed in the
    producer's ``sends`` and the consumer's ``receives``; and running the lists in order
    finishes (no worker waits forever). Raises :class:`ScheduleError` naming the action.
    """
    by_key, p, m = _index(schedule)
    for kind, s, i in itertools.product("FB", range(p), range(m)):
        if (kind, s, i) not in by_key:
            raise ScheduleError(
                f"{kind}{i} of stage {s} is missing: every stage must run F and B of each of "
                f"the {m} micro-batches"
            )
    for act in by_key.values():
        for dep_key in _deps(act, p):
            dep = by_key[dep_key]
            if dep.worker == act.worker:
                continue
            if act.worker not in dep.sends:
                raise ScheduleError(
                    f"{act} needs {dep}, which does not list worker {act.worker} in its sends"
                )
            if dep.worker not in act.receives:
                raise ScheduleError(
                    f"{act} needs {dep} but does not list worker {dep.worker} in its receives"
                )
    _run(schedule, by_key, p, lambda a: 1.0, lambda d, a: 0.0)  # raises on deadlock
    return p, m


def _run(
    schedule: Schedule,
    by_key: Mapping[tuple[str, int, int], Action],
    num_stages: int,
    duration: Callable[[Action], float],
    latency: Callable[[Action, Action], float],
) -> dict[Action, tuple[float, float]]:
    """Time every action: it starts when its worker is free and each input has arrived (its
    producer's end, plus ``latency`` when the producer is on another worker)."""
    times: dict[Action, tuple[float, float]] = {}
    pc = [0] * len(schedule)
    free = [0.0] * len(schedule)
    left = sum(map(len, schedule))
    while left:
        progressed = False
        for w, acts in enumerate(schedule):
            while pc[w] < len(acts):
                act = acts[pc[w]]
                deps = [by_key[k] for k in _deps(act, num_stages)]
                if any(d not in times for d in deps):
                    break
                ready = max(
                    [free[w]]
                    + [times[d][1] + (latency(d, act) if d.worker != w else 0.0) for d in deps]
                )
                times[act] = (ready, ready + duration(act))
                free[w] = times[act][1]
                pc[w] += 1
                left -= 1
                progressed = True
        if not progressed:
            stuck = []
            for w, acts in enumerate(schedule):
                if pc[w] < len(acts):
                    act = acts[pc[w]]
                    waits = [
                        f"{d} (later in its own list)" if d.worker == w else str(d)
                        for d in (by_key[k] for k in _deps(act, num_stages))
                        if d not in times
                    ]
                    stuck.append(f"{act} waits for {' and '.join(waits)}")
            raise ScheduleError("the schedule deadlocks: " + "; ".join(stuck))
    return times


@dataclass(frozen=True)
class SimResult:
    """Timing of a simulated schedule."""

    #: (start, end) of every action.
    times: Mapping[Action, tuple[float, float]]
    makespan: float
    #: Busy time per worker.
    busy: tuple[float, ...]

    @property
    def bubble(self) -> float:
        """Fraction of worker time spent idle before the makespan."""
        total = self.makespan * len(self.busy)
        return 1.0 - sum(self.busy) / total if total > 0 else 0.0


def _per_stage(value: float | Sequence[float], p: int, name: str) -> list[float]:
    vals = [float(value)] * p if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(vals) != p:
        raise ConfigError(f"{name} needs one time per stage ({p}), got {len(vals)}")
    if any(not v >= 0 for v in vals):
        raise ConfigError(f"{name} must be >= 0 seconds, got {vals}")
    return vals


def simulate(
    schedule: Schedule,
    f_time: float | Sequence[float],
    b_time: float | Sequence[float],
    overhead: float = 0.0,
    transfer: float = 0.0,
) -> SimResult:
    """Simulate ``schedule``: F takes ``f_time`` (a number or one per stage), B ``b_time``,
    each action ``overhead`` more; an input from another worker arrives ``transfer`` after
    its producer ends. Each worker runs its list in order, as early as its inputs allow."""
    by_key, p, _ = _index(schedule)
    validate(schedule)
    f = _per_stage(f_time, p, "f_time")
    b = _per_stage(b_time, p, "b_time")

    def duration(a: Action) -> float:
        return overhead + (f[a.stage] if a.kind == "F" else b[a.stage])

    times = _run(schedule, by_key, p, duration, lambda d, a: transfer)
    makespan = max(e for _, e in times.values())
    busy = tuple(sum(times[a][1] - times[a][0] for a in acts) for acts in schedule)
    return SimResult(times, makespan, busy)


def grid(schedule: Schedule, f_slots: int = 1, b_slots: int = 1) -> str:
    """The schedule as text: one row per worker, one column per time slot (F taking
    ``f_slots`` slots, B ``b_slots``), cells like ``F3``/``B1``, ``.`` where the worker idles."""
    for name, v in (("f_slots", f_slots), ("b_slots", b_slots)):
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be an int >= 1, got {v!r}")
    res = simulate(schedule, f_slots, b_slots)
    slots = round(res.makespan)
    rows = [["."] * slots for _ in schedule]
    for act, (start, end) in res.times.items():
        for t in range(round(start), round(end)):
            rows[act.worker][t] = act.label
    width = max(len(c) for row in rows for c in row)
    label = len(f"w{len(schedule) - 1}")
    lines = [(" " * label + " " + " ".join(f"{t:<{width}}"[:width] for t in range(slots))).rstrip()]
    lines += [
        f"{'w' + str(w):<{label}} " + " ".join(f"{c:<{width}}" for c in row).rstrip()
        for w, row in enumerate(rows)
    ]
    return "\n".join(lines)


def peak_inflight(schedule: Schedule) -> list[int]:
    """Per worker: the most micro-batches whose activations it holds at once (F run, B not)."""
    validate(schedule)
    peaks = []
    for acts in schedule:
        held = peak = 0
        for act in acts:
            held += 1 if act.kind == "F" else -1
            peak = max(peak, held)
        peaks.append(peak)
    return peaks


# --- the step-time predictor -------------------------------------------------------------------


@dataclass(frozen=True)
class StepEstimate:
    """A predicted step: wall time and what it is made of (seconds)."""

    seconds: float
    #: Compute plus call overhead of the busiest worker: the step with no waiting at all.
    busiest: float
    #: Idle fraction of the workers over the step.
    bubble: float
    #: Transfer time of one activation (= one gradient) over each stage boundary.
    transfers: tuple[float, ...]
    #: The actions on the critical path, first to last.
    critical_path: tuple[Action, ...]


def estimate_step(
    schedule: Schedule,
    stage_f: float | Sequence[float],
    stage_b: float | Sequence[float],
    call_overhead: float = 0.0,
    transfer_bytes: float | Sequence[float] = 0.0,
    bandwidth: float = float("inf"),
) -> StepEstimate:
    """Predict a step's wall time: the longest path through the schedule's actions.

    Each action costs its stage's forward (``stage_f``) or backward (``stage_b``) time per
    micro-batch plus ``call_overhead``; the edges between consecutive actions of a worker cost
    nothing, and an edge from another worker costs ``transfer_bytes`` of the boundary it
    crosses (one number, or one per boundary ``s -> s+1``, the same bytes flowing back as the
    gradient) divided by ``bandwidth`` bytes per second. Transfers overlap compute.
    """
    by_key, p, _ = _index(schedule)
    validate(schedule)
    f = _per_stage(stage_f, p, "stage_f")
    b = _per_stage(stage_b, p, "stage_b")
    if isinstance(transfer_bytes, (int, float)):
        sizes = [float(transfer_bytes)] * max(p - 1, 0)
    else:
        sizes = [float(x) for x in transfer_bytes]
    if len(sizes) != max(p - 1, 0) or any(not x >= 0 for x in sizes):
        raise ConfigError(
            f"transfer_bytes needs one size >= 0 per stage boundary ({p - 1}), got {sizes}"
        )
    if not bandwidth > 0:
        raise ConfigError(f"bandwidth must be > 0 bytes per second, got {bandwidth!r}")
    hop = tuple(x / bandwidth for x in sizes)

    # Longest path over an explicit DAG (worker order edges + dependency edges), visiting
    # actions in an order that respects both: the simulation's finishing order.
    order = sorted(
        _run(schedule, by_key, p, lambda a: 1.0, lambda d, a: 0.0).items(),
        key=lambda kv: (kv[1][1], kv[0].worker),
    )
    prev_on_worker: dict[Action, Action] = {}
    for acts in schedule:
        for x, y in itertools.pairwise(acts):
            prev_on_worker[y] = x
    end: dict[Action, float] = {}
    pred: dict[Action, Action | None] = {}
    for act, _ in order:
        best, via = 0.0, None
        edges: list[tuple[Action, float]] = []
        if act in prev_on_worker:
            edges.append((prev_on_worker[act], 0.0))
        for k in _deps(act, p):
            d = by_key[k]
            if d.worker != act.worker:
                edges.append((d, hop[min(d.stage, act.stage)]))
        for d, lag in edges:
            if end[d] + lag > best:
                best, via = end[d] + lag, d
        cost = call_overhead + (f[act.stage] if act.kind == "F" else b[act.stage])
        end[act] = best + cost
        pred[act] = via
    last = max(end, key=end.__getitem__)
    path: list[Action] = []
    cur: Action | None = last
    while cur is not None:
        path.append(cur)
        cur = pred[cur]
    seconds = end[last]
    busy = [
        sum(call_overhead + (f[a.stage] if a.kind == "F" else b[a.stage]) for a in acts)
        for acts in schedule
    ]
    bubble = 1.0 - sum(busy) / (seconds * len(busy)) if seconds > 0 else 0.0
    return StepEstimate(seconds, max(busy), bubble, hop, tuple(reversed(path)))
