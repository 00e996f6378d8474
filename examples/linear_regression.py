"""Fit f(x) = 3x + 7 by gradient descent from w = -2, b = 15 (the seed's training demo).

    python examples/linear_regression.py                          # in-process
    python examples/linear_regression.py --backend ray --workers 2

The data set is generated here: x uniform on [-2, 2], y = 3x + 7 (plus optional noise).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

import distgraph as dg


def make_data(n: int = 128, seed: int = 0, noise: float = 0.0) -> dict[str, np.ndarray]:
    """Samples of f(x) = 3x + 7 on [-2, 2]."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-2.0, 2.0, size=n)
    return {"x": x, "y": 3.0 * x + 7.0 + noise * rng.standard_normal(n)}


def build_graph(w: float = -2.0, b: float = 15.0) -> dg.Graph:
    """loss = mse(x * w + b, y), starting from the seed's w and b."""
    g = dg.Graph()
    x, y = g.input("x", shape=(None,)), g.input("y", shape=(None,))
    wn, bn = g.param("w", w), g.param("b", b)
    g.output("loss", dg.mse(x * wn + bn, y))
    return g


def make_executor(backend: str, workers: int) -> Any:
    """The executor the flags ask for; Ray is imported only for ``--backend ray``."""
    if backend == "ray":
        return dg.RayExecutor(num_workers=workers)
    return dg.LocalExecutor()


def parser() -> argparse.ArgumentParser:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=200, help="passes over the data (default 200)")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (default 0.05)")
    p.add_argument("--batch-size", type=int, default=16, help="mini-batch size (default 16)")
    p.add_argument("--samples", type=int, default=128, help="data set size (default 128)")
    p.add_argument("--noise", type=float, default=0.0, help="std of noise added to y (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed for data and shuffling (default 0)")
    p.add_argument("--backend", choices=["local", "ray"], default="local", help="executor")
    p.add_argument("--workers", type=int, default=2, help="Ray worker actors (default 2)")
    p.add_argument("--quiet", action="store_true", help="print only the final line")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train and return ``{"w", "b", "loss", "history"}``."""
    args = parser().parse_args(argv)
    data = make_data(args.samples, args.seed, args.noise)
    g = build_graph()
    ex = make_executor(args.backend, args.workers)
    try:
        trainer = dg.Trainer(g, loss="loss", optimizer=dg.SGD(lr=args.lr), executor=ex)
        history = trainer.fit(data, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
        params = trainer.params
    finally:
        ex.close()
    if not args.quiet:
        every = max(1, args.epochs // 10)
        for epoch in range(0, args.epochs, every):
            p = history.params[epoch]
            print(
                f"epoch {epoch + 1:4d}: loss {history.loss[epoch]:.6g}  "
                f"w {p['w']:.4f}  b {p['b']:.4f}"
            )
    w, b, loss = float(params["w"]), float(params["b"]), history.loss[-1]
    print(f"w = {w:.6f} (target 3), b = {b:.6f} (target 7), final loss = {loss:.3g}")
    return {"w": w, "b": b, "loss": loss, "history": list(history.loss)}


if __name__ == "__main__":
    main(sys.argv[1:])
