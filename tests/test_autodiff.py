"""Autodiff: the quickstart, agreement with HIPS autograd, the graph transform and check_grads."""

from __future__ import annotations

import dataclasses

import autograd.numpy as anp
import numpy as np
import pytest
from autograd import grad as autograd_grad
from graphs import BUILDERS, mlp, random_graphs
from hypothesis import HealthCheck, given, settings

import distgraph as dg
from distgraph import ops


def test_quickstart_verbatim():
    g = dg.Graph()
    x = g.input("x")
    w = g.param("w", 3.0)
    b = g.param("b", 1.0)
    z = g.output("z", x * w + b)

    res = dg.LocalExecutor().run(g, feeds={"x": 2.0}, grad="z")
    assert res.values["z"] == 7.0
    assert res.grads == {"x": 3.0, "w": 2.0, "b": 1.0}
    assert z.name == "z"
    assert all(type(v) is float for v in res.grads.values())


# --- independent oracle: HIPS autograd -------------------------------------------------------


def _mlp_params(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "W1": rng.standard_normal((5, 7)) / 2,
        "b1": rng.standard_normal(7) / 2,
        "W2": rng.standard_normal((7, 6)) / 2,
        "b2": rng.standard_normal((1, 6)) / 2,  # (1, 6): broadcast over the batch
        "W3": rng.standard_normal((6, 3)),
        "b3": rng.standard_normal(3),
    }


def _autograd_loss(p: dict, x: np.ndarray, labels: np.ndarray, probs: np.ndarray) -> float:
    h1 = anp.tanh(anp.dot(x, p["W1"]) + p["b1"])
    h2 = 1.0 / (1.0 + anp.exp(-(anp.dot(h1, p["W2"]) + p["b2"])))
    logits = anp.dot(h2, p["W3"]) + p["b3"]
    shifted = logits - anp.max(logits, axis=1, keepdims=True)
    logp = shifted - anp.log(anp.sum(anp.exp(shifted), axis=1, keepdims=True))
    ce_int = -anp.mean(logp[anp.arange(len(labels)), labels])
    ce_probs = -anp.mean(anp.sum(probs * logp, axis=1))
    return ce_int + 0.5 * ce_probs + 0.01 * anp.sum(p["W1"] ** 2)


def test_composite_loss_gradients_match_autograd():
    rng = np.random.default_rng(42)
    params = _mlp_params(rng)
    x = rng.standard_normal((8, 5))
    labels = rng.integers(0, 3, size=8)
    raw = rng.uniform(0.1, 1.0, size=(8, 3))
    probs = raw / raw.sum(axis=1, keepdims=True)

    g = dg.Graph()
    xn = g.input("x", shape=(None, 5))
    yn = g.input("labels", shape=(None,), dtype="int64")
    qn = g.input("probs", shape=(None, 3))
    p = {k: g.param(k, v) for k, v in params.items()}
    h1 = dg.tanh(xn @ p["W1"] + p["b1"])
    h2 = dg.sigmoid(dg.matmul(h1, p["W2"]) + p["b2"])
    logits = h2 @ p["W3"] + p["b3"]
    loss = dg.cross_entropy(logits, yn) + 0.5 * dg.cross_entropy(logits, qn)
    g.output("loss", loss + 0.01 * (p["W1"] ** 2).sum())

    res = dg.LocalExecutor().run(g, {"x": x, "labels": labels, "probs": probs}, grad="loss")
    expected_loss = _autograd_loss(params, x, labels, probs)
    assert res.values["loss"] == pytest.approx(expected_loss, rel=1e-12)

    expected = autograd_grad(_autograd_loss)(params, x, labels, probs)
    expected_x = autograd_grad(_autograd_loss, 1)(params, x, labels, probs)
    assert set(res.grads) == {*params, "x", "probs"}
    for name, want in [*expected.items(), ("x", expected_x)]:
        got = res.grads[name]
        assert got.shape == want.shape, name
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-15, err_msg=name)


# --- the graph transform ---------------------------------------------------------------------


def test_grad_appends_backward_nodes_and_leaves_forward_untouched():
    g, _, out = mlp()
    before = [n.model_dump() for n in g.nodes]
    gg = dg.grad(g, of=out)
    assert [n.model_dump() for n in g.nodes] == before  # the input graph is not modified
    assert [n.model_dump() for n in gg.nodes[: len(before)]] == before
    backward = gg.nodes[len(before) :]
    assert backward and all(n.phase == "backward" for n in backward)
    forward_names = {n["name"] for n in before}
    assert all(n.origin in forward_names for n in backward)
    assert gg.grad_of == out
    assert set(gg.grads) == {"x", "W1", "b1", "W2", "b2", "W3", "b3"}  # y is int: no gradient
    assert all(gg[node].spec.phase == "backward" for node in gg.grads.values())


def test_grad_is_deterministic():
    for name, build in BUILDERS.items():
        g, _, out = build()
        assert dg.grad(g, out).to_json() == dg.grad(g, out).to_json(), name


def test_shared_node_accumulates_in_a_fixed_order():
    g = dg.Graph()
    x = g.input("x")
    h = x * 2.0
    g.output("out", h * h + dg.tanh(h) + h)
    gg = dg.grad(g, "out")
    acc = gg["grad:" + h.name].spec
    assert acc.op == "add_n" and len(acc.inputs) == 4  # h*h reads h twice
    res = dg.LocalExecutor().run(g, {"x": 0.3}, grad="out")
    hv = 0.6
    assert res.grads["x"] == pytest.approx(2 * (2 * hv + (1 - np.tanh(hv) ** 2) + 1))


def test_unused_param_gets_a_zero_gradient_of_its_shape():
    g = dg.Graph()
    x = g.input("x")
    g.param("unused", np.ones((2, 3)))
    g.output("out", x * 3.0)
    res = dg.LocalExecutor().run(g, {"x": 1.0}, grad="out")
    np.testing.assert_array_equal(res.grads["unused"], np.zeros((2, 3)))
    assert res.grads["x"] == 3.0


def test_non_scalar_output_is_seeded_with_ones():
    g = dg.Graph()
    x = g.input("x", shape=(3,))
    w = g.param("w", np.array([1.0, 2.0, 3.0]))
    g.output("y", x * w)
    res = dg.LocalExecutor().run(g, {"x": np.array([4.0, 5.0, 6.0])}, grad="y")
    np.testing.assert_array_equal(res.grads["x"], [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(res.grads["w"], [4.0, 5.0, 6.0])


def test_grad_wrt_subset_and_refusals():
    g, _feeds, out = BUILDERS["seed"]()
    gg = dg.grad(g, out, wrt=["w"])
    assert list(gg.grads) == ["w"]
    with pytest.raises(dg.GraphError, match="already holds the backward pass"):
        dg.grad(gg, out)
    with pytest.raises(dg.GraphError, match="nope"):
        dg.grad(g, "nope")
    with pytest.raises(dg.GraphError, match="mul_1"):
        dg.grad(g, out, wrt=["mul_1"])


def test_differentiated_graph_runs_like_grad_argument():
    g, feeds, out = BUILDERS["classifier"]()
    a = dg.LocalExecutor().run(g, feeds, grad=out)
    b = dg.LocalExecutor().run(dg.grad(g, out), feeds, grad=out)
    assert a.values == b.values
    for k in a.grads:
        np.testing.assert_array_equal(a.grads[k], b.grads[k])


# --- check_grads itself ----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_check_grads_passes_on_every_builder(name):
    g, feeds, out = BUILDERS[name]()
    dg.testing.check_grads(g, feeds, of=out)


def test_check_grads_catches_a_wrong_vjp(monkeypatch):
    good = ops.OPS["tanh"]
    wrong = lambda g, out, a: g * (1 - out)
    monkeypatch.setitem(ops.OPS, "tanh", dataclasses.replace(good, vjps=(wrong,)))
    g = dg.Graph()
    x = g.input("x", shape=(2,))
    g.output("out", dg.tanh(x).sum())
    with pytest.raises(dg.GradientCheckError) as info:
        dg.testing.check_grads(g, {"x": np.array([0.5, -0.3])})
    msg = str(info.value)
    assert "'x'" in msg and "tanh" in msg and "'out'" in msg
    analytic = 1 - np.tanh(0.5)
    numeric = 1 - np.tanh(0.5) ** 2
    assert f"{analytic:.6f}"[:6] in msg and f"{numeric:.6f}"[:6] in msg
    assert isinstance(info.value, AssertionError)  # pytest shows it as a failed assertion


def test_check_grads_catches_a_wrong_param_gradient(monkeypatch):
    good = ops.OPS["mul"]
    wrong = lambda g, out, a, b: 2 * g * a
    monkeypatch.setitem(ops.OPS, "mul", dataclasses.replace(good, vjps=(good.vjps[0], wrong)))
    g, feeds, out = BUILDERS["seed"]()
    with pytest.raises(dg.GradientCheckError, match=r"'w'.*mul.*4\.0.*2\.0"):
        dg.testing.check_grads(g, feeds, of=out)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_graphs(smooth=True))
def test_check_grads_passes_on_random_graphs(built):
    g, feeds, out = built
    dg.testing.check_grads(g, feeds, of=out)
