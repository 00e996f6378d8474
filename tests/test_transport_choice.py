"""transport="auto" (issue 16 item 1): the measured choice between calls and compiled.

The decision (``TransportChoice``) is fed fake step times here; one Ray test shows a training
session and a repeated run() under auto ending on a transport and saying why, with both
measurements.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from distgraph.runtime.ray.transport_choice import CALLS, COMPILED, TransportChoice

MS = 1e-3


def drive(choice: TransportChoice, times: dict[str, float], steps: int) -> list[str]:
    """Run ``steps`` steps on whatever ``choice`` asks for, each taking ``times[transport]``;
    returns the transports the steps ran on."""
    ran = []
    for _ in range(steps):
        t = choice.choose()
        choice.record(t, times[t])
        ran.append(t)
    return ran


def test_probes_calls_then_compiled_and_keeps_the_faster():
    c = TransportChoice(k=5)
    assert c.status() == "measuring calls (0 of 5 steps)"
    ran = drive(c, {CALLS: 10 * MS, COMPILED: 2 * MS}, 12)
    # 1 warm-up + 5 counted steps each, calls first.
    assert ran == [CALLS] * 6 + [COMPILED] * 6
    assert c.probing is None and c.chosen == COMPILED
    assert c.choose() == COMPILED
    assert "calls 10.00 ms/step" in c.reason and "compiled 2.00 ms/step" in c.reason
    assert "compiled" in c.explain() and "10.00" in c.explain()
    assert drive(c, {CALLS: 10 * MS, COMPILED: 2 * MS}, 50) == [COMPILED] * 50


def test_compiled_slower_under_load_keeps_calls():
    c = TransportChoice(k=5)
    drive(c, {CALLS: 5.0 * MS, COMPILED: 21.4 * MS}, 12)
    assert c.chosen == CALLS and c.choose() == CALLS
    assert c.reason.startswith("calls faster") and c.status() == "calls measured faster"
    assert "21.40" in c.reason and "5.00" in c.reason


def test_warm_up_steps_are_not_counted():
    c = TransportChoice(k=3)
    c.record(CALLS, 5.0)  # the first step: an install, 5 s
    for _ in range(3):
        c.record(CALLS, 10 * MS)
    assert c.samples[CALLS] == pytest.approx([10 * MS] * 3)
    assert c.choose() == COMPILED
    c.record(COMPILED, 2.0)  # the compile
    for _ in range(3):
        c.record(COMPILED, 4 * MS)
    assert c.samples[COMPILED] == pytest.approx([4 * MS] * 3)
    assert c.chosen == COMPILED


def test_cold_steps_are_not_counted():
    c = TransportChoice(k=3)
    drive(c, {CALLS: 10 * MS, COMPILED: 4 * MS}, 8)
    assert c.chosen == COMPILED
    c.record(COMPILED, 3.0, cold=True)  # a graph reaped while idle, compiled again
    assert 3.0 not in c.samples[COMPILED]


def test_a_margin_keeps_calls_when_compiled_is_barely_faster():
    c = TransportChoice(k=5, margin=0.15)
    drive(c, {CALLS: 10 * MS, COMPILED: 9 * MS}, 12)  # 10 % faster: within the margin
    assert c.chosen == CALLS and "margin" in c.reason
    c = TransportChoice(k=5, margin=0.15)
    drive(c, {CALLS: 10 * MS, COMPILED: 8 * MS}, 12)  # 20 % faster: past it
    assert c.chosen == COMPILED


def test_noise_within_the_margin_does_not_flip_a_choice():
    rng = np.random.default_rng(0)
    c = TransportChoice(k=5, reprobe_after=20, min_gap=1000)
    flips = 0
    last = None
    for _ in range(2000):
        t = c.choose()
        base = 10 * MS if t == CALLS else 7 * MS  # compiled 30 % faster, +-10 % noise
        c.record(t, base * (1 + 0.1 * rng.uniform(-1, 1)))
        if c.probing is None:
            flips += last is not None and c.chosen != last
            last = c.chosen
    assert last == COMPILED and flips == 0
    assert len(c.decisions) > 3  # it did look again, and kept the choice each time


def test_reprobes_after_an_interval_that_doubles_while_the_choice_stands():
    c = TransportChoice(k=2, reprobe_after=10, min_gap=1000)
    times = {CALLS: 10 * MS, COMPILED: 2 * MS}
    drive(c, times, 6)
    assert c.chosen == COMPILED and c.interval == 10
    ran = drive(c, times, 10)
    assert ran == [COMPILED] * 10 and c.probing == CALLS  # the 10th step started a re-probe
    drive(c, times, 3)  # 1 warm-up + 2 counted calls steps
    assert c.probing is None and c.chosen == COMPILED
    assert c.interval == 20  # kept: looked at again half as often


def test_a_reprobe_switches_when_the_load_changes():
    c = TransportChoice(k=3, reprobe_after=8, min_gap=1000)
    drive(c, {CALLS: 10 * MS, COMPILED: 2 * MS}, 8)
    assert c.chosen == COMPILED
    loaded = {CALLS: 5 * MS, COMPILED: 21 * MS}  # the readers' spinning now costs the cores
    drive(c, loaded, 8 + 4)  # the interval on compiled, then 1 + 3 calls steps
    assert c.chosen == CALLS and c.choose() == CALLS
    assert [d[0] for d in c.decisions] == [COMPILED, CALLS]
    assert c.interval == 8  # a flip starts the interval over
    drive(c, loaded, 60)
    assert c.chosen == CALLS and c.interval > 8  # kept since: looked at less often


def test_drift_triggers_an_early_reprobe():
    c = TransportChoice(k=3, reprobe_after=10_000, drift=2.0, min_gap=5)
    drive(c, {CALLS: 10 * MS, COMPILED: 2 * MS}, 8)
    assert c.chosen == COMPILED
    drive(c, {CALLS: 10 * MS, COMPILED: 2 * MS}, 10)
    assert c.probing is None  # no drift: no probe
    drive(c, {CALLS: 3 * MS, COMPILED: 9 * MS}, 4)  # compiled now 4.5x slower than chosen
    assert c.probing == CALLS or c.chosen == CALLS
    drive(c, {CALLS: 3 * MS, COMPILED: 9 * MS}, 5)
    assert c.chosen == CALLS


def test_compiled_refused_settles_on_calls_with_the_reason():
    c = TransportChoice(k=2)
    drive(c, {CALLS: 10 * MS, COMPILED: 1 * MS}, 3)
    assert c.choose() == COMPILED
    for _ in range(3):  # the compiled path ran them on calls: data_path="store", say
        c.record(CALLS, 10 * MS, why='data_path="store"')
    assert c.probing is None and c.chosen == CALLS and c.choose() == CALLS
    assert 'compiled did not run: data_path="store"' in c.reason
    assert c.status() == c.reason
    assert 'data_path="store"' in c.explain()


def test_a_single_miss_is_not_a_refusal():
    c = TransportChoice(k=2)
    drive(c, {CALLS: 10 * MS, COMPILED: 1 * MS}, 3)
    c.record(CALLS, 10 * MS, why="first run of the plan in a row")  # then it compiles
    drive(c, {CALLS: 10 * MS, COMPILED: 1 * MS}, 3)
    assert c.chosen == COMPILED


def test_the_decision_is_logged_with_both_measurements(caplog):
    c = TransportChoice("training plan 7", k=2)
    with caplog.at_level(logging.INFO, logger="distgraph.runtime.ray.transport_choice"):
        drive(c, {CALLS: 10 * MS, COMPILED: 2 * MS}, 6)
    line = next(r.getMessage() for r in caplog.records if "training plan 7" in r.getMessage())
    assert "compiled" in line and "10.00 ms/step" in line and "2.00 ms/step" in line


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        TransportChoice(k=0)
    with pytest.raises(ValueError):
        TransportChoice().record("shm", 1.0)


# On Ray ------------------------------------------------------------------------------------------
def _training(ex, epochs: int):
    import distgraph as dg
    from distgraph import models

    g, data = models.mlp_classifier((2, 16, 16, 2), seed=3), models.spirals(48, seed=2)
    tr = dg.Trainer(g, loss="loss", optimizer=dg.Adam(lr=0.05), executor=ex, progress=False)
    tr.fit(data, epochs=epochs, batch_size=24, seed=7)  # 2 steps per epoch
    return tr


def _local_training(epochs: int):
    return _training(None, epochs)


@pytest.fixture(scope="module")
def ex_auto():
    from raysupport import ensure_ray

    import distgraph as dg

    ensure_ray()
    # round_robin: both workers take part, values cross them in every step.
    with dg.RayExecutor(num_workers=2, transport="auto", strategy="round_robin") as ex:
        yield ex


def test_a_training_session_under_auto_measures_both_and_says_why(ex_auto):
    tr = _training(ex_auto, epochs=10)  # 20 steps: 6 on calls, 6 compiled, then the choice
    s = tr.session
    c = s.choice
    assert c.probing is None and c.decisions, c.explain()  # it decided
    chosen, calls_s, compiled_s, _ = c.decisions[0]
    # The precondition of the comparison: both transports ran counted steps.
    assert calls_s is not None and compiled_s is not None
    said = s.explain_transport()
    assert f"auto: {chosen}" in said
    assert f"calls {calls_s * 1e3:.2f} ms/step" in said
    assert f"compiled {compiled_s * 1e3:.2f} ms/step" in said
    # Which one ran last matches the choice, and a calls choice left no graph behind.
    assert (s.compiled.last_reason == "") is (chosen == "compiled")
    assert (s.compiled.graph is not None) is (chosen == "compiled")
    ref = _local_training(epochs=10)
    assert tr.history.loss == ref.history.loss  # bit-identical whatever ran each step
    for k, v in ref.params.items():
        assert np.array_equal(tr.params[k], v), k
    tr.close()


def test_auto_switching_to_calls_tears_the_training_graph_down(ex_auto):
    from distgraph.runtime.ray.compiled import slot_of

    tr = _training(ex_auto, epochs=2)
    s = tr.session
    # A margin no compiled step can beat: the probe runs compiled, then calls must win.
    s.choice = TransportChoice("test", k=2, margin=0.99)
    compiled_seen = []
    for _ in range(4):
        tr.fit(models_data(), epochs=1, batch_size=24, seed=7)
        compiled_seen.append(s.compiled.graph is not None)
    assert any(compiled_seen)  # the precondition: the probe did compile a graph
    assert s.choice.chosen == "calls" and s.choice.probing is None
    assert s.compiled.graph is None and slot_of(ex_auto.cluster).holder is not s.compiled
    assert "auto: calls (calls" in s.explain_transport()
    tr.close()


def models_data():
    from distgraph import models

    return models.spirals(48, seed=2)


def test_repeated_runs_under_auto_measure_both_and_say_why(ex_auto):
    from graphs import mlp

    import distgraph as dg

    g, feeds, out = mlp()
    local = dg.LocalExecutor().run(g, feeds, grad=out)
    results = [ex_auto.run(g, feeds, grad=out) for _ in range(16)]
    plan_id = list(ex_auto.waves.plans.values())[-1][1]  # the latest plan run: g's
    c = ex_auto.compiled.choices[plan_id]
    assert c.probing is None and c.decisions, c.explain()
    chosen, calls_s, compiled_s, _ = c.decisions[0]
    assert calls_s is not None and compiled_s is not None  # both ran counted steps
    said = ex_auto.explain_transport(g, feeds, grad=out)
    assert f"auto: {chosen}" in said and "ms/step" in said
    assert ("compiled graph" in said) is (chosen == "compiled")
    for res in results:
        for k in local.values:
            assert np.array_equal(res.values[k], local.values[k]), k
        for k in local.grads:
            assert np.array_equal(res.grads[k], local.grads[k]), k


def test_auto_is_the_default_transport():
    import inspect

    import distgraph as dg
    from distgraph.runtime.ray.options import RayOptions

    assert inspect.signature(dg.RayExecutor).parameters["transport"].default == "auto"
    assert RayOptions().transport == "auto"
