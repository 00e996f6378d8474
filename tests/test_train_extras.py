"""Training conveniences (issue 17, item 3) and the Trainer's one session (issue 13).

Learning-rate schedules, clipping by global norm, a validation split with a metric per epoch,
``Trainer.evaluate``, the progress bar; and a local session with the Ray session's interface.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from graphs import SPREAD_COST, towers
from raysupport import ensure_ray

import distgraph as dg
from distgraph import models, optim
from distgraph.checkpoint import load_checkpoint
from distgraph.runtime import local
from distgraph.runtime.paramserver import ParameterServer


def linear_graph() -> dg.Graph:
    g = dg.Graph()
    x, y = g.input("x", shape=(None,)), g.input("y", shape=(None,))
    g.output("loss", dg.mse(x * g.param("w", -2.0) + g.param("b", 15.0), y))
    return g


def linear_data(n: int = 64) -> dict[str, np.ndarray]:
    x = np.linspace(-1, 1, n)
    return {"x": x, "y": 3 * x + 7}


def assert_params_identical(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert np.array_equal(got[k], want[k]), k


# --- schedules: pure functions of the step id --------------------------------------------------


def test_schedules_follow_their_formulas():
    assert [dg.ConstantLR(0.3)(s) for s in (1, 7, 10**6)] == [0.3, 0.3, 0.3]
    step = dg.StepDecayLR(1.0, every=3, factor=0.5)
    assert [step(s) for s in range(1, 8)] == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25]
    cos = dg.CosineLR(0.1, steps=10, final=0.01)
    assert cos(1) == 0.1 and math.isclose(cos(6), 0.055) and cos(11) == 0.01 == cos(50)
    assert all(cos(s) > cos(s + 1) for s in range(1, 11))  # decreasing over the decay
    warm = dg.WarmupLR(4, dg.CosineLR(0.2, steps=10))
    assert [warm(s) for s in (1, 2, 3, 4)] == pytest.approx([0.05, 0.1, 0.15, 0.2], rel=1e-15)
    assert warm(4) == warm(5) == 0.2  # the warm-up ends at the rate the cosine starts at
    assert warm(5 + 5) == pytest.approx(cos_at(0.2, 0.0, 5, 10), rel=1e-15) and warm(20) == 0.0
    assert dg.WarmupLR(2, 0.5)(1) == 0.25  # a number after the warm-up is a constant rate


def cos_at(value: float, final: float, done: int, steps: int) -> float:
    return final + (value - final) * 0.5 * (1 + math.cos(math.pi * done / steps))


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda: dg.ConstantLR(0.0), r"ConstantLR\.value must be a finite number > 0"),
        (lambda: dg.StepDecayLR(0.1, every=0), r"StepDecayLR\.every must be an int >= 1"),
        (lambda: dg.StepDecayLR(0.1, every=2, factor=1.5), r"StepDecayLR\.factor"),
        (lambda: dg.CosineLR(0.1, steps=10, final=0.5), r"CosineLR\.final must be in \[0, value\]"),
        (lambda: dg.CosineLR(float("nan"), steps=10), r"CosineLR\.value"),
        (lambda: dg.WarmupLR(3, "fast"), r"WarmupLR\.then must be a schedule"),
        (lambda: dg.SGD(lr=lambda step: 0.1), r"SGD\.lr .*schedule.*'<lambda>'"),
        (lambda: dg.Adam(lr=0.1, clip_norm=0.0), r"Adam\.clip_norm must be a finite number > 0"),
        (lambda: dg.LRSchedule.from_config({"kind": "exp"}), r"lr\.kind: unknown schedule 'exp'"),
        (
            lambda: dg.Optimizer.from_config(
                {"kind": "sgd", "lr": {"kind": "warmup", "steps": 2, "then": {"kind": "cosine"}}}
            ),
            r"optimizer\.lr\.then.*steps",
        ),
        (lambda: dg.ConstantLR(0.1)(0), r"step ids start at 1"),
    ],
)
def test_bad_schedules_are_refused_naming_the_field(make, needle):
    with pytest.raises(dg.ConfigError, match=needle):
        make()


def test_an_optimizer_with_a_schedule_round_trips_through_its_config():
    opt = dg.Adam(lr=dg.WarmupLR(3, dg.CosineLR(0.01, steps=20, final=1e-4)), clip_norm=2.5)
    cfg = opt.config()
    assert cfg["lr"] == {
        "kind": "warmup",
        "steps": 3,
        "then": {"kind": "cosine", "value": 0.01, "steps": 20, "final": 1e-4},
    }
    assert cfg["clip_norm"] == 2.5
    assert dg.Optimizer.from_config(cfg) == opt
    assert dg.SGD(0.1).config() == {
        "kind": "sgd",
        "clip_norm": None,
        "lr": 0.1,
        "weight_decay": 0.0,
    }


def test_the_server_applies_the_rate_of_the_step_id_it_stages():
    # A replayed step (same id, later in time) must get its own rate, not the latest one.
    schedule = dg.StepDecayLR(1.0, every=2, factor=0.5)
    server = ParameterServer({"w": np.array(10.0)}, dg.SGD(lr=schedule), {}, {"w": "gw"})
    for step_id, want_lr in [(1, 1.0), (2, 1.0), (3, 0.5), (7, 0.125)]:
        before = float(server.params()["w"])
        server.stage(step_id, {"gw": np.array(1.0)})
        status = server.commit(step_id)
        assert status["applied"]
        assert float(server.params()["w"]) == before - want_lr
        assert server.status()["lr"] == want_lr


def test_training_with_a_schedule_equals_hand_written_sgd():
    schedule = dg.WarmupLR(2, dg.StepDecayLR(0.2, every=3, factor=0.5))
    tr = dg.Trainer(linear_graph(), "loss", dg.SGD(lr=schedule), progress=False)
    data = linear_data(16)
    tr.fit(data, epochs=2, batch_size=4, seed=1)  # 8 steps
    w, b = -2.0, 15.0
    step = 0
    for epoch in range(2):
        for idx in dg.train.batch_indices(16, 4, seed=1, epoch=epoch):
            step += 1
            x, y = data["x"][idx], data["y"][idx]
            r = x * w + b - y
            gw, gb = np.mean(2 * r * x), np.mean(2 * r)
            lr = schedule(step)
            w, b = w - lr * gw, b - lr * gb
    assert tr.session.status()["lr"] == schedule(8) == 0.1
    assert math.isclose(tr.params["w"], w, rel_tol=1e-12)
    assert math.isclose(tr.params["b"], b, rel_tol=1e-12)


def test_a_schedule_survives_a_checkpoint_and_the_run_continues_exactly(tmp_path):
    def opt():
        return dg.Momentum(lr=dg.CosineLR(0.1, steps=12, final=0.01), clip_norm=5.0)

    whole = dg.Trainer(linear_graph(), "loss", opt(), progress=False)
    whole.fit(linear_data(), epochs=4, batch_size=16, seed=2)
    first = dg.Trainer(linear_graph(), "loss", opt(), progress=False)
    first.fit(linear_data(), epochs=2, batch_size=16, seed=2)
    first.save(tmp_path / "ck")
    assert load_checkpoint(tmp_path / "ck").optimizer["lr"]["kind"] == "cosine"
    resumed = dg.Trainer(linear_graph(), "loss", dg.SGD(0.5), progress=False)
    with pytest.warns(UserWarning, match="replaces"):
        resumed.load(tmp_path / "ck")
    assert resumed.optimizer == opt()
    resumed.fit(linear_data(), epochs=2, batch_size=16, seed=2)
    assert_params_identical(resumed.params, whole.params)


# --- clipping by global norm ------------------------------------------------------------------


def test_global_norm_combines_per_param_sums_in_any_grouping():
    rng = np.random.default_rng(0)
    grads = {f"p{i}": rng.standard_normal(s) for i, s in enumerate([(3, 4), (5,), (), (2, 2, 2)])}
    sums = {k: optim.sum_of_squares(g) for k, g in grads.items()}
    whole = optim.global_norm(sums)
    flat = np.concatenate([np.ravel(g) for g in grads.values()])
    assert math.isclose(whole, float(np.linalg.norm(flat)), rel_tol=1e-14)
    # Two "shards" combining their sums, in either order, give the same norm bit for bit.
    shard_a = {k: sums[k] for k in ("p0", "p2")}
    shard_b = {k: sums[k] for k in ("p1", "p3")}
    assert optim.global_norm({**shard_b, **shard_a}) == whole
    assert optim.global_norm({**shard_a, **shard_b}) == whole


def test_clipping_scales_every_gradient_by_one_factor():
    opt = dg.SGD(lr=1.0, clip_norm=1.0)
    params = {"a": np.zeros(2), "b": np.zeros(())}
    grads = {"a": np.array([3.0, 0.0]), "b": np.array(4.0)}  # global norm 5
    out = opt.apply(params, grads, opt.init(params), step=1)
    assert out.clipped and out.grad_norm == 5.0
    np.testing.assert_allclose(out.params["a"], [-0.6, 0.0], rtol=1e-15)
    assert float(out.params["b"]) == pytest.approx(-0.8, rel=1e-15)
    small = opt.apply(params, {"a": np.array([0.3, 0.0]), "b": np.array(0.4)}, {}, step=1)
    assert not small.clipped and np.array_equal(small.params["a"], [-0.3, 0.0])
    unclipped = dg.SGD(lr=1.0).apply(params, grads, {}, step=1)
    assert unclipped.grad_norm is None and not unclipped.clipped


def test_clipped_steps_are_reported_and_bound_the_update():
    opt = dg.SGD(lr=0.1, clip_norm=0.5)
    tr = dg.Trainer(linear_graph(), "loss", opt, progress=False)
    tr.fit(linear_data(), epochs=1, batch_size=16, seed=0)
    status = tr.session.status()
    assert status["clipped"] == [1, 2, 3, 4]  # the start is far off: every norm exceeds 0.5
    assert status["grad_norm"] > 0.5
    free = dg.Trainer(linear_graph(), "loss", dg.SGD(lr=0.1), progress=False)
    free.fit(linear_data(), epochs=1, batch_size=16, seed=0)
    assert free.session.status()["clipped"] == []
    moved = math.hypot(tr.params["w"] + 2.0, tr.params["b"] - 15.0)
    assert moved <= 4 * 0.1 * 0.5 + 1e-12  # each step moves at most lr * clip_norm
    assert tr.params != free.params


@pytest.fixture(scope="module")
def ray_ready():
    ensure_ray()


def test_clipping_and_schedule_are_identical_on_ray_and_local(ray_ready):
    # mincut puts one tower on each worker; without clipping both workers would update their
    # own params (replicas), each seeing only its tower's gradients. The global norm needs all
    # of them: the server clips, and every executor ends with the same params bit for bit.
    g, _, _ = towers(n=2)
    rng = np.random.default_rng(9)
    data = {"x": rng.standard_normal((48, 8)), "y": rng.integers(0, 3, size=48)}

    def opt():
        return dg.Adam(lr=dg.WarmupLR(3, dg.CosineLR(0.05, steps=20)), clip_norm=0.3)

    ref = dg.Trainer(g, "loss", opt(), progress=False)
    ref.fit(data, epochs=3, batch_size=12, seed=4)  # 12 steps
    with dg.RayExecutor(num_workers=2, strategy="mincut", cost=SPREAD_COST) as ex:
        tr = dg.Trainer(g, "loss", opt(), executor=ex, progress=False)
        tr.fit(data, epochs=3, batch_size=12, seed=4)
        from distgraph.runtime.ray import replica_layout

        plan = tr.session.plan
        assert set(plan.placement.values()) == {0, 1}
        assert set(replica_layout(plan)[0]) == {0, 1}  # replicas would apply partial norms
        assert tr.session.replicas == {}
        status, want = tr.session.status(), ref.session.status()
        assert status["clipped"] and status["clipped"] == want["clipped"]  # clipping triggered
        assert status["lr"] == want["lr"] == opt().lr(12)
        assert_params_identical(tr.params, ref.params)
        assert tr.history.loss == ref.history.loss
        tr.close()


def test_worker_replicas_apply_the_schedule_like_the_server(ray_ready):
    # Without clipping, each tower's worker updates its own params: it evaluates the schedule
    # at the step id too, and stays equal to the server and to the local run.
    g, _, _ = towers(n=2)
    rng = np.random.default_rng(3)
    data = {"x": rng.standard_normal((48, 8)), "y": rng.integers(0, 3, size=48)}

    def opt():
        return dg.Momentum(lr=dg.StepDecayLR(0.1, every=3, factor=0.5))

    ref = dg.Trainer(g, "loss", opt(), progress=False)
    ref.fit(data, epochs=2, batch_size=12, seed=1)  # 8 steps, rates 0.1, 0.05, 0.025
    with dg.RayExecutor(num_workers=2, strategy="mincut", cost=SPREAD_COST) as ex:
        tr = dg.Trainer(g, "loss", opt(), executor=ex, progress=False)
        tr.fit(data, epochs=2, batch_size=12, seed=1)
        assert set(tr.session.replicas) == {0, 1}  # the precondition: workers update themselves
        assert_params_identical(tr.params, ref.params)
        tr.close()


def test_steps_replayed_after_a_server_crash_keep_their_rate_and_clipping(ray_ready, tmp_path):
    # The server restarts from its checkpoint at step 5 and replays steps 6-8: each must get
    # the rate of its own step id (the schedule decays every 2 steps) and the same clipping.
    g, data = models.mlp_classifier((2, 8, 2), seed=2), models.spirals(32, seed=5)

    def opt():
        return dg.SGD(lr=dg.StepDecayLR(0.5, every=2, factor=0.7), clip_norm=0.2)

    ref = dg.Trainer(g, "loss", opt(), progress=False)
    ref.fit(data, epochs=3, batch_size=16, seed=3)  # 12 steps
    ckpt = str(tmp_path / "ps")
    with dg.RayExecutor(num_workers=2, checkpoint_dir=ckpt, checkpoint_every=5) as ex:
        tr = dg.Trainer(g, "loss", opt(), executor=ex, progress=False)

        def crash(step: int, loss: float) -> None:
            if step == 8:
                tr.session.ps.crash.remote()

        tr.fit(data, epochs=3, batch_size=16, seed=3, callback=crash)
        recoveries = tr.session.recoveries
        assert any("replaying steps [6, 7, 8" in r for r in recoveries), recoveries
        status = tr.session.status()
        assert status["applied"] == list(range(1, 13))
        # The restarted server clipped the steps it replayed and those after, like the local run.
        assert status["clipped"] and set(status["clipped"]) <= set(ref.session.status()["clipped"])
        assert status["lr"] == ref.session.status()["lr"] == opt().lr(12)
        assert_params_identical(tr.params, ref.params)
        tr.close()


# --- validation, evaluate, metrics ------------------------------------------------------------


def classifier():
    return models.mlp_classifier((2, 16, 2), seed=3), models.spirals(60, seed=1)


def test_validation_split_records_val_loss_and_accuracy_per_epoch():
    g, data = classifier()
    tr = dg.Trainer(g, "loss", dg.Adam(lr=0.05), progress=False)
    hist = tr.fit(data, epochs=3, batch_size=16, validation_split=0.25, metric="accuracy")
    assert len(hist.val_loss) == len(hist.val_accuracy) == len(hist.loss) == 3
    assert hist["val_accuracy"] is hist.val_metrics["val_accuracy"]
    assert all(0.0 <= a <= 1.0 for a in hist.val_accuracy)
    # The held-out rows are the last quarter, never trained on: 90 of 120 rows train.
    assert tr.step == 3 * math.ceil(90 / 16)
    held = {k: v[90:] for k, v in data.items()}
    got = tr.evaluate(held, metric="accuracy")
    assert got == {"loss": hist.val_loss[-1], "accuracy": hist.val_accuracy[-1]}


def test_evaluate_matches_numpy_on_the_current_params():
    g, data = classifier()
    tr = dg.Trainer(g, "loss", dg.Adam(lr=0.05), progress=False)
    tr.fit(data, epochs=2, batch_size=16)
    p = tr.params
    logits = np.maximum(data["x"] @ p["W1"] + p["b1"], 0) @ p["W2"] + p["b2"]
    want_acc = float(np.mean(logits.argmax(1) == data["y"]))
    shifted = logits - logits.max(1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    want_loss = float(-np.mean(logp[np.arange(len(logp)), data["y"]]))
    whole = tr.evaluate(data, metric="accuracy")
    assert whole["accuracy"] == want_acc and 0 < want_acc < 1
    assert math.isclose(whole["loss"], want_loss, rel_tol=1e-12)
    batched = tr.evaluate(data, metric="accuracy", batch_size=7)  # 17 requests, the last short
    assert batched["accuracy"] == want_acc
    assert math.isclose(batched["loss"], want_loss, rel_tol=1e-12)
    assert tr.evaluate(data) == {"loss": whole["loss"]}
    assert tr.step == 2 * 8 and tr.params["W1"].tobytes() == p["W1"].tobytes()  # nothing trained


def test_a_callable_metric_is_named_by_its_function():
    def error_rate(predictions: np.ndarray, targets: np.ndarray) -> float:
        return float(np.mean(predictions.argmax(1) != targets))

    g, data = classifier()
    val = models.spirals(20, seed=9)
    tr = dg.Trainer(g, "loss", dg.Adam(lr=0.05), progress=False)
    hist = tr.fit(data, epochs=2, batch_size=32, validation=val, metric=error_rate)
    assert len(hist.val_error_rate) == 2
    assert hist.val_error_rate[-1] == 1 - tr.evaluate(val, metric="accuracy")["accuracy"]


def test_validation_history_is_kept_by_checkpoints(tmp_path):
    g, data = classifier()
    tr = dg.Trainer(g, "loss", dg.Adam(lr=0.05), progress=False)
    tr.fit(data, epochs=2, batch_size=32, validation_split=0.2, metric="accuracy")
    tr.save(tmp_path / "ck")
    other = dg.Trainer(g, "loss", dg.Adam(lr=0.05), progress=False)
    other.load(tmp_path / "ck")
    assert other.history.val_loss == tr.history.val_loss and len(tr.history.val_loss) == 2
    assert other.history.val_accuracy == tr.history.val_accuracy
    # An epoch without validation leaves a NaN, so each series stays aligned with epochs.
    other.fit(data, epochs=1, batch_size=32)
    other.fit(data, epochs=1, batch_size=32, validation_split=0.2, metric="accuracy")
    assert len(other.history.val_loss) == 4 and math.isnan(other.history.val_loss[2])


@pytest.mark.parametrize(
    "kwargs, error, needle",
    [
        ({"metric": "f1", "validation_split": 0.2}, dg.ConfigError, "metric must be"),
        ({"validation_split": 1.0}, dg.ConfigError, r"validation_split must be a fraction"),
        ({"validation_split": 0.999}, dg.FeedError, "leaves 0 to train on and 120"),
        ({"validation_split": 1e-17}, dg.FeedError, "leaves 120 to train on and 0"),
        (
            {"validation_split": 0.2, "validation": {"x": np.ones((2, 2))}},
            dg.ConfigError,
            "not both",
        ),
        ({"validation": {"x": np.ones((2, 2)), "y": np.ones(3)}}, dg.FeedError, "validation"),
        (
            {"validation": {"x": np.ones((2, 2))}},
            dg.FeedError,
            r"validation data has inputs \['x'\]",
        ),
    ],
)
def test_bad_validation_options_are_refused_before_any_step(kwargs, error, needle):
    g, data = classifier()
    tr = dg.Trainer(g, "loss", dg.Adam(lr=0.05), progress=False)
    with pytest.raises(error, match=needle):
        tr.fit(data, epochs=1, batch_size=32, **kwargs)
    assert tr.step == 0 and tr.applied_steps == []


def test_accuracy_needs_a_loss_built_on_one_cross_entropy_or_mse():
    g = dg.Graph()
    x = g.input("x", shape=(None, 2))
    g.output("loss", dg.mean((x @ g.param("W", np.ones((2, 2)))) ** 2))
    tr = dg.Trainer(g, "loss", dg.SGD(0.1), progress=False)
    with pytest.raises(dg.ConfigError, match=r"metric 'accuracy'.*loss 'loss'.*has none"):
        tr.evaluate({"x": np.ones((4, 2))}, metric="accuracy")
    assert tr.evaluate({"x": np.ones((4, 2))}) == {"loss": 4.0}


def test_evaluate_on_ray_equals_local(ray_ready):
    g, data = classifier()
    ref = dg.Trainer(g, "loss", dg.Adam(lr=0.05), progress=False)
    ref.fit(data, epochs=2, batch_size=32, validation_split=0.2, metric="accuracy")
    with dg.RayExecutor(num_workers=2, strategy="round_robin") as ex:
        tr = dg.Trainer(g, "loss", dg.Adam(lr=0.05), executor=ex, progress=False)
        tr.fit(data, epochs=2, batch_size=32, validation_split=0.2, metric="accuracy")
        assert tr.session.layout.count == 1  # precondition of equality: "auto" kept one replica
        assert tr.history.val_loss == ref.history.val_loss
        assert tr.history.val_accuracy == ref.history.val_accuracy
        assert tr.evaluate(data, metric="accuracy") == ref.evaluate(data, metric="accuracy")
        tr.close()


# --- progress bar -----------------------------------------------------------------------------


def test_progress_bar_shows_loss_and_the_validation_metric(capsys):
    g, data = classifier()
    tr = dg.Trainer(g, "loss", dg.Adam(lr=0.05), progress=True)
    tr.fit(data, epochs=2, batch_size=32, validation_split=0.2, metric="accuracy")
    err = capsys.readouterr().err
    assert "epoch 2/2" in err and "loss=" in err
    assert f"val_accuracy={tr.history.val_accuracy[-1]:.4g}" in err
    quiet = dg.Trainer(g, "loss", dg.Adam(lr=0.05), progress=False)
    quiet.fit(data, epochs=1, batch_size=32, validation_split=0.2, metric="accuracy")
    assert capsys.readouterr().err == ""


# --- one session, one interface ---------------------------------------------------------------


def test_the_local_session_has_the_ray_sessions_interface(tmp_path):
    tr = dg.Trainer(linear_graph(), "loss", dg.SGD(0.05), progress=False)
    tr.fit(linear_data(), epochs=1, batch_size=16)
    session = tr.session
    assert isinstance(session, local.LocalSession)
    status = session.status()
    assert status == {
        "version": 4,
        "applied": [1, 2, 3, 4],
        "duplicates": [],
        "clipped": [],
        "lr": 0.05,
        "grad_norm": None,
    }
    session.step(4, {k: v[:8] for k, v in linear_data().items()})  # a step id seen before
    assert session.status()["duplicates"] == [4] and session.status()["version"] == 4
    session.save(str(tmp_path / "ck"))
    ck = load_checkpoint(tmp_path / "ck")
    assert ck.applied_steps == [1, 2, 3, 4] and ck.extra["epoch"] == 1  # progress included
    assert ck.run_id == tr.run_id
