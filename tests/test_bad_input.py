"""Bad input (issue 6, item 6): a clear DistgraphError naming what is wrong, no parameter change.

Every input that reaches an executor is tried on both the reference executor and
``RayExecutor(2)``. Training cases take one good step, then a bad one, then assert that the
params and the record of applied steps did not move, and that later good steps give exactly
what a run that never saw the bad batch gives.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pytest
import ray
from graphs import seed_graph
from raysupport import ensure_ray

import distgraph as dg
from distgraph.spec import GraphSpec

# Ray prints the failed tasks of a bad step from a background thread; numpy warns about the
# NaN a node produces on purpose.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.fixture(scope="module")
def ray_ex():
    ensure_ray()
    ex = dg.RayExecutor(num_workers=2)
    yield ex
    ex.close()


@pytest.fixture(params=["local", "ray"])
def ex(request):
    """Each executor in turn; Ray spreads nodes round-robin so values cross workers."""
    if request.param == "local":
        yield dg.LocalExecutor()
        return
    ray_ex = request.getfixturevalue("ray_ex")
    ray_ex.strategy = "round_robin"
    yield ray_ex
    ray_ex.strategy = "mincut"
    # A failed step must not leave values behind on any worker.
    assert ray.get([w.held_steps.remote() for w in ray_ex.workers]) == [[], []]


# --- graphs and batches ------------------------------------------------------------------------


def classifier() -> dg.Graph:
    """Softmax regression: x (batch, 3) floats, labels (batch,) int64."""
    rng = np.random.default_rng(0)
    g = dg.Graph()
    x = g.input("x", shape=(None, 3))
    labels = g.input("labels", shape=(None,), dtype="int64")
    w = g.param("W", rng.standard_normal((3, 4)))
    b = g.param("b", np.zeros(4))
    g.output("loss", dg.cross_entropy(x @ w + b, labels))
    return g


def classifier_batch(n: int = 6, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, 3)), "labels": rng.integers(0, 4, size=n)}


def log_regression() -> dg.Graph:
    """mse(log(x) * w + b, y): a negative x makes the node ``bad_log`` produce NaN."""
    g = dg.Graph()
    x, y = g.input("x", shape=(None,)), g.input("y", shape=(None,))
    w, b = g.param("w", 0.5), g.param("b", 0.1)
    h = g.apply("log", x, name="bad_log") * w + b
    g.output("loss", dg.mse(h, y))
    return g


def log_batch() -> dict[str, np.ndarray]:
    return {"x": np.array([1.0, 2.0, 3.0, 4.0]), "y": np.array([1.0, 2.0, 1.0, 0.5])}


def untyped_matmul() -> dg.Graph:
    """An input without a declared shape: a wrong shape is only found when the op runs."""
    g = dg.Graph()
    x = g.input("x")
    w = g.param("W", np.full((3, 2), 0.5))
    prod = g.apply("matmul", x, w, name="prod")
    g.output("loss", (prod * prod).mean())
    return g


def assert_params_equal(got: Mapping[str, Any], want: Mapping[str, Any]) -> None:
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=f"param {k}")


def guarded_step(
    ex: dg.LocalExecutor,
    build: Callable[[], dg.Graph],
    good: Mapping[str, Any],
    bad: Mapping[str, Any],
    error: type[dg.DistgraphError],
    names: list[str],
    check_finite: bool = True,
) -> dg.DistgraphError:
    """Good step, bad step (must raise ``error`` naming ``names``), then good steps again."""
    opt = dg.SGD(lr=0.1)
    trainer = dg.Trainer(
        build(), loss="loss", optimizer=opt, executor=ex, check_finite=check_finite, progress=False
    )
    ref = dg.Trainer(build(), loss="loss", optimizer=opt, progress=False)  # never sees `bad`
    n = len(next(iter(good.values())))
    for t in (trainer, ref):
        t.fit(good, epochs=1, batch_size=n, shuffle=False)
    before, applied = trainer.params, trainer.applied_steps
    try:
        with pytest.raises(error) as info:
            trainer.session.step(trainer.step + 1, bad)
        msg = str(info.value)
        for name in names:
            assert name in msg, f"{name!r} not named in: {msg}"
        assert_params_equal(trainer.params, before)
        assert trainer.applied_steps == applied
        # The failed step id is free: the next good step takes it, and the run goes on as if
        # the bad batch had never been offered.
        for t in (trainer, ref):
            t.fit(good, epochs=2, batch_size=n, shuffle=False)
        assert trainer.applied_steps == [1, 2, 3]
        for k, v in ref.params.items():
            np.testing.assert_array_equal(trainer.params[k], v, err_msg=k)
    finally:
        trainer.close()
    return info.value


# --- cycles ------------------------------------------------------------------------------------


def _doc(*nodes: dict, outputs: list[str] | None = None, **extra: Any) -> dict:
    return {"nodes": list(nodes), "outputs": outputs or [], **extra}


@pytest.mark.parametrize(
    ("nodes", "cycle"),
    [
        (
            [
                {"name": "x", "op": "input"},
                {"name": "a", "op": "add", "inputs": ["x", "c"]},
                {"name": "b", "op": "tanh", "inputs": ["a"]},
                {"name": "c", "op": "neg", "inputs": ["b"]},
            ],
            ["a", "b", "c"],
        ),
        (
            [
                {"name": "p", "op": "mul", "inputs": ["q", "q"]},
                {"name": "q", "op": "exp", "inputs": ["p"]},
            ],
            ["p", "q"],
        ),
        ([{"name": "s", "op": "neg", "inputs": ["s"]}], ["s"]),
    ],
    ids=["three", "two", "self"],
)
def test_cycle_through_json_names_its_nodes(nodes, cycle):
    text = json.dumps(_doc(*nodes, outputs=[cycle[0]]))
    with pytest.raises(dg.CycleError) as info:
        dg.Graph.from_json(text)
    err = info.value
    assert isinstance(err, dg.GraphError)
    assert err.cycle[0] == err.cycle[-1] and sorted(set(err.cycle)) == sorted(cycle)
    assert " -> ".join(err.cycle) in str(err)
    # The same spec as a GraphSpec object (not text) is refused the same way.
    with pytest.raises(dg.CycleError):
        dg.Graph.from_spec(GraphSpec.model_validate(json.loads(text)))


# --- shapes ------------------------------------------------------------------------------------


def test_shape_mismatch_while_building_names_node_op_and_shapes():
    g = dg.Graph()
    x = g.input("x", shape=(None, 3))
    w = g.param("W", np.ones((4, 2)))
    with pytest.raises(dg.ShapeError) as info:
        g.apply("matmul", x, w, name="logits")
    msg = str(info.value)
    for needle in ("'logits'", "matmul", "(None, 3)", "(4, 2)"):
        assert needle in msg
    assert "logits" not in g


def test_shape_mismatch_in_a_json_spec_names_node_and_shapes():
    doc = _doc(
        {"name": "a", "op": "input", "shape": [3, 4]},
        {"name": "b", "op": "input", "shape": [5]},
        {"name": "total", "op": "add", "inputs": ["a", "b"]},
        outputs=["total"],
    )
    with pytest.raises(dg.ShapeError) as info:
        dg.Graph.from_json(json.dumps(doc))
    msg = str(info.value)
    for needle in ("'total'", "add", "(3, 4)", "(5,)"):
        assert needle in msg


def test_wrong_feed_shape_is_refused_before_training(ex):
    bad = dict(classifier_batch(), x=np.ones((6, 2)))
    guarded_step(
        ex, classifier, classifier_batch(), bad, dg.FeedError, ["'x'", "(6, 2)", "(batch, 3)"]
    )


def test_wrong_feed_rank_is_refused_before_training(ex):
    bad = dict(classifier_batch(), labels=np.zeros((6, 1), dtype=np.int64))
    guarded_step(ex, classifier, classifier_batch(), bad, dg.FeedError, ["'labels'", "(6, 1)"])


def test_shape_mismatch_found_while_running_names_node_op_and_shapes(ex):
    good = {"x": np.ones((4, 3))}
    bad = {"x": np.ones((4, 5))}
    guarded_step(
        ex, untyped_matmul, good, bad, dg.ExecutionError, ["'prod'", "matmul", "x(4, 5)", "W(3, 2)"]
    )


# --- dtypes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "names"),
    [
        ("labels", np.array([0.0, 1.0, 2.0, 3.0, 0.5, 1.0]), ["'labels'", "float64", "int64"]),
        ("x", np.array([["a", "b", "c"]] * 6), ["'x'", "float64"]),
        ("x", np.ones((6, 3), dtype=np.complex128), ["'x'", "complex128", "float64"]),
    ],
    ids=["float-labels", "string-x", "complex-x"],
)
def test_dtype_mismatch_names_the_input_and_both_dtypes(ex, field, value, names):
    bad = dict(classifier_batch(), **{field: value})
    guarded_step(ex, classifier, classifier_batch(), bad, dg.DTypeError, names)


def test_float_feed_into_an_int_input_on_run(ex):
    g = dg.Graph()
    k = g.input("k", dtype="int64")
    g.output("out", k * 2)
    with pytest.raises(dg.DTypeError, match=r"'k'.*float64.*int64"):
        ex.run(g, {"k": 1.5})
    assert ex.run(g, {"k": 3}).values["out"] == 6


# --- missing, unexpected and disagreeing feeds -------------------------------------------------


def test_missing_feeds_are_named(ex):
    err = guarded_step(
        ex, classifier, classifier_batch(), {"x": np.ones((6, 3))}, dg.FeedError, ["'labels'"]
    )
    assert "missing" in str(err) and "'x'" not in str(err).split("missing")[1].split("]")[0]


def test_unexpected_feeds_are_named(ex):
    bad = dict(classifier_batch(), lables=np.zeros(6, dtype=np.int64), extra=1.0)
    err = guarded_step(
        ex, classifier, classifier_batch(), bad, dg.FeedError, ["'lables'", "'extra'"]
    )
    assert "unexpected" in str(err)


def test_wrong_batch_size_between_inputs_names_both(ex):
    bad = {"x": np.ones((6, 3)), "labels": np.zeros(4, dtype=np.int64)}
    err = guarded_step(ex, classifier, classifier_batch(), bad, dg.FeedError, ["'x'", "'labels'"])
    assert "batch size" in str(err) and "6" in str(err) and "4" in str(err)


def test_feed_errors_on_run_change_nothing(ex):
    g, feeds, out = seed_graph()
    for bad, error in [({}, dg.FeedError), ({"x": 2.0, "y": 1.0}, dg.FeedError)]:
        with pytest.raises(error):
            ex.run(g, bad, grad=out)
    res = ex.run(g, feeds, grad=out)
    assert res.values["z"] == 7.0 and res.grads == {"x": 3.0, "w": 2.0, "b": 1.0}


# --- NaN and Inf -------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_feed_with_check_finite_is_named(ex, value):
    bad = classifier_batch()
    bad["x"] = bad["x"].copy()
    bad["x"][2, 1] = value
    guarded_step(ex, classifier, classifier_batch(), bad, dg.NonFiniteError, ["'x'"])


def test_nan_produced_by_a_node_names_that_node(ex):
    bad = dict(log_batch(), x=np.array([1.0, -2.0, 3.0, 4.0]))
    err = guarded_step(
        ex, log_regression, log_batch(), bad, dg.NonFiniteError, ["'bad_log'", "log", "NaN"]
    )
    assert "'loss'" not in str(err)  # the first node at fault, not a later one


def test_nan_produced_by_a_node_on_run_names_that_node(ex):
    g = log_regression()
    with pytest.raises(dg.NonFiniteError, match=r"'bad_log'.*log.*NaN"):
        ex.run(g, dict(log_batch(), x=np.array([1.0, -2.0, 3.0, 4.0])), check_finite=True)
    assert np.isfinite(ex.run(g, log_batch(), check_finite=True).values["loss"])


def test_inf_in_the_backward_pass_names_the_vjp_node(ex):
    g = dg.Graph()
    x = g.input("x", shape=(2,))
    g.output("out", g.apply("sqrt", x, name="root").sum())
    with pytest.raises(dg.NonFiniteError, match=r"vjp.*root.*sqrt.*Inf"):
        ex.run(g, {"x": np.array([0.0, 1.0])}, grad="out", check_finite=True)
    assert ex.run(g, {"x": np.array([4.0, 1.0])}, grad="out").grads["x"].tolist() == [0.25, 0.5]


def test_nan_gradient_leaves_params_unchanged(ex):
    """Without check_finite the NaN reaches the gradients; the optimizer refuses the update."""
    bad = classifier_batch()
    bad["x"] = bad["x"].copy()
    bad["x"][0, 0] = np.nan
    err = guarded_step(
        ex,
        classifier,
        classifier_batch(),
        bad,
        dg.NonFiniteError,
        ["gradient", "'W'"],
        check_finite=False,
    )
    assert "no parameter was changed" in str(err)


# --- specs -------------------------------------------------------------------------------------


def test_unknown_op_in_json_names_field_and_op():
    doc = _doc({"name": "x", "op": "input"}, {"name": "y", "op": "frobnicate", "inputs": ["x"]})
    with pytest.raises(dg.SpecError, match=r"nodes\.1\.op.*'frobnicate'"):
        dg.Graph.from_json(json.dumps(doc))


def test_unknown_op_inside_a_vjp_node_is_named():
    doc = _doc(
        {"name": "x", "op": "input"},
        {
            "name": "g",
            "op": "vjp",
            "inputs": ["x", "x"],
            "attrs": {"op": "frobnicate", "argnum": 0},
        },
    )
    with pytest.raises(dg.DistgraphError, match="'frobnicate'"):
        dg.Graph.from_json(json.dumps(doc))


def test_ops_are_named_not_imported():
    """A spec cannot reach Python callables: an op that names a module path is just unknown."""
    doc = _doc({"name": "x", "op": "input"}, {"name": "y", "op": "os.system", "inputs": ["x"]})
    with pytest.raises(dg.SpecError, match=r"nodes\.1\.op.*'os\.system'"):
        dg.Graph.from_json(json.dumps(doc))


@pytest.mark.parametrize(
    ("doc", "path"),
    [
        (_doc({"name": "x", "op": "input"}, {"name": "y", "inputs": ["x"]}), "nodes.1.op"),
        (_doc({"name": "x", "op": 7}), "nodes.0.op"),
        (_doc({"name": "x", "op": "input", "inputs": "abc"}), "nodes.0.inputs"),
        (_doc({"name": "x", "op": "input", "shape": [2, "three"]}), "nodes.0.shape.1"),
        (_doc({"name": "x", "op": "input", "attrs": []}), "nodes.0.attrs"),
        (_doc({"name": "x", "op": "input", "colour": "red"}), "nodes.0.colour"),
        (
            _doc(
                {"name": "p", "op": "param"},
                params={"p": {"dtype": "object", "shape": [1], "data": ""}},
            ),
            "params.p.dtype",
        ),
        (
            _doc(
                {"name": "p", "op": "param"},
                params={"p": {"dtype": "float64", "shape": [2, -3], "data": ""}},
            ),
            "params.p.shape",
        ),
        ({"nodes": [], "outputs": "z"}, "outputs"),
        ({"nodes": {"x": {"op": "input"}}}, "nodes"),
        ([1, 2, 3], "<root>"),
    ],
)
def test_malformed_json_names_the_field_path(doc, path):
    with pytest.raises(dg.SpecError) as info:
        dg.Graph.from_json(json.dumps(doc))
    assert re.search(rf"(^|\s){re.escape(path)}:", str(info.value)), str(info.value)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('{"nodes": [', "not valid JSON"),
        (b'{"nodes": [], "outputs": ["\xff\xfe"]}', "not valid JSON"),
        ("", "not valid JSON"),
        ("NaN", "<root>"),
    ],
    ids=["truncated", "not-utf8", "empty", "bare-value"],
)
def test_text_that_is_not_a_spec(text, needle):
    with pytest.raises(dg.SpecError, match=re.escape(needle)):
        dg.Graph.from_json(text)


def test_corrupted_array_data_names_the_param():
    g, _, _ = seed_graph()
    doc = json.loads(g.to_json())
    doc["params"]["w"]["data"] = "###not base64###"
    with pytest.raises(dg.SpecError, match="base64"):
        dg.Graph.from_json(json.dumps(doc))
    doc["params"]["w"]["data"] = "AAAA"  # valid base64, 3 bytes: not one float64
    with pytest.raises(dg.SpecError, match=r"3 bytes.*needs 8"):
        dg.Graph.from_json(json.dumps(doc))


def test_oversized_json_is_refused_before_parsing():
    g = dg.Graph()
    g.output("out", g.param("big", np.zeros(4096)).sum())
    text = g.to_json()
    with pytest.raises(dg.SpecError) as info:
        dg.Graph.from_json(text, max_bytes=1024)
    msg = str(info.value)
    assert str(len(text)) in msg and "1024" in msg
    assert len(dg.Graph.from_json(text, max_bytes=len(text)).nodes) == len(g.nodes)
    # Not parsed at all: an oversized text that is not even JSON gets the size error.
    with pytest.raises(dg.SpecError, match="larger than the limit"):
        dg.Graph.from_json("x" * 2048, max_bytes=1024)


# --- optimizer settings ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: dg.SGD(lr=-1), "SGD.lr"),
        (lambda: dg.Adam(beta1=1.5), "Adam.beta1"),
        (lambda: dg.Momentum(momentum=1), "Momentum.momentum"),
        (lambda: dg.Adam(beta2=-0.1), "Adam.beta2"),
        (lambda: dg.Adam(lr=float("nan")), "Adam.lr"),
        (lambda: dg.Optimizer.from_config({"kind": "adam", "beta1": 1.5}), "Adam.beta1"),
        (lambda: dg.Optimizer.from_config({"kind": "sgd", "lr": -1}), "SGD.lr"),
        (lambda: dg.Optimizer.from_config({"kind": "sgd", "rate": 0.1}), "rate"),
    ],
)
def test_invalid_optimizer_hyperparameters_name_the_field(make, field):
    with pytest.raises(dg.ConfigError) as info:
        make()
    assert field in str(info.value)


# --- the cluster -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"num_workers": 64}, ["64 workers", "CPU"]),
        ({"num_workers": 2, "resources_per_worker": {"CPU": 1000}}, ["2 workers", "2000 CPU"]),
        ({"num_workers": 1, "resources_per_worker": {"GPU": 1}}, ["1 workers", "GPU"]),
        ({"num_workers": 2, "resources_per_worker": {"tpu_pod": 1}}, ["tpu_pod"]),
    ],
    ids=["64-workers", "1000-cpus", "gpu", "custom-resource"],
)
def test_more_workers_than_the_cluster_can_place(ray_ex, kwargs, names):
    with pytest.raises(dg.ClusterError) as info:
        dg.RayExecutor(**kwargs)
    msg = str(info.value)
    for name in names:
        assert name in msg, msg
    assert "num_workers" in msg  # says what to change
    _assert_still_works(ray_ex)


def test_workers_that_fit_the_cluster_but_not_its_free_room(ray_ex):
    """The CPUs exist, but ``ray_ex`` holds some: the wait ends at the deadline, clearly."""
    total = int(ray.cluster_resources()["CPU"])
    with pytest.raises(dg.ClusterError) as info:
        dg.RayExecutor(num_workers=2, resources_per_worker={"CPU": total / 2}, deadline=2)
    msg = str(info.value)
    assert "2 workers" in msg and "CPU" in msg and "num_workers" in msg
    assert not [
        pg for pg in ray.util.placement_group_table().values() if pg["state"] == "PENDING"
    ], "the placement group of the failed executor was left pending"
    _assert_still_works(ray_ex)


def _assert_still_works(ex) -> None:
    g, feeds, out = seed_graph()
    res = ex.run(g, feeds, grad=out)
    assert res.values["z"] == 7.0 and res.grads == {"x": 3.0, "w": 2.0, "b": 1.0}


def test_feed_too_large_for_the_object_store(ray_ex, monkeypatch):
    capacity = 150 * 1024
    monkeypatch.setattr(ray_ex.cluster, "object_store_capacity", lambda: float(capacity))
    g = dg.Graph()
    x = g.input("x", shape=(None,))
    g.output("out", (x * g.param("w", 2.0)).sum())
    big = np.ones(200 * 1024 // 8)  # 200 KiB: over the (patched) capacity
    with pytest.raises(dg.DistgraphError) as info:
        ray_ex.run(g, {"x": big}, grad="out")
    msg = str(info.value)
    assert "'x'" in msg and (f"{big.nbytes:,}" in msg or str(big.nbytes) in msg), msg
    small = np.ones(1000)
    assert ray_ex.run(g, {"x": small}, grad="out").values["out"] == 2000.0
    # Training refuses the batch before the parameter server sees anything.
    trainer = dg.Trainer(g, loss="out", optimizer=dg.SGD(lr=0.01), executor=ray_ex, progress=False)
    with pytest.raises(dg.DistgraphError, match="'x'"):
        trainer.session.step(1, {"x": big})
    assert trainer.params == {"w": 2.0} and trainer.applied_steps == []
    trainer.session.step(1, {"x": small})
    assert trainer.applied_steps == [1]
    trainer.close()


def test_param_too_large_for_the_object_store(ray_ex, monkeypatch):
    capacity = 150 * 1024
    monkeypatch.setattr(ray_ex.cluster, "object_store_capacity", lambda: float(capacity))
    g = dg.Graph()
    x = g.input("x", shape=(None,))
    big = g.param("huge_w", np.ones(200 * 1024 // 8))
    g.output("out", (big * x.sum()).sum())
    nbytes = 200 * 1024
    with pytest.raises(dg.DistgraphError) as info:
        ray_ex.run(g, {"x": np.ones(3)}, grad="out")
    msg = str(info.value)
    assert "'huge_w'" in msg and (f"{nbytes:,}" in msg or str(nbytes) in msg), msg
    trainer = dg.Trainer(g, loss="out", optimizer=dg.SGD(lr=0.01), executor=ray_ex, progress=False)
    with pytest.raises(dg.DistgraphError, match="'huge_w'"):
        trainer.session.step(1, {"x": np.ones(3)})
    assert trainer.applied_steps == []
    np.testing.assert_array_equal(trainer.params["huge_w"], np.ones(200 * 1024 // 8))
    trainer.close()
    monkeypatch.undo()
    _assert_still_works(ray_ex)


# --- the runtime survives ----------------------------------------------------------------------


def test_ray_runtime_is_usable_after_every_kind_of_bad_input(ray_ex):
    """A burst of failing runs, then the seed graph and a training run, both exact."""
    g = log_regression()
    bad_runs: list[tuple[dict, dict]] = [
        ({}, {}),
        (dict(log_batch(), z=1.0), {}),
        (dict(log_batch(), x=np.ones(3)), {}),
        (dict(log_batch(), x=np.array(["a", "b", "c", "d"])), {}),
        (dict(log_batch(), x=np.array([1.0, -2.0, 3.0, 4.0])), {"check_finite": True}),
        (dict(log_batch(), y=np.array([np.inf, 0.0, 0.0, 0.0])), {"check_finite": True}),
    ]
    for strategy in ("round_robin", "mincut", "level"):
        ray_ex.strategy = strategy
        for feeds, kwargs in bad_runs:
            with pytest.raises(dg.DistgraphError):
                ray_ex.run(g, feeds, grad="loss", **kwargs)
        local = dg.LocalExecutor().run(g, log_batch(), grad="loss")
        remote = ray_ex.run(g, log_batch(), grad="loss")
        assert remote.values == local.values
        assert_params_equal(remote.grads, local.grads)
    ray_ex.strategy = "mincut"
    assert ray.get([w.held_steps.remote() for w in ray_ex.workers]) == [[], []]
    _assert_still_works(ray_ex)


# --- CLI and argument errors ---------------------------------------------------------------------
# (issue 12, items 5 and 8; the CLI's own table of bad invocations is in test_cli.py)


def _seed_trainer() -> tuple[dg.Trainer, dict[str, np.ndarray]]:
    g = log_regression()
    return dg.Trainer(g, loss="loss", optimizer=dg.SGD(lr=0.1), progress=False), log_batch()


@pytest.mark.parametrize("seed", [1.5, "abc", -1, True, None])
def test_fit_refuses_a_seed_that_is_not_a_non_negative_int(seed):
    trainer, data = _seed_trainer()
    before = trainer.params
    with pytest.raises(dg.ConfigError, match="seed must be an int >= 0"):
        trainer.fit(data, epochs=1, batch_size=2, seed=seed)
    assert trainer.step == 0
    assert_params_equal(trainer.params, before)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"epochs": True}, "epochs"), ({"batch_size": 2.0}, "batch_size"), ({"epochs": -1}, "epochs")],
)
def test_fit_refuses_bad_counts(kwargs, field):
    trainer, data = _seed_trainer()
    with pytest.raises(dg.ConfigError, match=f"^{field} must be an int"):
        trainer.fit(data, **{"epochs": 1, "batch_size": 2, **kwargs})
    assert trainer.step == 0


def test_fit_accepts_numpy_integers():
    trainer, data = _seed_trainer()
    trainer.fit(data, epochs=np.int64(1), batch_size=np.int32(2), seed=np.uint8(3))
    assert trainer.step == 2  # 4 rows in batches of 2


def test_fit_refuses_empty_data_by_name():
    trainer, data = _seed_trainer()
    empty = {k: v[:0] for k, v in data.items()}
    assert all(len(v) == 0 for v in empty.values()) and empty  # precondition: named, no rows
    with pytest.raises(dg.FeedError, match="no rows"):
        trainer.fit(empty, epochs=1, batch_size=2)
    assert trainer.step == 0 and len(trainer.history) == 0


def test_html_report_refuses_a_missing_folder(tmp_path):
    from distgraph.viz import write_report

    g, feeds, out = seed_graph()
    res = dg.LocalExecutor().run(g, feeds, grad=out, trace=True)
    kwargs = dict(placement={}, trace=res.trace, values=res.values, grads=res.grads)
    with pytest.raises(dg.ConfigError) as info:
        write_report(tmp_path / "missing" / "r.html", g.spec, **kwargs)
    assert str(tmp_path / "missing") in str(info.value) and "does not exist" in str(info.value)
    assert not (tmp_path / "missing").exists()
    # Not even at the filesystem root (the probe found a folder made there).
    root_dir = f"/distgraph-no-such-folder-{uuid.uuid4().hex}"
    try:
        with pytest.raises(dg.ConfigError, match=re.escape(root_dir)):
            write_report(f"{root_dir}/r.html", g.spec, **kwargs)
        assert not os.path.exists(root_dir)
    finally:
        shutil.rmtree(root_dir, ignore_errors=True)
    with pytest.raises(dg.ConfigError, match="it is a folder"):
        write_report(tmp_path, g.spec, **kwargs)
    assert write_report(tmp_path / "r.html", g.spec, **kwargs).is_file()  # an existing folder


class _NoRay:
    """Stands in for ``ray.init`` and records its arguments, so nothing starts."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, **kwargs: Any) -> None:
        self.calls.append(kwargs)
        raise RuntimeError("stop before starting Ray")


@pytest.fixture
def no_embedded_ray(monkeypatch):
    """As if no Ray ran in this process (the suite shares one), with ``ray.init`` disarmed."""
    fake = _NoRay()
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return fake


def test_embedded_ray_refuses_more_workers_than_cpus(no_embedded_ray):
    from distgraph.runtime.ray import machine_cpus

    cpus = machine_cpus()
    for workers in (cpus + 1, 1000):
        with pytest.raises(dg.ClusterError) as info:
            dg.RayExecutor(num_workers=workers)
        msg = str(info.value)
        assert f"{workers} workers" in msg and f"has {cpus}" in msg
        assert "num_workers" in msg and "oversubscribe=True" in msg
    # Fractional CPUs per worker still count one process per worker.
    with pytest.raises(dg.ClusterError):
        dg.RayExecutor(num_workers=cpus + 1, resources_per_worker={"CPU": 0.5})
    assert no_embedded_ray.calls == []  # refused before Ray was asked to start anything


@pytest.mark.parametrize(
    ("kwargs", "num_cpus"),
    [
        ({"oversubscribe": True}, None),  # None: the number of workers, checked below
        ({"ray_init_kwargs": {"num_cpus": 64}}, 64),
    ],
    ids=["oversubscribe", "explicit-num-cpus"],
)
def test_embedded_ray_starts_more_workers_when_asked(no_embedded_ray, kwargs, num_cpus):
    from distgraph.runtime.ray import machine_cpus

    workers = machine_cpus() + 1
    with pytest.raises(RuntimeError, match="stop before starting Ray"):
        dg.RayExecutor(num_workers=workers, **kwargs)
    (call,) = no_embedded_ray.calls
    assert call["address"] == "local" and call["num_cpus"] == (num_cpus or workers)


def test_embedded_ray_within_the_cpu_count_is_not_refused(no_embedded_ray):
    from distgraph.runtime.ray import machine_cpus

    with pytest.raises(RuntimeError, match="stop before starting Ray"):
        dg.RayExecutor(num_workers=machine_cpus())
    assert no_embedded_ray.calls[0]["num_cpus"] == machine_cpus()


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), float("inf"), "10", True])
def test_connect_timeout_must_be_positive_seconds(no_embedded_ray, timeout):
    with pytest.raises(dg.ConfigError, match="connect_timeout"):
        dg.RayExecutor(num_workers=1, address="127.0.0.1:1", connect_timeout=timeout)


@pytest.fixture
def silent_port():
    """A local port that accepts connections and never sends a byte (127.0.0.1 only)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(5)
    for conn in held:
        conn.close()
    server.close()


# Deadline correctness, not speed: the error must come at the timeout, not minutes later. The
# slack covers starting Python and importing Ray in the child process on a busy machine.
CONNECT_SLACK = 20.0


def test_connect_timeout_bounds_the_whole_connection(silent_port):
    address, timeout = f"127.0.0.1:{silent_port}", 3
    probe = (
        "import sys, time, distgraph as dg\n"
        "t = time.monotonic()\n"
        "try:\n"
        f"    dg.RayExecutor(num_workers=1, address={address!r}, connect_timeout={timeout})\n"
        "except dg.ClusterError as e:\n"
        "    print(f'{time.monotonic() - t:.2f}'); print(e); sys.exit(3)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 3, done.stderr[-2000:]
    elapsed, message = done.stdout.split("\n", 1)
    assert timeout * 0.9 <= float(elapsed) <= timeout + CONNECT_SLACK, elapsed
    assert address in message and f"connect_timeout={timeout} s" in message, message


def test_cli_connect_timeout_names_the_address_and_the_real_timeout(silent_port):
    address = f"127.0.0.1:{silent_port}"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "distgraph.cli", "demo", "--address", address]
        + ["--connect-timeout", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("distgraph: error:"), done.stderr
    assert address in lines[0] and "connect_timeout=2 s" in lines[0], lines[0]
    assert elapsed <= 2 + CONNECT_SLACK, elapsed


# --- hostile npz and checkpoint files ---
#
# Issue 12, items 3 and 5: feeds files and checkpoints users receive are read header-first. Each
# row is a file this test writes, the error it must raise, and a word its message must hold.
# The load runs in a subprocess whose address space is capped at 1.5 GiB over its baseline, so
# a file that makes the reader allocate what it claims dies there of MemoryError instead of
# passing.

_CEILING = 3 << 29  # 1.5 GiB
_BOMB_SHAPE = (70_000_000, 3)  # 1.68 GB of float64 zeros: over the ceiling and the 1 GiB limit

_LOADER = """
import json, resource, sys
import numpy as np
import distgraph as dg
from distgraph import cli

kind, path = sys.argv[1], sys.argv[2]
g = dg.Graph()
x, y = g.input("x", shape=(None, 3)), g.input("y", shape=(None,))
w = g.param("w", np.array([0.5, -0.5, 1.0]))
g.output("loss", dg.mse((x * w).sum(axis=1), y))
trainer = dg.Trainer(g, loss="loss", optimizer=dg.Adam(lr=0.1), progress=False)
if kind == "make":  # write a good checkpoint (the rows tamper with copies of it)
    trainer.fit({"x": np.ones((8, 3)), "y": np.ones(8)}, epochs=1, batch_size=4)
    trainer.save(path)
    sys.exit(0)
vm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize"))
limit = vm * 1024 + int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
try:
    if kind == "feeds":
        cli._load_feeds(path, g)
    else:
        trainer.load(path)
    out = {"error": None, "message": ""}
except BaseException as e:
    out = {"error": type(e).__name__, "message": str(e)[:800]}
print(json.dumps(out))
"""


def _run_loader(kind: str, path: Any) -> dict[str, Any]:
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", _LOADER, kind, str(path), str(_CEILING)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]) if kind != "make" else {}


def _npy_header(shape: tuple[int, ...], descr: str = "<f8") -> bytes:
    import io

    from numpy.lib import format as npy_format

    buf = io.BytesIO()
    npy_format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _zip(path: Any, members: dict[str, bytes], compress: bool = False) -> None:
    import zipfile

    mode = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", mode) as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def _bomb(path: Any, member: str) -> None:
    """A zip whose one member honestly unpacks to 1.68 GB of zeros (a few MB on disk)."""
    import zipfile

    with (
        zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf,
        zf.open(member, "w", force_zip64=True) as f,
    ):
        f.write(_npy_header(_BOMB_SHAPE))
        chunk, left = bytes(1 << 24), _BOMB_SHAPE[0] * _BOMB_SHAPE[1] * 8
        while left:
            n = min(left, len(chunk))
            f.write(chunk[:n])
            left -= n


def _feeds_file(root: Any, case: str) -> Any:
    path = root / f"{case}.npz"
    good_x, good_y = np.ones((4, 3)), np.ones(4)
    if case == "bomb":
        _bomb(path, "x.npy")
    elif case == "lying header":  # 7 TiB claimed by a 300-byte file
        _zip(path, {"x.npy": _npy_header((2**40, 1))})
    elif case == "header bigger than data":
        _zip(path, {"x.npy": _npy_header((1000, 3)) + bytes(24)})
    elif case == "object array":
        np.savez(path, x=np.array([{"a": 1}, None], dtype=object), y=good_y)
    elif case == "structured dtype":
        np.savez(path, x=np.zeros(4, dtype=[("a", "f8")]), y=good_y)
    elif case == "unicode strings":
        np.savez(path, x=np.array(["a", "b"]), y=good_y)
    elif case == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(300))
    elif case == "npy file":
        path = root / "x.npy"
        np.save(path, good_x)
    elif case == "missing":
        path = root / "nowhere.npz"
    elif case == "directory":
        path = root / "adir.npz"
        path.mkdir()
    elif case == "wrong shape":
        np.savez(path, x=np.ones((4, 5)), y=good_y)
    elif case == "unknown member":
        np.savez(path, x=good_x, y=good_y, z=good_y)
    elif case == "not an array member":
        _zip(path, {"x.npy": _npy_header((4, 3)) + good_x.tobytes(), "a.txt": b"hi"})
    else:
        raise AssertionError(case)
    return path


FEEDS_CASES = {
    "bomb": "'x'",
    "lying header": "'x'",
    "header bigger than data": "'x'",
    "object array": "'x'",
    "structured dtype": "'x'",
    "unicode strings": "'x'",
    "garbage": "not an .npz",
    "npy file": ".npy",
    "missing": "does not exist",
    "directory": "not a file",
    "wrong shape": "'x'",
    "unknown member": "'z'",
    "not an array member": "a.txt",
}


@pytest.mark.parametrize("case", sorted(FEEDS_CASES))
def test_hostile_feeds_file_is_refused_within_a_memory_ceiling(tmp_path, case):
    path = _feeds_file(tmp_path, case)
    out = _run_loader("feeds", path)
    assert out["error"] == "FeedError", out
    assert str(path.name) in out["message"] or case == "missing", out
    assert FEEDS_CASES[case] in out["message"], out


def _edit_state(ckpt: Any, edit: Callable[[dict], None]) -> None:
    version = ckpt / json.loads((ckpt / "checkpoint.json").read_text())["current"]
    state = json.loads((version / "state.json").read_text())
    edit(state)
    (version / "state.json").write_text(json.dumps(state))


def _old_format(ckpt: Any, params: Callable[[Any], None], step: Any = 1) -> None:
    """A format-1 checkpoint (three files; what earlier versions wrote) with hostile parts."""
    import shutil

    shutil.rmtree(ckpt)
    ckpt.mkdir()
    params(ckpt / "params.npz")
    np.savez(ckpt / "optimizer.npz")
    state = {"format": "distgraph.checkpoint/1", "step": step, "applied_steps": [1]}
    state.update(optimizer={"kind": "sgd", "lr": 0.1}, params=["w"], extra={})
    (ckpt / "state.json").write_text(json.dumps(state))


def _checkpoint_case(ckpt: Any, case: str) -> None:
    """Tamper with the good checkpoint ``ckpt`` (a copy) as ``case`` says."""
    if case.startswith("format 1"):
        version = None  # the whole directory is replaced
    else:
        version = ckpt / json.loads((ckpt / "checkpoint.json").read_text())["current"]
    if case == "format 1 bomb":
        _old_format(ckpt, lambda p: _bomb(p, "w.npy"))
    elif case == "format 1 lying header":
        _old_format(ckpt, lambda p: _zip(p, {"w.npy": _npy_header((2**40,))}))
    elif case == "format 1 step is text":
        _old_format(ckpt, lambda p: np.savez(p, w=np.ones(3)), step="abc")
    elif case == "bomb declared in state.json":
        _bomb(version / "arrays.npz", "p0.npy")
        _edit_state(ckpt, lambda s: s["params"]["w"].update(shape=list(_BOMB_SHAPE)))
    elif case == "lying header":
        _zip(version / "arrays.npz", {"p0.npy": _npy_header((2**40,))})
        _edit_state(ckpt, lambda s: s["params"]["w"].update(shape=[2**40]))
    elif case == "member shape differs from state.json":
        np.savez(
            version / "arrays.npz", p0=np.ones(5), s1=np.ones(3), s2=np.ones(3), s3=np.int64(1)
        )
    elif case == "object member":
        np.savez(version / "arrays.npz", p0=np.array([None] * 3, dtype=object))
    elif case == "garbage arrays":
        (version / "arrays.npz").write_bytes(b"\0" * 300)
    elif case == "step is negative":
        _edit_state(ckpt, lambda s: s.update(step=-1))
    elif case == "applied step ids are text":
        _edit_state(ckpt, lambda s: s.update(applied_steps=["a"]))
    elif case == "shape is text":
        _edit_state(ckpt, lambda s: s["params"]["w"].update(shape="big"))
    elif case == "epoch is negative":
        _edit_state(ckpt, lambda s: s["extra"].update(epoch=-3))
    elif case == "format is unknown":
        _edit_state(ckpt, lambda s: s.update(format="distgraph.checkpoint/9"))
    elif case == "state.json is not JSON":
        (version / "state.json").write_text("{not json")
    elif case == "pointer leaves the folder":
        (ckpt / "checkpoint.json").write_text(
            json.dumps({"format": "distgraph.checkpoint/2", "current": "../../etc"})
        )
    elif case == "state.json is too large":  # valid JSON, 65 MiB of blanks
        state = (version / "state.json").read_text()
        (version / "state.json").write_text(state[:-1] + " " * (65 << 20) + "}")
    elif case == "optimizer lr is negative":
        _edit_state(ckpt, lambda s: s["optimizer"].update(lr=-1))
    else:
        raise AssertionError(case)


CHECKPOINT_CASES = {
    "format 1 bomb": "'w'",
    "format 1 lying header": "'w'",
    "format 1 step is text": "step",
    "bomb declared in state.json": "'p0'",
    "lying header": "'p0'",
    "member shape differs from state.json": "'p0'",
    "object member": "'p0'",
    "garbage arrays": "arrays.npz",
    "step is negative": "field step",
    "applied step ids are text": "field applied_steps",
    "shape is text": "field params.w.shape",
    "epoch is negative": "field extra.epoch",
    "format is unknown": "field format",
    "state.json is not JSON": "state.json",
    "pointer leaves the folder": "field current",
    "optimizer lr is negative": "optimizer",
    "state.json is too large": "limit",
}


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "ckpt"
    _run_loader("make", path)
    return path


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_hostile_checkpoint_is_refused_within_a_memory_ceiling(tmp_path, good_checkpoint, case):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(good_checkpoint, ckpt)
    assert _run_loader("load", ckpt) == {"error": None, "message": ""}  # the copy is good
    _checkpoint_case(ckpt, case)
    out = _run_loader("load", ckpt)
    assert out["error"] == "CheckpointError", out
    assert CHECKPOINT_CASES[case] in out["message"], out
