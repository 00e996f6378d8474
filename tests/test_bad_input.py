"""Bad input (issue 6, item 6): a clear DistgraphError naming what is wrong, no parameter change.

Every input that reaches an executor is tried on both the reference executor and
``RayExecutor(2)``. Training cases take one good step, then a bad one, then assert that the
params and the record of applied steps did not move, and that later good steps give exactly
what a run that never saw the bad batch gives.
"""

from __future__ import annotations

import json
import re
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
    monkeypatch.setattr(ray_ex, "_object_store_capacity", lambda: float(capacity))
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
    monkeypatch.setattr(ray_ex, "_object_store_capacity", lambda: float(capacity))
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
