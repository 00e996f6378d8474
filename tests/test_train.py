"""Optimizers and the Trainer: the seed's fit, determinism, checkpoints, hand-written peers."""

from __future__ import annotations

import numpy as np
import pytest
from graphs import BUILDERS, linear_data

import distgraph as dg
from distgraph.train import batch_indices


def _linear_graph(w: float = -2.0, b: float = 15.0) -> dg.Graph:
    g = dg.Graph()
    x, y = g.input("x", shape=(None,)), g.input("y", shape=(None,))
    g.output("loss", dg.mse(x * g.param("w", w) + g.param("b", b), y))
    return g


def _fit(optimizer: dg.Optimizer, epochs: int = 200, seed: int = 0, **kw) -> dg.Trainer:
    trainer = dg.Trainer(_linear_graph(), loss="loss", optimizer=optimizer)
    trainer.fit(linear_data(128), epochs=epochs, batch_size=16, seed=seed, **kw)
    return trainer


def test_seed_fit_reaches_the_targets():
    trainer = _fit(dg.SGD(lr=0.05))
    history = trainer.history
    assert abs(trainer.params["w"] - 3) < 0.01 and abs(trainer.params["b"] - 7) < 0.05
    assert len(history.loss) == 200 and history.loss[-1] < 1e-6 < history.loss[0]
    assert history.params[0].keys() == {"w", "b"} and history.params[-1]["w"] == trainer.params["w"]
    assert trainer.step == 200 * 8 and trainer.applied_steps == list(range(1, 1601))


def test_training_is_deterministic_for_a_seed():
    a, b = _fit(dg.SGD(lr=0.05), epochs=20), _fit(dg.SGD(lr=0.05), epochs=20)
    assert a.history.step_loss == b.history.step_loss and a.params == b.params
    c = _fit(dg.SGD(lr=0.05), epochs=20, seed=1)
    assert c.history.step_loss != a.history.step_loss  # the seed drives the shuffling


def test_batches_cover_the_data_once_per_epoch():
    batches = batch_indices(50, 16, seed=3, epoch=2)
    assert [len(b) for b in batches] == [16, 16, 16, 2]
    assert sorted(np.concatenate(batches)) == list(range(50))
    again = batch_indices(50, 16, seed=3, epoch=2)
    assert all(np.array_equal(x, y) for x, y in zip(batches, again))
    other = batch_indices(50, 16, seed=3, epoch=3)
    assert not np.array_equal(np.concatenate(batches), np.concatenate(other))
    in_order = batch_indices(5, 2, seed=0, epoch=0, shuffle=False)
    assert [b.tolist() for b in in_order] == [[0, 1], [2, 3], [4]]


@pytest.mark.parametrize(
    "optimizer",
    [dg.Adam(lr=0.05), dg.Momentum(lr=0.02, momentum=0.9), dg.Momentum(lr=0.02, nesterov=True)],
    ids=["adam", "momentum", "nesterov"],
)
def test_save_and_load_continue_exactly(tmp_path, optimizer):
    whole = _fit(optimizer, epochs=10)
    first = _fit(optimizer, epochs=5)
    first.save(tmp_path / "ckpt")
    resumed = dg.Trainer(_linear_graph(), loss="loss", optimizer=optimizer)
    resumed.load(tmp_path / "ckpt")
    assert resumed.params == first.params and resumed.epoch == 5
    assert resumed.history.loss == first.history.loss
    resumed.fit(linear_data(128), epochs=5, batch_size=16, seed=0)
    assert resumed.params == whole.params
    assert resumed.history.loss == whole.history.loss
    assert resumed.applied_steps == whole.applied_steps


def test_checkpoint_holds_optimizer_state(tmp_path):
    from distgraph.checkpoint import load_checkpoint

    trainer = _fit(dg.Adam(lr=0.05), epochs=3)
    trainer.save(tmp_path / "ckpt")
    ckpt = load_checkpoint(tmp_path / "ckpt")
    assert ckpt.optimizer["kind"] == "adam" and ckpt.optimizer["lr"] == 0.05
    assert int(ckpt.opt_state["w"]["t"]) == 24
    assert ckpt.params["w"] == trainer.params["w"]
    with pytest.raises(dg.CheckpointError, match="missing"):
        trainer.load(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "optimizer",
    [dg.SGD(lr=0.5), dg.Momentum(lr=0.1), dg.Momentum(lr=0.1, nesterov=True), dg.Adam(lr=0.02)],
    ids=["sgd", "momentum", "nesterov", "adam"],
)
def test_each_optimizer_reduces_the_loss(optimizer):
    g, _, out = BUILDERS["mlp"]()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 4))
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 1).astype(np.int64)
    trainer = dg.Trainer(g, loss=out, optimizer=optimizer)
    history = trainer.fit({"x": x, "y": y}, epochs=30, batch_size=20, seed=0)
    assert history.loss[-1] < 0.6 * history.loss[0]


def test_adam_matches_a_hand_written_adam():
    data = linear_data(32)
    x, y = data["x"], data["y"]
    lr, b1, b2, eps = 0.1, 0.8, 0.99, 1e-7
    trainer = dg.Trainer(_linear_graph(), "loss", dg.Adam(lr=lr, beta1=b1, beta2=b2, eps=eps))
    trainer.fit(data, epochs=50, batch_size=32, shuffle=False)
    p = np.array([-2.0, 15.0])
    m, v = np.zeros(2), np.zeros(2)
    for t in range(1, 51):
        r = 2 * (p[0] * x + p[1] - y) / len(x)
        grad = np.array([np.sum(r * x), np.sum(r)])
        m = b1 * m + (1 - b1) * grad
        v = b2 * v + (1 - b2) * grad**2
        p = p - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        got = trainer.history.params[t - 1]
        np.testing.assert_allclose([got["w"], got["b"]], p, rtol=1e-12, atol=1e-12)


def _run(opt: dg.Optimizer, grads: list[np.ndarray], p0: np.ndarray) -> np.ndarray:
    params, state = {"p": p0}, opt.init({"p": p0})
    for g in grads:
        before = params["p"].copy()
        params, state = opt.update(params, {"p": g}, state)
        assert not np.shares_memory(params["p"], before)
    return params["p"]


def test_optimizer_updates_match_their_formulas():
    rng = np.random.default_rng(7)
    p0 = rng.standard_normal(3)
    grads = [rng.standard_normal(3) for _ in range(4)]
    lr, mu, wd = 0.1, 0.9, 0.01
    # SGD with weight decay.
    p = p0.copy()
    for g in grads:
        p = p - lr * (g + wd * p)
    np.testing.assert_allclose(_run(dg.SGD(lr=lr, weight_decay=wd), grads, p0), p, rtol=1e-14)
    # Heavy ball and Nesterov (PyTorch's formulation).
    for nesterov in (False, True):
        p, vel = p0.copy(), np.zeros(3)
        for g in grads:
            vel = mu * vel + g
            p = p - lr * (g + mu * vel if nesterov else vel)
        got = _run(dg.Momentum(lr=lr, momentum=mu, nesterov=nesterov), grads, p0)
        np.testing.assert_allclose(got, p, rtol=1e-14)
    assert not np.allclose(
        _run(dg.Momentum(lr=lr, nesterov=True), grads, p0),
        _run(dg.Momentum(lr=lr), grads, p0),
    )


def test_update_is_pure():
    opt = dg.Adam(lr=0.1)
    params = {"p": np.ones(2)}
    state = opt.init(params)
    new_params, new_state = opt.update(params, {"p": np.ones(2)}, state)
    np.testing.assert_array_equal(params["p"], np.ones(2))
    np.testing.assert_array_equal(state["p"]["m"], np.zeros(2))
    assert int(state["p"]["t"]) == 0 and int(new_state["p"]["t"]) == 1
    assert not np.array_equal(new_params["p"], params["p"])


def test_float32_params_stay_float32_through_training():
    g, _, out = BUILDERS["mlp"](dtype="float32")
    rng = np.random.default_rng(0)
    data = {"x": rng.standard_normal((20, 4)).astype(np.float32), "y": rng.integers(0, 3, 20)}
    for opt in (dg.SGD(lr=0.1), dg.Momentum(lr=0.1), dg.Adam(lr=0.01)):
        trainer = dg.Trainer(g, loss=out, optimizer=opt)
        trainer.fit(data, epochs=2, batch_size=10)
        assert all(v.dtype == np.float32 for v in trainer.params.values())


def test_optimizer_config_round_trip():
    for opt in (dg.SGD(lr=0.3), dg.Momentum(lr=0.1, nesterov=True), dg.Adam(beta2=0.9)):
        assert dg.Optimizer.from_config(opt.config()) == opt


def test_threaded_executor_trains_identically():
    runs = []
    for threads in (1, 2):
        g, feeds, out = BUILDERS["wide"]()  # x has the fixed shape (6, 5): one batch of 6
        with dg.LocalExecutor(threads=threads) as ex:
            trainer = dg.Trainer(g, loss=out, optimizer=dg.Adam(lr=0.01), executor=ex)
            trainer.fit(feeds, epochs=5, batch_size=6)
            runs.append(trainer)
    assert runs[0].history.step_loss == runs[1].history.step_loss
    assert runs[0].history.loss[-1] < runs[0].history.loss[0]
    for k, v in runs[0].params.items():
        assert v.tobytes() == runs[1].params[k].tobytes()
