"""The step-time predictor (``distgraph.predict``, ``plan.estimate``) against hand-computed
schedules, the calibration probe on Ray, and ``explain`` printing the prediction."""

from __future__ import annotations

import dataclasses
import math

import pytest

from distgraph.cost import Calibration, CostModel
from distgraph.errors import ConfigError
from distgraph.plan import plan_for
from distgraph.predict import SERVER, Call, plan_calls, simulate_calls
from distgraph.simops import SimCostModel, sim_chain
from distgraph.stageplan import build_stage_plan

#: Sim layers cost exactly their sleeps (no per-node overhead), so schedules are exact.
EXACT = dataclasses.replace(SimCostModel(), node_overhead=0.0)
FREE = Calibration(call_overhead_s=0.0, seconds_per_byte=0.0)


def sim_pipeline(p: int, m: int, f_ms: float, b_ms: float, schedule: str = "gpipe"):
    g = sim_chain(p, f_ms=f_ms, b_ms=b_ms)
    base = plan_for(
        g,
        grad="loss",
        num_workers=p,
        strategy="pipeline",
        training=True,
        cost=EXACT,
        batch_size=2 * m,
    )
    plan = build_stage_plan(base, m, schedule, 2 * m)
    assert plan.num_stages == p  # precondition: one layer per stage
    return plan


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_free_pipeline_is_the_schedule_formula(schedule):
    plan = sim_pipeline(4, 8, 20, 40, schedule)
    # (m + p - 1) slots of F + B: 11 x 60 ms.
    assert plan.estimate(calibration=FREE) == pytest.approx(0.660, abs=1e-6)


def test_pipelined_step_is_one_call_per_worker_holding_its_actions():
    """As the runtime submits it (pipelined.py): one call per worker, stage 0 first, each
    holding that worker's schedule actions in order, then the server's staging call."""
    plan = sim_pipeline(4, 8, 20, 40)
    calls = plan.calls()
    assert [c.worker for c in calls] == [*plan.stages, SERVER]
    for s, (call, acts) in enumerate(zip(calls, plan.schedule())):
        assert [a.label for a in call.actions] == [f"{x.label}@{s}" for x in acts]
        assert call.seconds == 0 and call.deps == () and call.awaited
    # F3 of stage 2 takes F3 of stage 1 (call 1), delivered worker to worker.
    f3 = next(a for a in calls[2].actions if a.label == "F3@2")
    ((src_call, src_pos, _bytes),) = f3.deps
    assert calls[src_call].actions[src_pos].label == "F3@1"


def test_gpipe_p4_m8_pays_one_call_per_worker_and_a_handoff_per_stage_boundary():
    """GPipe, p=4, m=8, 20/40 ms, by hand: every worker's one call starts at once and pays
    the call overhead c once; the critical path is F0 down the stages, F0..F7 on the last
    stage, B7..B0 there and B0 back up: 11 x 60 ms plus 2 (p - 1) = 6 hand-offs d (each
    action waits for the value the previous stage delivered), then the server's staging
    call (c more: a hop equal to a call leaves no latency) and the commit's submission."""
    plan = sim_pipeline(4, 8, 20, 40)
    c, d = 0.003, 0.001
    cal = Calibration(call_overhead_s=c, seconds_per_byte=0.0, hop_s=c, deliver_s=d)
    server = plan.calls()[-1]
    assert server.worker == SERVER and server.seconds < 1e-6
    expected = (8 + 4 - 1) * (0.020 + 0.040) + c + 6 * d + c + server.seconds
    # The loss (a mean over 2 rows) costs nanoseconds: that is the tolerance.
    assert plan.estimate(calibration=cal) == pytest.approx(expected, abs=1e-7)
    # The old model (one call per action, relayed by the driver) paid 22 calls here.
    assert plan.estimate(calibration=cal) < 0.660 + 22 * c


def test_gpipe_actions_pay_node_cost_not_call_overhead():
    """Per action inside a call: its nodes' kernel cost. On GPipe's critical path (stage s's
    F / B tasks run 1 / 2 nodes for s < 3; the last stage's 3 / 4 with the loss): F0 on
    stages 0-2 (3 nodes), F0..F7 on stage 3 (24), B7..B0 there (32), B0 on stages 2-0 (6)."""
    plan = sim_pipeline(4, 8, 20, 40)
    assert [len(t.nodes) for t in plan.tasks] == [1, 2, 1, 2, 1, 2, 3, 4]  # precondition
    nu = 0.001
    got = plan.estimate(calibration=Calibration(0.0, 0.0, node_s=nu))
    assert got == pytest.approx(0.660 + (3 + 24 + 32 + 6) * nu, abs=1e-7)


def test_gpipe_actions_pay_their_own_setup_once_each_on_the_critical_path():
    """``action_s`` (an action's setup and hand-on inside its call) is paid by each of the
    2 (m + p - 1) = 22 actions on GPipe's critical path, once: not a call each."""
    plan = sim_pipeline(4, 8, 20, 40)
    a = 0.002
    got = plan.estimate(calibration=Calibration(0.0, 0.0, action_s=a))
    assert got == pytest.approx(0.660 + 22 * a, abs=1e-7)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_handoff_latency_is_paid_on_every_cross_stage_edge_of_the_critical_path(schedule):
    """The hand-off constant is paid once per stage boundary the critical path crosses:
    2 (p - 1) for GPipe; 1F1B's path crosses more (its steady state alternates stages), and
    its count does not depend on the constant's size."""
    p = 4
    plan = sim_pipeline(p, 8, 20, 40, schedule)
    base = plan.estimate(calibration=FREE)

    def crossings(d: float) -> float:
        return (plan.estimate(calibration=Calibration(0.0, 0.0, deliver_s=d)) - base) / d

    n = crossings(0.001)
    # The loss costs nanoseconds, and shifts which path is longest by as much.
    assert n == pytest.approx(round(n), abs=1e-4) and crossings(0.002) == pytest.approx(n, abs=1e-4)
    if schedule == "gpipe":
        assert round(n) == 2 * (p - 1)
    else:
        assert round(n) > 2 * (p - 1)


def test_hop_latency_is_paid_by_the_driver_dispatched_calls_only():
    """A hop longer than a call delays what the driver dispatches: the workers' calls (all at
    once, so once on the path), the server's call (after the last gradient) and the reply;
    the hand-offs between actions never pass through the driver."""
    plan = sim_pipeline(4, 8, 20, 40)
    c, hop = 0.001, 0.004
    base = plan.estimate(calibration=Calibration(c, 0.0, hop_s=c))
    slow = plan.estimate(calibration=Calibration(c, 0.0, hop_s=hop))
    assert slow - base == pytest.approx(3 * (hop - c), abs=1e-9)


def test_an_action_waiting_for_a_later_action_of_its_own_call_deadlocks():
    from distgraph.predict import ActionCost

    calls = [
        Call(0, 0.0, actions=(ActionCost(0.01, deps=((1, 1, 0),)),)),
        Call(1, 0.0, actions=(ActionCost(0.01, deps=((0, 0, 0),)), ActionCost(0.01))),
    ]
    # Call 0's action waits for call 1's second action, which runs after call 1's first,
    # which waits for call 0's action: no order runs them.
    with pytest.raises(ConfigError, match="deadlock"):
        simulate_calls(calls, FREE)
    with pytest.raises(ConfigError, match="not an action of another call"):
        simulate_calls([Call(0, 0.0, actions=(ActionCost(0.0, deps=((0, 0, 0),)),))], FREE)


def test_serial_driver_makes_the_overhead_grow_with_workers():
    """The same work per worker costs more at more workers when the driver is serial."""
    cal = Calibration(0.001, 0.0, hop_s=0.002, driver_s=0.002, submit_s=0.0005)

    def overhead(n: int) -> float:
        calls = [Call(w, 0.05, awaited=True) for w in range(n)]
        return simulate_calls(calls, cal).seconds - 0.05

    assert overhead(2) < overhead(8) < overhead(32)
    # 32 calls each taking the driver 2 ms before it runs: the last one starts after 64 ms.
    assert overhead(32) >= 32 * 0.002


def test_data_parallel_step_is_the_slowest_replica_plus_the_update():
    """Replicas run side by side; the server's call waits for every gradient."""
    from distgraph.runtime.ray.replicas import replicate

    g = sim_chain(2, f_ms=10, b_ms=20)
    base = plan_for(g, grad="loss", num_workers=1, training=True, cost=EXACT)
    plan = replicate(base, 4)
    assert len(plan.tasks) == 4 and {t.worker for t in plan.tasks} == {0, 1, 2, 3}
    assert plan.estimate(calibration=FREE) == pytest.approx(0.060, abs=1e-6)
    c = 0.002
    # Each replica's one call, then the server's: two calls in a row.
    got = plan.estimate(calibration=Calibration(c, 0.0, hop_s=c))
    assert got == pytest.approx(0.060 + 2 * c, abs=1e-6)


def test_data_parallel_server_takes_the_gradients_by_nested_reference():
    """With replicas the runtime passes the server the gradient refs nested (server.py), so
    the driver dispatches its call at once instead of after the last gradient: with a
    driver of d per call, the 4th replica's call is dispatched at 4d and the server's call
    waits on the server for its gradient, no fifth dispatch after it."""
    from distgraph.predict import replicated
    from distgraph.runtime.ray.replicas import replicate

    g = sim_chain(2, f_ms=10, b_ms=20)
    base = plan_for(g, grad="loss", num_workers=1, training=True, cost=EXACT)
    plan = replicate(base, 4)
    assert replicated(plan) and not replicated(base)
    assert plan_calls(plan, EXACT)[-1].nested
    c, d = 0.002, 0.001
    got = plan.estimate(calibration=Calibration(c, 0.0, hop_s=c + d, driver_s=d))
    assert got == pytest.approx(4 * d + c + 0.060 + c, abs=1e-6)


def test_server_call_pays_per_gradient_dict_and_per_param_taker():
    """The staging call takes one gradient dict per replica and returns params to each of
    the 4 workers: 3 objects in beyond the first, 4 out beyond the staged update."""
    from distgraph.runtime.ray.replicas import replicate

    g = sim_chain(2, f_ms=10, b_ms=20)
    plan = replicate(plan_for(g, grad="loss", num_workers=1, training=True, cost=EXACT), 4)
    assert all(plan.resident[w] for w in range(4))  # precondition: every worker takes params
    server = plan_calls(plan, EXACT)[-1]
    assert server.worker == SERVER and server.objects == 3 + 4
    got = plan.estimate(calibration=Calibration(0.0, 0.0, object_s=0.001))
    assert got == pytest.approx(0.060 + 7 * 0.001, abs=1e-6)


def test_each_node_of_a_call_pays_the_blocking_kernel_cost():
    calls = [Call(0, 0.01, nodes=3, awaited=True)]
    cal = Calibration(0.001, 0.0, node_s=0.002)
    assert simulate_calls(calls, cal).seconds == pytest.approx(0.01 + 0.001 + 3 * 0.002)


def test_transfers_cost_their_bytes():
    calls = [Call(0, 0.01), Call(1, 0.01, deps=((0, 1_000_000),), awaited=True)]
    cal = Calibration(0.0, seconds_per_byte=1e-8)
    assert simulate_calls(calls, cal).seconds == pytest.approx(0.02 + 0.01)


def test_calls_must_come_in_submission_order():
    with pytest.raises(ConfigError, match="submission order"):
        simulate_calls([Call(0, 0.0, deps=((1, 0),)), Call(1, 0.0)], FREE)


def test_bad_calibration_constants_are_refused():
    with pytest.raises(ConfigError, match="driver_s"):
        simulate_calls([Call(0, 0.0)], Calibration(0.0, 0.0, driver_s=math.nan))


def test_default_constants_come_from_the_cost_model():
    cost = CostModel(call_overhead=0.002, bytes_per_second=1e8)
    cal = Calibration.from_cost(cost)
    assert not cal.measured
    assert cal.call_overhead_s == 0.002 and cal.seconds_per_byte == pytest.approx(1e-8)
    assert "default constants" in cal.describe()


def test_explain_prints_the_prediction_and_its_constants():
    plan = sim_pipeline(4, 8, 20, 40)
    text = plan.explain()
    assert f"predicted step: {plan.estimate() * 1e3:.3f} ms" in text
    assert "default constants" in text
    cal = Calibration(0.003, 1e-9, hop_s=0.004, workers=4, measured=True, load=1.5)
    text = plan.explain(cal)
    assert f"predicted step: {plan.estimate(calibration=cal) * 1e3:.3f} ms" in text
    assert "calibrated on 4 workers at load 1.5" in text
    assert "schedule alone (free calls and transfers): 660.000 ms" in text


def test_cli_explain_prints_the_predicted_step_time(capsys):
    from distgraph.cli import main

    assert main(["explain", "mlp", "--workers", "2", "--strategy", "pipeline"]) == 0
    out = capsys.readouterr().out
    assert "predicted step:" in out and "default constants" in out


def test_submission_order_is_the_simulated_start_order():
    """The submission order of a schedule is computed in one pass (simulating 1,024 stages
    takes minutes); it equals the order of the simulated start times."""
    from distgraph.pipeline import simulate

    for name in ("gpipe", "1f1b"):
        for p, m in [(1, 1), (3, 7), (4, 8), (8, 3)]:
            plan = sim_pipeline(p, m, 1, 2, name)
            sim = simulate(plan.schedule(), 1.0, 1.0)
            expected = sorted(sim.times, key=lambda a: (sim.times[a][0], a.stage))
            assert plan.submission_order() == expected


# --- on Ray ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_executor():
    from raysupport import ensure_ray

    import distgraph as dg

    ensure_ray()
    with dg.RayExecutor(num_workers=2) as ex:
        yield ex


def test_calibration_probe_returns_positive_finite_constants(ray_executor):
    cal = ray_executor.calibrate(refresh=True)
    assert cal.measured and cal.workers == 2
    for name in ("call_overhead_s", "hop_s", "driver_s", "submit_s"):
        value = getattr(cal, name)
        assert 0 < value < math.inf, (name, value)
    assert 0 <= cal.seconds_per_byte < math.inf
    # The hand-off through the runtime's mailbox and an action's own time were measured.
    assert 0 < cal.deliver_s < math.inf and 0 < cal.action_s < math.inf
    # Cached per cluster and worker count: asked again, the same measurement.
    assert ray_executor.calibrate() is cal


def test_cli_explain_calibrate_prints_measured_constants(capsys):
    from raysupport import ensure_ray

    from distgraph.cli import main

    ensure_ray()
    assert main(["explain", "seed", "--workers", "2", "--calibrate"]) == 0
    out = capsys.readouterr().out
    assert "predicted step:" in out and "calibrated on 2 workers" in out
