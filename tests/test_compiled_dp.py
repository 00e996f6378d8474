"""Compiled training steps with data-parallel replicas and sharded parameter servers (issue 16,
items 1 and 3): every replica's tasks and every shard's stage and commit are nodes of one
Ray Compiled Graph, bit-identical to actor calls, recovering from a lost worker or shard."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import slow_ops  # noqa: F401 - registers the "stall" op in this process too
from raysupport import ensure_ray

import distgraph as dg
from distgraph import models
from distgraph.functional import mse

TESTS = str(Path(__file__).resolve().parent)


pytestmark = pytest.mark.usefixtures("fresh_ray_runtime")


def mlp_problem() -> tuple[dg.Graph, dict[str, np.ndarray]]:
    return models.mlp_classifier((2, 16, 16, 2), seed=3), models.spirals(48, seed=2)


def assert_params_identical(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert np.array_equal(got[k], want[k]), k


def assert_params_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-12, atol=0, err_msg=k)


def assert_ran_compiled(tr: dg.Trainer) -> None:
    """The precondition: the session's steps ran as its compiled graph."""
    s = tr.session
    assert s.compiled.last_reason == "", s.compiled.last_reason
    assert s.compiled.graph is not None and not s.compiled.graph.torn_down
    assert "compiled graph" in s.explain_transport(), s.explain_transport()


def assert_layout_used(tr: dg.Trainer, replicas: int, shards: int) -> None:
    """The precondition: every replica computed rows of every step, every shard applied
    every step."""
    status = tr.session.status()
    steps = tr.applied_steps
    assert status["replicas"]["count"] == replicas
    if replicas > 1:
        for s in steps:
            rows = [e["rows"] for e in status["replicas"]["steps"][s]]
            assert len(rows) == replicas and all(b > a for a, b in rows), (s, rows)
    if shards > 1:
        assert [p["applied"] for p in status["shards"]] == [steps] * shards
        assert all(p["params"] for p in status["shards"])  # every shard owns params


@pytest.fixture(scope="module")
def ex2():
    ensure_ray()
    with dg.RayExecutor(num_workers=2, strategy="round_robin", transport="compiled") as ex:
        yield ex


LAYOUTS = [(2, 1), (1, 2), (2, 2)]


@pytest.mark.parametrize("opt", [dg.SGD(lr=0.05), dg.Adam(lr=0.05)], ids=["sgd", "adam"])
@pytest.mark.parametrize("replicas, shards", LAYOUTS, ids=["r2", "s2", "r2s2"])
def test_compiled_replicas_and_shards_equal_calls_and_local(ex2, opt, replicas, shards):
    g, data = mlp_problem()
    local = dg.Trainer(g, loss="loss", optimizer=opt, progress=False)
    local.fit(data, epochs=3, batch_size=24, seed=7)
    ex2.replicas, ex2.ps_shards = replicas, shards
    runs = {}
    try:
        for transport in ("calls", "compiled"):
            ex2.transport = transport
            tr = dg.Trainer(g, loss="loss", optimizer=opt, executor=ex2, progress=False)
            tr.fit(data, epochs=3, batch_size=24, seed=7)
            assert_layout_used(tr, replicas, shards)
            if transport == "compiled":
                assert_ran_compiled(tr)
                graph = tr.session.compiled.graph
                assert len(graph.servers) == shards
                assert {t.worker for t in graph.plan.tasks} == {0, 1}
            runs[transport] = (tr.params, tr.history.loss, tr.applied_steps)
            tr.close()
    finally:
        ex2.replicas, ex2.ps_shards, ex2.transport = "auto", 1, "compiled"
    (p_calls, l_calls, a_calls), (p_comp, l_comp, a_comp) = runs["calls"], runs["compiled"]
    assert len(a_comp) > 2 and a_comp == a_calls == list(range(1, len(a_comp) + 1))
    assert_params_identical(p_comp, p_calls)
    assert l_comp == l_calls
    assert_params_close(p_comp, local.params)
    np.testing.assert_allclose(l_comp, local.history.loss, rtol=1e-12)


def train_with(ex: dg.RayExecutor, on_step) -> dg.Trainer:
    g, data = mlp_problem()
    tr = dg.Trainer(g, loss="loss", optimizer=dg.Adam(lr=0.02), executor=ex, progress=False)
    tr.fit(data, epochs=4, batch_size=16, seed=11, callback=lambda step, loss: on_step(tr, step))
    return tr


def test_worker_killed_during_compiled_replicated_steps_recovers_identically(tmp_path):
    ensure_ray()
    layout = {"num_workers": 2, "replicas": 2, "strategy": "round_robin", "transport": "compiled"}
    with dg.RayExecutor(**layout) as ex:
        whole = train_with(ex, lambda tr, step: None)
        assert_ran_compiled(whole)
        want, steps = whole.params, whole.applied_steps
        whole.close()
    crashed: list[int] = []

    def crash(tr, step):
        if step == 9 and not crashed:  # the live graph's next execution meets a dead worker
            assert tr.session.compiled.graph is not None
            tr.session.cluster.workers[1].crash.remote()
            crashed.append(step)

    with dg.RayExecutor(**layout, checkpoint_dir=str(tmp_path / "ps"), checkpoint_every=5) as ex:
        tr = train_with(ex, crash)
        assert crashed == [9] and ex.replacements == [1]
        assert tr.applied_steps == steps
        assert_layout_used(tr, 2, 1)
        assert_ran_compiled(tr)  # recompiled on the new worker
        assert tr.session.compiled.graph.workers == ex.workers
        assert_params_identical(tr.params, want)
        tr.close()


def test_shard_killed_during_compiled_sharded_steps_recovers_identically(tmp_path):
    ensure_ray()
    layout = {
        "num_workers": 2,
        "replicas": 2,
        "ps_shards": 2,
        "strategy": "round_robin",
        "transport": "compiled",
    }
    with dg.RayExecutor(**layout) as ex:
        whole = train_with(ex, lambda tr, step: None)
        assert_ran_compiled(whole)
        want, steps = whole.params, whole.applied_steps
        whole.close()
    crashed: list[int] = []

    def crash(tr, step):
        if step == 13 and not crashed:  # shard checkpoints at 5 and 10: 11..13 replayed
            assert tr.session.compiled.graph is not None
            tr.session.server.links[1].handle.crash.remote()
            crashed.append(step)

    with dg.RayExecutor(**layout, checkpoint_dir=str(tmp_path / "ps"), checkpoint_every=5) as ex:
        tr = train_with(ex, crash)
        assert crashed == [13]
        recoveries = tr.session.recoveries
        assert any("restarted from version 10" in r for r in recoveries), recoveries
        assert any("replaying steps [11, 12, 13]" in r for r in recoveries), recoveries
        assert tr.applied_steps == steps
        assert_layout_used(tr, 2, 2)
        assert_ran_compiled(tr)  # recompiled with the restarted shards
        graph, links = tr.session.compiled.graph, tr.session.server.links
        assert [h is link.handle for h, link in zip(graph.servers, links)] == [True, True]
        assert_params_identical(tr.params, want)
        tr.close()


def test_auto_compiles_replicas_and_explains_it(caplog):
    ensure_ray()
    g, data = mlp_problem()
    with dg.RayExecutor(num_workers=2, transport="auto", replicas=2, ps_shards=2) as ex:
        tr = dg.Trainer(g, loss="loss", optimizer=dg.SGD(lr=0.1), executor=ex, progress=False)
        with caplog.at_level(logging.INFO, logger="distgraph.runtime.ray.compiled_training"):
            tr.fit(data, epochs=2, batch_size=24)
        assert_layout_used(tr, 2, 2)
        assert_ran_compiled(tr)
        text = tr.session.explain_transport()
        assert "2 replicas" in text and "2 parameter-server shards" in text, text
        assert any("compiled training plan" in r.message for r in caplog.records)
        tr.close()


def test_async_steps_are_still_refused_under_compiled():
    ensure_ray()
    g, data = mlp_problem()
    with dg.RayExecutor(num_workers=2, transport="compiled", replicas=2, consistency="async") as ex:
        tr = dg.Trainer(g, loss="loss", optimizer=dg.SGD(lr=0.1), executor=ex, progress=False)
        with pytest.raises(dg.ConfigError, match="consistency='async'"):
            tr.fit(data, epochs=1, batch_size=24)


def test_compiled_shards_clip_by_one_global_norm_like_calls(ex2):
    # With clip_norm, each shard's sums of squares are graph nodes and every shard's stage
    # combines all of them into the one global norm, as the calls path does.
    g, data = mlp_problem()
    opt = dg.Adam(lr=0.05, clip_norm=0.05)
    local = dg.Trainer(g, loss="loss", optimizer=opt, progress=False)
    local.fit(data, epochs=2, batch_size=24, seed=7)
    ex2.replicas, ex2.ps_shards = 2, 2
    runs = {}
    try:
        for transport in ("calls", "compiled"):
            ex2.transport = transport
            tr = dg.Trainer(g, loss="loss", optimizer=opt, executor=ex2, progress=False)
            tr.fit(data, epochs=2, batch_size=24, seed=7)
            assert_layout_used(tr, 2, 2)
            clipped = tr.session.status()["clipped"]
            assert clipped, "the precondition: clipping changed some steps"
            if transport == "compiled":
                assert_ran_compiled(tr)
            runs[transport] = (tr.params, tr.history.loss, clipped)
            tr.close()
    finally:
        ex2.replicas, ex2.ps_shards, ex2.transport = "auto", 1, "compiled"
    assert runs["compiled"][2] == runs["calls"][2]
    assert_params_identical(runs["compiled"][0], runs["calls"][0])
    assert runs["compiled"][1] == runs["calls"][1]
    assert_params_close(runs["compiled"][0], local.params)


def test_a_fenced_graph_changes_no_shard_and_a_shard_commits_only_what_it_staged():
    # A sharded step's nodes, run in-process: fenced (abandoned) graphs change nothing, and a
    # commit finds the update its own stage held (two phases, as with calls).
    from distgraph.runtime.paramserver import StepNotStagedError
    from distgraph.runtime.ray.actors import _RayParamServer
    from distgraph.runtime.serial import StaleGraphError

    shard = _RayParamServer(
        {"w": np.ones(2)}, dg.SGD(lr=0.5), {0: ["w"]}, {"w": "g"}, keep_undo=True
    )
    grads = {"g": np.full(2, 2.0)}
    shard.fence(3)
    with pytest.raises(StaleGraphError):
        shard.compiled_stage(3, (7, {}), 1, 0, grads)
    with pytest.raises(StaleGraphError):
        shard.compiled_commit(3, (7, {}), (0,), 7)
    with pytest.raises(StepNotStagedError):  # nothing staged: the step must run again
        shard.compiled_commit(4, (7, {}), (0,), 7)
    assert shard.status()["applied"] == [] and np.array_equal(shard.params()["w"], np.ones(2))
    assert shard.compiled_stage(4, (7, {}), 1, 0, grads) == 7
    assert shard.status()["applied"] == []  # staged, not applied
    status, new = shard.compiled_commit(4, (7, {}), (0,), 7)
    assert status["applied"] and shard.status()["applied"] == [7]
    assert np.array_equal(new["w"], np.zeros(2))


def test_a_traced_compiled_step_shows_replicas_and_shard_tracks(ex2):
    g, data = mlp_problem()
    ex2.replicas, ex2.ps_shards = 2, 2
    try:
        tr = dg.Trainer(g, loss="loss", optimizer=dg.SGD(lr=0.1), executor=ex2, progress=False)
        s = tr.session
        feeds = {k: v[:24] for k, v in data.items()}
        losses = [s.step(i, feeds, trace=i == 3) for i in (1, 2, 3)]
        assert_ran_compiled(tr)  # the precondition: step 3 ran compiled
        tracks = {e.track for e in s.last_trace}
        assert {"replica 0", "replica 1"} <= tracks, tracks
        assert {"parameter server shard 0", "parameter server shard 1"} <= tracks, tracks
        phases = {(e.track, e.phase) for e in s.last_trace if e.track.startswith("parameter")}
        assert ("parameter server shard 1", "apply") in phases, phases
        assert all(np.isfinite(losses))
        tr.close()
    finally:
        ex2.replicas, ex2.ps_shards = "auto", 1


def stalling_regression(flag: str) -> dg.Graph:
    """y = w*x + b by MSE, ``w`` passing a "stall" op (waits while ``flag`` exists)."""
    g = dg.Graph()
    x, y = g.input("x", shape=(None,)), g.input("y", shape=(None,))
    w, b = g.param("w", -2.0), g.param("b", 15.0)
    # On the param, so the loss still splits by rows (the op is not known to be row-wise).
    stuck = g.apply("stall", w, flag=flag, name="stuck")
    g.output("loss", mse(x * stuck + b, y))
    return g


@pytest.mark.parametrize("victim", ["worker", "shard"])
def test_actor_killed_mid_compiled_replicated_step_recovers_identically(tmp_path, victim):
    # The kill lands while step 5's graph execution is running (both replicas stalled in
    # 'stuck'): the execution fails, the graph is fenced and torn down, worker 1 replaced
    # (or every shard restarted from their common checkpoint and the steps since replayed),
    # and step 5 runs again compiled.
    ensure_ray()
    flag = str(tmp_path / "stall")
    g, data = stalling_regression(flag), models.linear_data(32, seed=1)
    layout = {
        "num_workers": 2,
        "replicas": 2,
        "strategy": "round_robin",
        "transport": "compiled",
        "ops_modules": ["slow_ops"],
        "worker_runtime_env": {"env_vars": {"PYTHONPATH": TESTS}},
        "ps_shards": 2 if victim == "shard" else 1,
    }

    def fit(ex, callback=None):
        tr = dg.Trainer(g, loss="loss", optimizer=dg.Adam(lr=0.05), executor=ex, progress=False)
        tr.fit(data, epochs=2, batch_size=8, seed=3, callback=callback)  # 4 steps an epoch
        return tr

    with dg.RayExecutor(**layout) as ex:
        whole = fit(ex)
        assert_ran_compiled(whole)
        want, steps = whole.params, whole.applied_steps
        whole.close()
    killed: list[int] = []

    def kill(ex) -> None:
        time.sleep(2.0)
        if victim == "worker":
            ex.workers[1].crash.remote()  # a normal call: runs beside the graph's loop
        else:
            tr_box[0].session.server.links[1].handle.crash.remote()
        time.sleep(1.0)
        os.remove(flag)

    ckpt = {"checkpoint_dir": str(tmp_path / "ps"), "checkpoint_every": 3}
    with dg.RayExecutor(**layout, **ckpt) as ex:
        killer = threading.Thread(target=kill, args=(ex,))

        def on_step(step, loss):
            if step == 4 and not killed:
                assert tr_box and tr_box[0].session.compiled.graph is not None
                Path(flag).touch()  # step 5 stalls in 'stuck' on both workers
                killer.start()
                killed.append(step)

        tr_box: list[dg.Trainer] = []
        tr = dg.Trainer(g, loss="loss", optimizer=dg.Adam(lr=0.05), executor=ex, progress=False)
        tr_box.append(tr)
        tr.fit(data, epochs=2, batch_size=8, seed=3, callback=on_step)
        killer.join()
        recoveries = tr.session.recoveries
        if victim == "worker":
            assert killed == [4] and ex.replacements == [1]
            assert any("step 5: replaced workers [1]" in r for r in recoveries), recoveries
        else:  # shard checkpoints at 3: step 4 replayed, then step 5 again
            assert killed == [4] and ex.replacements == []
            assert any("restarted from version 3" in r for r in recoveries), recoveries
            assert any("replaying steps [4]" in r for r in recoveries), recoveries
        assert tr.applied_steps == steps and len(steps) == 8
        assert_layout_used(tr, 2, layout["ps_shards"])
        assert_ran_compiled(tr)
        assert tr.session.compiled.graph.workers == ex.workers
        assert_params_identical(tr.params, want)
        tr.close()


@pytest.mark.parametrize("replicas", [1, 2])
def test_microbatch_pipelines_compile_under_auto_and_equal_calls(replicas):
    # A pipelined step's calls are schedule actions, not one task per worker: its session
    # compiles them as a pipeline graph (compiled_pipeline.py). Before that existed, one
    # replica's pipeline reached the plain training compiler and failed with a KeyError.
    ensure_ray()
    g, data = mlp_problem()
    params = {}
    for transport in ("calls", "auto"):
        with dg.RayExecutor(
            num_workers=2, transport=transport, microbatches=2, replicas=replicas
        ) as ex:
            tr = dg.Trainer(g, loss="loss", optimizer=dg.SGD(lr=0.1), executor=ex, progress=False)
            tr.fit(data, epochs=2, batch_size=24)
            assert tr.applied_steps == list(range(1, 9))  # four steps an epoch
            if transport == "auto":
                said = tr.session.explain_transport()
                assert "compiled graph of the pipeline" in said, said
            params[transport] = tr.params
            tr.close()
    assert_params_identical(params["auto"], params["calls"])
