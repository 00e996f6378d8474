"""`attention`: forward + backward of one causal multi-head self-attention layer, float32, on
``LocalExecutor``.

``q, k, v = x Wq, x Wk, x Wv`` split into heads; ``softmax(causal(q k^T / sqrt(d))) v``; heads
merged and projected by ``Wo``; loss = mean of the squared output. Each timed call is one
training step (forward, backward, SGD update). Peers: the same maths by hand in numpy, and
PyTorch on the CPU when importable. BLAS (and PyTorch) use one thread.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._harness import Record, blas_threads, log, measure, sgd_session_step

NAME = "attention"
#: label -> (comparison, bound) of every target this benchmark checks.
TARGETS = {"local_vs_numpy": ("<=", 1.2)}
#: None needed: PyTorch is optional (skipped with a note when missing).
PEERS: tuple[str, ...] = ()
#: SGD learning rate of the timed training step.
LR = 0.01
WEIGHTS = ("wq", "wk", "wv", "wo")


def make_problem(batch: int, seq: int, dim: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Input ``x`` (batch, seq, dim) and the four (dim, dim) projections."""
    rng = np.random.default_rng(seed)
    p = {"x": rng.standard_normal((batch, seq, dim)).astype(np.float32)}
    for name in WEIGHTS:
        p[name] = (rng.standard_normal((dim, dim)) / np.sqrt(dim)).astype(np.float32)
    return p


def _heads(t: np.ndarray, heads: int) -> np.ndarray:
    b, s, d = t.shape
    return np.ascontiguousarray(t.reshape(b, s, heads, d // heads).transpose(0, 2, 1, 3))


def _merge(t: np.ndarray) -> np.ndarray:
    b, h, s, dh = t.shape
    return np.ascontiguousarray(t.transpose(0, 2, 1, 3)).reshape(b, s, h * dh)


def _t(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.swapaxes(a, -1, -2))


def numpy_step(p: dict[str, np.ndarray], heads: int) -> tuple[float, dict[str, np.ndarray]]:
    """Loss and the gradients of the four projections, by hand."""
    x = p["x"]
    b, s, d = x.shape
    x2 = x.reshape(b * s, d)
    q, k, v = (_heads((x2 @ p[w]).reshape(b, s, d), heads) for w in ("wq", "wk", "wv"))
    scale = np.float32(1.0 / math.sqrt(d // heads))
    keep = np.tri(s, s, dtype=bool)
    scores = np.where(keep, np.matmul(q, _t(k)) * scale, np.float32(-1e9))
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    att = e / e.sum(axis=-1, keepdims=True)
    ctx = _merge(np.matmul(att, v)).reshape(b * s, d)
    out = ctx @ p["wo"]
    loss = float(np.mean(out * out))
    gout = out * np.float32(2.0 / out.size)
    grads = {"wo": ctx.T @ gout}
    gctx = _heads((gout @ p["wo"].T).reshape(b, s, d), heads)
    gatt = np.matmul(gctx, _t(v))
    gv = np.matmul(_t(att), gctx)
    gscores = att * (gatt - np.sum(gatt * att, axis=-1, keepdims=True))
    gscores = np.where(keep, gscores, np.float32(0)) * scale
    gq = np.matmul(gscores, k)
    gk = np.matmul(_t(gscores), q)
    for w, gh in (("wq", gq), ("wk", gk), ("wv", gv)):
        grads[w] = x2.T @ _merge(gh).reshape(b * s, d)
    return loss, grads


def build_distgraph(p: dict[str, np.ndarray], heads: int) -> Any:
    """The same layer as a graph (einsum for the two attention products); output ``loss``."""
    import distgraph as dg

    g = dg.Graph()
    _, s, d = p["x"].shape
    x = g.input("x", shape=(None, s, d), dtype="float32")

    def split_heads(t: Any) -> Any:
        return dg.transpose(dg.reshape(t, (-1, s, heads, d // heads)), (0, 2, 1, 3))

    q, k, v = (split_heads(x @ g.param(w, p[w])) for w in ("wq", "wk", "wv"))
    scores = dg.einsum("bhqd,bhkd->bhqk", q, k) * (1.0 / math.sqrt(d // heads))
    att = dg.softmax(dg.causal_mask(scores))
    ctx = dg.reshape(dg.transpose(dg.einsum("bhqk,bhkd->bhqd", att, v), (0, 2, 1, 3)), (-1, s, d))
    out = ctx @ g.param("wo", p["wo"])
    g.output("loss", dg.mean(out * out))
    return g


def _torch_step_fn(p: dict[str, np.ndarray], heads: int) -> Any:
    import torch

    x = torch.tensor(p["x"])
    ws = {w: torch.tensor(p[w], requires_grad=True) for w in WEIGHTS}
    b, s, d = p["x"].shape
    mask = torch.ones(s, s, dtype=torch.bool).tril()

    def step() -> None:
        for w in ws.values():
            w.grad = None
        q, k, v = (
            (x @ ws[w]).reshape(b, s, heads, d // heads).transpose(1, 2) for w in ("wq", "wk", "wv")
        )
        scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(d // heads))
        att = torch.softmax(scores.masked_fill(~mask, -1e9), dim=-1)
        out = (att @ v).transpose(1, 2).reshape(b, s, d) @ ws["wo"]
        (out * out).mean().backward()

    return step


def _numpy_sgd(p: dict[str, np.ndarray], heads: Any) -> Any:
    """One training step by hand: forward, backward, SGD update of the weights in place."""
    params = {k: v.copy() for k, v in p.items()}

    def step() -> None:
        grads = numpy_step(params, heads)[1]
        for w, gw in grads.items():
            params[w] -= np.float32(LR) * gw

    return step


def bench(rec: Record, quick: bool = False, progress: bool = False) -> None:
    """Time distgraph, numpy and PyTorch on the same forward + backward."""
    import distgraph as dg

    batch, seq, dim, heads = (2, 32, 32, 4) if quick else (8, 128, 128, 4)
    repeats = 5 if quick else 15
    p = make_problem(batch, seq, dim)
    rec.note(
        f"x ({batch}, {seq}, {dim}), {heads} heads, causal; float32, gradients of Wq Wk Wv Wo."
    )
    g = build_distgraph(p, heads)
    with blas_threads(1) as how:
        rec.note(how)
        ex = dg.LocalExecutor()
        got = ex.run(g, {"x": p["x"]}, grad="loss")
        loss, grads = numpy_step(p, heads)
        # Same maths: the two implementations agree before either is timed.
        np.testing.assert_allclose(got.values["loss"], loss, rtol=1e-4)
        for w in WEIGHTS:
            np.testing.assert_allclose(got.grads[w], grads[w], rtol=1e-3, atol=1e-6)
        log(progress, NAME, "numpy")
        numpy_s = rec.figure("numpy_s", measure(_numpy_sgd(p, heads), repeats, 2))
        log(progress, NAME, "distgraph local")
        local_s = rec.figure(
            "distgraph_local_s", measure(sgd_session_step(g, ex, {"x": p["x"]}, LR), repeats, 2)
        )
        _torch_peer(rec, p, heads, repeats, progress, numpy_s)
    rec.target("local_vs_numpy", rec.ratio("local_vs_numpy", local_s, numpy_s))


def _torch_peer(
    rec: Record, p: dict[str, np.ndarray], heads: int, repeats: int, progress: bool, numpy_s: float
) -> None:
    try:
        import torch
    except ImportError:
        rec.note("PyTorch peer skipped: torch is not importable.")
        return
    log(progress, NAME, "pytorch cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch_s = rec.figure("torch_s", measure(_torch_step_fn(p, heads), repeats, 2))
    finally:
        torch.set_num_threads(threads)
    rec.ratio("torch_vs_numpy", torch_s, numpy_s)
    rec.ratio("local_vs_torch", rec.figures["distgraph_local_s"], torch_s)
    rec.note(f"PyTorch {torch.__version__} CPU, one thread.")
