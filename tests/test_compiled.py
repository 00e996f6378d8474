"""The compiled transport (issue 16): run() steps as a Ray Compiled Graph.

The teardown hang is shown with a raw Ray probe (``compiled_probe.py``, run in a subprocess so
a hang never stalls the suite), then the executor's compiled transport is shown to avoid it.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import slow_ops  # noqa: F401 - registers the "stall" op in this process too
from graphs import BUILDERS, SPREAD_COST, mlp, seed_graph, towers
from raysupport import ensure_ray

import distgraph as dg
from distgraph.bench.mlp import build_distgraph, make_problem
from distgraph.runtime.ray.compiled import MIN_BUFFER

TESTS = str(Path(__file__).resolve().parent)
PROBE = os.path.join(TESTS, "compiled_probe.py")


def run_probe(*args: str, timeout: float = 400) -> list[str]:
    """Run the raw probe in its own session (its Ray included) and return its teardown lines.

    A probe that printed no teardown line never reached a teardown (its Ray did not start on a
    loaded machine, say): it is run once more, then the test fails with the probe's stderr."""
    for attempt in range(2):
        proc = subprocess.Popen(
            [sys.executable, PROBE, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # only the probe's own process group
            proc.communicate()
            pytest.fail(f"the probe {args} did not finish within {timeout} s")
        lines = [line for line in out.splitlines() if line.startswith("teardown")]
        if lines or attempt == 1:
            break
    if not lines:
        pytest.fail(f"the probe {args} reached no teardown; its stderr ends:\n{err[-2000:]}")
    return lines


@pytest.mark.slow
def test_raw_probe_hangs_at_teardown_with_default_buffers():
    # 2.8 MB messages through Ray's default 1 MB channels: the writer resizes its channel and
    # teardown closes the old one while the reader waits on the new one.
    assert MIN_BUFFER < 4 * 700_000  # the precondition: a message larger than the buffer
    assert run_probe("default", "10", "700000") == ["teardown HUNG"]


@pytest.mark.slow
def test_raw_probe_tears_down_with_sized_buffers():
    # The fix: buffer_size_bytes set in the driver and both actors before compiling.
    lines = run_probe("sized", "1000", "700000")
    assert len(lines) == 2 and all("HUNG" not in line for line in lines), lines


# The executor ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ex_compiled():
    ensure_ray()
    with dg.RayExecutor(num_workers=2, transport="compiled") as ex:
        yield ex


def assert_results_equal(a: dg.Result, b: dg.Result) -> None:
    assert a.values.keys() == b.values.keys() and a.grads.keys() == b.grads.keys()
    for k in a.values:
        assert np.array_equal(a.values[k], b.values[k]), k
    for k in a.grads:
        assert np.array_equal(a.grads[k], b.grads[k]), k


CONFORMANCE = [
    "seed",
    "linear",
    "mlp",
    "diamond",
    "wide",
    "broadcast",
    "classifier",
    "shapes",
    "towers",
]


@pytest.mark.parametrize("name", CONFORMANCE)
@pytest.mark.parametrize("strategy", ["round_robin", "mincut"])
def test_compiled_equals_calls_and_local(ex_compiled, name, strategy):
    g, feeds, out = BUILDERS[name]() if name != "towers" else towers()
    local = dg.LocalExecutor().run(g, feeds, grad=out)
    ex = ex_compiled
    before = ex.strategy, ex.cost
    ex.strategy, ex.cost = strategy, SPREAD_COST
    try:
        ex.transport = "calls"
        calls = ex.run(g, feeds, grad=out)
        ex.transport = "compiled"
        first = ex.run(g, feeds, grad=out)  # the plan's first compiled-transport run
        results = [ex.run(g, feeds, grad=out) for _ in range(3)]
        assert ex.compiled.last_reason == "", ex.compiled.last_reason  # ran compiled
        assert "compiled graph" in ex.explain_transport(g, feeds, grad=out)
    finally:
        ex.strategy, ex.cost = before
        ex.transport = "compiled"
    if strategy == "round_robin":  # what makes it distributed: values cross workers
        assert len(set(results[-1].placement.values())) == 2
    for res in [calls, first, *results]:
        assert_results_equal(res, local)


def test_trace_and_outputs_under_compiled(ex_compiled):
    g, feeds, out = mlp()
    for _ in range(2):
        ex_compiled.run(g, feeds, outputs=["loss"], grad=out)
    res = ex_compiled.run(g, feeds, outputs=["loss"], grad=out, trace=True)
    assert ex_compiled.compiled.last_reason == ""
    assert any(e.kind == "node" for e in res.trace)
    assert_results_equal(res, dg.LocalExecutor().run(g, feeds, outputs=["loss"], grad=out))


def test_node_error_is_raised_and_the_next_run_compiles_again(ex_compiled):
    g = dg.Graph()
    x = g.input("x", shape=(2,))
    g.output("y", dg.log(x))
    ok = {"x": np.array([1.0, 2.0])}
    for _ in range(2):
        ex_compiled.run(g, ok, check_finite=True)
    with pytest.raises(dg.DistgraphError, match="log"):
        ex_compiled.run(g, {"x": np.array([-1.0, 2.0])}, check_finite=True)
    assert not ex_compiled.compiled.graphs  # the failed graph is gone
    res = ex_compiled.run(g, ok, check_finite=True)
    assert ex_compiled.compiled.last_reason == "" and ex_compiled.compiled.graphs
    assert np.array_equal(res.values["y"], np.log(ok["x"]))


def test_larger_batch_compiles_again_with_larger_channels(ex_compiled):
    g, feeds, out = mlp()
    small = {k: v[:4] for k, v in feeds.items()}
    for _ in range(2):
        ex_compiled.run(g, small, grad=out)
    (compiled,) = ex_compiled.compiled.graphs.values()
    big = {k: np.concatenate([v] * 40000) for k, v in small.items()}  # 160,000 rows
    res = ex_compiled.run(g, big, grad=out)
    (again,) = ex_compiled.compiled.graphs.values()
    assert again is not compiled and again.buffer_bytes > compiled.buffer_bytes
    assert ex_compiled.compiled.last_reason == ""
    assert_results_equal(res, dg.LocalExecutor().run(g, big, grad=out))


def test_transport_is_validated():
    with pytest.raises(dg.ConfigError, match="transport"):
        dg.RayExecutor(transport="shm")


def test_auto_falls_back_on_multi_node_with_a_reason(caplog):
    ensure_ray()
    g, feeds, out = seed_graph()
    with dg.RayExecutor(num_workers=2, transport="auto", strategy="round_robin") as ex:
        # Two workers on one machine; their node ids are what the transport reads.
        ex.cluster.worker_info[1] = {**ex.cluster.worker_info[1], "node_id": "another-node"}
        with caplog.at_level(logging.INFO, logger="distgraph.runtime.ray.compiled"):
            for _ in range(3):
                res = ex.run(g, feeds, grad=out)
        assert set(res.placement.values()) == {0, 1}  # the plan spans both "nodes"
        assert "2 nodes" in ex.compiled.last_reason
        assert "2 nodes" in ex.explain_transport(g, feeds, grad=out)
        assert any("not compiled" in r.message and "2 nodes" in r.message for r in caplog.records)
        assert not ex.compiled.graphs
        assert res.values == {"z": 7.0}


# 1,000 steps of several-MB messages, then close, twice ------------------------------------------
@pytest.mark.slow
def test_thousand_mlp_steps_then_teardown_twice_on_the_same_actors():
    ensure_ray()
    sizes, batch = [784, 512, 512, 10], 512
    params, x, y = make_problem(sizes, batch)
    g = build_distgraph(sizes, params, batch)
    feeds = {"x": x, "y": y}
    # Forward on worker 0, backward on worker 1: the activations cross (6.3 MB a step) and
    # the gradients go to the driver (3.3 MB).
    ex = dg.RayExecutor(
        num_workers=2,
        transport="compiled",
        strategy=lambda prog, n, cost: {
            name: 0 if prog.nodes[name].phase == "forward" else 1 for name in prog.order
        },
    )
    try:
        # The same workers on calls give the reference (BLAS sums in a float32 matmul depend on
        # the thread count, so LocalExecutor in this process may differ in the last bits).
        ex.transport = "calls"
        want = ex.run(g, feeds, grad="loss")
        ex.transport = "compiled"
        workers = list(ex.workers)
        for _round in range(2):
            ex.run(g, feeds, grad="loss")
            for _ in range(1000):
                res = ex.run(g, feeds, grad="loss")
            assert ex.compiled.last_reason == ""
            (compiled,) = ex.compiled.graphs.values()
            # The precondition: messages larger than Ray's default buffer (several MB).
            assert compiled.buffer_bytes > 4 * MIN_BUFFER, compiled.buffer_bytes
            assert len({t.worker for t in compiled.plan.tasks}) == 2
            assert_results_equal(res, want)
            start = time.perf_counter()
            ex.compiled.close()  # tear the graph down; the actors stay
            assert time.perf_counter() - start < 5.0
            assert ex.workers == workers and not ex.replacements
    finally:
        start = time.perf_counter()
        ex.close()
    assert time.perf_counter() - start < 5.0


# Failures ----------------------------------------------------------------------------------------
def stall_graph(flag: str) -> dg.Graph:
    g = dg.Graph()
    x = g.input("x")
    w = g.param("w", 3.0)
    h = g.apply("stall", x * w, flag=flag, name="stuck")
    g.output("z", h + 1.0)
    return g


@pytest.fixture
def stall_ex():
    ensure_ray()
    with dg.RayExecutor(
        num_workers=2,
        transport="compiled",
        strategy={"mul_1": 0, "stuck": 1, "z": 0},
        ops_modules=["slow_ops"],
        worker_runtime_env={"env_vars": {"PYTHONPATH": TESTS}},
    ) as ex:
        yield ex


def test_worker_killed_during_a_compiled_step_is_replaced_and_recompiled(stall_ex, tmp_path):
    ex = stall_ex
    flag = str(tmp_path / "stall")
    g = stall_graph(flag)
    for _ in range(2):
        assert ex.run(g, {"x": 2.0}).values == {"z": 7.0}
    assert ex.compiled.last_reason == ""
    Path(flag).touch()  # the next step stalls in 'stuck' on worker 1

    def kill() -> None:
        time.sleep(2.0)
        ex.workers[1].crash.remote()  # a normal call: runs beside the graph's loop
        time.sleep(1.0)
        os.remove(flag)

    killer = threading.Thread(target=kill)
    killer.start()
    res = ex.run(g, {"x": 2.0})
    killer.join()
    assert res.values == {"z": 7.0}
    assert ex.replacements == [1]
    assert ex.compiled.last_reason == ""  # the step ran again compiled, on the new worker
    (compiled,) = ex.compiled.graphs.values()
    assert compiled.workers == ex.workers
    assert ex.run(g, {"x": 2.0}).values == {"z": 7.0}


def test_compiled_step_past_its_deadline_names_the_stuck_node(stall_ex, tmp_path):
    ex = stall_ex
    flag = str(tmp_path / "stall")
    g = stall_graph(flag)
    for _ in range(2):
        ex.run(g, {"x": 2.0})
    assert ex.compiled.last_reason == ""
    level = ex.plan(g).program.level["stuck"]
    Path(flag).touch()
    ex.deadline = 3.0
    try:
        with pytest.raises(dg.WaveTimeoutError) as info:
            ex.run(g, {"x": 2.0})
    finally:
        os.remove(flag)
        ex.deadline = 600.0
    msg = str(info.value)
    assert "'stuck'" in msg and f"level {level}" in msg and "worker 1" in msg, msg
    # The graph was dropped; the next runs compile a new one on the same actors.
    for _ in range(2):
        assert ex.run(g, {"x": 2.0}).values == {"z": 7.0}
    assert not ex.replacements


def test_alternating_plans_stay_on_calls_then_compile(ex_compiled):
    a, feeds_a, out_a = seed_graph()
    b, feeds_b, out_b = mlp()
    ex_compiled.compiled.close()
    for _ in range(3):  # a, b, a, b, ...: no plan runs twice in a row
        ex_compiled.run(a, feeds_a, grad=out_a)
        assert ex_compiled.compiled.last_reason.startswith("first run")
        ex_compiled.run(b, feeds_b, grad=out_b)
        assert ex_compiled.compiled.last_reason.startswith("first run")
    assert not ex_compiled.compiled.graphs
    res = ex_compiled.run(b, feeds_b, grad=out_b)
    assert ex_compiled.compiled.last_reason == "" and len(ex_compiled.compiled.graphs) == 1
    assert_results_equal(res, dg.LocalExecutor().run(b, feeds_b, grad=out_b))


def test_cli_transport_flag(capsys):
    from distgraph.cli import main

    assert main(["run", "seed", "--backend", "local", "--transport", "compiled"]) == 2
    err = capsys.readouterr().err
    assert "--transport" in err and "backend" in err
    ensure_ray()
    assert main(["run", "seed", "--backend", "ray", "--transport", "auto", "--json"]) == 0
    assert '"z": 7.0' in capsys.readouterr().out


# Training steps (item 1/3: the parameter server's update inside the graph) ----------------------
def training_task(task: str) -> tuple[dg.Graph, dict[str, np.ndarray], int]:
    """(graph, training data, batch size): the problems of test_ray_runtime's equality test."""
    from distgraph import models

    if task == "linear":
        return models.linear_regression(), models.linear_data(96, seed=1), 16
    if task == "mlp":
        return models.mlp_classifier((2, 16, 16, 2), seed=3), models.spirals(48, seed=2), 24
    g, _, _ = towers(n=2)
    rng = np.random.default_rng(9)
    return g, {"x": rng.standard_normal((48, 8)), "y": rng.integers(0, 3, size=48)}, 24


def assert_params_identical(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert np.array_equal(got[k], want[k]), k


@pytest.mark.parametrize("opt", [dg.SGD(lr=0.05), dg.Adam(lr=0.05)], ids=["sgd", "adam"])
@pytest.mark.parametrize(
    "task, strategy",
    # round_robin: params come back from the server (the graph's take_params nodes); mincut
    # on the towers: each worker updates its own replica.
    [("linear", "round_robin"), ("mlp", "round_robin"), ("towers", "mincut")],
)
def test_compiled_training_equals_calls_and_local(ex_compiled, opt, task, strategy):
    g, data, batch = training_task(task)
    ref = dg.Trainer(g, loss="loss", optimizer=opt, progress=False)
    ref.fit(data, epochs=3, batch_size=batch, seed=7)
    before = ex_compiled.strategy, ex_compiled.cost
    ex_compiled.strategy, ex_compiled.cost = strategy, SPREAD_COST  # mincut splits the towers
    try:
        runs = {}
        for transport in ("calls", "compiled"):
            ex_compiled.transport = transport
            tr = dg.Trainer(g, loss="loss", optimizer=opt, executor=ex_compiled, progress=False)
            tr.fit(data, epochs=3, batch_size=batch, seed=7)
            s = tr.session
            assert set(s.plan.placement.values()) == {0, 1}  # both workers take part
            if transport == "compiled":  # the precondition: the steps ran compiled
                assert s.compiled.last_reason == "" and s.compiled.graph is not None
                assert "compiled graph" in s.explain_transport()
                assert bool(s.takers) is (strategy == "round_robin")
            runs[transport] = (tr.params, tr.history.loss, tr.applied_steps)
            tr.close()
    finally:
        (ex_compiled.strategy, ex_compiled.cost), ex_compiled.transport = before, "compiled"
    for params, loss, applied in runs.values():
        assert_params_identical(params, ref.params)
        assert loss == ref.history.loss
        assert applied == list(range(1, len(applied) + 1))


def test_compiled_training_with_reads_checkpoints_and_runs_between_steps(ex_compiled, tmp_path):
    # Out-of-band calls between compiled steps (reads, a save, a run() of another plan on the
    # same workers, which takes them for its own graph) leave the training bit-identical.
    g, data, batch = training_task("mlp")
    ref = dg.Trainer(g, loss="loss", optimizer=dg.Adam(lr=0.05), progress=False)
    ref.fit(data, epochs=4, batch_size=batch, seed=7)
    ex_compiled.strategy = "round_robin"
    try:
        tr = dg.Trainer(
            g, loss="loss", optimizer=dg.Adam(lr=0.05), executor=ex_compiled, progress=False
        )
        sg, sfeeds, sout = seed_graph()
        for epoch in range(4):
            tr.fit(data, epochs=1, batch_size=batch, seed=7)
            assert tr.session.compiled.last_reason == ""
            assert tr.session.status()["version"] == tr.step > 3 * epoch
            tr.session.save(str(tmp_path / f"e{epoch}"))
            for _ in range(3):  # compiled from its second run: the training graph goes
                assert ex_compiled.run(sg, sfeeds, grad=sout).values == {"z": 7.0}
            assert ex_compiled.compiled.last_reason == ""
        assert_params_identical(tr.params, ref.params)
        assert tr.history.loss == ref.history.loss
        tr.close()
    finally:
        ex_compiled.strategy = "mincut"


def test_compiled_training_interrupted_after_its_update_counts_the_step(ex_compiled, monkeypatch):
    from distgraph.runtime.ray.compiled_training import TrainingGraph

    g, data, batch = training_task("mlp")
    whole = dg.Trainer(g, loss="loss", optimizer=dg.Adam(lr=0.05), progress=False)
    whole.fit(data, epochs=3, batch_size=batch, seed=7)
    real_run = TrainingGraph.run
    interrupted = []

    def run_then_interrupt(self, step, *args, **kwargs):
        out = real_run(self, step, *args, **kwargs)
        if step == 6 and not interrupted:  # the graph ran: the server applied step 6
            interrupted.append(step)
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(TrainingGraph, "run", run_then_interrupt)
    ex_compiled.strategy = "round_robin"
    try:
        tr = dg.Trainer(
            g, loss="loss", optimizer=dg.Adam(lr=0.05), executor=ex_compiled, progress=False
        )
        with pytest.raises(KeyboardInterrupt):
            tr.fit(data, epochs=3, batch_size=batch, seed=7)
        assert interrupted == [6] and tr.step == 6  # the server decided: applied, counted
        assert tr.session.status()["applied"] == list(range(1, 7))
        tr.fit(data, epochs=2, batch_size=batch, seed=7)  # the second epoch's rest, the third
        assert tr.applied_steps == list(range(1, 13))  # four steps an epoch
        assert tr.session.status()["duplicates"] == []
        assert tr.session.compiled.last_reason == ""
        assert_params_identical(tr.params, whole.params)
        tr.close()
    finally:
        ex_compiled.strategy = "mincut"


def test_compiled_training_interrupted_before_its_update_leaves_it_unapplied(
    ex_compiled, monkeypatch
):
    from distgraph.runtime.ray.compiled_training import TrainingGraph

    g, data, batch = training_task("mlp")
    whole = dg.Trainer(g, loss="loss", optimizer=dg.Adam(lr=0.05), progress=False)
    whole.fit(data, epochs=3, batch_size=batch, seed=7)
    real_run = TrainingGraph.run
    interrupted = []

    def interrupt_then_run(self, step, *args, **kwargs):
        if step == 6 and not interrupted:  # nothing of step 6 reached the graph
            interrupted.append(step)
            raise KeyboardInterrupt
        return real_run(self, step, *args, **kwargs)

    monkeypatch.setattr(TrainingGraph, "run", interrupt_then_run)
    tr = dg.Trainer(
        g, loss="loss", optimizer=dg.Adam(lr=0.05), executor=ex_compiled, progress=False
    )
    with pytest.raises(KeyboardInterrupt):
        tr.fit(data, epochs=3, batch_size=batch, seed=7)
    assert interrupted == [6] and tr.step == 5
    assert tr.session.status()["applied"] == [1, 2, 3, 4, 5]
    tr.fit(data, epochs=2, batch_size=batch, seed=7)  # step 6 again, same batch, same id
    assert tr.applied_steps == list(range(1, 13))  # four steps an epoch
    assert tr.session.compiled.last_reason == ""
    assert_params_identical(tr.params, whole.params)
    tr.close()


def test_compiled_training_compiles_replicas_and_auto_says_so(caplog):
    # Replicas were refused here before (ConfigError under "compiled", calls under "auto");
    # both transports now compile them (more in test_compiled_dp.py).
    ensure_ray()
    g, data, batch = training_task("mlp")
    with dg.RayExecutor(num_workers=2, transport="compiled", replicas=2) as ex:
        tr = dg.Trainer(g, loss="loss", optimizer=dg.SGD(lr=0.1), executor=ex, progress=False)
        tr.fit(data, epochs=1, batch_size=batch)
        assert tr.session.layout.count == 2  # the precondition: two replicas
        assert tr.session.compiled.last_reason == "" and tr.session.compiled.graph is not None
        tr.close()
        ex.transport = "auto"
        tr = dg.Trainer(g, loss="loss", optimizer=dg.SGD(lr=0.1), executor=ex, progress=False)
        with caplog.at_level(logging.INFO, logger="distgraph.runtime.ray.compiled_training"):
            tr.fit(data, epochs=2, batch_size=batch)
        assert tr.applied_steps == list(range(1, 9))  # four steps an epoch
        assert tr.session.compiled.last_reason == "" and tr.session.compiled.graph is not None
        assert "2 replicas" in tr.session.explain_transport()
        assert any("compiled training plan" in r.message for r in caplog.records)
        assert not any("not compiled" in r.message for r in caplog.records)
        tr.close()


def test_microbatches_compile_under_compiled_and_auto():
    # Pipelined steps compile too (tests/test_compiled_pipeline.py has the equality tests).
    ensure_ray()
    g, data, batch = training_task("mlp")
    with dg.RayExecutor(num_workers=2, strategy="pipeline", microbatches=2) as ex:
        for transport in ("compiled", "auto"):
            ex.transport = transport
            tr = dg.Trainer(g, loss="loss", optimizer=dg.SGD(lr=0.1), executor=ex, progress=False)
            tr.fit(data, epochs=2, batch_size=batch)
            assert tr.session.compiled.last_reason == ""
            assert "compiled graph of the pipeline" in tr.session.explain_transport()
            tr.close()


def test_a_fenced_graph_changes_nothing_on_the_server_or_a_worker():
    # Late work of an abandoned compiled step (its graph fenced by the driver) must not apply
    # an update or change a worker's params: the actors' compiled calls, run in-process.
    from distgraph.runtime.ray.actors import _RayParamServer, _RayWorker
    from distgraph.runtime.serial import StaleGraphError

    server = _RayParamServer({"w": np.ones(2)}, dg.SGD(lr=0.5), {0: ["w"]}, {"w": "g"})
    grads = {"g": np.full(2, 2.0)}
    assert server.fence(3) == 3
    with pytest.raises(StaleGraphError, match="abandoned"):
        server.compiled_step(3, (7, {}), (0,), 1, grads)
    assert server.status()["applied"] == [] and np.array_equal(server.params()["w"], np.ones(2))
    status, new = server.compiled_step(4, (7, {}), (0,), 1, grads)  # a newer graph
    assert status["applied"] and server.status()["applied"] == [7]
    assert np.array_equal(new["w"], np.zeros(2))

    worker = _RayWorker(0)
    worker.resident[1] = {"w": np.ones(2)}
    worker.fence(5)
    with pytest.raises(StaleGraphError):
        worker.take_params(1, 5, new)
    assert np.array_equal(worker.resident[1]["w"], np.ones(2))
    worker.take_params(1, 6, new)
    assert np.array_equal(worker.resident[1]["w"], np.zeros(2))


def test_an_idle_graph_is_torn_down_and_compiled_again_on_use():
    # An idle graph's loop polls (~0.4 of a core per reading worker here): after idle_s
    # without a step the reaper tears it down; steps then run on calls once and compile anew.
    ensure_ray()
    g, feeds, out = seed_graph()
    mg, data, batch = training_task("mlp")
    ref = dg.Trainer(mg, loss="loss", optimizer=dg.Adam(lr=0.05), progress=False)
    ref.fit(data, epochs=2, batch_size=batch, seed=7)
    with dg.RayExecutor(num_workers=2, transport="compiled") as ex:
        slot = ex.compiled.slot
        slot.idle_s = 1.0
        for _ in range(3):
            ex.run(g, feeds, grad=out)
        (graph,) = ex.compiled.graphs.values()
        assert ex.compiled.last_reason == "" and not graph.torn_down  # the precondition
        deadline = time.time() + 60
        while not graph.torn_down and time.time() < deadline:
            time.sleep(0.2)
        assert graph.torn_down and slot.reaped == 1
        assert "compiled graph" not in ex.explain_transport(g, feeds, grad=out)
        for _ in range(2):
            res = ex.run(g, feeds, grad=out)
        assert ex.compiled.last_reason == "" and res.values == {"z": 7.0}

        tr = dg.Trainer(mg, loss="loss", optimizer=dg.Adam(lr=0.05), executor=ex, progress=False)
        tr.fit(data, epochs=1, batch_size=batch, seed=7)
        first = tr.session.compiled.graph
        assert first is not None and tr.session.compiled.last_reason == ""
        while not first.torn_down and time.time() < deadline + 60:
            time.sleep(0.2)
        assert first.torn_down and slot.reaped >= 2  # the run() graph's again, then this one
        tr.fit(data, epochs=1, batch_size=batch, seed=7)
        assert tr.session.compiled.graph is not first and tr.session.compiled.last_reason == ""
        assert_params_identical(tr.params, ref.params)
        assert tr.history.loss == ref.history.loss
        tr.close()


def test_steps_of_another_plan_on_calls_do_not_keep_an_unused_graph_alive():
    # The reaper goes by when the graph itself last ran: a run() plan's graph stays idle
    # (its readers spinning) while a training session's steps run on calls, so it goes.
    from distgraph.runtime.ray.compiled import GraphSlot

    class Holder:
        released = 0

        def release(self) -> None:
            Holder.released += 1

    slot = GraphSlot(idle_s=0.4)
    holder, other = Holder(), object()
    slot.claim(holder)
    assert slot.holder is holder  # the precondition: a live graph
    deadline = time.time() + 30
    while slot.holder is not None and time.time() < deadline:
        slot.touch(other)  # another plan's step on calls, every 50 ms
        time.sleep(0.05)
    assert slot.holder is None and Holder.released == 1 and slot.reaped == 1


# Last in the module: it shuts the shared Ray runtime down (the module executor's actors
# with it) to start a multi-node cluster.
@pytest.mark.slow
def test_multi_node_auto_falls_back_and_compiled_runs_across_nodes(caplog):
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        g, feeds, out = towers()
        local = dg.LocalExecutor().run(g, feeds, grad=out)
        with dg.RayExecutor(
            num_workers=2,
            strategy="round_robin",
            cost=SPREAD_COST,
            address=cluster.address,
            transport="auto",
        ) as ex:
            # The precondition: the two workers run on two nodes, and the plan uses both.
            assert len({i["node_id"] for i in ex.worker_info}) == 2
            with caplog.at_level(logging.INFO, logger="distgraph.runtime.ray.compiled"):
                for _ in range(3):
                    res = ex.run(g, feeds, grad=out)
            assert set(res.placement.values()) == {0, 1}
            assert "2 nodes" in ex.compiled.last_reason and not ex.compiled.graphs
            assert any("2 nodes" in r.message for r in caplog.records)
            assert_results_equal(res, local)
            ex.transport = "compiled"  # asked for explicitly: tried across the nodes
            for _ in range(3):
                res = ex.run(g, feeds, grad=out)
            assert ex.compiled.last_reason == "" and ex.compiled.graphs
            assert_results_equal(res, local)
    finally:
        ray.shutdown()
        cluster.shutdown()
