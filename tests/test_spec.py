"""The IR as JSON: exact round trips, validation, size limits, and never a pickle."""

from __future__ import annotations

import base64
import json
import pickle

import numpy as np
import pytest
from graphs import BUILDERS, EXAMPLE_BUILDERS, random_graphs
from hypothesis import HealthCheck, given, settings

import distgraph as dg
from distgraph.spec import ArrayData, GraphSpec


def assert_same_result(a: dg.Result, b: dg.Result) -> None:
    """Values and gradients equal bit for bit, with equal types and dtypes."""
    assert a.values.keys() == b.values.keys() and a.grads.keys() == b.grads.keys()
    for x, y in [
        *zip(a.values.values(), b.values.values()),
        *zip(a.grads.values(), b.grads.values()),
    ]:
        assert type(x) is type(y)
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(x, y)


def _round_trip(g: dg.Graph, feeds: dict, out: str) -> None:
    text = g.to_json()
    loaded = dg.Graph.from_json(text)
    assert loaded.to_json() == text  # a fixed point: nothing lost or reordered
    assert loaded.levels() == g.levels() and loaded.outputs == g.outputs
    ex = dg.LocalExecutor()
    assert_same_result(ex.run(g, feeds, grad=out), ex.run(loaded, feeds, grad=out))
    # The differentiated graph (backward nodes, grads map) round-trips too.
    full = dg.grad(g, out)
    again = dg.Graph.from_json(full.to_json(indent=2))
    assert again.grads == full.grads and again.grad_of == full.grad_of
    assert [n.phase for n in again.nodes] == [n.phase for n in full.nodes]
    assert_same_result(ex.run(full, feeds, grad=out), ex.run(again, feeds, grad=out))


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_round_trip_builders(name):
    _round_trip(*BUILDERS[name]())


@pytest.mark.parametrize("name", sorted(EXAMPLE_BUILDERS))
def test_round_trip_examples(name):
    _round_trip(*EXAMPLE_BUILDERS[name]())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_graphs())
def test_round_trip_random_graphs(built):
    _round_trip(*built)


def test_round_trip_keeps_dtypes_and_constants():
    g = dg.Graph()
    x = g.input("x", shape=(None, 3), dtype="float32")
    w = g.param("w", np.arange(3, dtype=np.float32))
    mask = g.const(np.array([True, False, True]), name="mask")
    table = g.const(np.array([[1, 2, 3]], dtype=np.int16), name="table")
    h = dg.where(mask, x * w, x * 0.5) + table
    g.output("out", h.sum(axis=1))
    loaded = dg.Graph.from_json(g.to_json())
    assert loaded["out"].dtype == np.float32 and loaded.params["w"].dtype == np.float32
    assert loaded["x"].shape == (None, 3)
    feeds = {"x": np.ones((2, 3), np.float32)}
    assert_same_result(dg.LocalExecutor().run(g, feeds), dg.LocalExecutor().run(loaded, feeds))


def test_params_are_stored_exactly():
    values = np.array([np.pi, -0.0, 1e-300, np.nextafter(1.0, 2.0)])
    g = dg.Graph()
    g.output("out", g.param("p", values).sum())
    loaded = dg.Graph.from_json(g.to_json())
    assert loaded.params["p"].tobytes() == values.tobytes()


def test_spec_rejects_unregistered_ops():
    g, _, _ = BUILDERS["seed"]()
    doc = json.loads(g.to_json())
    doc["nodes"][3]["op"] = "frobnicate"
    with pytest.raises(dg.SpecError, match=r"nodes\.3\.op.*'frobnicate'"):
        dg.Graph.from_json(json.dumps(doc))
    # A backward node naming an unknown op in its attrs is refused too.
    full = json.loads(dg.grad(*BUILDERS["seed"]()[::2]).to_json())
    vjp = next(n for n in full["nodes"] if n["op"] == "vjp")
    vjp["attrs"]["op"] = "frobnicate"
    with pytest.raises(dg.DistgraphError, match="'frobnicate'"):
        dg.Graph.from_json(json.dumps(full))


def test_oversized_spec_is_refused_before_parsing():
    g, _, _ = BUILDERS["mlp"]()
    text = g.to_json()
    with pytest.raises(dg.SpecError, match=f"{len(text)} bytes.*limit of 100"):
        dg.Graph.from_json(text, max_bytes=100)
    with pytest.raises(dg.SpecError, match="limit"):
        GraphSpec.from_json(text.encode(), max_bytes=len(text) - 1)
    assert dg.Graph.from_json(text, max_bytes=len(text)).to_json() == text


def _spec_with_param(array: dict) -> str:
    return json.dumps(
        {"nodes": [{"name": "p", "op": "param", "shape": [2], "dtype": "float64"}],
         "outputs": ["p"], "params": {"p": array}}
    )  # fmt: skip


@pytest.mark.parametrize("dtype", ["object", "O", "V8", "<U4", "S3", "complex128", "datetime64"])
def test_disallowed_array_dtypes_are_refused(dtype):
    payload = base64.b64encode(pickle.dumps([1, 2])).decode()
    text = _spec_with_param({"dtype": dtype, "shape": [2], "data": payload})
    with pytest.raises(dg.SpecError, match=r"params\.p\.dtype.*not allowed"):
        dg.Graph.from_json(text)


def test_a_spec_never_unpickles(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("pickle was used")

    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "Unpickler", boom)
    g, feeds, out = BUILDERS["classifier"]()
    loaded = dg.Graph.from_json(g.to_json())
    dg.LocalExecutor().run(loaded, feeds, grad=out)
    # Pickle bytes under an allowed dtype are just numbers of the wrong size.
    payload = base64.b64encode(pickle.dumps(["os.system"], protocol=4)).decode()
    with pytest.raises(dg.SpecError, match="bytes"):
        dg.Graph.from_json(_spec_with_param({"dtype": "float64", "shape": [2], "data": payload}))


def test_cannot_serialize_object_arrays():
    with pytest.raises(dg.SpecError, match="object"):
        ArrayData.from_numpy(np.array([{}, None], dtype=object))


def test_array_data_is_validated():
    with pytest.raises(dg.SpecError, match="not valid base64"):
        dg.Graph.from_json(_spec_with_param({"dtype": "float64", "shape": [2], "data": "!!"}))
    with pytest.raises(dg.SpecError, match="param node has no value"):
        dg.Graph.from_json(json.dumps({"nodes": [{"name": "p", "op": "param"}], "outputs": ["p"]}))
    with pytest.raises(dg.SpecError, match=r"outputs.*'ghost'"):
        dg.Graph.from_json(
            json.dumps({"nodes": [{"name": "x", "op": "input"}], "outputs": ["ghost"]})
        )


def test_spec_is_plain_data():
    g, _, _ = BUILDERS["shapes"]()
    doc = json.loads(g.to_json())
    assert doc["format"] == "distgraph.graph/1"
    assert [n["name"] for n in doc["nodes"]] == [n.name for n in g.nodes]
    for node in doc["nodes"]:
        assert set(node) == {"name", "op", "inputs", "attrs", "shape", "dtype", "phase", "origin"}
    index = next(n for n in doc["nodes"] if n["op"] == "index")
    assert index["attrs"]["index"] == [[0, 2, 2, 4], {"slice": [1, 11, 2]}]


def test_spec_in_any_order_is_sorted_topologically():
    text = json.dumps(
        {
            "nodes": [
                {"name": "z", "op": "add", "inputs": ["m", "b"]},
                {"name": "m", "op": "mul", "inputs": ["x", "w"]},
                {"name": "x", "op": "input"},
                {"name": "w", "op": "const"},
                {"name": "b", "op": "const"},
            ],
            "outputs": ["z"],
            "constants": {"w": 3.0, "b": 1.0},
        }
    )
    g = dg.Graph.from_json(text)
    order = [n.name for n in g.nodes]
    assert order[-1] == "z" and order.index("x") < order.index("m")
    assert dg.LocalExecutor().run(g, {"x": 2.0}).values == {"z": 7.0}


def test_make_node_matches_model_construct():
    from distgraph.spec import NodeSpec, make_node

    fields = dict(
        name="n",
        op="add",
        inputs=["a", "b"],
        attrs={"k": 1},
        shape=[None, 3],
        dtype="float32",
        phase="backward",
        origin="m",
    )
    fast = make_node(**fields)
    slow = NodeSpec.model_construct(**fields)
    assert fast == slow
    assert fast.model_dump() == slow.model_dump() == fields
    assert fast.model_dump_json() == slow.model_dump_json()
    assert fast.model_copy(update={"name": "m2"}).name == "m2"
    assert NodeSpec.model_validate_json(fast.model_dump_json()) == slow


def test_non_finite_scalar_constants_round_trip():
    """JSON has no NaN: they were written as null, which did not load back (found by the fuzzer)."""
    g = dg.Graph()
    x = g.input("x", shape=(2,), dtype="float64")
    g.output("y", x * float("nan") + float("-inf"))
    text = g.to_json()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in the spec"))
    again = dg.Graph.from_json(text)
    got = dg.LocalExecutor().run(again, {"x": np.ones(2)}).values["y"]
    assert np.isnan(got).all()
    assert again.to_json() == text
