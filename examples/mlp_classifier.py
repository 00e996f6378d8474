"""Classify two interleaved spirals with an MLP: 2 hidden ReLU layers, softmax cross-entropy.

    python examples/mlp_classifier.py                             # in-process
    python examples/mlp_classifier.py --backend ray --workers 2

The data set is generated here; the script prints the loss as it trains and the final training
accuracy (the default run reaches well over 95 %).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

import distgraph as dg


def spirals(
    n_per_class: int = 200, turns: float = 1.75, noise: float = 0.1, seed: int = 0
) -> dict[str, np.ndarray]:
    """Two interleaved spirals in 2-D: ``x`` (n, 2) float64 and integer labels ``y``."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for label in (0, 1):
        # sqrt spreads the points evenly along the arm instead of crowding the centre.
        t = np.sqrt(rng.uniform(0.0, 1.0, n_per_class))
        angle = 2 * np.pi * turns * t + np.pi * label  # the second arm is the first, rotated
        radius = 0.1 + 2.0 * t
        pts = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
        xs.append(pts + noise * rng.standard_normal(pts.shape))
        ys.append(np.full(n_per_class, label))
    return {"x": np.concatenate(xs), "y": np.concatenate(ys).astype(np.int64)}


def build_graph(hidden: int = 32, seed: int = 0) -> dg.Graph:
    """x (batch, 2) -> relu -> relu -> logits (batch, 2); loss = cross_entropy(logits, y)."""
    rng = np.random.default_rng(seed)
    g = dg.Graph()
    h = g.input("x", shape=(None, 2))
    y = g.input("y", shape=(None,), dtype="int64")
    sizes = [2, hidden, hidden, 2]
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes), start=1):
        w = g.param(f"W{i}", rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in))
        b = g.param(f"b{i}", np.zeros(fan_out))
        h = h @ w + b  # b (fan_out,) broadcasts over the batch
        if i < len(sizes) - 1:
            h = dg.relu(h)
    g.output("logits", h)
    g.output("loss", dg.cross_entropy(g["logits"], y))
    return g


def make_executor(backend: str, workers: int) -> Any:
    """The executor the flags ask for; Ray is imported only for ``--backend ray``."""
    if backend == "ray":
        return dg.RayExecutor(num_workers=workers)
    return dg.LocalExecutor()


def parser() -> argparse.ArgumentParser:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=100, help="passes over the data (default 100)")
    p.add_argument("--lr", type=float, default=0.02, help="Adam learning rate (default 0.02)")
    p.add_argument("--batch-size", type=int, default=100, help="mini-batch size (default 100)")
    p.add_argument("--hidden", type=int, default=32, help="units per hidden layer (default 32)")
    p.add_argument("--samples", type=int, default=200, help="points per spiral (default 200)")
    p.add_argument("--seed", type=int, default=0, help="seed for data, init, shuffling")
    p.add_argument("--backend", choices=["local", "ray"], default="local", help="executor")
    p.add_argument("--workers", type=int, default=2, help="Ray worker actors (default 2)")
    p.add_argument("--quiet", action="store_true", help="print only the final line")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train; return ``{"accuracy", "loss", "history", "params"}``."""
    args = parser().parse_args(argv)
    data = spirals(args.samples, seed=args.seed)
    g = build_graph(args.hidden, args.seed)
    ex = make_executor(args.backend, args.workers)
    try:
        trainer = dg.Trainer(g, loss="loss", optimizer=dg.Adam(lr=args.lr), executor=ex)
        every = max(1, args.epochs // 10)
        for start in range(0, args.epochs, every):
            epochs = min(every, args.epochs - start)
            history = trainer.fit(data, epochs=epochs, batch_size=args.batch_size, seed=args.seed)
            if not args.quiet:
                print(f"epoch {trainer.epoch:4d}: loss {history.loss[-1]:.4f}")
        params = trainer.params
        # Training accuracy: one forward pass over all points with the trained params.
        logits = ex.run(g.with_params(params), data, outputs=["logits"]).values["logits"]
    finally:
        ex.close()
    accuracy = float(np.mean(np.argmax(logits, axis=1) == data["y"]))
    loss = trainer.history.loss[-1]
    print(f"training accuracy {accuracy:.1%}, final loss {loss:.4f}, {trainer.step} steps")
    return {
        "accuracy": accuracy,
        "loss": loss,
        "history": list(trainer.history.loss),
        "params": params,
    }


if __name__ == "__main__":
    main(sys.argv[1:])
