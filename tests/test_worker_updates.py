"""Workers that update their own params (replicas of the parameter server's update)."""

from __future__ import annotations

import numpy as np
import pytest
import ray
from raysupport import ensure_ray

import distgraph as dg
from distgraph import models
from distgraph.plan import build_plan
from distgraph.runtime.ray import replica_layout


def two_branch_graph() -> dg.Graph:
    """loss = mean((x*a)^2) + mean(tanh(x*b)): two params, each in its own branch."""
    g = dg.Graph()
    x = g.input("x", shape=(None, 3))
    a = g.param("a", np.array([0.5, -1.0, 2.0]))
    b = g.param("b", np.array([1.5, 0.25, -0.75]))
    g.output("loss", dg.mean((x * a) ** 2) + dg.mean(dg.tanh(x * b)))
    return g


def training_plan(g: dg.Graph, placement_of) -> dg.Plan:
    prog = dg.LocalExecutor().program(g, ["loss"], grad="loss", wrt=list(g.params))
    placement = {n: placement_of(n, prog) for n in prog.order}
    return build_plan(prog, placement, 2, training=True)


def test_one_worker_plan_updates_locally_and_pipelines():
    g = two_branch_graph()
    plan = training_plan(g, lambda n, prog: 0)
    replicas, pipelined = replica_layout(plan)
    assert set(replicas) == {0}
    assert set(replicas[0]) == {"a", "b"}
    assert pipelined


def test_gradient_computed_elsewhere_disables_the_replica():
    g = two_branch_graph()
    # Everything on worker 0 except the final gradient node of "b", which lands on worker 1.
    prog = dg.LocalExecutor().program(g, ["loss"], grad="loss", wrt=list(g.params))
    grad_b = prog.grads["b"]
    plan = build_plan(prog, {n: (1 if n == grad_b else 0) for n in prog.order}, 2, training=True)
    replicas, pipelined = replica_layout(plan)
    assert 0 not in replicas  # "b" is resident on 0 but its gradient is computed on 1
    assert not pipelined


@pytest.fixture(scope="module")
def ray_ready():
    ensure_ray()


def fit(executor, steps_data, opt):
    g = models.mlp_classifier((2, 8, 8, 2), seed=1)
    trainer = dg.Trainer(g, loss="loss", optimizer=opt, executor=executor, progress=False)
    trainer.fit(steps_data, epochs=3, batch_size=16, seed=5)
    return trainer


@pytest.mark.parametrize("strategy", ["mincut", "round_robin"])
def test_replicas_equal_the_server_bit_for_bit(ray_ready, strategy):
    data = models.spirals(32, seed=2)
    want = fit(dg.LocalExecutor(), data, dg.Adam(lr=0.05)).params
    with dg.RayExecutor(num_workers=2, strategy=strategy) as ex:
        trainer = fit(ex, data, dg.Adam(lr=0.05))
        session = trainer.session
        assert session.layout.count == 1  # precondition of bit-identity: replicas="auto" kept one
        got = trainer.params
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
        applied = trainer.applied_steps
        assert applied == list(range(1, 13))
        for w in session.replicas:
            rep = ray.get(ex.workers[w].replica.remote(session.plan_id))
            assert rep["applied"] == applied
            for p, value in rep["params"].items():
                assert np.array_equal(value, got[p]), (w, p)
        if strategy == "mincut":  # a small model stays on one worker, which updates itself
            assert session.replicas and session.pipelined
        trainer.close()


def test_same_params_with_and_without_worker_updates(ray_ready):
    data = models.spirals(32, seed=2)
    results = []
    for flag in (True, False):
        with dg.RayExecutor(num_workers=2, worker_updates=flag) as ex:
            trainer = fit(ex, data, dg.Momentum(lr=0.1, momentum=0.9))
            assert bool(trainer.session.replicas) is flag
            results.append(trainer.params)
            trainer.close()
    for k in results[0]:
        assert np.array_equal(results[0][k], results[1][k]), k


def test_failed_step_leaves_server_and_replicas_unchanged(ray_ready):
    # d/dw sqrt(w * x) is infinite at x = 0: the forward is finite, the gradient is not, so the
    # worker's own update refuses the step (NonFiniteError) and nothing may change anywhere.
    g = dg.Graph()
    x = g.input("x", shape=(None,))
    w = g.param("w", np.array(2.0))
    g.output("loss", dg.mean(dg.sqrt(w * x)))
    good = {"x": np.array([1.0, 4.0, 9.0])}
    with dg.RayExecutor(num_workers=2) as ex:
        trainer = dg.Trainer(g, loss="loss", optimizer=dg.SGD(lr=0.5), executor=ex, progress=False)
        session = trainer.session
        session.step(1, good)
        before = trainer.params
        with pytest.raises(dg.DistgraphError, match="'w'"):
            session.step(2, {"x": np.array([0.0, 1.0])})
        assert trainer.params == before
        assert trainer.applied_steps == [1]
        for wk in session.replicas:
            rep = ray.get(ex.workers[wk].replica.remote(session.plan_id))
            assert rep["applied"] == [1] and float(rep["params"]["w"]) == before["w"]
        session.step(3, good)
        ref = dg.Trainer(g, loss="loss", optimizer=dg.SGD(lr=0.5), progress=False).session
        ref.step(1, good)
        ref.step(3, good)
        assert trainer.params["w"] == ref.params["w"]
        trainer.close()


def regression_problem(n: int = 2048):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((n, 16))  # 256 KiB: large enough to go through the object store
    y = x @ rng.standard_normal(16) + 0.5
    g = dg.Graph()
    xs = g.input("x", shape=(None, 16))
    ys = g.input("y", shape=(None,))
    w = g.param("w", np.zeros(16))
    b = g.param("b", np.array(0.0))
    g.output("loss", dg.mean((dg.matmul(xs, w) + b - ys) ** 2))
    return g, {"x": x, "y": y}


def test_training_data_is_shipped_once_per_fit(ray_ready, monkeypatch):
    import ray

    g, data = regression_problem()
    want = dg.Trainer(g, loss="loss", optimizer=dg.SGD(lr=0.05), progress=False)
    want.fit(data, epochs=3, batch_size=256, seed=1)
    puts = []
    real_put = ray.put

    def counting_put(value, *args, **kwargs):
        if isinstance(value, np.ndarray):
            puts.append(value.shape)
        return real_put(value, *args, **kwargs)

    monkeypatch.setattr(ray, "put", counting_put)
    with dg.RayExecutor(num_workers=2) as ex:
        trainer = dg.Trainer(g, loss="loss", optimizer=dg.SGD(lr=0.05), executor=ex, progress=False)
        trainer.fit(data, epochs=3, batch_size=256, seed=1)  # 24 steps
        assert puts == [(2048, 16)]  # x once; y (16 KiB) rides with each step's indices
        for k, v in want.params.items():
            np.testing.assert_array_equal(trainer.params[k], v, err_msg=k)
        assert trainer.history.step_loss == want.history.step_loss
        trainer.close()


def test_bad_rows_still_fail_at_their_own_step(ray_ready):
    g, data = regression_problem(512)
    data["x"][300, 2] = np.nan  # in the fifth batch of 64 when not shuffled
    with dg.RayExecutor(num_workers=2) as ex:
        trainer = dg.Trainer(
            g,
            loss="loss",
            optimizer=dg.SGD(lr=0.05),
            executor=ex,
            check_finite=True,
            progress=False,
        )
        with pytest.raises(dg.NonFiniteError, match="feed 'x'"):
            trainer.fit(data, epochs=1, batch_size=64, shuffle=False)
        assert trainer.applied_steps == [1, 2, 3, 4]
        trainer.close()


def test_server_lost_after_the_last_pipelined_step_is_recovered_on_read(ray_ready):
    data = models.spirals(32, seed=2)
    want = fit(dg.LocalExecutor(), data, dg.Adam(lr=0.05)).params
    with dg.RayExecutor(num_workers=2) as ex:
        trainer = fit(ex, data, dg.Adam(lr=0.05))
        session = trainer.session
        assert session.pipelined
        ray.get(session.ps.status.remote())  # let the last update land, then lose the server
        session.ps.crash.remote()
        got = trainer.params  # waits for the deferred update, restarts the server, replays
        assert any("replaying steps" in r for r in session.recoveries), session.recoveries
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
        assert trainer.applied_steps == list(range(1, 13))
        trainer.close()
