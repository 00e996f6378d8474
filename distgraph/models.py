"""Ready-made graphs and data sets from the seed story, used by the CLI, examples and tests."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from .functional import cross_entropy, mse, relu
from .graph import Graph


def seed_graph(x: float = 2.0, w: float = 3.0, b: float = 1.0) -> tuple[Graph, dict[str, Any]]:
    """The seed's ``z = x * w + b`` with x=2, w=3, b=1; returns the graph and its feeds."""
    g = Graph()
    xn = g.input("x")
    wn = g.param("w", w)
    bn = g.param("b", b)
    g.output("z", xn * wn + bn)
    return g, {"x": x}


def linear_data(n: int = 200, seed: int = 0, noise: float = 0.0) -> dict[str, np.ndarray]:
    """Samples of f(x) = 3x + 7 on [-2, 2] (optionally with Gaussian noise)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-2, 2, size=n)
    y = 3 * x + 7 + noise * rng.standard_normal(n)
    return {"x": x, "y": y}


def linear_regression(w: float = -2.0, b: float = 15.0) -> Graph:
    """The seed's training demo: fit y = w*x + b (starting from w=-2, b=15) by MSE."""
    g = Graph()
    x, y = g.input("x", shape=(None,)), g.input("y", shape=(None,))
    wn, bn = g.param("w", w), g.param("b", b)
    g.output("pred", x * wn + bn)
    g.output("loss", mse(g["pred"], y))
    return g


def spirals(
    n_per_class: int = 200, classes: int = 2, noise: float = 0.2, seed: int = 0
) -> dict[str, np.ndarray]:
    """Interleaved spirals in 2-D: ``x`` (n, 2) float64 and integer labels ``y``."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for c in range(classes):
        t = np.linspace(0.25, 1.0, n_per_class)
        angle = 3.5 * np.pi * t + 2 * np.pi * c / classes
        pts = np.stack([t * np.cos(angle), t * np.sin(angle)], axis=1) * 2.0
        xs.append(pts + noise * t[:, None] * rng.standard_normal(pts.shape) * 0.5)
        ys.append(np.full(n_per_class, c))
    return {"x": np.concatenate(xs), "y": np.concatenate(ys).astype(np.int64)}


def mlp_classifier(
    sizes: tuple[int, ...] = (2, 64, 64, 2), seed: int = 0, dtype: str = "float64"
) -> Graph:
    """An MLP with ReLU hidden layers and softmax cross-entropy; outputs ``logits`` and ``loss``."""
    rng = np.random.default_rng(seed)
    g = Graph()
    x = g.input("x", shape=(None, sizes[0]), dtype=dtype)
    y = g.input("y", shape=(None,), dtype="int64")
    h = x
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes), start=1):
        w = g.param(
            f"W{i}", (rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)).astype(dtype)
        )
        b = g.param(f"b{i}", np.zeros(fan_out, dtype=dtype))
        h = h @ w + b
        if i < len(sizes) - 1:
            h = relu(h)
    g.output("logits", h)
    g.output("loss", cross_entropy(g["logits"], y))
    return g


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose arg-max matches the label."""
    return float(np.mean(np.argmax(logits, axis=-1) == labels))


BUILTIN = ("seed", "linear", "mlp")


def builtin_graph(name: str) -> tuple[Graph, dict[str, Any], str]:
    """A named built-in graph with sample feeds and the output to differentiate."""
    if name == "seed":
        g, feeds = seed_graph()
        return g, feeds, "z"
    if name == "linear":
        data = linear_data(16)
        return linear_regression(), data, "loss"
    if name == "mlp":
        data = spirals(16)
        return mlp_classifier(), data, "loss"
    raise KeyError(name)
