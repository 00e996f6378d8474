"""Graph builders shared by the test suites (the Ray conformance suite runs them too).

Every builder returns ``(graph, feeds, grad_output)``: a fresh graph, feeds that make it run, and
the output to differentiate. ``BUILDERS`` lists them by name; ``random_graphs()`` is a hypothesis
strategy producing random DAGs of registry ops with valid shapes, in the same form.
"""

from __future__ import annotations

import importlib.util
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import strategies as st

import distgraph as dg
from distgraph.cost import CostModel

Built = tuple[dg.Graph, dict[str, Any], str]


def seed_graph() -> Built:
    """The seed's z = x * w + b with x=2, w=3, b=1."""
    g = dg.Graph()
    x = g.input("x")
    w = g.param("w", 3.0)
    b = g.param("b", 1.0)
    g.output("z", x * w + b)
    return g, {"x": 2.0}, "z"


def linear_data(n: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    """Noise-free samples of f(x) = 3x + 7 on [-2, 2]."""
    x = np.random.default_rng(seed).uniform(-2.0, 2.0, size=n)
    return {"x": x, "y": 3.0 * x + 7.0}


def linear_regression() -> Built:
    """The seed's training demo: mse(x * w + b, y) from w=-2, b=15."""
    g = dg.Graph()
    x, y = g.input("x", shape=(None,)), g.input("y", shape=(None,))
    w, b = g.param("w", -2.0), g.param("b", 15.0)
    g.output("loss", dg.mse(x * w + b, y))
    return g, linear_data(16), "loss"


def mlp(seed: int = 0, dtype: str = "float64") -> Built:
    """Two hidden layers (tanh, sigmoid), broadcast biases, softmax cross-entropy on int labels."""
    rng = np.random.default_rng(seed)
    g = dg.Graph()
    x = g.input("x", shape=(None, 4), dtype=dtype)
    y = g.input("y", shape=(None,), dtype="int64")
    sizes = [4, 8, 6, 3]
    h = x
    for i, (a, b) in enumerate(itertools.pairwise(sizes), start=1):
        w = g.param(f"W{i}", (rng.standard_normal((a, b)) / np.sqrt(a)).astype(dtype))
        bias = g.param(f"b{i}", (0.1 * rng.standard_normal(b)).astype(dtype))
        h = h @ w + bias
        if i == 1:
            h = dg.tanh(h)
        elif i == 2:
            h = dg.sigmoid(h)
    g.output("logits", h)
    g.output("loss", dg.cross_entropy(g["logits"], y))
    feeds = {"x": rng.standard_normal((5, 4)).astype(dtype), "y": rng.integers(0, 3, size=5)}
    return g, feeds, "loss"


def wide(branches: int = 8) -> Built:
    """``branches`` independent branches from one input, summed: wide levels."""
    rng = np.random.default_rng(1)
    g = dg.Graph()
    x = g.input("x", shape=(6, 5))
    outs = []
    for i in range(branches):
        w = g.param(f"w{i}", rng.standard_normal((5, 5)))
        h = dg.tanh(x @ w)
        h = h * (i + 1.0) + dg.sigmoid(h)
        outs.append(h.sum(axis=1))
    total = outs[0]
    for o in outs[1:]:
        total = total + o
    g.output("out", total.mean())
    return g, {"x": rng.standard_normal((6, 5))}, "out"


def deep_chain(length: int = 200) -> Built:
    """A chain of ``length`` alternating tanh/mul nodes: one node per level."""
    g = dg.Graph()
    x = g.input("x", shape=(3,))
    a = g.param("a", np.array([0.9, 1.1, 1.0]))
    h = x
    for i in range(length - 1):
        h = h * a if i % 2 else dg.tanh(h)
    g.output("out", h.sum())
    return g, {"x": np.array([0.3, -0.2, 0.5])}, "out"


def diamond() -> Built:
    """x feeds two branches that meet again: gradients accumulate at x."""
    g = dg.Graph()
    x = g.input("x", shape=(4,))
    w = g.param("w", np.array([0.5, -1.0, 2.0, 0.25]))
    left = dg.exp(x * 0.5)
    right = dg.tanh(x * w)
    g.output("out", (left * right + x).sum())
    return g, {"x": np.array([0.1, -0.4, 0.7, 1.2])}, "out"


def broadcast_heavy() -> Built:
    """(3, 4) with (4,), (3, 1), () and (1, 4) operands, every binary op."""
    rng = np.random.default_rng(2)
    g = dg.Graph()
    x = g.input("x", shape=(3, 4))
    row = g.param("row", rng.standard_normal(4))
    col = g.param("col", rng.uniform(0.5, 1.5, size=(3, 1)))
    s = g.param("s", 1.5)
    one_by = g.param("one_by", rng.standard_normal((1, 4)))
    h = (x + row) * col - s / (col + 1.0)
    h = dg.maximum(h, one_by) + dg.minimum(x, row) - one_by * s
    h = dg.broadcast_to(row, (3, 4)) * h / (1.0 + col * col)
    g.output("out", h.mean(axis=0).sum() + (h * col).sum())
    return g, {"x": rng.standard_normal((3, 4))}, "out"


def classifier() -> Built:
    """Softmax / log-softmax / cross-entropy with both integer labels and probability rows."""
    rng = np.random.default_rng(3)
    g = dg.Graph()
    x = g.input("x", shape=(None, 3))
    labels = g.input("labels", shape=(None,), dtype="int64")
    probs = g.input("probs", shape=(None, 4))
    w = g.param("w", rng.standard_normal((3, 4)))
    b = g.param("b", rng.standard_normal(4))
    logits = x @ w + b
    p = dg.softmax(logits)
    lp = dg.log_softmax(logits, axis=-1)
    loss = dg.cross_entropy(logits, labels) + dg.cross_entropy(logits, probs) * 0.5
    g.output("loss", loss + (p * lp).sum() * 0.01)
    raw = rng.uniform(0.1, 1.0, size=(5, 4))
    feeds = {
        "x": rng.standard_normal((5, 3)),
        "labels": rng.integers(0, 4, size=5),
        "probs": raw / raw.sum(axis=1, keepdims=True),
    }
    return g, feeds, "loss"


def shapes() -> Built:
    """concat, index (ints, slices, None, int lists), reshape and transpose."""
    rng = np.random.default_rng(4)
    g = dg.Graph()
    x = g.input("x", shape=(2, 3, 4))
    y = g.param("y", rng.standard_normal((2, 3, 2)))
    c = dg.concat([x, y, x * 2.0], axis=-1)  # (2, 3, 10)
    t = c.transpose(2, 0, 1)  # (10, 2, 3)
    r = t.reshape(5, 12)
    picked = r[[0, 2, 2, 4], 1:11:2]  # (4, 5)
    more = x[1, None, :, -1]  # (1, 3)
    flat = dg.reshape(picked, (20,))
    g.output("out", (flat * flat).sum() + more.sum() + dg.transpose(picked).mean())
    return g, {"x": rng.standard_normal((2, 3, 4))}, "out"


def towers(n: int = 2, width: int = 8, batch: int = 5, depth: int = 2, seed: int = 5) -> Built:
    """``n`` independent MLP towers (``depth`` tanh layers of ``width`` units each) over one
    input, their logits summed into a softmax cross-entropy: a graph ``mincut`` really splits,
    one tower per worker, when compute is dear (``SPREAD_COST``, or ``width=256, batch=64``
    under the default cost model)."""
    rng = np.random.default_rng(seed)
    g = dg.Graph()
    x = g.input("x", shape=(None, width))
    y = g.input("y", shape=(None,), dtype="int64")
    logits = None
    for t in range(n):
        h = x
        for d in range(depth):
            w = g.param(f"t{t}_W{d}", rng.standard_normal((width, width)) / np.sqrt(width))
            b = g.param(f"t{t}_b{d}", 0.1 * rng.standard_normal(width))
            h = dg.tanh(h @ w + b)
        out = h @ g.param(f"t{t}_out", rng.standard_normal((width, 3)) / np.sqrt(width))
        logits = out if logits is None else logits + out
    g.output("loss", dg.cross_entropy(logits, y))
    feeds = {"x": rng.standard_normal((batch, width)), "y": rng.integers(0, 3, size=batch)}
    return g, feeds, "loss"


BUILDERS: dict[str, Callable[[], Built]] = {
    "seed": seed_graph,
    "linear": linear_regression,
    "mlp": mlp,
    "wide": wide,
    "deep_chain": deep_chain,
    "diamond": diamond,
    "broadcast": broadcast_heavy,
    "classifier": classifier,
    "shapes": shapes,
}

#: Graphs built to be split (not in ``BUILDERS``, whose every graph the fuzz and gradient
#: suites also run): the conformance suite runs them on both executors too.
SPLIT_BUILDERS: dict[str, Callable[[], Built]] = {"towers": towers}

#: A cost model that makes compute dear and calls cheap, so the strategies spread any graph
#: whose levels hold independent work (under the default model a graph this small stays on
#: one worker, and a test of how work is split would test nothing).
SPREAD_COST = CostModel(flops_per_second=1e6, call_overhead=1e-6, batch_size=32)

#: (graph, strategy) pairs that rightly stay on one worker whatever the worker count, even under
#: ``SPREAD_COST``: chains, where no level holds two independent ops, so splitting cannot pay.
#: A multi-worker run of them tests nothing a one-worker run does not.
ONE_WORKER: frozenset[tuple[str, str]] = frozenset(
    (name, strategy)
    for name in ("seed", "linear", "mlp", "deep_chain")
    for strategy in ("level", "mincut")
)


# --- the example scripts' graphs --------------------------------------------------------------

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str) -> Any:
    """Import ``examples/<name>.py`` as a module (examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def example_seed() -> Built:
    """examples/seed_graph.py's graph."""
    return load_example("seed_graph").build_graph(), {"x": 2.0}, "z"


def example_linear() -> Built:
    """examples/linear_regression.py's graph on 16 of its samples."""
    ex = load_example("linear_regression")
    return ex.build_graph(), ex.make_data(16), "loss"


def example_mlp() -> Built:
    """examples/mlp_classifier.py's graph (8 hidden units) on 20 spiral points."""
    ex = load_example("mlp_classifier")
    return ex.build_graph(8), ex.spirals(10), "loss"


EXAMPLE_BUILDERS: dict[str, Callable[[], Built]] = {
    "example_seed": example_seed,
    "example_linear": example_linear,
    "example_mlp": example_mlp,
}


# --- random DAGs -----------------------------------------------------------------------------

#: Unary ops the random DAGs use (each wrapped so values stay finite and away from kinks).
_UNARY = ("neg", "exp", "log", "sqrt", "abs", "relu", "sigmoid", "tanh", "softplus", "pow")
_BINARY = ("add", "sub", "mul", "div", "maximum", "minimum")
_OTHER = ("matmul", "sum", "mean", "max", "softmax", "log_softmax", "transpose", "reshape")
_MORE = ("concat", "index", "where", "broadcast_to", "mse")
RANDOM_OPS = _UNARY + _BINARY + _OTHER + _MORE


def _unary(op: str, h: dg.Node) -> dg.Node:
    if op == "neg":
        return -h
    if op == "exp":
        return dg.exp(dg.tanh(h))  # bounded argument: no overflow
    if op == "log":
        return dg.log(h * h + 1.0)
    if op == "sqrt":
        return dg.sqrt(h * h + 0.5)
    if op == "abs":
        return dg.abs(h + 0.01)
    if op == "relu":
        return dg.relu(h + 0.01)
    if op == "pow":
        return (h * h + 1.0) ** 0.75
    return h.graph.apply(op, h)


@st.composite
def random_graphs(draw: Any, max_nodes: int = 12, smooth: bool = False) -> Built:
    """A random DAG of registry ops over a (3, 4) input and a few params, with valid shapes.

    ``smooth=True`` leaves out ops with kinks (abs, relu, maximum, minimum, max) so finite
    differences are trustworthy. The output ``out`` is a scalar built from every sink.
    """
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    g = dg.Graph()
    x = g.input("x", shape=(3, 4))
    pool: list[dg.Node] = [x, g.param("p0", rng.standard_normal((3, 4)))]
    pool.append(g.param("p1", rng.standard_normal(4)))
    kinks = {"abs", "relu", "maximum", "minimum", "max"}
    ops = [o for o in RANDOM_OPS if not (smooth and o in kinks)]
    for i in range(draw(st.integers(1, max_nodes))):
        op = draw(st.sampled_from(ops))
        a = draw(st.sampled_from(pool))
        full = [n for n in pool if n.shape == (3, 4)]
        if op in _UNARY:
            h = _unary(op, a)
        elif op in _BINARY:
            # The second operand broadcasts: same shape, a row, a column or a scalar.
            b = draw(st.sampled_from(pool))
            if op == "div":
                b = b * b + 1.0
            h = a.graph.apply(op, a, b)
        elif op == "matmul":
            w = g.param(f"m{i}", rng.standard_normal((a.shape[-1], 4)) / 2) if a.shape else None
            h = a @ w if w is not None else a * 2.0
        elif op in ("sum", "mean", "max"):
            axis = draw(st.sampled_from([None, 0, -1, [0, 1]])) if len(a.shape) == 2 else None
            # Without keepdims a (3,) result would not broadcast back against (3, 4).
            keep = True if axis == -1 else draw(st.booleans())
            r = a.graph.apply(op, a, axis=axis, keepdims=keep)
            h = r + draw(st.sampled_from(full))  # back to (3, 4) (or broadcast) for reuse
        elif op in ("softmax", "log_softmax"):
            b = draw(st.sampled_from(full))
            h = a.graph.apply(op, b, axis=draw(st.sampled_from([0, -1])))
        elif op == "transpose":
            h = draw(st.sampled_from(full)).T.reshape(3, 4) * 1.5
        elif op == "reshape":
            h = dg.reshape(draw(st.sampled_from(full)).reshape(2, 6)[::-1], (3, 4))
        elif op == "concat":
            b, c = draw(st.sampled_from(full)), draw(st.sampled_from(full))
            if draw(st.booleans()):
                h = dg.concat([b, c], axis=0)[[0, 5, 2]]  # (6, 4) -> (3, 4)
            else:
                h = dg.concat([b, c], axis=1)[:, 1:8:2]  # (3, 8) -> (3, 4)
        elif op == "index":
            b = draw(st.sampled_from(full))
            h = b[[2, 0, 0], None, 1:][:, 0] * 1.0  # (3, 3)
            h = dg.concat([h, b[:, :1]], axis=1)
        elif op == "where":
            cond = g.const(rng.random((3, 4)) > 0.5)
            h = dg.where(cond, draw(st.sampled_from(full)), draw(st.sampled_from(pool)))
        elif op == "broadcast_to":
            h = dg.broadcast_to(draw(st.sampled_from(pool)).sum(axis=0) * 0.25, (3, 4)) * 1.0
        else:  # mse
            h = dg.mse(a, draw(st.sampled_from(full))) + draw(st.sampled_from(full))
        pool.append(h)
    consumed = {i for n in g.nodes for i in n.inputs}
    sinks = [n for n in pool[3:] if n.name not in consumed] or [pool[-1]]
    total = sinks[0].sum()
    for s in sinks[1:]:
        total = total + s.sum()
    g.output("out", total)
    return g, {"x": rng.standard_normal((3, 4))}, "out"
