"""A 2-layer causal transformer that models the characters of the seed page (ships with distgraph).

    python examples/char_transformer.py                               # in-process
    python examples/char_transformer.py --backend ray --workers 2     # mincut: one worker
    python examples/char_transformer.py --backend ray --workers 2 --strategy pipeline
    python examples/char_transformer.py --generate 300                # then sample 300 characters
    python examples/char_transformer.py --quick                       # a short smoke run

The corpus (``distgraph.datasets.load_text()``, ~10,000 characters) is split once: the first
90 % trains, the last 10 % is held out. Training windows of ``--context`` characters start every
``--stride`` characters; the model predicts each next character (token + position embeddings,
pre-norm blocks of causal multi-head attention and a GELU MLP, a final layer norm, a linear
head, mean softmax cross-entropy). After training the script prints the held-out loss (nats per
character) beside two baselines measured on the same characters: the unigram model of the
training text (the target is at least 25 % below it) and, for context, the bigram model.

On Ray, ``--strategy`` picks the partitioner: ``mincut`` (the default) keeps this small model on
one worker, ``pipeline`` puts block0 and block1 on different workers, and every strategy trains
to the same parameters as the local run.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

import distgraph as dg
from distgraph import nn
from distgraph.datasets import load_text


class Corpus:
    """The text as integer ids over its sorted character set, split into train and held-out."""

    def __init__(self, text: str, held_out: float = 0.1):
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}
        ids = np.array([self.index[c] for c in text], dtype=np.int64)
        cut = int(len(ids) * (1 - held_out))
        self.train, self.test = ids[:cut], ids[cut:]

    @property
    def vocab(self) -> int:
        """Number of distinct characters."""
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """Ids of ``text`` (characters outside the corpus are dropped)."""
        return np.array([self.index[c] for c in text if c in self.index], dtype=np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``."""
        return "".join(self.chars[int(i)] for i in ids)


def windows(ids: np.ndarray, context: int, stride: int) -> dict[str, np.ndarray]:
    """Feeds ``x`` (n, context) and their next characters ``y`` (n, context)."""
    starts = np.arange(0, len(ids) - context, stride)
    x = np.stack([ids[s : s + context] for s in starts])
    y = np.stack([ids[s + 1 : s + context + 1] for s in starts])
    return {"x": x, "y": y}


def ngram_losses(corpus: Corpus) -> tuple[float, float]:
    """Held-out cross-entropy (nats/char) of the training text's add-one-smoothed unigram and
    bigram models, on the characters the transformer predicts (each held-out char after the
    first)."""
    v = corpus.vocab
    uni = np.bincount(corpus.train, minlength=v) + 1.0
    uni /= uni.sum()
    big = np.ones((v, v))
    np.add.at(big, (corpus.train[:-1], corpus.train[1:]), 1.0)
    big /= big.sum(axis=1, keepdims=True)
    prev, nxt = corpus.test[:-1], corpus.test[1:]
    return float(-np.mean(np.log(uni[nxt]))), float(-np.mean(np.log(big[prev, nxt])))


def build_graph(
    vocab: int,
    context: int,
    width: int = 64,
    heads: int = 4,
    layers: int = 2,
    dropout: float = 0.0,
    seed: int = 0,
) -> dg.Graph:
    """The transformer; outputs ``logits`` (batch, context, vocab) and ``loss``."""
    g = dg.Graph()
    x = g.input("x", shape=(None, context), dtype="int64")
    y = g.input("y", shape=(None, context), dtype="int64")
    tok = nn.embedding(x, vocab, width, name="tok", seed=seed)
    pos = nn.embedding(g.const(np.arange(context)), context, width, name="pos", seed=seed)
    h = tok + pos  # (batch, context, width) + (context, width)
    for i in range(layers):
        h = nn.transformer_block(h, heads, name=f"block{i}", dropout=dropout, seed=seed)
    h = nn.layer_norm(h, name="ln_f")
    g.output("logits", nn.linear(h, vocab, name="head", seed=seed, init="glorot"))
    flat = g["logits"].reshape(-1, vocab)
    g.output("loss", dg.cross_entropy(flat, y.reshape(-1)))
    return g


def held_out_loss(ex: Any, graph: dg.Graph, ids: np.ndarray, context: int) -> float:
    """Mean next-character loss over every held-out character after the first, in consecutive
    windows of ``context`` run as one batch (the last, shorter window is padded; padded
    positions are not counted)."""
    starts = range(0, len(ids) - 1, context)
    x = np.zeros((len(starts), context), np.int64)
    y = np.zeros((len(starts), context), np.int64)
    counted = np.zeros((len(starts), context), bool)
    for row, s in enumerate(starts):
        n = len(ids[s + 1 : s + context + 1])
        x[row, :n], y[row, :n], counted[row, :n] = ids[s : s + n], ids[s + 1 : s + n + 1], True
    logits = ex.run(graph, {"x": x, "y": y}, outputs=["logits"]).values["logits"]
    shifted = logits - logits.max(axis=-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    picked = np.take_along_axis(logp, y[..., None], axis=-1)[..., 0]
    return float(-picked[counted].mean())


def generate(
    ex: Any,
    graph: dg.Graph,
    corpus: Corpus,
    context: int,
    prompt: str,
    n: int,
    seed: int,
    temperature: float = 0.8,
) -> str:
    """Sample ``n`` characters after ``prompt`` (seeded): each from the model's distribution at
    the last position of the window, sharpened by ``temperature``."""
    rng = np.random.default_rng(seed)
    ids = list(corpus.encode(prompt)) or [corpus.index.get(" ", 0)]
    for _ in range(n):
        window = ids[-context:]
        # Causal attention: position len(window) - 1 sees only the window, not the padding.
        xp = np.zeros((1, context), np.int64)
        xp[0, : len(window)] = window
        logits = ex.run(graph, {"x": xp, "y": xp}, outputs=["logits"]).values["logits"]
        z = logits[0, len(window) - 1] / temperature
        p = np.exp(z - z.max())
        ids.append(int(rng.choice(corpus.vocab, p=p / p.sum())))
    return corpus.decode(ids)


def make_executor(backend: str, workers: int, strategy: str) -> Any:
    """The executor the flags ask for; Ray is imported only for ``--backend ray``."""
    if backend == "ray":
        return dg.RayExecutor(num_workers=workers, strategy=strategy)
    return dg.LocalExecutor()


def parser() -> argparse.ArgumentParser:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=8, help="passes over the windows (default 8)")
    p.add_argument(
        "--lr", type=float, default=3e-3, help="Adam's first rate, cosine-decayed (default 3e-3)"
    )
    p.add_argument("--dropout", type=float, default=0.1, help="block dropout (default 0.1)")
    p.add_argument("--batch-size", type=int, default=32, help="windows per step (default 32)")
    p.add_argument("--context", type=int, default=64, help="characters per window (default 64)")
    p.add_argument("--stride", type=int, default=8, help="gap between window starts (default 8)")
    p.add_argument("--width", type=int, default=64, help="model width (default 64)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    p.add_argument("--layers", type=int, default=2, help="transformer blocks (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed for init, shuffling, sampling")
    p.add_argument("--backend", choices=["local", "ray"], default="local", help="executor")
    p.add_argument("--workers", type=int, default=2, help="Ray worker actors (default 2)")
    p.add_argument(
        "--strategy",
        default="mincut",
        help=f"RayExecutor strategy: {', '.join(sorted(dg.STRATEGIES))} (default mincut)",
    )
    p.add_argument("--generate", type=int, default=0, metavar="N", help="sample N characters")
    p.add_argument("--prompt", default="The ", help="text the samples continue (default 'The ')")
    p.add_argument(
        "--quick", action="store_true", help="1 epoch on 64 windows: a smoke run, no target"
    )
    p.add_argument("--quiet", action="store_true", help="print only the results")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train; return ``{"held_out_loss", "unigram_loss", "bigram_loss", "history", "seconds",
    "sample"}``."""
    args = parser().parse_args(argv)
    corpus = Corpus(load_text())
    train = windows(corpus.train, args.context, args.stride)
    epochs = args.epochs
    if args.quick:
        train = {k: v[:64] for k, v in train.items()}
        epochs = min(epochs, 1)
    g = build_graph(
        corpus.vocab, args.context, args.width, args.heads, args.layers, args.dropout, args.seed
    )
    unigram, bigram = ngram_losses(corpus)
    # Per-epoch validation on the held-out text's whole windows (the final figure below also
    # counts the last, partial window).
    held_out = windows(corpus.test, args.context, args.context)
    steps = epochs * -(-len(train["x"]) // args.batch_size)
    optimizer = dg.Adam(lr=dg.CosineLR(args.lr, steps=steps, final=args.lr / 10))
    ex = make_executor(args.backend, args.workers, args.strategy)
    started = time.perf_counter()
    sample = ""
    try:
        trainer = dg.Trainer(g, loss="loss", optimizer=optimizer, executor=ex)
        for _ in range(epochs):
            history = trainer.fit(
                train, epochs=1, batch_size=args.batch_size, seed=args.seed, validation=held_out
            )
            if not args.quiet:
                print(
                    f"epoch {trainer.epoch:3d}: loss {history.loss[-1]:.4f}, held-out "
                    f"{history.val_loss[-1]:.4f}",
                    flush=True,
                )
        seconds = time.perf_counter() - started
        trained = g.with_params(trainer.params)
        loss = held_out_loss(ex, trained, corpus.test, args.context)
        if args.generate:
            sample = generate(
                ex, trained, corpus, args.context, args.prompt, args.generate, args.seed
            )
    finally:
        ex.close()
    below = 1 - loss / unigram
    print(
        f"held-out loss {loss:.4f} nats/char; unigram baseline {unigram:.4f} ({below:.1%} "
        f"below it), bigram {bigram:.4f}; {trainer.step} steps in {seconds:.1f} s "
        f"({args.backend})"
    )
    if sample:
        print(f"--- sample (seed {args.seed}) ---\n{sample}")
    return {
        "held_out_loss": loss,
        "val_loss": list(trainer.history.val_loss),
        "unigram_loss": unigram,
        "bigram_loss": bigram,
        "history": list(trainer.history.loss),
        "seconds": seconds,
        "sample": sample,
        "perplexity": math.exp(loss),
    }


if __name__ == "__main__":
    main(sys.argv[1:])
