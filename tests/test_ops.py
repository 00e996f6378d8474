"""Every registry op against finite differences, in float64, and its dtype kept in float32.

Each case builds the op under test on leaves of the requested dtype; the harness then adds a
probe ``out = sum(op_output * C)`` with a random constant ``C``, so a wrong VJP cannot hide
behind a gradient that happens to be all ones (``sum(softmax(x))`` is constant, for example).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

import distgraph as dg
from distgraph.ops import BUILTIN_OPS, LEAF_OPS, OPS, Attr, defop

#: Autodiff plumbing: inserted by ``dg.grad`` only, with no useful gradient of its own.
PLUMBING = {"ones_like", "zeros_like", "add_n"}

Build = Callable[["Leaves"], dg.Node]


class Leaves:
    """Creates inputs and params of one dtype on a graph and records the feeds."""

    def __init__(self, g: dg.Graph, dtype: str, rng: np.random.Generator):
        self.g, self.dtype, self.rng = g, dtype, rng
        self.feeds: dict[str, Any] = {}

    def _values(self, shape: tuple[int, ...], low: float | None, high: float | None) -> Any:
        if low is None:
            v = self.rng.standard_normal(shape)
        else:
            v = self.rng.uniform(low, high, size=shape)
        return v.astype(self.dtype)

    def input(self, name: str, shape: tuple[int, ...], low=None, high=None) -> dg.Node:
        """A fed input of this dtype (values uniform in [low, high) when given)."""
        self.feeds[name] = self._values(shape, low, high)
        return self.g.input(name, shape=shape, dtype=self.dtype)

    def param(self, name: str, shape: tuple[int, ...], low=None, high=None) -> dg.Node:
        """A param of this dtype."""
        return self.g.param(name, self._values(shape, low, high))

    def feed(self, name: str, value: Any, dtype: str) -> dg.Node:
        """An input with a fixed value and dtype (labels, conditions)."""
        value = np.asarray(value, dtype=dtype)
        self.feeds[name] = value
        return self.g.input(name, shape=value.shape, dtype=dtype)

    def away_from_zero(self, name: str, shape: tuple[int, ...], param: bool = False) -> dg.Node:
        """Values with |v| in [0.2, 2): no kink of abs/relu within a finite-difference step."""
        mag = self.rng.uniform(0.2, 2.0, size=shape)
        v = (mag * self.rng.choice([-1.0, 1.0], size=shape)).astype(self.dtype)
        if param:
            return self.g.param(name, v)
        self.feeds[name] = v
        return self.g.input(name, shape=shape, dtype=self.dtype)


@dataclass
class Case:
    """One op configuration: ``build`` returns the node under test."""

    id: str
    build: Build
    wrt: list[str] | None = None
    eps: float = 1e-6
    rtol: float = 1e-5


def _distinct(lv: Leaves, name: str, shape: tuple[int, ...], param: bool = False) -> dg.Node:
    """A permutation of well-separated values: max has no near ties."""
    v = (lv.rng.permutation(int(np.prod(shape))).reshape(shape) * 0.37 - 1.0).astype(lv.dtype)
    if param:
        return lv.g.param(name, v)
    lv.feeds[name] = v
    return lv.g.input(name, shape=shape, dtype=lv.dtype)


def _other(dtype: str) -> str:
    return "float32" if dtype == "float64" else "float64"


def _separated(lv: Leaves, a_shape: tuple, b_shape: tuple) -> tuple[dg.Node, dg.Node]:
    """Operands for maximum/minimum whose broadcast values never tie."""
    a = lv.input("a", a_shape)
    base = np.broadcast_to(lv.feeds["a"], np.broadcast_shapes(a_shape, b_shape))
    # b = a shifted by at least 0.1 where they meet; only possible when b is the full shape.
    gap = lv.rng.uniform(0.1, 1.0, size=base.shape) * lv.rng.choice([-1.0, 1.0], size=base.shape)
    value = (base + gap).astype(lv.dtype)
    lv.feeds["b"] = value
    return a, lv.g.input("b", shape=value.shape, dtype=lv.dtype)


CASES: list[Case] = [
    # Elementwise arithmetic with broadcasting and reversed operands.
    Case("add_row", lambda lv: lv.input("a", (3, 4)) + lv.param("b", (4,))),
    Case("add_col", lambda lv: lv.input("a", (3, 4)) + lv.input("b", (3, 1))),
    Case("add_rconst", lambda lv: 2.5 + lv.input("a", (3, 4))),
    Case("sub_row_col", lambda lv: lv.input("a", (3, 1)) - lv.param("b", (4,))),
    Case("sub_rconst", lambda lv: 1.0 - lv.input("a", (2, 3))),
    Case("mul_col", lambda lv: lv.input("a", (3, 4)) * lv.param("b", (3, 1))),
    Case("mul_batched", lambda lv: lv.input("a", (2, 3, 4)) * lv.input("b", (4,))),
    Case("div_row", lambda lv: lv.input("a", (3, 4)) / lv.param("b", (4,), 0.5, 2.0)),
    Case("div_rconst", lambda lv: 1.0 / lv.input("a", (3, 1), 0.5, 2.0)),
    Case("div_col", lambda lv: lv.param("a", (4,)) / lv.input("b", (3, 1), 0.5, 2.0)),
    Case("neg", lambda lv: -lv.input("a", (3, 4))),
    Case("pow_int", lambda lv: lv.input("a", (3, 4)) ** 3),
    Case("pow_sqrt", lambda lv: lv.input("a", (3, 4), 0.5, 2.0) ** 0.5),
    Case("pow_negative", lambda lv: lv.param("a", (3, 1), 0.5, 2.0) ** -1.5),
    Case("maximum_row", lambda lv: dg.maximum(*_separated(lv, (4,), (3, 4)))),
    Case("minimum_col", lambda lv: dg.minimum(*_separated(lv, (3, 1), (3, 4)))),
    # Elementwise functions.
    Case("exp", lambda lv: dg.exp(lv.input("a", (3, 4)))),
    Case("log", lambda lv: dg.log(lv.input("a", (3, 4), 0.3, 3.0))),
    Case("sqrt", lambda lv: dg.sqrt(lv.param("a", (3, 4), 0.3, 3.0))),
    Case("abs", lambda lv: dg.abs(lv.away_from_zero("a", (3, 4)))),
    Case("relu", lambda lv: dg.relu(lv.away_from_zero("a", (3, 4), param=True))),
    Case("sigmoid", lambda lv: dg.sigmoid(lv.input("a", (3, 4), -8.0, 8.0))),
    Case("tanh", lambda lv: dg.tanh(lv.input("a", (3, 4)))),
    Case("softplus", lambda lv: dg.softplus(lv.input("a", (3, 4), -30.0, 30.0))),
    Case("identity", lambda lv: lv.g.apply("identity", lv.input("a", (3, 4)))),
    Case(
        "where_bcast",
        lambda lv: dg.where(
            lv.feed("cond", lv.rng.random((3, 4)) > 0.5, "bool"),
            lv.input("a", (3, 4)),
            lv.param("b", (4,)),
        ),
    ),
    Case(
        "where_col_cond",
        lambda lv: dg.where(
            lv.feed("cond", [[True], [False], [True]], "bool"),
            lv.input("a", (3, 1)),
            lv.input("b", (3, 4)),
        ),
    ),
    # stop_gradient: x's own gradient is checked; y (behind the stop) is asserted zero below.
    Case(
        "stop_gradient",
        lambda lv: lv.input("x", (3, 4)) * dg.stop_gradient(lv.input("y", (3, 4))),
        wrt=["x"],
    ),
    # cast: a round trip through the other float dtype (float32 precision: wider step).
    Case(
        "cast_round_trip",
        lambda lv: lv.input("a", (3, 4)).astype(_other(lv.dtype)).astype(lv.dtype) * 1.0,
        eps=1e-3,
        rtol=1e-3,
    ),
    # Linear algebra.
    Case("matmul_2d", lambda lv: lv.input("a", (3, 4)) @ lv.param("b", (4, 5))),
    Case("matmul_batched", lambda lv: lv.input("a", (2, 3, 4)) @ lv.input("b", (2, 4, 5))),
    Case("matmul_bcast_batch", lambda lv: lv.input("a", (2, 3, 4)) @ lv.param("b", (4, 5))),
    Case("matmul_bcast_left", lambda lv: lv.param("a", (3, 4)) @ lv.input("b", (2, 4, 5))),
    Case("matmul_vec_mat", lambda lv: lv.input("a", (4,)) @ lv.param("b", (4, 5))),
    Case("matmul_mat_vec", lambda lv: dg.matmul(lv.input("a", (3, 4)), lv.input("b", (4,)))),
    Case("matmul_vec_vec", lambda lv: lv.input("a", (4,)) @ lv.input("b", (4,))),
    Case("matmul_batched_vec", lambda lv: lv.input("a", (2, 3, 4)) @ lv.param("b", (4,))),
    Case("matmul_vec_batched", lambda lv: lv.input("a", (3,)) @ lv.input("b", (2, 3, 4))),
    Case("matmul_rconst", lambda lv: np.ones((2, 3), lv.dtype) @ lv.input("a", (3, 4))),
]

# Reductions: every axis form, with and without keepdims.
_AXES: list[Any] = [None, 0, -1, 1, [0, 2], [-1, 0, 1]]
for _op in ("sum", "mean", "max"):
    for _axis in _AXES:
        for _keep in (False, True):

            def _reduce(lv: Leaves, op=_op, axis=_axis, keep=_keep) -> dg.Node:
                x = _distinct(lv, "a", (2, 3, 4)) if op == "max" else lv.input("a", (2, 3, 4))
                return getattr(dg, op)(x, axis=axis, keepdims=keep)

            CASES.append(Case(f"{_op}_axis{_axis}_keep{_keep}".replace(" ", ""), _reduce))

CASES += [
    Case("max_method_param", lambda lv: _distinct(lv, "a", (3, 4), param=True).max(axis=1)),
    Case("sum_method_scalar_in", lambda lv: (lv.input("a", (3, 4)) * 2.0).sum()),
    # Shape manipulation.
    Case("reshape", lambda lv: lv.input("a", (2, 3, 4)).reshape(6, 4)),
    Case("reshape_flat", lambda lv: dg.reshape(lv.param("a", (2, 3, 4)), (-1,))),
    Case("reshape_expand", lambda lv: lv.input("a", (12,)).reshape((3, 1, 4))),
    Case("transpose_reverse", lambda lv: lv.input("a", (2, 3, 4)).T),
    Case("transpose_axes", lambda lv: dg.transpose(lv.input("a", (2, 3, 4)), (1, 0, 2))),
    Case("transpose_axes_2", lambda lv: lv.param("a", (2, 3, 4)).transpose(2, 0, 1)),
    Case("broadcast_to_row", lambda lv: dg.broadcast_to(lv.input("a", (4,)), (3, 4))),
    Case("broadcast_to_col", lambda lv: dg.broadcast_to(lv.param("a", (3, 1)), (2, 3, 4))),
    Case(
        "concat_axis0",
        lambda lv: dg.concat([lv.input("a", (2, 4)), lv.param("b", (3, 4))], axis=0),
    ),
    Case(
        "concat_last_three",
        lambda lv: dg.concat(
            [lv.input("a", (2, 3, 1)), lv.input("b", (2, 3, 4)), lv.param("c", (2, 3, 2))],
            axis=-1,
        ),
    ),
    Case(
        "concat_repeated_input",
        lambda lv: dg.concat([(a := lv.input("a", (3, 2))), lv.input("b", (3, 1)), a], axis=1),
    ),
    Case("index_int", lambda lv: lv.input("a", (3, 4))[1]),
    Case("index_negative_int", lambda lv: lv.input("a", (3, 4))[-1, 2]),
    Case("index_slices", lambda lv: lv.input("a", (4, 5))[1:3, ::2]),
    Case("index_reverse", lambda lv: lv.param("a", (4, 5))[::-1, 4:0:-2]),
    Case("index_newaxis", lambda lv: lv.input("a", (3, 4))[None, :, None, 1]),
    Case("index_ellipsis", lambda lv: lv.input("a", (2, 3, 4))[..., 1:3]),
    Case("index_list_repeats", lambda lv: lv.input("a", (4, 3))[[0, 2, 2, 3, 0]]),
    Case("index_list_mixed", lambda lv: lv.input("a", (3, 4))[1:, [0, 0, 3]]),
    Case("index_two_lists", lambda lv: lv.param("a", (3, 4))[[0, 1, 1], [2, 2, 3]]),
    # Softmax family over several axes.
    Case("softmax_last", lambda lv: dg.softmax(lv.input("a", (3, 5)))),
    Case("softmax_axis0", lambda lv: dg.softmax(lv.input("a", (3, 5)), axis=0)),
    Case("softmax_3d_mid", lambda lv: dg.softmax(lv.param("a", (2, 3, 4)), axis=1)),
    Case("log_softmax_last", lambda lv: dg.log_softmax(lv.input("a", (3, 5)))),
    Case("log_softmax_axis0", lambda lv: dg.log_softmax(lv.input("a", (2, 3, 4)), axis=0)),
    Case("log_softmax_3d_mid", lambda lv: dg.log_softmax(lv.input("a", (2, 3, 4)), axis=-2)),
    # Losses.
    Case("mse", lambda lv: dg.mse(lv.input("p", (3, 4)), lv.input("t", (3, 4)))),
    Case("mse_bcast", lambda lv: dg.mse(lv.param("p", (3, 4)), lv.input("t", (4,)))),
    Case("mse_bcast_pred", lambda lv: dg.mse(lv.input("p", (3, 1)), lv.param("t", (3, 4)))),
    Case(
        "cross_entropy_int",
        lambda lv: dg.cross_entropy(
            lv.input("logits", (5, 4)), lv.feed("y", lv.rng.integers(0, 4, 5), "int64")
        ),
    ),
    Case(
        "cross_entropy_int_3d",
        lambda lv: dg.cross_entropy(
            lv.param("logits", (2, 3, 4)), lv.feed("y", lv.rng.integers(0, 4, (2, 3)), "int32")
        ),
    ),
    # Neural-network ops (distgraph/nnops.py; checked against autograd in test_nnops.py).
    Case(
        "conv2d_stride_pad_dilation",
        lambda lv: dg.conv2d(
            lv.input("x", (2, 2, 7, 6)), lv.param("w", (3, 2, 3, 2)), 2, 1, [2, 1]
        ),
    ),
    Case("max_pool2d", lambda lv: dg.max_pool2d(_distinct(lv, "x", (1, 2, 5, 4)), [2, 2], 1)),
    Case("avg_pool2d", lambda lv: dg.avg_pool2d(lv.input("x", (2, 1, 5, 5)), 2, [1, 2])),
    Case(
        "layer_norm",
        lambda lv: dg.layer_norm(
            lv.input("x", (2, 3, 5)), lv.param("w", (5,)), lv.param("b", (5,))
        ),
    ),
    Case(
        "embedding",
        lambda lv: dg.embedding(
            lv.feed("ids", [[0, 2, 2], [3, 1, 0]], "int64"), lv.param("t", (4, 3))
        ),
    ),
    Case("dropout_outside_training", lambda lv: dg.dropout(lv.input("x", (3, 4)), 0.5)),
    Case("gelu", lambda lv: dg.gelu(lv.input("x", (3, 4), low=-3, high=3))),
    Case(
        "einsum_attention",
        lambda lv: dg.einsum(
            "bhqd,bhkd->bhqk", lv.input("q", (2, 2, 3, 4)), lv.param("k", (2, 1, 5, 4))
        ),
    ),
    Case("split", lambda lv: dg.split(lv.input("x", (3, 7)), [2, 5], axis=1)[1]),
    Case(
        "stack",
        lambda lv: dg.stack([lv.input("a", (2, 3)), lv.param("b", (2, 3))], axis=1),
    ),
    # Through softmax, as attention uses it: the -1e9 fill itself would swamp the finite
    # differences of the probe sum.
    Case("causal_mask", lambda lv: dg.softmax(dg.causal_mask(lv.input("x", (2, 4, 4))))),
    Case(
        "cross_entropy_probs",
        lambda lv: dg.cross_entropy(
            lv.input("logits", (5, 4)),
            lv.g.apply("softmax", lv.input("q", (5, 4)), axis=-1),
        ),
    ),
]


def build_case(case: Case, dtype: str, seed: int = 0) -> tuple[dg.Graph, dict, dg.Node, set]:
    """The case's graph with ``out`` (a probed scalar) and ``value`` (the op output, flat)."""
    g = dg.Graph()
    lv = Leaves(g, dtype, np.random.default_rng(seed))
    node = case.build(lv)
    covered = {n.op for n in g.nodes if n.op not in LEAF_OPS}
    c = g.const(np.random.default_rng(seed + 1).standard_normal(node.shape).astype(dtype))
    g.output("out", (node * c).sum())
    g.output("value", node.reshape(-1))
    return g, lv.feeds, node, covered


def _case_ids() -> list[str]:
    return [c.id for c in CASES]


def test_case_ids_unique():
    assert len(set(_case_ids())) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=_case_ids())
def test_op_gradient_float64(case: Case):
    g, feeds, _node, _ = build_case(case, "float64")
    dg.testing.check_grads(g, feeds, of="out", wrt=case.wrt, eps=case.eps, rtol=case.rtol)
    res = dg.LocalExecutor().run(g, feeds, grad="out")
    assert set(res.grads) >= set(case.wrt or [])
    if case.id == "stop_gradient":
        np.testing.assert_array_equal(res.grads["y"], np.zeros((3, 4)))


@pytest.mark.parametrize("case", CASES, ids=_case_ids())
def test_op_preserves_float32(case: Case):
    g, feeds, node, _ = build_case(case, "float32")
    assert node.dtype == np.float32, f"inferred dtype of {node.op} is {node.dtype}"
    res = dg.LocalExecutor().run(g, feeds, outputs=["value", "out"], grad="out")
    assert res.values["value"].dtype == np.float32
    float_leaves = [n for n in g.inputs + list(g.params) if g[n].dtype.kind == "f"]
    assert float_leaves and set(float_leaves) <= set(res.grads)
    for name in float_leaves:
        grad = res.grads[name]
        assert isinstance(grad, np.ndarray) and grad.dtype == np.float32, (name, grad)
    # The float32 run agrees with the float64 run of the same values to float32 precision.
    g64, feeds64, _, _ = build_case(case, "float64")
    ref = dg.LocalExecutor().run(g64, feeds64, outputs=["value"], grad="out")
    np.testing.assert_allclose(res.values["value"], ref.values["value"], rtol=2e-3, atol=2e-3)
    for name in float_leaves:
        np.testing.assert_allclose(res.grads[name], ref.grads[name], rtol=2e-3, atol=2e-3)


def test_every_registry_op_is_covered():
    covered: set[str] = set()
    for case in CASES:
        covered |= build_case(case, "float64")[3]
    assert covered == set(BUILTIN_OPS) - PLUMBING


def test_cast_float32_to_float64():
    g = dg.Graph()
    x = g.input("x", shape=(3,), dtype="float32")
    y = x.astype("float64")
    assert y.dtype == np.float64
    g.output("out", (y * np.array([1.0, -2.0, 3.0])).sum())
    g.output("y", y)
    feeds = {"x": np.array([0.5, 1.5, -2.0], dtype=np.float32)}
    res = dg.LocalExecutor().run(g, feeds, outputs=["y"], grad="out")
    assert res.values["y"].dtype == np.float64
    # The gradient has the dtype of the value it is the gradient of.
    assert res.grads["x"].dtype == np.float32
    np.testing.assert_array_equal(res.grads["x"], np.array([1.0, -2.0, 3.0], np.float32))
    dg.testing.check_grads(g, feeds, of="out", eps=1e-3, rtol=1e-3)


def test_max_ties_share_the_gradient():
    g = dg.Graph()
    x = g.input("x", shape=(2, 3))
    g.output("out", x.max(axis=1).sum())
    res = dg.LocalExecutor().run(g, {"x": np.array([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]])}, grad="out")
    np.testing.assert_allclose(res.grads["x"], [[0, 0.5, 0.5], [1 / 3, 1 / 3, 1 / 3]])


def test_maximum_and_minimum_ties_go_to_the_first_operand():
    g = dg.Graph()
    a, b = g.input("a"), g.input("b")
    g.output("out", dg.maximum(a, b) + 10.0 * dg.minimum(a, b))
    res = dg.LocalExecutor().run(g, {"a": 1.0, "b": 1.0}, grad="out")
    assert res.grads == {"a": 11.0, "b": 0.0}


def test_relu_and_abs_subgradient_at_zero_is_zero():
    g = dg.Graph()
    x = g.input("x")
    g.output("out", dg.relu(x) + dg.abs(x))
    assert dg.LocalExecutor().run(g, {"x": 0.0}, grad="out").grads == {"x": 0.0}


def test_stable_extremes_stay_finite():
    g = dg.Graph()
    x = g.input("x", shape=(4,))
    out = dg.sigmoid(x).sum() + dg.softplus(x).sum() + dg.log_softmax(x).sum()
    g.output("out", out + dg.softmax(x * 10.0).max())
    feeds = {"x": np.array([-1000.0, -50.0, 50.0, 1000.0])}
    res = dg.LocalExecutor().run(g, feeds, grad="out", check_finite=True)
    assert np.isfinite(res.values["out"]) and np.all(np.isfinite(res.grads["x"]))


def test_cross_entropy_int_labels_equal_one_hot_rows():
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((6, 3))
    labels = rng.integers(0, 3, 6)
    results = []
    for y in (labels, np.eye(3)[labels]):
        g = dg.Graph()
        z = g.input("z", shape=(6, 3))
        yy = g.input("y", shape=y.shape, dtype=y.dtype)
        g.output("loss", dg.cross_entropy(z, yy))
        results.append(dg.LocalExecutor().run(g, {"z": logits, "y": y}, grad="loss"))
    assert results[0].values["loss"] == pytest.approx(results[1].values["loss"], rel=1e-12)
    np.testing.assert_allclose(results[0].grads["z"], results[1].grads["z"], rtol=1e-12)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    assert results[0].values["loss"] == pytest.approx(-logp[np.arange(6), labels].mean())


def test_unknown_op_is_an_error_not_an_eval():
    g = dg.Graph()
    x = g.input("x")
    with pytest.raises(dg.UnknownOpError, match="__import__"):
        g.apply("__import__('os').system('true')", x)


# --- declared attributes (issue 12, item 1) ----------------------------------------------------

#: Keyword arguments numpy's ufuncs and reductions accept: none may reach a kernel undeclared.
NUMPY_KWARGS = ["where", "out", "dtype", "casting", "order", "subok", "signature", "axes"]
NUMPY_KWARGS += ["keepdims", "axis", "initial", "extobj", "sig", "copy", "like", "mode"]


def _one_node_spec(op: str, attrs: dict[str, Any], shape: list[int] | None = None) -> str:
    """A spec: input x of ``shape`` (default [3, 4]), y = op(x, ...) with ``attrs``."""
    arity = OPS[op].arity
    inputs = ["x"] * (1 if arity is None else arity)
    doc = {
        "nodes": [
            {"name": "x", "op": "input", "shape": shape or [3, 4], "dtype": "float64"},
            {"name": "y", "op": op, "inputs": inputs, "attrs": attrs},
        ],
        "outputs": ["y"],
    }
    return json.dumps(doc)


def test_exp_where_false_is_refused_not_run():
    """The probe: exp(where=false) returned uninitialised memory (another graph's params)."""
    g = dg.Graph()
    x = g.input("x", shape=(3,))
    g.output("y", dg.exp(x))
    doc = json.loads(g.to_json())
    assert doc["nodes"][1]["op"] == "exp"
    doc["nodes"][1]["attrs"] = {"where": False}
    with pytest.raises(dg.SpecError, match=r"node 'y' \(op exp\): attribute 'where' is not"):
        dg.Graph.from_json(json.dumps(doc))
    with pytest.raises(dg.SpecError, match=r"attribute 'where'"):
        g.apply("exp", x, where=False)
    assert len(g) == 2  # nothing was added


@pytest.mark.parametrize(
    ("op", "kwarg"),
    [(op, k) for op in sorted(BUILTIN_OPS) for k in NUMPY_KWARGS if k not in OPS[op].attrs],
)
def test_undeclared_numpy_keywords_are_refused_for_every_op(op: str, kwarg: str):
    for value in (False, None, 0, "float32", [0]):
        with pytest.raises(dg.SpecError, match=rf"node 'y' \(op {op}\): attribute '{kwarg}'"):
            dg.Graph.from_json(_one_node_spec(op, {kwarg: value}))


def test_every_kernel_keyword_is_declared_and_nothing_more():
    """A row's declared attributes are exactly the keyword parameters of its forward."""
    for name in sorted(BUILTIN_OPS):
        op = OPS[name]
        params = inspect.signature(op.forward).parameters.values()
        if any(p.kind is p.VAR_KEYWORD for p in params):
            raise AssertionError(f"{name}: a forward taking **kwargs cannot be checked")
        try:  # numpy ufuncs (exp, maximum...) take numpy's own keywords: none is declared
            keywords = {
                p.name
                for p in params
                if p.default is not p.empty or p.kind is p.KEYWORD_ONLY
                if not isinstance(op.forward, np.ufunc)
            }
        except ValueError:
            keywords = set()
        positional = op.arity if op.arity is not None else 0
        named = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD][positional:]
        assert set(op.attrs) == keywords | set(named), name


@pytest.mark.parametrize(
    ("op", "attrs", "shape", "needle"),
    [
        ("sum", {"axis": True}, None, "'axis' = True"),  # bool is an int in Python: refused
        ("sum", {"axis": 2}, None, "out of range for an input of rank 2"),
        ("sum", {"axis": -3}, None, "out of range"),
        ("sum", {"axis": [0, -2]}, None, "names an axis twice"),
        ("sum", {"axis": 1.0}, None, "'axis' = 1.0"),
        ("mean", {"keepdims": 1}, None, "'keepdims' = 1 must be true or false"),
        ("max", {"keepdims": "yes"}, None, "'keepdims'"),
        ("softmax", {"axis": 2}, None, "out of range"),
        ("log_softmax", {"axis": None}, None, "got null"),
        ("concat", {"axis": 5}, None, "out of range"),
        ("concat", {"axis": False}, None, "'axis' = False"),
        ("reshape", {"shape": [-2, 6]}, None, "dimension -2"),
        ("reshape", {"shape": [-1, -1]}, None, "more than one -1"),
        ("reshape", {"shape": [True, 12]}, None, "list of integers"),
        ("reshape", {}, None, "'shape' is required"),
        ("transpose", {"axes": [0, 0]}, None, "permutation"),
        ("transpose", {"axes": [0]}, None, "permutation"),
        ("transpose", {"axes": [1, 2]}, None, "permutation"),
        ("broadcast_to", {"shape": [-1, 4]}, None, "dimension -1"),
        ("broadcast_to", {"shape": [1] * 65}, None, "65 dimensions"),
        ("broadcast_to", {"shape": [2**40, 2**40, 4]}, None, "more than"),
        ("index", {"index": [1.5]}, None, "item 1.5"),
        ("index", {"index": [True]}, None, "item True"),
        ("index", {"index": ["...", "..."]}, None, "more than one '...'"),
        ("index", {"index": [{"slice": [0, 2, 0]}]}, None, "step 0"),
        ("index", {"index": [{"slice": [0, 2]}]}, None, "'slice'"),
        ("index", {"index": [[0, [1]]]}, None, "ragged"),
        ("index", {"index": [["a"]]}, None, "list of integers"),
        ("index", {"index": [[2**70]]}, None, "int64"),
        ("pow", {"exponent": "2"}, None, "'exponent'"),
        ("pow", {"exponent": True}, None, "'exponent' = True"),
        ("pow", {"exponent": float("inf")}, None, "finite"),
        ("cast", {"dtype": 5}, None, "'dtype'"),
        ("cast", {"dtype": "nonsense"}, None, "not a dtype name"),
        ("cast", {"dtype": "2f8"}, None, "subarray"),
        ("cast", {"dtype": "i4,i4"}, None, "structured"),
        ("cast", {"dtype": "(,"}, None, "not a dtype name"),
        ("cast", {}, None, "'dtype' is required"),
    ],
)
def test_ill_typed_or_out_of_range_attributes_name_node_and_attribute(op, attrs, shape, needle):
    with pytest.raises(dg.SpecError, match=rf"node 'y' \(op {op}\)") as err:
        dg.Graph.from_json(_one_node_spec(op, attrs, shape))
    assert needle in str(err.value)


def test_attribute_checks_hold_through_the_api():
    g = dg.Graph()
    x = g.input("x", shape=(3, 4))
    before = len(g)
    for build in (
        lambda: x.sum(axis=True),
        lambda: x.sum(axis=2),
        lambda: x.reshape(-2, 6),
        lambda: dg.softmax(x, axis=5),
        lambda: dg.concat([x, x], axis=2),
        lambda: x.transpose(0, 0),
        lambda: g.apply("exp", x, out=None),
        lambda: g.apply("sum", x, axis=0, dtype="float32"),
    ):
        with pytest.raises(dg.SpecError, match=r"attribute '\w+'"):
            build()
    assert len(g) == before
    # Valid values still build and run.
    y = g.output("y", dg.softmax(x.reshape(4, 3), axis=0).sum(axis=[0, -1], keepdims=True))
    feeds = {"x": np.arange(12.0).reshape(3, 4)}
    assert y.shape == (1, 1)
    np.testing.assert_allclose(dg.LocalExecutor().run(g, feeds).values["y"], [[3.0]])


def test_vjp_nodes_carry_only_declared_attributes():
    g = dg.Graph()
    x = g.input("x", shape=(3, 4))
    g.output("y", x.sum(axis=0).sum())
    doc = json.loads(dg.grad(g, "y").to_json())
    vjp = next(n for n in doc["nodes"] if n["op"] == "vjp" and n["attrs"]["attrs"])
    vjp["attrs"]["attrs"]["where"] = False
    with pytest.raises(dg.SpecError, match=rf"node '{vjp['name']}' \(op sum\).*'where'"):
        dg.Graph.from_json(json.dumps(doc))
    del vjp["attrs"]["attrs"]["where"]
    vjp["attrs"]["attrs"]["axis"] = 7
    with pytest.raises(dg.SpecError, match=r"'axis' = 7 is out of range"):
        dg.Graph.from_json(json.dumps(doc))
    vjp["attrs"]["attrs"]["axis"] = 0
    vjp["attrs"]["out"] = None
    with pytest.raises(dg.SpecError, match=r"\(op vjp\): attribute 'out'"):
        dg.Graph.from_json(json.dumps(doc))
    del vjp["attrs"]["out"]
    vjp["inputs"] = vjp["inputs"] + ["x"]  # a second forward input for a one-input op
    with pytest.raises(dg.SpecError, match=r"inputs: a vjp of sum"):
        dg.Graph.from_json(json.dumps(doc))


def test_leaf_nodes_take_no_attributes():
    doc = json.loads(_one_node_spec("exp", {}))
    doc["nodes"][0]["attrs"] = {"where": False}
    with pytest.raises(dg.SpecError, match=r"nodes\.0\.attrs: input node 'x' takes no attr"):
        dg.Graph.from_json(json.dumps(doc))


def test_custom_ops_declare_attributes_with_defop():
    seen: list[dict[str, Any]] = []

    def scale(a: Any, factor: float = 1.0, mode: str = "mul") -> Any:
        seen.append({"factor": factor, "mode": mode})
        return a * factor if mode == "mul" else a + factor

    defop(
        "test_scale_attrs",
        scale,
        lambda g, out, a, factor=1.0, mode="mul": g * factor if mode == "mul" else g,
        attrs={
            "factor": Attr("float", default=1.0, low=-10, high=10),
            "mode": Attr("str", default="mul", choices=("mul", "add")),
        },
    )
    defop("test_plain_attrs", lambda a: a * 2, lambda g, out, a: 2 * g)
    g = dg.Graph()
    x = g.input("x", shape=(2,))
    y = g.apply("test_scale_attrs", x, factor=3.0)
    g.output("z", g.apply("test_plain_attrs", y).sum())
    res = dg.LocalExecutor().run(g, {"x": np.array([1.0, 2.0])}, grad="z")
    assert res.values["z"] == 18.0 and list(res.grads["x"]) == [6.0, 6.0]
    assert all(s == {"factor": 3.0, "mode": "mul"} for s in seen)
    for attrs, needle in (
        ({"factor": 11.0}, "out of range"),
        ({"factor": True}, "must be a number"),
        ({"mode": "div"}, "one of"),
        ({"where": False}, "not declared by test_scale_attrs"),
    ):
        with pytest.raises(dg.SpecError, match=rf"attribute '\w+'.*{needle}"):
            g.apply("test_scale_attrs", x, **attrs)
    with pytest.raises(dg.SpecError, match="takes no attributes"):
        g.apply("test_plain_attrs", x, factor=2.0)
    # The same checks on a spec, and a valid spec round-trips.
    doc = json.loads(g.to_json())
    assert dg.Graph.from_json(json.dumps(doc)).to_json() == g.to_json()
    next(n for n in doc["nodes"] if n["op"] == "test_scale_attrs")["attrs"]["factor"] = "3"
    with pytest.raises(dg.SpecError, match="'factor'"):
        dg.Graph.from_json(json.dumps(doc))
    with pytest.raises(TypeError, match="Attr"):
        defop("test_bad_decl", lambda a: a, None, attrs={"k": "float"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="unknown attribute kind"):
        Attr("complex")


# --- concat's VJP (issue 12, item 2b) ----------------------------------------------------------


def test_concat_gradient_is_linear_in_the_number_of_inputs():
    """Each input's VJP read every input: N vjp nodes of N+1 inputs, O(N^2) for a long concat
    (a 49 KiB spec asked for 763 MiB). Now each share is a slice of the cotangent."""
    sizes = {}
    for n in (100, 400):
        g = dg.Graph()
        x = g.input("x", shape=(1,))
        g.output("loss", dg.concat([x] * n).sum())
        full = dg.grad(g, "loss")
        sizes[n] = sum(len(s.inputs) for s in full.nodes)
        assert dg.LocalExecutor().run(g, {"x": [1.5]}, grad="loss").grads["x"] == [n]
    assert sizes[400] < 4 * sizes[100] * 1.1, sizes  # linear, not 16x


@pytest.mark.parametrize(
    ("shapes", "axis", "sliced"),
    [
        ([(2, 3), (1, 3), (4, 3)], 0, 3),
        ([(2, 3), (2, 1), (2, 2)], 1, 3),
        ([(2, 3), (2, 1), (2, 2)], -1, 3),
        ([(None, 3), (2, 3)], 0, 2),  # batch first: the other is sliced from the end
        ([(2, 3), (None, 3), (2, 3)], 0, 3),  # the batch one: between known ends
        ([(None, 3), (2, 3), (None, 3)], 0, 0),  # unknown bounds: the generic VJP
        ([(None, 2), (None, 3)], 1, 2),
    ],
)
def test_concat_gradient_matches_finite_differences(shapes, axis, sliced):
    rng = np.random.default_rng(0)
    g = dg.Graph()
    xs = [g.input(f"x{i}", shape=s) for i, s in enumerate(shapes)]
    c = dg.concat(xs, axis=axis)
    g.output("loss", (c * c * dg.sigmoid(c)).sum())  # a cotangent that differs per element
    feeds = {
        f"x{i}": rng.standard_normal(tuple(2 if d is None else d for d in s))
        for i, s in enumerate(shapes)
    }
    full = dg.grad(g, "loss")
    generic = [n.name for n in full.nodes if n.op == "vjp" and n.attrs["op"] == "concat"]
    slices = [n.name for n in full.nodes if n.op == "index" and n.phase == "backward"]
    assert (len(slices), len(generic)) == (sliced, len(shapes) - sliced)
    dg.testing.check_grads(g, feeds, "loss")
