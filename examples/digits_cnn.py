"""Classify scikit-learn's 8x8 hand-written digits with a small CNN (data ships with distgraph).

    python examples/digits_cnn.py                              # in-process
    python examples/digits_cnn.py --backend ray --workers 2    # workers + a parameter server
    python examples/digits_cnn.py --quick                      # a short smoke run

conv(8, 3x3) -> relu -> max-pool 2 -> conv(16, 3x3) -> relu -> max-pool 2 -> linear(10), softmax
cross-entropy, Adam with a cosine-decayed rate. The 1,797 images are split once by a seeded
permutation into 1,438 training and 359 held-out images; after every epoch the script prints the
mean training loss and the accuracy on the held-out images (the default run ends above 97 %).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

import distgraph as dg
from distgraph import nn
from distgraph.datasets import load_digits


def split(seed: int = 0, test_fraction: float = 0.2) -> tuple[dict, dict]:
    """(train, test) feeds: ``x`` (n, 1, 8, 8) float32 in [0, 1], ``y`` int64 labels."""
    images, labels = load_digits()
    x = (images[:, None, :, :] / 16.0).astype(np.float32)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = round(test_fraction * len(labels))
    test, train = order[:n_test], order[n_test:]
    return {"x": x[train], "y": labels[train]}, {"x": x[test], "y": labels[test]}


def build_graph(channels: tuple[int, int] = (8, 16), seed: int = 0) -> dg.Graph:
    """The CNN; outputs ``logits`` (batch, 10) and ``loss``."""
    g = dg.Graph()
    x = g.input("x", shape=(None, 1, 8, 8), dtype="float32")
    y = g.input("y", shape=(None,), dtype="int64")
    h = dg.relu(nn.conv2d(x, channels[0], 3, padding=1, name="conv1", seed=seed))
    h = dg.max_pool2d(h, 2)  # 8x8 -> 4x4
    h = dg.relu(nn.conv2d(h, channels[1], 3, padding=1, name="conv2", seed=seed))
    h = dg.max_pool2d(h, 2)  # 4x4 -> 2x2
    h = h.reshape(-1, channels[1] * 2 * 2)
    g.output("logits", nn.linear(h, 10, name="fc", seed=seed, init="glorot"))
    g.output("loss", dg.cross_entropy(g["logits"], y))
    return g


def make_executor(backend: str, workers: int, strategy: str, replicas: int | str = "auto") -> Any:
    """The executor the flags ask for; Ray is imported only for ``--backend ray``."""
    if backend == "ray":
        return dg.RayExecutor(num_workers=workers, strategy=strategy, replicas=replicas)
    return dg.LocalExecutor()


def parser() -> argparse.ArgumentParser:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=25, help="passes over the data (default 25)")
    p.add_argument(
        "--lr", type=float, default=0.01, help="Adam's first rate, cosine-decayed (default 0.01)"
    )
    p.add_argument("--batch-size", type=int, default=64, help="mini-batch size (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed for the split, init, shuffling")
    p.add_argument("--backend", choices=["local", "ray"], default="local", help="executor")
    p.add_argument("--workers", type=int, default=2, help="Ray worker actors (default 2)")
    p.add_argument(
        "--strategy",
        default="mincut",
        help=f"RayExecutor strategy: {', '.join(sorted(dg.STRATEGIES))} (default mincut)",
    )
    p.add_argument(
        "--replicas",
        type=lambda v: v if v == "auto" else int(v),
        default="auto",
        help="data-parallel replicas on Ray: an int dividing --workers, or auto (default auto: "
        "more replicas only when the cost model expects them to pay)",
    )
    p.add_argument(
        "--quick", action="store_true", help="2 epochs on 256 images: a smoke run, no target"
    )
    p.add_argument("--quiet", action="store_true", help="print only the final line")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train; return ``{"accuracy", "loss", "history", "seconds", "params"}``."""
    args = parser().parse_args(argv)
    train, test = split(args.seed)
    epochs = args.epochs
    if args.quick:
        train = {k: v[:256] for k, v in train.items()}
        epochs = min(epochs, 2)
    g = build_graph(seed=args.seed)
    ex = make_executor(args.backend, args.workers, args.strategy, args.replicas)
    started = time.perf_counter()
    try:
        # Adam with the rate cosine-decayed to a twentieth over the run: late epochs settle
        # instead of oscillating around the minimum.
        steps = epochs * -(-len(train["y"]) // args.batch_size)
        lr = dg.CosineLR(args.lr, steps=steps, final=args.lr / 20)
        trainer = dg.Trainer(g, loss="loss", optimizer=dg.Adam(lr=lr), executor=ex)
        for _ in range(epochs):
            # The held-out images are scored after every epoch (history.val_accuracy); they
            # choose nothing, so the last epoch's figure is an honest test accuracy.
            history = trainer.fit(
                train,
                epochs=1,
                batch_size=args.batch_size,
                seed=args.seed,
                validation=test,
                metric="accuracy",
            )
            if not args.quiet:
                print(
                    f"epoch {trainer.epoch:3d}: loss {history.loss[-1]:.4f}, held-out accuracy "
                    f"{history.val_accuracy[-1]:.2%}",
                    flush=True,
                )
        seconds = time.perf_counter() - started
        accuracy = trainer.evaluate(test, metric="accuracy")["accuracy"]
        params = trainer.params
    finally:
        ex.close()
    loss = trainer.history.loss[-1]
    print(
        f"test accuracy {accuracy:.2%} on {len(test['y'])} held-out images; final training "
        f"loss {loss:.4f}; {trainer.step} steps in {seconds:.1f} s ({args.backend})"
    )
    return {
        "accuracy": accuracy,
        "val_accuracy": list(trainer.history.val_accuracy),
        "loss": loss,
        "history": list(trainer.history.loss),
        "seconds": seconds,
        "params": params,
    }


if __name__ == "__main__":
    main(sys.argv[1:])
