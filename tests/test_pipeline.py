"""Pipeline parallelism without a runtime: the stage partitioner, schedules as data, their
simulation and the step-time predictor; and the simulated-compute ops (locally and on Ray)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from graphs import random_graphs
from hypothesis import HealthCheck, given, settings

import distgraph as dg
from distgraph import pipeline as pl
from distgraph.cost import CostModel
from distgraph.models import mlp_classifier, seed_graph
from distgraph.pipeline import (
    SCHEDULES,
    Action,
    ScheduleError,
    estimate_step,
    gpipe,
    grid,
    make_schedule,
    one_f_one_b,
    peak_inflight,
    pipeline_stages,
    simulate,
    stage_profile,
    stage_times,
    validate,
)
from distgraph.program import compile_program
from distgraph.simops import SIM_LAYER, SimCostModel, sim_chain

#: Slow transfers, so where the cut falls changes the stage times.
SLOW_LINK = CostModel(flops_per_second=1e6, bytes_per_second=2e4, batch_size=8)


def deep_mlp(hidden: int = 8, width: int = 256):
    g = mlp_classifier((64,) + (width,) * hidden + (10,))
    return compile_program(g, grad="loss")


def stage_sequence(prog, placement):
    """Stages of the forward ops in topological order."""
    return [
        placement[n]
        for n in prog.order
        if prog.nodes[n].phase == "forward" and prog.nodes[n].op not in ("input", "param", "const")
    ]


# --- the partition strategy --------------------------------------------------------------------


def test_pipeline_is_a_registered_strategy():
    assert "pipeline" in dg.STRATEGIES
    prog = deep_mlp()
    via_registry = dg.partition(prog, 4, "pipeline", CostModel(batch_size=64))
    direct = pl.pipeline(prog, 4, CostModel(batch_size=64))
    assert via_registry == direct
    assert set(via_registry) == set(prog.order)


@pytest.mark.parametrize("workers", [2, 3, 4, 8])
def test_stages_are_contiguous_balanced_and_use_every_worker(workers):
    prog = deep_mlp()
    cost = CostModel(batch_size=64)
    cut = pipeline_stages(prog, workers, cost)
    placement = cut.placement
    # Precondition: a real pipeline, every worker a stage.
    assert set(placement.values()) == set(range(workers))
    seq = stage_sequence(prog, placement)
    assert seq == sorted(seq), "stages must be contiguous runs of the topological order"
    assert seq[0] == 0 and seq[-1] == workers - 1
    # Balanced: the slowest stage is within one position's work of the even share (the bound
    # a contiguous cut can always reach), and far below doing everything on one stage.
    fwd, anchor = pl._anchors(prog)
    weight, _ = pl._stage_inputs(prog, cost, anchor, len(fwd))
    total = float(weight.sum())
    assert math.isclose(sum(cut.compute), total, rel_tol=1e-9)
    assert max(cut.compute) <= total / workers + weight.max() + 1e-12
    assert max(cut.compute) < total / workers * 1.25 or workers == 8  # 8 stages: 9 layers


def test_four_stage_mlp_is_as_even_as_its_layers_allow():
    prog = deep_mlp()
    cut = pipeline_stages(prog, 4, CostModel(batch_size=64))
    # 7 equal 256x256 layers between a small first and last layer: 2, 2, 2, 1 + the small ones.
    layers_per_stage = [
        sum(
            1
            for n, w in cut.placement.items()
            if w == s and prog.nodes[n].op == "matmul" and prog.nodes[n].phase == "forward"
        )
        for s in range(4)
    ]
    assert sorted(layers_per_stage) == [2, 2, 2, 3], layers_per_stage
    assert max(cut.compute) / min(cut.compute) < 1.8


def test_backward_nodes_run_on_their_forward_nodes_worker():
    prog = deep_mlp()
    placement = dg.partition(prog, 4, "pipeline", CostModel(batch_size=64))
    assert set(placement.values()) == set(range(4))
    checked = 0
    for n in prog.order:
        node = prog.nodes[n]
        if node.phase != "backward" or node.origin is None:
            continue
        origin = prog.nodes[node.origin]
        if origin.op in ("input", "param", "const"):
            # A leaf's gradient sum sits with the leaf, which sits with its first consumer.
            assert placement[n] == placement[node.origin], n
            continue
        assert placement[n] == placement[node.origin], (n, node.origin)
        checked += node.op == "vjp"
    assert checked >= 20  # every layer's matmul, add and relu VJPs


def brute_force(prog, p, cost):
    """The best bottleneck over every contiguous cut, evaluated from the placement itself."""
    fwd, anchor = pl._anchors(prog)
    n = len(fwd)
    results = []
    for cuts in itertools.combinations(range(1, n), p - 1):
        starts = np.array((0, *cuts))
        stage_of = np.searchsorted(starts, np.arange(n), side="right") - 1
        placement = {name: int(stage_of[a]) for name, a in zip(prog.order, anchor.tolist())}
        compute, receive = stage_times(prog, placement, p, cost)
        results.append(max(c + r for c, r in zip(compute, receive)))
    return results


def skip_graph(seed: int) -> dg.Graph:
    """A random chain with skip connections and layers of different widths (so both the
    compute and the bytes crossing each cut vary)."""
    rng = np.random.default_rng(seed)
    g = dg.Graph()
    x = g.input("x", shape=(None, 4))
    hs = [x]
    for i in range(int(rng.integers(5, 10))):
        h = hs[-1]
        width = int(rng.choice([2, 4, 16, 64]))
        w = g.param(f"w{i}", rng.standard_normal((h.shape[-1], width)) / 4)
        h = dg.tanh(h @ w)
        j = int(rng.integers(0, len(hs)))
        if rng.random() < 0.4 and hs[j].shape == h.shape:
            h = h + hs[j]  # a skip connection, possibly over several layers
        hs.append(h)
    g.output("loss", dg.mean(hs[-1] * hs[-1]))
    return g


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("p", [2, 3, 4])
def test_dp_optimum_equals_brute_force_on_skip_chains(seed, p):
    prog = compile_program(skip_graph(seed), grad="loss")
    cut = pipeline_stages(prog, p, SLOW_LINK)
    options = brute_force(prog, p, SLOW_LINK)
    # Precondition: the cut matters (the candidates differ) and transfers are part of it.
    assert max(options) > min(options) * 1.05
    assert any(r > 0 for r in cut.receive)
    assert math.isclose(cut.bottleneck, min(options), rel_tol=1e-9), (cut, min(options))


def test_dp_optimum_equals_brute_force_on_random_dags():
    checked = []

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(built=random_graphs(max_nodes=12))
    def check(built):
        g, _, out = built
        prog = compile_program(g, grad=out)
        for p in (2, 3):
            if len(pl._anchors(prog)[0]) < p:
                continue
            cut = pipeline_stages(prog, p, SLOW_LINK)
            assert math.isclose(cut.bottleneck, min(brute_force(prog, p, SLOW_LINK)), rel_tol=1e-9)
            checked.append(p)

    check()
    assert len(checked) >= 20  # precondition: most examples were big enough to cut


def test_grouped_positions_cut_at_group_starts_optimally(monkeypatch):
    """Past MAX_CUT_POSITIONS forward ops, cuts are chosen among group starts: still the
    optimum over those cuts."""
    prog = compile_program(skip_graph(3), grad="loss")
    n = len(pl._anchors(prog)[0])
    monkeypatch.setattr(pl, "MAX_CUT_POSITIONS", 5)
    assert n > 5  # precondition: grouping happens
    cut = pipeline_stages(prog, 3, SLOW_LINK)
    starts = [min(k for k in range(n) if k * 5 // n == b) for b in range(5)]
    assert set(cut.cuts) <= set(starts)
    _, anchor = pl._anchors(prog)
    best = math.inf
    for cuts in itertools.combinations(starts[1:], 2):
        b = np.array((0, *cuts))
        stage_of = np.searchsorted(b, np.arange(n), side="right") - 1
        placement = {name: int(stage_of[a]) for name, a in zip(prog.order, anchor.tolist())}
        c, r = stage_times(prog, placement, 3, SLOW_LINK)
        best = min(best, max(x + y for x, y in zip(c, r)))
    assert math.isclose(cut.bottleneck, best, rel_tol=1e-9)


def test_fewer_forward_ops_than_workers_leaves_workers_idle():
    g, _ = seed_graph()
    prog = compile_program(g, grad="z")
    placement = dg.partition(prog, 4, "pipeline")
    assert set(placement.values()) == {0, 1}  # two forward ops: mul, add


def test_cli_explain_takes_the_pipeline_strategy(capsys):
    from distgraph.cli import main

    assert main(["explain", "mlp", "--workers", "2", "--strategy", "pipeline"]) == 0
    out = capsys.readouterr().out
    assert "strategy 'pipeline'" in out


# --- schedules ---------------------------------------------------------------------------------

SIZES = [(p, m) for p in range(1, 7) for m in range(1, 11)]


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("p,m", SIZES)
def test_schedules_are_valid_and_bubble_is_the_formula(name, p, m):
    sched = make_schedule(name, p, m)
    assert validate(sched) == (p, m)
    assert [len(acts) for acts in sched] == [2 * m] * p
    formula = (p - 1) / (m + p - 1)
    unit = simulate(sched, 1.0, 1.0)
    assert unit.makespan == 2 * (m + p - 1)
    assert math.isclose(unit.bubble, formula, abs_tol=1e-12)
    # Backward twice as slow as forward: the same bubble, every slot 3 units.
    slow_b = simulate(sched, 1.0, 2.0)
    assert slow_b.makespan == 3 * (m + p - 1)
    assert math.isclose(slow_b.bubble, formula, abs_tol=1e-12)


@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (3, 3), (4, 2), (5, 16)])
def test_peak_inflight_gpipe_holds_m_and_1f1b_at_most_p(p, m):
    assert peak_inflight(gpipe(p, m)) == [m] * p
    peaks = peak_inflight(one_f_one_b(p, m))
    assert peaks == [min(p - s, m) for s in range(p)]
    assert max(peaks) <= p
    if m > p:  # precondition for the saving: more micro-batches than stages
        assert max(peaks) < m


def test_grid_draws_the_familiar_pictures():
    assert grid(gpipe(3, 2)) == "\n".join(
        [
            "   0  1  2  3  4  5  6  7",
            "w0 F0 F1 .  .  .  .  B0 B1",
            "w1 .  F0 F1 .  .  B0 B1 .",
            "w2 .  .  F0 F1 B0 B1 .  .",
        ]
    )
    assert grid(one_f_one_b(3, 4)) == "\n".join(
        [
            "   0  1  2  3  4  5  6  7  8  9  10 11",
            "w0 F0 F1 F2 .  .  B0 F3 B1 .  B2 .  B3",
            "w1 .  F0 F1 .  B0 F2 B1 F3 B2 .  B3 .",
            "w2 .  .  F0 B0 F1 B1 F2 B2 F3 B3 .  .",
        ]
    )
    # Slots of different length: a B takes two.
    assert grid(gpipe(2, 1), b_slots=2).splitlines()[1:] == [
        "w0 F0 .  .  .  B0 B0",
        "w1 .  F0 B0 B0 .  .",
    ]


def test_adding_a_schedule_is_adding_a_function(monkeypatch):
    def backwards_first_gpipe(p, m):
        # GPipe with the backward micro-batches in reverse order: still valid.
        return [acts[:m] + acts[m:][::-1] for acts in gpipe(p, m)]

    monkeypatch.setitem(SCHEDULES, "reverse", backwards_first_gpipe)
    sched = make_schedule("reverse", 3, 4)
    assert [a.label for a in sched[0]][4:] == ["B3", "B2", "B1", "B0"]
    with pytest.raises(dg.ConfigError, match=r"unknown pipeline schedule 'zb'.*'1f1b'"):
        make_schedule("zb", 3, 4)


def test_validate_names_a_missing_action():
    sched = gpipe(3, 2)
    sched[1] = [a for a in sched[1] if a.label != "B1"]
    with pytest.raises(ScheduleError, match="B1 of stage 1 is missing"):
        validate(sched)


def test_validate_names_a_repeated_action():
    sched = gpipe(2, 2)
    sched[0].append(sched[0][0])
    with pytest.raises(ScheduleError, match="F0 of stage 0 on worker 0 appears twice"):
        validate(sched)


def test_validate_refuses_a_deadlock_and_names_who_waits():
    sched = gpipe(2, 2)
    # Worker 0 insists on its first backward before its first forward: nobody can move.
    sched[0] = [sched[0][2], *sched[0][:2], sched[0][3]]
    with pytest.raises(ScheduleError) as info:
        validate(sched)
    msg = str(info.value)
    assert "deadlocks" in msg
    assert (
        "B0 of stage 0 on worker 0 waits for F0 of stage 0 on worker 0 (later in its own list)"
        " and B0 of stage 1 on worker 1"
    ) in msg
    assert "F0 of stage 1 on worker 1 waits for F0 of stage 0 on worker 0" in msg


def test_validate_refuses_a_dependency_nobody_sends():
    sched = one_f_one_b(3, 2)
    f = sched[1][0]
    assert f.label == "F0"
    sched[1][0] = Action(f.worker, f.stage, f.kind, f.microbatch, sends=f.sends, receives=())
    with pytest.raises(ScheduleError, match=r"F0 of stage 1 on worker 1 needs F0 of stage 0"):
        validate(sched)
    sched = one_f_one_b(3, 2)
    b = next(a for a in sched[2] if a.label == "B1")
    sched[2][sched[2].index(b)] = Action(b.worker, b.stage, "B", 1, sends=(), receives=())
    with pytest.raises(
        ScheduleError, match=r"B1 of stage 1 on worker 1 needs B1 of stage 2.*sends"
    ):
        validate(sched)


def test_validate_refuses_an_action_on_the_wrong_worker():
    sched = gpipe(2, 1)
    sched[0][0] = Action(1, 0, "F", 0, sends=(1,))
    with pytest.raises(ScheduleError, match="is listed for worker 0"):
        validate(sched)


def test_schedule_sizes_are_checked():
    with pytest.raises(dg.ConfigError, match="microbatches must be an int >= 1"):
        gpipe(2, 0)
    with pytest.raises(dg.ConfigError, match="stages must be an int >= 1"):
        one_f_one_b(0, 3)


def test_simulate_adds_overhead_and_transfers_to_the_ideal():
    p, m, f, b, o, t = 4, 8, 2.0, 4.0, 0.5, 0.25
    res = simulate(gpipe(p, m), f, b, overhead=o, transfer=t)
    # Fill and drain cross p-1 boundaries each way; every slot pays the call overhead.
    assert math.isclose(res.makespan, (m + p - 1) * (f + b + 2 * o) + 2 * (p - 1) * t)
    assert res.busy == (m * (f + b + 2 * o),) * p


# --- the step-time predictor -------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("p,m", [(1, 1), (2, 3), (4, 8), (5, 4), (8, 16)])
def test_estimate_step_agrees_with_simulation(name, p, m):
    rng = np.random.default_rng(p * 100 + m)
    f = rng.uniform(0.01, 0.03, p).tolist()
    b = rng.uniform(0.02, 0.06, p).tolist()
    nbytes, bandwidth, overhead = 4e5, 1e8, 1e-3
    sched = make_schedule(name, p, m)
    est = estimate_step(sched, f, b, overhead, nbytes, bandwidth)
    sim = simulate(sched, f, b, overhead=overhead, transfer=nbytes / bandwidth)
    assert math.isclose(est.seconds, sim.makespan, rel_tol=1e-12)
    assert math.isclose(est.bubble, sim.bubble, rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(est.busiest, max(sim.busy), rel_tol=1e-12)
    # The critical path runs from the first forward to the last backward of stage 0.
    assert est.critical_path[0].label == "F0" and est.critical_path[0].stage == 0
    assert est.critical_path[-1].kind == "B" and est.critical_path[-1].stage == 0


def test_estimate_step_closed_form_with_uneven_links():
    p, m, f, b, o = 4, 8, 0.02, 0.04, 1e-3
    sizes = [1e6, 4e6, 2e6]
    bandwidth = 1e9
    est = estimate_step(gpipe(p, m), f, b, o, sizes, bandwidth)
    hops = sum(sizes) / bandwidth
    assert math.isclose(est.seconds, (m + p - 1) * (f + b + 2 * o) + 2 * hops, rel_tol=1e-12)
    ideal = estimate_step(gpipe(p, m), f, b)
    assert math.isclose(ideal.seconds, (m + p - 1) * (f + b), rel_tol=1e-12)
    assert math.isclose(ideal.bubble, (p - 1) / (m + p - 1), rel_tol=1e-12)


def test_stage_profile_feeds_the_predictor():
    """From a placed sim chain to a predicted step: 8 layers of 2 ms forward / 4 ms backward
    on 4 stages, 1F1B over 8 micro-batches: (m + p - 1) slots of 2 layers' work."""
    g = sim_chain(8, f_ms=2, b_ms=4, width=16)
    prog = compile_program(g, grad="loss")
    cost = SimCostModel(batch_size=32, bytes_per_second=1e9)
    cut = pipeline_stages(prog, 4, cost)
    assert len(set(cut.placement.values())) == 4  # precondition: 4 real stages
    prof = stage_profile(prog, cut.placement, 4, cost)
    assert prof.forward == pytest.approx([0.004] * 4, abs=1e-4)
    assert prof.backward == pytest.approx([0.008] * 4, abs=1e-4)
    assert prof.boundary_bytes == (32 * 16 * 8,) * 3  # one (32, 16) float64 activation each
    est = estimate_step(
        one_f_one_b(4, 8), prof.forward, prof.backward, 0.0, prof.boundary_bytes, 1e9
    )
    per_stage = [f + b for f, b in zip(prof.forward, prof.backward)]
    # Lower bounds: micro-batch 0 there and back; the busiest stage's 8 micro-batches.
    assert est.seconds >= sum(per_stage) + 2 * 3 * 4096 / 1e9 - 1e-12
    assert est.seconds >= 8 * max(per_stage) - 1e-12
    assert est.seconds == pytest.approx(11 * (0.004 + 0.008), rel=0.01)


def test_estimate_step_refuses_bad_inputs():
    with pytest.raises(dg.ConfigError, match="transfer_bytes needs one size"):
        estimate_step(gpipe(3, 2), 1.0, 1.0, 0.0, [1.0], 1.0)
    with pytest.raises(dg.ConfigError, match="stage_f needs one time per stage"):
        estimate_step(gpipe(3, 2), [1.0, 2.0], 1.0)
    with pytest.raises(dg.ConfigError, match="bandwidth must be > 0"):
        estimate_step(gpipe(3, 2), 1.0, 1.0, 0.0, 1.0, 0.0)


# --- simulated compute -------------------------------------------------------------------------


def test_sim_layer_is_a_registered_custom_op():
    from distgraph.ops import BUILTIN_OPS, OPS

    assert SIM_LAYER in OPS and SIM_LAYER not in BUILTIN_OPS


def test_sim_chain_values_and_gradients_are_exact():
    ws = [1.5, 2.0, -0.5, 3.0]
    g = sim_chain(4, f_ms=0, b_ms=0, weights=ws)
    x = np.array([[1.0], [2.0], [3.0]])
    res = dg.LocalExecutor().run(g, {"x": x}, outputs=["y", "loss"], grad="loss")
    prod = math.prod(ws)
    assert np.array_equal(res.values["y"], x * prod)
    assert res.values["loss"] == pytest.approx(np.mean(x) * prod, rel=1e-15)
    for i, w in enumerate(ws):
        np.testing.assert_allclose(res.grads[f"w{i}"], [np.mean(x) * prod / w], rtol=1e-15)
    np.testing.assert_allclose(res.grads["x"], np.full((3, 1), prod / 3), rtol=1e-15)
    dg.testing.check_grads(g, {"x": x}, of="loss")


def test_sim_layer_sleeps_its_configured_time(monkeypatch):
    from distgraph import simops

    slept: list[float] = []
    g = sim_chain(3, f_ms=[20, 30, 40], b_ms=[40, 60, 80], width=2)
    # (After building: dtype inference may run a kernel once per distinct attrs.)
    monkeypatch.setattr(simops, "_sleep_ms", slept.append)
    dg.LocalExecutor().run(g, {"x": np.ones((4, 2))}, outputs=["loss"], grad="loss")
    forward = [20, 30, 40]
    backward = [20, 20, 30, 30, 40, 40]  # b_ms split over the two VJPs
    assert sorted(slept) == pytest.approx(sorted(forward + backward))


def test_sim_cost_model_balances_sim_layers():
    # Three light layers and one three times as heavy: two stages split 3 | 1.
    g = sim_chain(4, f_ms=[10, 10, 10, 30], b_ms=[20, 20, 20, 60])
    prog = compile_program(g, grad="loss")
    cut = pipeline_stages(prog, 2, SimCostModel())
    assert [cut.placement[f"layer{i}"] for i in range(4)] == [0, 0, 0, 1]
    assert cut.compute == pytest.approx((0.09, 0.09), abs=1e-4)
    even = pipeline_stages(compile_program(sim_chain(8, 5, 10), grad="loss"), 4, SimCostModel())
    assert [even.placement[f"layer{i}"] for i in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_sim_chain_on_ray_matches_local_with_the_pipeline_strategy():
    from raysupport import ensure_ray

    ensure_ray()
    g = sim_chain(8, f_ms=2, b_ms=4, weights=[1.0, -2.0, 0.5, 1.5, 1.0, 2.0, -1.0, 0.25])
    feeds = {"x": np.arange(6.0).reshape(6, 1)}
    local = dg.LocalExecutor().run(g, feeds, outputs=["loss"], grad="loss")
    with dg.RayExecutor(
        num_workers=4, strategy="pipeline", cost=SimCostModel(), ops_modules=["distgraph.simops"]
    ) as ex:
        remote = ex.run(g, feeds, outputs=["loss"], grad="loss")
        # Precondition: the step really ran as a 4-stage pipeline.
        assert {c[0] for c in ex.last_calls} == {0, 1, 2, 3}
    assert np.array_equal(remote.values["loss"], local.values["loss"])
    for k in local.grads:
        assert np.array_equal(remote.grads[k], local.grads[k]), k
