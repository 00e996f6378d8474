"""What a run is compiled for, on both executors (issues 11 and 12): the gradient asked for,
the graph as it is now, the feeds as they are given, and the names, shapes and labels allowed.

Every test runs on the LocalExecutor and on a two-worker RayExecutor, which must agree.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from raysupport import ensure_ray

import distgraph as dg
from distgraph.cli import main as cli_main

BACKENDS = ["local", "ray"]


@pytest.fixture(scope="module")
def executors():
    ensure_ray()
    exs = {"local": dg.LocalExecutor(), "ray": dg.RayExecutor(num_workers=2, strategy="mincut")}
    yield exs
    for ex in exs.values():
        ex.close()


@pytest.fixture(params=BACKENDS)
def ex(request, executors):
    return executors[request.param]


def assert_grads_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert np.array_equal(got[k], want[k]), k


# --- 11.4: a graph differentiated for one output, asked for another -------------------------


def two_losses() -> tuple[dg.Graph, dict]:
    g = dg.Graph()
    x = g.input("x", shape=(None, 2))
    w = g.param("w", np.array([0.5, -1.0]))
    b = g.param("b", 0.25)
    g.output("a", ((x * w).sum(axis=1) + b).mean())
    g.output("b_loss", (((x * w).sum(axis=1) - b) ** 2).mean())
    return g, {"x": np.array([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]])}


def test_grad_of_another_output_differentiates_that_output(ex):
    g, feeds = two_losses()
    da = dg.LocalExecutor().run(g, feeds, grad="a").grads
    db = dg.LocalExecutor().run(g, feeds, grad="b_loss").grads
    assert not np.array_equal(da["w"], db["w"])  # precondition: the two answers differ
    of_a = dg.grad(g, of="a")
    assert_grads_equal(ex.run(of_a, feeds, grad="b_loss").grads, db)
    assert_grads_equal(ex.run(of_a, feeds, grad="a").grads, da)
    assert_grads_equal(ex.run(of_a, feeds).grads, da)  # no grad asked: the one it holds


def test_trainer_on_a_graph_differentiated_for_another_output(ex):
    g, feeds = two_losses()
    ref = dg.Trainer(g, "b_loss", dg.SGD(0.1))
    ref.fit(feeds, epochs=3, batch_size=3)
    t = dg.Trainer(dg.grad(g, of="a"), "b_loss", dg.SGD(0.1), executor=ex)
    t.fit(feeds, epochs=3, batch_size=3)
    other = dg.Trainer(g, "a", dg.SGD(0.1))
    other.fit(feeds, epochs=3, batch_size=3)
    assert not np.array_equal(other.params["w"], ref.params["w"])  # precondition
    for k, v in ref.params.items():
        assert np.array_equal(t.params[k], v), k
    t.close()


def test_graph_missing_some_params_gradients_trains_them_all(ex):
    """dg.grad(..., wrt=['w']) then training every param: b's gradient is taken too (before:
    KeyError on Local)."""
    g, feeds = two_losses()
    ref = dg.Trainer(g, "b_loss", dg.SGD(0.1))
    ref.fit(feeds, epochs=2, batch_size=3)
    part = dg.grad(g, of="b_loss", wrt=["w"])
    assert set(part.grads) == {"w"}  # precondition: b has no gradient node
    t = dg.Trainer(part, "b_loss", dg.SGD(0.1), executor=ex)
    t.fit(feeds, epochs=2, batch_size=3)
    assert t.params["b"] != 0.25
    for k, v in ref.params.items():
        assert np.array_equal(t.params[k], v), k
    t.close()


def test_param_without_a_path_to_the_loss_gets_a_zero_gradient(ex):
    g, feeds = two_losses()
    g.param("unused", np.array([1.0, 2.0, 3.0]))
    c = g.param("c", 2.0)
    g.output("loss", g["b_loss"] + dg.stop_gradient(c) * 0.0)
    t = dg.Trainer(g, "loss", dg.SGD(0.1), executor=ex)
    t.fit(feeds, epochs=2, batch_size=3)
    assert np.array_equal(t.params["unused"], [1.0, 2.0, 3.0]) and t.params["c"] == 2.0
    assert t.params["w"].tolist() != [0.5, -1.0]  # precondition: the others trained
    t.close()


def test_grad_of_another_output_refused_when_outputs_use_the_old_backward_pass(ex):
    g, feeds = two_losses()
    of_a = dg.grad(g, of="a")
    of_a.output("gw", of_a[of_a.grads["w"]] * 1.0)
    with pytest.raises(dg.GraphError, match=r"backward pass of 'a'.*\['gw'\]"):
        ex.run(of_a, feeds, grad="b_loss")


def test_cli_run_grad_of_another_output(tmp_path, capsys):
    g, feeds = two_losses()
    (tmp_path / "g.json").write_text(dg.grad(g, of="a").to_json())
    np.savez(tmp_path / "f.npz", **feeds)
    want = dg.LocalExecutor().run(g, feeds, grad="b_loss").grads
    argv = ["run", str(tmp_path / "g.json"), "--feeds", str(tmp_path / "f.npz")]
    assert cli_main([*argv, "--grad", "b_loss", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["grads"]
    assert np.array_equal(got["w"], want["w"]) and got["b"] == want["b"]


# --- 11.5: a mutation after a run -------------------------------------------------------------


def test_output_added_after_a_run_is_computed(ex):
    g = dg.Graph()
    x = g.input("x")
    h = g.apply("mul", x, 3.0, name="h")
    g.output("y", h + 1.0)
    assert ex.run(g, {"x": 2.0}).values == {"y": 7.0}
    g.output("h", h)  # a node that already has this name: no rename, no new node
    assert ex.run(g, {"x": 2.0}).values == {"y": 7.0, "h": 6.0}


def test_param_value_change_after_a_run_is_used(ex):
    g = dg.Graph()
    x = g.input("x")
    g.param("w", 2.0)
    g.output("y", x * g["w"])
    assert ex.run(g, {"x": 3.0}).values["y"] == 6.0
    g._params["w"] = np.array(5.0)  # what dg.testing.check_grads does to bump a param
    assert ex.run(g, {"x": 3.0}).values["y"] == 15.0


def test_every_mutation_changes_the_version():
    g = dg.Graph()
    seen = [g.version]

    def changed() -> None:
        assert g.version not in seen
        seen.append(g.version)

    x = g.input("x")
    changed()
    w = g.param("w", 1.0)
    changed()
    g.const(2.0, name="two")
    changed()
    y = x * w
    changed()
    g.output("y", y)  # rename of an auto-named node
    changed()
    g.output("y2", g["y"])  # identity node
    changed()
    g.output("x", x)  # already named: only the output list changes
    changed()
    g._params["w"] = np.array(3.0)
    changed()
    g._params.update(w=np.array(4.0))
    changed()
    assert g.copy().version not in seen and dg.grad(g, of="y").version not in seen
    assert g.with_params({"w": 1.0}).version not in seen


# --- 11.6: integer feeds that do not fit ------------------------------------------------------


def int_graph(dtype: str) -> dg.Graph:
    g = dg.Graph()
    g.output("y", g.input("x", shape=(None,), dtype=dtype) * 1)
    return g


@pytest.mark.parametrize(
    ("dtype", "value", "shown"),
    [
        ("int8", np.array([1, 300]), "300 at index [1]"),
        ("int32", np.array([2**40]), str(2**40)),
        ("uint8", np.array([-1, 3]), "-1 at index [0]"),
        ("int64", np.array([2**63], dtype=np.uint64), str(2**63)),
        ("int32", np.array([1.0, 1e10]), "10000000000.0"),
        ("int16", np.array([1, -40000]), "-40000"),
    ],
)
def test_int_feed_out_of_range_is_refused(ex, dtype, value, shown):
    with pytest.raises(dg.FeedError, match=rf"feed 'x'.*{re.escape(shown)}.*does not fit {dtype}"):
        ex.run(int_graph(dtype), {"x": value})


def test_int_feeds_that_fit_pass_unchanged(ex):
    res = ex.run(int_graph("int8"), {"x": np.array([-128, 127, 0])})
    assert res.values["y"].dtype == np.int8 and res.values["y"].tolist() == [-128, 127, 0]
    whole = ex.run(int_graph("int32"), {"x": np.array([1.0, -7.0])}).values["y"]
    assert whole.dtype == np.int32 and whole.tolist() == [1, -7]
    flags = ex.run(int_graph("int8"), {"x": np.array([True, False])}).values["y"]
    assert flags.tolist() == [1, 0]


def test_non_whole_float_into_int_input_is_refused(ex):
    with pytest.raises(dg.DTypeError, match=r"feed 'x'.*2\.5 at index \[1\].*int32"):
        ex.run(int_graph("int32"), {"x": np.array([1.0, 2.5])})
    with pytest.raises(dg.DTypeError, match=r"feed 'x'.*nan"):
        ex.run(int_graph("int32"), {"x": np.array([np.nan])})


def test_float_feed_overflowing_float32_is_refused_but_narrowing_is_fine(ex):
    g = dg.Graph()
    g.output("y", g.input("x", shape=(None,), dtype="float32") * 1)
    with pytest.raises(dg.FeedError, match=r"feed 'x'.*1e\+39.*float32"):
        ex.run(g, {"x": np.array([1.0, 1e39])})
    y = ex.run(g, {"x": np.array([0.1, np.inf])}).values["y"]
    assert y.dtype == np.float32 and y[0] == np.float32(0.1) and np.isinf(y[1])


# --- 12.4: declared dimensions ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((10**12,), "larger than the limit"),
        ((1,) * 65, "65 dimensions"),
        ((2**63, 0), "larger than the limit"),
        ((2**20, 2**20), "elements"),
        ((1.5,), "not an int"),
        ((True, 2), "not an int"),
    ],
)
def test_declared_dimensions_are_bounded_through_the_api(shape, message):
    with pytest.raises(dg.ShapeError, match=rf"input 'x'.*{message}"):
        dg.Graph().input("x", shape=shape)


@pytest.mark.parametrize("shape", [[10**12], [1] * 65, [2**63, 0], 1e12])
def test_declared_dimensions_are_bounded_in_specs(shape):
    dims = shape if isinstance(shape, list) else [shape]
    node = {"name": "x", "op": "input", "shape": dims, "dtype": "float64"}
    text = json.dumps({"format": "distgraph.graph/1", "nodes": [node], "outputs": ["x"]})
    with pytest.raises(dg.SpecError, match=r"nodes\.0\.shape"):
        dg.Graph.from_json(text)
    param = {"dtype": "float64", "shape": dims, "data": ""}
    node = {"name": "w", "op": "param"}
    text = json.dumps({"format": "distgraph.graph/1", "nodes": [node], "params": {"w": param}})
    with pytest.raises(dg.SpecError, match=r"params\.w\.shape"):
        dg.Graph.from_json(text)


# --- 12.5: a non-scalar loss ------------------------------------------------------------------


def test_non_scalar_loss_is_refused_naming_it(ex):
    g = dg.Graph()
    x = g.input("x", shape=(None, 2))
    w = g.param("w", np.ones(2))
    g.output("per_row", (x * w).sum(axis=1))
    t = dg.Trainer(g, "per_row", dg.SGD(0.1), executor=ex)
    with pytest.raises(dg.ShapeError, match=r"loss 'per_row' has shape \(batch,\)"):
        t.fit({"x": np.ones((4, 2))}, batch_size=2)
    assert np.array_equal(t.params["w"], [1.0, 1.0])


def test_non_scalar_loss_of_unknown_shape_is_refused_before_a_step(ex):
    g = dg.Graph()
    x = g.input("x")  # no shape: the loss's rank is known only from the feeds
    w = g.param("w", 2.0)
    g.output("loss", x * w)
    t = dg.Trainer(g, "loss", dg.SGD(0.1), executor=ex)
    with pytest.raises(dg.ShapeError, match=r"loss 'loss' has shape \(batch,\)"):
        t.fit({"x": np.ones(4)}, batch_size=2)
    assert t.params["w"] == 2.0 and t.applied_steps == []


# --- 12.9: names and labels -------------------------------------------------------------------


@pytest.mark.parametrize("bad", [":", "<script>", "../x", "", "a/../b", "a" * 300, "vjp:y:0"])
def test_spec_node_names_are_validated_like_api_names(bad):
    nodes = [
        {"name": "x", "op": "input", "dtype": "float64"},
        {"name": bad, "op": "neg", "inputs": ["x"]},
    ]
    text = json.dumps({"format": "distgraph.graph/1", "nodes": nodes, "outputs": [bad]})
    with pytest.raises(dg.SpecError, match=r"nodes\.1\.name"):
        dg.Graph.from_json(text)
    if bad:
        with pytest.raises(dg.GraphError):
            dg.Graph().input(bad)


def test_generated_names_still_round_trip():
    g, _ = two_losses()
    g2 = dg.grad(g, of="b_loss")
    assert any(":" in n.name for n in g2.nodes)  # precondition
    again = dg.Graph.from_json(g2.to_json())
    assert again.to_json() == g2.to_json()


@pytest.mark.parametrize("label", [-1, 3, 7])
def test_cross_entropy_labels_outside_the_classes_are_refused(ex, label):
    g = dg.Graph()
    logits = g.input("logits", shape=(None, 3))
    y = g.input("y", shape=(None,), dtype="int64")
    g.output("loss", dg.cross_entropy(logits, y))
    feeds = {"logits": np.zeros((4, 3)), "y": np.array([0, 2, label, 1])}
    with pytest.raises(dg.ExecutionError, match=rf"'loss'.*\[0, 3\).*found {label} at index \[2\]"):
        ex.run(g, feeds)
    with pytest.raises(dg.ExecutionError, match="'loss'"):
        ex.run(g, feeds, grad="loss")


# --- 12.10: the first classification graph ---------------------------------------------------


def classifier(y_kwargs: dict) -> tuple[dg.Graph, dict]:
    rng = np.random.default_rng(0)
    g = dg.Graph()
    x = g.input("x", shape=(None, 2))
    w = g.param("w", rng.standard_normal((2, 3)) * 0.1)
    b = g.param("b", np.zeros(3))
    y = g.input("y", **y_kwargs)
    g.output("loss", dg.cross_entropy(x @ w + b, y))
    xs = rng.standard_normal((30, 2))
    ys = (xs[:, 0] > 0).astype(np.int64) + (xs[:, 1] > 0.5)
    return g, {"x": xs, "y": ys}


def reference_loss(g: dg.Graph, feeds: dict) -> float:
    z = feeds["x"] @ g.params["w"] + g.params["b"]
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(feeds["y"])), feeds["y"]].mean())


@pytest.mark.parametrize("y_kwargs", [{}, {"dtype": "int64"}], ids=["undeclared", "dtype-only"])
def test_int_labels_into_an_input_declared_without_dtype_or_shape(ex, y_kwargs):
    g, feeds = classifier(y_kwargs)
    res = ex.run(g, feeds, grad="loss")
    assert np.isclose(res.values["loss"], reference_loss(g, feeds))
    assert set(res.grads) == {"x", "w", "b"}  # integer labels take no gradient
    assert res.grads["w"].shape == (2, 3)
    if not y_kwargs:  # the same graph also takes probability rows
        floats = ex.run(g, {"x": feeds["x"], "y": np.eye(3)[feeds["y"]]}, grad="loss")
        assert np.isclose(floats.values["loss"], res.values["loss"])


def test_trainer_on_int_labels_with_an_undeclared_input(ex):
    g, feeds = classifier({})
    ref = dg.Trainer(g, "loss", dg.Adam(0.1))
    ref.fit(feeds, epochs=5, batch_size=8)
    t = dg.Trainer(g, "loss", dg.Adam(0.1), executor=ex)
    hist = t.fit(feeds, epochs=5, batch_size=8)
    assert hist.loss[-1] < hist.loss[0] * 0.7
    for k, v in ref.params.items():
        assert np.array_equal(t.params[k], v), k
    t.close()


def test_labels_that_do_not_fit_say_what_to_declare(ex):
    g, feeds = classifier({})
    # A Python list carries no dtype: it is read as float64, i.e. as probability rows.
    hint = r"'loss'.*declared without a dtype or shape: .*'y' \(fed {}.*dtype='int64'"
    with pytest.raises(dg.ExecutionError, match=hint.format("float64")):
        ex.run(g, {"x": feeds["x"], "y": feeds["y"].tolist()})
    with pytest.raises(dg.ExecutionError, match=hint.format("int64")):
        ex.run(g, {"x": feeds["x"], "y": feeds["y"][:, None]})
    t = dg.Trainer(g, "loss", dg.SGD(0.1), executor=ex)
    with pytest.raises(dg.ExecutionError, match=hint.format("float64")):
        t.fit({"x": feeds["x"], "y": feeds["y"].astype(float)}, batch_size=10)
    assert t.applied_steps == []
    t.close()


def test_params_and_constants_are_bounded_through_the_api():
    with pytest.raises(dg.ShapeError, match=r"param 'w'.*40 dimensions"):
        dg.Graph().param("w", np.zeros((1,) * 40))
    with pytest.raises(dg.ShapeError, match=r"constant c.*40 dimensions"):
        dg.Graph().const(np.zeros((1,) * 40), name="c")


# --- review: a spec's backward pass is checked against the one dg.grad builds ------------------


def _two_param_grad_spec() -> dict:
    g = dg.Graph()
    x = g.input("x", shape=(None, 3))
    a, b = g.param("a", np.array([1.0, 2.0, 3.0])), g.param("b", np.array([0.5, 0.5, 0.5]))
    g.output("loss", ((x * a).sum(axis=1) + dg.exp(x * b).sum(axis=1)).mean())
    return json.loads(dg.grad(g, of="loss").to_json())


def _edit_a_forward_sum(doc: dict) -> None:
    node = next(n for n in doc["nodes"] if n["op"] == "sum" and n["phase"] == "forward")
    node["attrs"]["keepdims"] = True  # its vjp node keeps the old attrs


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda d: d["grads"].update(a=d["grads"]["b"], b=d["grads"]["a"]), "grads"),
        (lambda d: d["grads"].update(a="loss"), "grads"),
        (lambda d: d.update(grad_of=d["grads"]["a"]), "grad_of"),
        (_edit_a_forward_sum, "attrs"),
    ],
    ids=["swapped-same-shape", "grad-is-a-forward-node", "grad_of-elsewhere", "stale-vjp-attrs"],
)
def test_a_spec_whose_backward_pass_is_not_the_gradient_is_refused(edit, needle):
    # Review: these loaded, and run(grad="loss") or a Trainer returned (or applied) values
    # under the names of gradients they were not: with the swap, a's and b's silently.
    doc = _two_param_grad_spec()
    assert dg.Graph.from_json(json.dumps(doc)).grads == doc["grads"]  # the file as written loads
    edit(doc)
    with pytest.raises(dg.SpecError, match=needle):
        dg.Graph.from_json(json.dumps(doc))


def test_grad_graphs_with_a_subset_or_outputs_built_from_gradients_still_load():
    g = dg.Graph()
    x = g.input("x", shape=(None, 3))
    w = g.param("w", np.ones(3))
    g.output("loss", (x * w).sum())
    partial = dg.grad(g, of="loss", wrt=["w"])
    partial.output("gnorm", (partial[partial.grads["w"]] ** 2).sum())  # reads the backward pass
    again = dg.Graph.from_json(partial.to_json())
    assert again.to_json() == partial.to_json()
