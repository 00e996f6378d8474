"""Every error names what broke: its type and the names in its message are asserted."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

import distgraph as dg
from distgraph import errors
from distgraph.paramstore import ParameterStore


def _spec(*nodes: dict, outputs: list[str] | None = None) -> str:
    return json.dumps({"nodes": list(nodes), "outputs": outputs or []})


def _rotations(cycle: list[str]) -> set[tuple[str, ...]]:
    body = cycle[:-1]
    return {tuple(body[i:] + body[:i] + [body[i]]) for i in range(len(body))}


def test_error_hierarchy():
    for name in dir(errors):
        obj = getattr(errors, name)
        if (
            isinstance(obj, type)
            and issubclass(obj, Exception)
            and obj.__module__ == errors.__name__
        ):
            assert issubclass(obj, dg.DistgraphError), name
            assert getattr(dg, name) is obj  # exported


# --- cycles ------------------------------------------------------------------------------------


def test_cycle_names_its_path():
    text = _spec(
        {"name": "x", "op": "input"},
        {"name": "a", "op": "add", "inputs": ["x", "c"]},
        {"name": "b", "op": "neg", "inputs": ["a"]},
        {"name": "c", "op": "tanh", "inputs": ["b"]},
        {"name": "d", "op": "neg", "inputs": ["c"]},
        outputs=["d"],
    )
    with pytest.raises(dg.CycleError) as info:
        dg.Graph.from_json(text)
    assert isinstance(info.value, dg.GraphError)
    assert tuple(info.value.cycle) in _rotations(["a", "b", "c", "a"])
    assert " -> ".join(info.value.cycle) in str(info.value)
    assert re.search(r"(a -> b -> c -> a|b -> c -> a -> b|c -> a -> b -> c)", str(info.value))


def test_self_loop_is_a_cycle():
    text = _spec({"name": "x", "op": "input"}, {"name": "s", "op": "add", "inputs": ["x", "s"]})
    with pytest.raises(dg.CycleError, match="s -> s"):
        dg.Graph.from_json(text)


def test_dangling_input_is_named():
    text = _spec({"name": "x", "op": "input"}, {"name": "y", "op": "neg", "inputs": ["ghost"]})
    with pytest.raises(dg.GraphError, match=r"'y'.*'ghost'"):
        dg.Graph.from_json(text)


# --- shapes ------------------------------------------------------------------------------------


def test_shape_error_names_node_op_and_both_shapes():
    g = dg.Graph()
    x = g.param("x", np.ones((3, 4)))
    y = g.input("y", shape=(5,))
    with pytest.raises(dg.ShapeError) as info:
        g.apply("add", x, y, name="total")
    msg = str(info.value)
    assert "'total'" in msg and "add" in msg and "(3, 4)" in msg and "(5,)" in msg
    # An operator-built node has no name yet: the message says what it was built from.
    with pytest.raises(dg.ShapeError, match=r"mul\(x, y\).*op mul.*\(3, 4\).*\(5,\)"):
        x * y
    assert len(g) == 2  # the bad node was not added


@pytest.mark.parametrize(
    ("build", "op", "shapes"),
    [
        (lambda x, y: x @ y, "matmul", ["(3, 4)", "(5,)"]),
        (lambda x, y: dg.concat([x, y.reshape(5, 1)], axis=0), "concat", ["(3, 4)", "(5, 1)"]),
        (lambda x, y: x.reshape(7, 2), "reshape", ["(3, 4)"]),
        (lambda x, y: dg.mse(x, y), "mse", ["(3, 4)", "(5,)"]),
        (lambda x, y: dg.broadcast_to(y, (3, 4)), "broadcast_to", ["(5,)"]),
        (lambda x, y: x[5], "index", ["(3, 4)"]),
    ],
)
def test_shape_errors_of_other_ops(build, op, shapes):
    g = dg.Graph()
    x = g.param("x", np.ones((3, 4)))
    y = g.input("y", shape=(5,))
    with pytest.raises(dg.ShapeError) as info:
        build(x, y)
    msg = str(info.value)
    assert f"op {op}" in msg
    for s in shapes:
        assert s in msg


def test_runtime_shape_failure_names_node_op_and_shapes():
    g = dg.Graph()
    x, y = g.input("x"), g.input("y")  # no declared shapes: checked when run
    g.output("prod", x @ y)
    with pytest.raises(dg.ExecutionError, match=r"'prod'.*matmul.*x\(3, 4\).*y\(5,\)"):
        dg.LocalExecutor().run(g, {"x": np.ones((3, 4)), "y": np.ones(5)})


# --- feeds -------------------------------------------------------------------------------------


def _three_inputs() -> dg.Graph:
    g = dg.Graph()
    a, b, c = g.input("a", shape=(None, 3)), g.input("b", shape=(None,)), g.input("c")
    g.output("out", (a.sum(axis=1) * b).sum() + c)
    return g


def test_missing_feed_names_every_missing_input():
    with pytest.raises(dg.FeedError) as info:
        dg.LocalExecutor().run(_three_inputs(), {"b": np.ones(2)})
    msg = str(info.value)
    assert "'a'" in msg and "'c'" in msg and "'b'" not in msg.split("missing")[1].split("]")[0]


def test_unexpected_feeds_are_named():
    feeds = {"a": np.ones((2, 3)), "b": np.ones(2), "c": 1.0, "typo_x": 1.0, "extra": 2.0}
    with pytest.raises(dg.FeedError, match=r"unexpected feeds.*'typo_x'.*'extra'"):
        dg.LocalExecutor().run(_three_inputs(), feeds)


def test_wrong_batch_size_names_the_inputs_and_sizes():
    feeds = {"a": np.ones((4, 3)), "b": np.ones(5), "c": 1.0}
    with pytest.raises(dg.FeedError) as info:
        dg.LocalExecutor().run(_three_inputs(), feeds)
    msg = str(info.value)
    assert "batch size" in msg and "'a'" in msg and "'b'" in msg and "4" in msg and "5" in msg


def test_wrong_fixed_dimension_and_rank():
    g = _three_inputs()
    with pytest.raises(dg.FeedError, match=r"'a'.*\(4, 2\).*\(batch, 3\)"):
        dg.LocalExecutor().run(g, {"a": np.ones((4, 2)), "b": np.ones(4), "c": 1.0})
    with pytest.raises(dg.FeedError, match=r"'b'"):
        dg.LocalExecutor().run(g, {"a": np.ones((4, 3)), "b": np.ones((4, 1)), "c": 1.0})


def test_feed_of_wrong_kind_is_a_dtype_error():
    g = dg.Graph()
    x = g.input("x", dtype="int64")
    g.output("out", x * 2)
    with pytest.raises(dg.DTypeError, match="'x'"):
        dg.LocalExecutor().run(g, {"x": 1.5})


# --- specs -------------------------------------------------------------------------------------


def test_unknown_op_in_spec_names_the_field_path():
    text = _spec({"name": "x", "op": "input"}, {"name": "y", "op": "frobnicate", "inputs": ["x"]})
    with pytest.raises(dg.SpecError, match=r"nodes\.1\.op.*'frobnicate'"):
        dg.Graph.from_json(text)


def test_unknown_op_in_the_api():
    g = dg.Graph()
    with pytest.raises(dg.UnknownOpError, match="'frobnicate'"):
        g.apply("frobnicate", g.input("x"))


@pytest.mark.parametrize(
    ("doc", "path"),
    [
        ({"nodes": [{"name": "x", "op": "input"}, {"name": "y", "inputs": ["x"]}]}, "nodes.1.op"),
        ({"nodes": [{"name": "x", "op": "input", "shape": "abc"}]}, "nodes.0.shape"),
        ({"nodes": [{"name": "x", "op": "input", "colour": 1}]}, "nodes.0.colour"),
        ({"nodes": [{"name": "x", "op": "input", "phase": "sideways"}]}, "nodes.0.phase"),
        ({"nodes": "x"}, "nodes"),
        ({}, "nodes"),
        ({"nodes": [], "format": "other/9"}, "format"),
        (
            {
                "nodes": [{"name": "p", "op": "param"}],
                "params": {"p": {"dtype": "float64", "shape": [-1], "data": ""}},
            },
            "params.p.shape",
        ),
    ],
)
def test_malformed_spec_names_the_field_path(doc, path):
    with pytest.raises(dg.SpecError, match=re.escape(path)):
        dg.Graph.from_json(json.dumps(doc))


def test_invalid_json_text():
    with pytest.raises(dg.SpecError, match="not valid JSON"):
        dg.Graph.from_json('{"nodes": [')


# --- non-finite values -------------------------------------------------------------------------


def test_check_finite_names_the_first_node_that_produced_nan():
    g = dg.Graph()
    x = g.input("x", shape=(2,))
    bad = g.apply("log", x, name="bad_log")
    later = g.apply("mul", bad, 2.0, name="later")
    g.output("out", later.sum())
    feeds = {"x": np.array([1.0, -1.0])}
    with np.errstate(invalid="ignore"):
        plain = dg.LocalExecutor().run(g, feeds)
        assert math.isnan(plain.values["out"])  # off by default: NaN flows through
        with pytest.raises(dg.NonFiniteError) as info:
            dg.LocalExecutor().run(g, feeds, check_finite=True)
    msg = str(info.value)
    assert "'bad_log'" in msg and "log" in msg and "NaN" in msg and "'later'" not in msg


def test_check_finite_catches_inf_in_the_backward_pass():
    g = dg.Graph()
    x = g.input("x")
    g.output("out", dg.sqrt(x))
    with np.errstate(divide="ignore"), pytest.raises(dg.NonFiniteError, match=r"vjp.*sqrt.*Inf"):
        dg.LocalExecutor().run(g, {"x": 0.0}, grad="out", check_finite=True)


def test_check_finite_names_a_non_finite_feed():
    g = dg.Graph()
    g.output("out", g.input("x") * 2.0)
    with pytest.raises(dg.NonFiniteError, match="'x'"):
        dg.LocalExecutor().run(g, {"x": np.inf}, check_finite=True)


# --- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: dg.SGD(lr=0), "SGD.lr"),
        (lambda: dg.SGD(lr=-0.1), "SGD.lr"),
        (lambda: dg.SGD(lr=float("nan")), "SGD.lr"),
        (lambda: dg.SGD(lr=True), "SGD.lr"),
        (lambda: dg.SGD(lr="0.1"), "SGD.lr"),
        (lambda: dg.SGD(lr=0.1, weight_decay=-1), "SGD.weight_decay"),
        (lambda: dg.Momentum(momentum=1.0), "Momentum.momentum"),
        (lambda: dg.Momentum(momentum=-0.1), "Momentum.momentum"),
        (lambda: dg.Momentum(nesterov="yes"), "Momentum.nesterov"),
        (lambda: dg.Momentum(lr=float("inf")), "Momentum.lr"),
        (lambda: dg.Adam(beta1=1.0), "Adam.beta1"),
        (lambda: dg.Adam(beta2=1.5), "Adam.beta2"),
        (lambda: dg.Adam(eps=0.0), "Adam.eps"),
        (lambda: dg.Adam(lr=-1e-3), "Adam.lr"),
    ],
)
def test_invalid_optimizer_hyperparameters(make, field):
    with pytest.raises(dg.ConfigError, match=re.escape(field)):
        make()


def test_unknown_optimizer_kind_in_a_config():
    with pytest.raises(dg.ConfigError, match=r"optimizer\.kind"):
        dg.Optimizer.from_config({"kind": "lbfgs", "lr": 1.0})


def test_trainer_and_executor_settings_are_checked():
    g = dg.Graph()
    g.output("loss", (g.param("w", 1.0) - g.input("x")) ** 2)
    with pytest.raises(dg.ConfigError, match="'nope'"):
        dg.Trainer(g, loss="nope", optimizer=dg.SGD(lr=0.1))
    with pytest.raises(dg.ConfigError, match="optimizer"):
        dg.Trainer(g, loss="loss", optimizer="sgd")
    trainer = dg.Trainer(g, loss="loss", optimizer=dg.SGD(lr=0.1))
    with pytest.raises(dg.ConfigError, match="batch_size"):
        trainer.fit({"x": np.ones(4)}, epochs=1, batch_size=0)
    with pytest.raises(dg.ConfigError, match="epochs"):
        trainer.fit({"x": np.ones(4)}, epochs=-1)
    with pytest.raises(dg.FeedError, match="equal first dimensions"):
        trainer.fit({"x": np.ones(4), "y": np.ones(3)}, epochs=1)
    with pytest.raises(dg.ConfigError, match="threads"):
        dg.LocalExecutor(threads=0)


# --- failed optimizer steps change nothing -----------------------------------------------------


def test_failed_optimizer_step_leaves_params_unchanged():
    opt = dg.Adam(lr=0.1)
    params = {"a": np.array([1.0, 2.0]), "b": np.array(3.0)}
    store = ParameterStore(params, opt)
    store.apply(1, {"a": np.array([0.5, 0.5]), "b": np.array(1.0)})
    before = {k: v.copy() for k, v in store.params.items()}
    state_before = {k: {s: np.copy(v) for s, v in st.items()} for k, st in store.opt_state.items()}
    # "a" is fine, "b" is NaN: neither param nor any optimizer state may change.
    with pytest.raises(dg.NonFiniteError, match="'b'"):
        store.apply(2, {"a": np.array([0.5, 0.5]), "b": np.array(np.nan)})
    for k in before:
        np.testing.assert_array_equal(store.params[k], before[k])
        for s, v in state_before[k].items():
            np.testing.assert_array_equal(store.opt_state[k][s], v)
    assert store.applied == [1]
    with pytest.raises(dg.ShapeError, match="'a'"):
        store.apply(3, {"a": np.ones(3), "b": np.array(1.0)})
    assert store.applied == [1]


def test_trainer_step_with_nan_gradient_leaves_params_unchanged():
    g = dg.Graph()
    x, y = g.input("x", shape=(None,)), g.input("y", shape=(None,))
    g.output("loss", dg.mse(x * g.param("w", 1.0) + g.param("b", 0.0), y))
    trainer = dg.Trainer(g, loss="loss", optimizer=dg.Momentum(lr=0.1))
    trainer.fit({"x": np.ones(4), "y": np.ones(4) * 2}, epochs=1, batch_size=4)
    before, steps = trainer.params, trainer.step
    with np.errstate(invalid="ignore"), pytest.raises(dg.NonFiniteError, match="'w'"):
        trainer.fit({"x": np.array([1.0, np.nan, 1.0, 1.0]), "y": np.ones(4)}, epochs=1)
    assert trainer.params == before and trainer.step == steps
