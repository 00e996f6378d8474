"""The tracing API, shape/dtype inference and topological levels."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from graphs import BUILDERS

import distgraph as dg


def test_seed_graph_levels(seed_graph):
    g, _, _ = seed_graph
    levels = g.levels()
    assert [len(lv) for lv in levels] == [3, 1, 1]
    assert set(levels[0]) == {"x", "w", "b"}
    assert g[levels[1][0]].op == "mul" and g[levels[2][0]].op == "add"
    assert levels[2] == ["z"]
    assert g.levels(phase="forward") == levels


def test_seed_graph_levels_with_backward_nodes(seed_graph):
    g, _, _ = seed_graph
    full = dg.grad(g, "z")
    assert full.levels(phase="forward") == g.levels()
    backward = full.levels(phase="backward")
    # dz/dz, then add's two shares, then mul's two shares.
    assert [len(lv) for lv in backward] == [1, 2, 2]
    assert [full[n].spec.op for n in backward[0]] == ["ones_like"]
    assert {full[n].spec.attrs["op"] for n in backward[1]} == {"add"}
    assert {full[n].spec.attrs["op"] for n in backward[2]} == {"mul"}
    assert full.levels() == g.levels() + backward


def test_wide_graph_level_holds_every_branch():
    g, _, _ = BUILDERS["wide"]()
    levels = g.levels()
    assert max(len(lv) for lv in levels) >= 8
    matmuls = [n.name for n in g.nodes if n.op == "matmul"]
    assert len(matmuls) == 8 and any(set(matmuls) <= set(lv) for lv in levels)


def test_levels_respect_every_edge():
    for name, build in BUILDERS.items():
        g, _, out = build()
        full = dg.grad(g, out)
        level = {n: i for i, lv in enumerate(full.levels()) for n in lv}
        assert set(level) == {n.name for n in full.nodes}, name
        for node in full.nodes:
            for i in node.inputs:
                assert level[i] < level[node.name], (name, i, node.name)
            if node.inputs:  # as early as possible: one more than the deepest input
                assert level[node.name] == 1 + max(level[i] for i in node.inputs)


def test_diamond_levels():
    g, _, _ = BUILDERS["diamond"]()
    level = {n: i for i, lv in enumerate(g.levels()) for n in lv}
    out = g["out"].spec
    assert level["x"] == 0 and level[out.name] == max(level.values())


def test_hundred_thousand_node_chain_builds_levels_and_differentiates():
    limit = sys.getrecursionlimit()
    assert limit < 100_000  # so a recursive algorithm would fail here
    n = 100_000
    g = dg.Graph()
    h = g.input("x")
    a = g.param("a", 1.0001)
    for i in range(n - 2):
        h = h * a if i % 2 else dg.tanh(h)
    g.output("out", h)
    assert len(g) == n
    levels = g.levels()
    assert len(levels) == n - 1  # x and a share level 0
    full = dg.grad(g, "out")
    assert full.grads.keys() == {"x", "a"}
    backward = full.levels(phase="backward")
    assert len(full) > 2 * n - 10
    assert len(backward) >= n - 2


# --- the tracing API ---------------------------------------------------------------------------


def test_operators_and_reversed_forms():
    g = dg.Graph()
    x = g.input("x")
    exprs = {
        "add": x + 2.0, "radd": 2.0 + x, "sub": x - 2.0, "rsub": 2.0 - x,
        "mul": x * 3.0, "rmul": 3.0 * x, "div": x / 4.0, "rdiv": 4.0 / x,
        "pow": x ** 2, "neg": -x, "pos": +x,
        "matmul": g.const(np.array([1.0, 2.0])) @ (x * np.ones(2)),
        "rmatmul": np.array([1.0, 2.0]) @ (x * np.ones(2)),
        "array_left": np.array([1.0, 2.0]) * x,
    }  # fmt: skip
    for k, v in exprs.items():
        g.output(k, v)
    res = dg.LocalExecutor().run(g, {"x": 2.0})
    expected = {
        "add": 4.0, "radd": 4.0, "sub": 0.0, "rsub": 0.0, "mul": 6.0, "rmul": 6.0,
        "div": 0.5, "rdiv": 2.0, "pow": 4.0, "neg": -2.0, "pos": 2.0, "matmul": 6.0,
        "rmatmul": 6.0,
    }  # fmt: skip
    for k, v in expected.items():
        assert res.values[k] == v, k
    np.testing.assert_array_equal(res.values["array_left"], [2.0, 4.0])
    assert isinstance(exprs["array_left"], dg.Node)  # ndarray * Node defers to the Node


def test_constant_base_power_is_exp_of_scaled_log_and_differentiates():
    g = dg.Graph()
    x = g.param("x", np.array([0.5, 1.0, 3.0]))
    g.output("y", (2.0**x).sum())
    res = dg.LocalExecutor().run(g, {})
    np.testing.assert_allclose(
        res.values["y"], (2.0 ** np.array([0.5, 1.0, 3.0])).sum(), rtol=1e-15
    )
    dg.testing.check_grads(g, {}, of="y")
    for bad, why in ((0.0, "must be positive"), (-2, "must be positive"), ("2", "int or float")):
        with pytest.raises(dg.GraphError, match=why) as err:
            bad**x
        assert "x" in str(err.value)


def test_shape_and_dtype_inference():
    g = dg.Graph()
    x = g.input("x", shape=(None, 4))
    w = g.param("w", np.zeros((4, 3)))
    h = x @ w + np.zeros(3)
    assert h.shape == (None, 3) and h.dtype == np.float64
    assert h.sum(axis=0).shape == (3,)
    assert h.mean(axis=1, keepdims=True).shape == (None, 1)
    assert h.T.shape == (3, None)
    assert h[:, 1:].shape == (None, 2)
    assert dg.concat([h, h], axis=1).shape == (None, 6)
    assert dg.cross_entropy(h, g.input("y", shape=(None,), dtype="int64")).shape == ()
    x32 = g.input("x32", shape=(2,), dtype="float32")
    assert (x32 * 2.0).dtype == np.float32  # Python scalars stay weak
    assert (x32 * np.float64(2.0)).dtype == np.float32
    assert (x32 + g.param("p64", np.ones(2))).dtype == np.float64
    assert x32.astype("float64").dtype == np.float64
    assert g.input("free").shape is None
    assert (g["free"] * x).shape is None  # unknown until run


def test_params_are_copied_and_converted():
    value = np.array([1.0, 2.0])
    g = dg.Graph()
    p = g.param("p", value)
    value[0] = 99.0
    assert g.params["p"][0] == 1.0
    g.params["p"][1] = 42.0  # a copy is returned
    assert g.params["p"][1] == 2.0
    assert g.param("i", 3).dtype == np.float64
    with pytest.raises(dg.DTypeError, match="'s'"):
        g.param("s", "text")
    assert p.shape == (2,)


def test_output_names_and_graph_views():
    g = dg.Graph()
    x = g.input("x")
    w = g.param("w", 2.0)
    y = g.output("y", x * w)
    assert y.name == "y" and y.op == "mul"  # an unnamed node is renamed
    assert "y" in g and g["y"].name == "y"
    again = g.output("again", y)  # an output of a named node: an identity node
    assert again.op == "identity" and g.outputs == ["y", "again"]
    assert g.inputs == ["x"] and list(g.params) == ["w"]
    assert dg.LocalExecutor().run(g, {"x": 3.0}).values == {"y": 6.0, "again": 6.0}


def test_graph_structure_errors():
    g = dg.Graph()
    x = g.input("x")
    with pytest.raises(dg.GraphError, match="'x' already exists"):
        g.input("x")
    with pytest.raises(dg.GraphError, match="invalid node name 'a b'"):
        g.input("a b")
    with pytest.raises(dg.GraphError, match="'grad:x'"):
        g.param("grad:x", 1.0)
    other = dg.Graph().input("o")
    with pytest.raises(dg.GraphError, match="another graph"):
        x + other
    with pytest.raises(TypeError, match="truth value"):
        bool(x)
    with pytest.raises(dg.GraphError, match="constant exponent"):
        x**x
    with pytest.raises(dg.GraphError, match="no node named 'nope'"):
        g["nope"]
    with pytest.raises(dg.GraphError, match="operand"):
        x + "text"


def test_copy_is_independent():
    g, feeds, _ = BUILDERS["seed"]()
    c = g.copy()
    c.output("extra", c["z"] * 2.0)
    assert "extra" not in g and "extra" in c
    assert dg.LocalExecutor().run(g, feeds).values == {"z": 7.0}
    assert dg.LocalExecutor().run(c, feeds).values == {"z": 7.0, "extra": 14.0}


def test_graph_version_changes_recompile():
    g, feeds, _ = BUILDERS["seed"]()
    ex = dg.LocalExecutor()
    assert ex.run(g, feeds).values == {"z": 7.0}
    g.output("z2", g["z"] * g["z"])
    assert ex.run(g, feeds).values == {"z": 7.0, "z2": 49.0}
