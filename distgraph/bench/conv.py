"""`conv`: forward + backward of two convolution layers (conv, ReLU, max-pool, conv, ReLU,
mean), float32, on ``LocalExecutor``.

Each timed call is one training step (forward, backward, SGD update of the weights).
Peers: the same maths written by hand in numpy (im2col + one batched GEMM per convolution,
col2im for the input gradient, the pooling gradient routed to each window's maximum), and
PyTorch on the CPU when importable. BLAS (and PyTorch) use one thread, so the ratios compare
kernels and per-node overhead, not thread pools.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._harness import Record, blas_threads, log, measure, sgd_session_step

NAME = "conv"
#: label -> (comparison, bound) of every target this benchmark checks.
TARGETS = {"local_vs_numpy": ("<=", 1.2)}
#: None needed: PyTorch is optional (skipped with a note when missing).
PEERS: tuple[str, ...] = ()
#: SGD learning rate of the timed training step.
LR = 0.01


def make_problem(batch: int, channels: int, size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Input ``x`` (batch, 3, size, size) and weights ``w1`` (channels, 3, 3, 3), ``w2``."""
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((batch, 3, size, size)).astype(np.float32),
        "w1": (rng.standard_normal((channels, 3, 3, 3)) * 0.3).astype(np.float32),
        "w2": (rng.standard_normal((channels, channels, 3, 3)) * 0.1).astype(np.float32),
    }


# --- the hand-written peer --------------------------------------------------------------------


def _cols(x: np.ndarray) -> np.ndarray:
    """(N, C*9, H*W) columns of a 3x3, padding-1, stride-1 convolution."""
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3))
    return win.transpose(0, 1, 4, 5, 2, 3).reshape(n, c * 9, h * w)


def _conv(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cols = _cols(x)
    out = np.matmul(w.reshape(w.shape[0], -1), cols)
    return out.reshape(x.shape[0], w.shape[0], *x.shape[2:]), cols


def _conv_back(
    g: np.ndarray, x_shape: tuple, w: np.ndarray, cols: np.ndarray, need_dx: bool
) -> tuple[np.ndarray | None, np.ndarray]:
    n, c, h, wd = x_shape
    o = w.shape[0]
    g3 = g.reshape(n, o, h * wd)
    dw = np.matmul(g3, cols.transpose(0, 2, 1)).sum(axis=0).reshape(w.shape)
    if not need_dx:
        return None, dw
    dcols = np.matmul(w.reshape(o, -1).T, g3).reshape(n, c, 3, 3, h, wd)
    dxp = np.zeros((n, c, h + 2, wd + 2), dtype=g.dtype)
    for i in range(3):
        for j in range(3):
            dxp[:, :, i : i + h, j : j + wd] += dcols[:, :, i, j]
    return dxp[:, :, 1:-1, 1:-1], dw


def numpy_step(p: dict[str, np.ndarray]) -> tuple[float, np.ndarray, np.ndarray]:
    """Loss and the gradients of ``w1`` and ``w2``, by hand."""
    x, w1, w2 = p["x"], p["w1"], p["w2"]
    z1, cols1 = _conv(x, w1)
    a1 = np.maximum(z1, 0)
    # 2x2 max-pool as four strided taps (faster in numpy than reducing a reshaped view).
    taps = [
        (slice(None), slice(None), slice(i, None, 2), slice(j, None, 2))
        for i in (0, 1)
        for j in (0, 1)
    ]
    pooled = a1[taps[0]].copy()
    for key in taps[1:]:
        np.maximum(pooled, a1[key], out=pooled)
    z2, cols2 = _conv(pooled, w2)
    a2 = np.maximum(z2, 0)
    loss = float(a2.mean())
    g2 = (z2 > 0) * np.float32(1.0 / a2.size)
    dpooled, dw2 = _conv_back(g2, pooled.shape, w2, cols2, need_dx=True)
    assert dpooled is not None
    hits = [a1[key] == pooled for key in taps]
    share = dpooled / sum(h.astype(np.float32) for h in hits)  # ties share, as distgraph does
    da1 = np.zeros_like(a1)
    for key, hit in zip(taps, hits):
        da1[key] = np.where(hit, share, 0)
    _, dw1 = _conv_back(da1 * (z1 > 0), x.shape, w1, cols1, need_dx=False)
    return loss, dw1, dw2


# --- distgraph and PyTorch ----------------------------------------------------------------------


def build_distgraph(p: dict[str, np.ndarray]) -> Any:
    """The same network as a graph; output ``loss``."""
    import distgraph as dg

    g = dg.Graph()
    x = g.input("x", shape=(None, *p["x"].shape[1:]), dtype="float32")
    h = dg.relu(dg.conv2d(x, g.param("w1", p["w1"]), padding=1))
    h = dg.max_pool2d(h, 2)
    h = dg.relu(dg.conv2d(h, g.param("w2", p["w2"]), padding=1))
    g.output("loss", dg.mean(h))
    return g


def _torch_step_fn(p: dict[str, np.ndarray]) -> Any:
    import torch

    x = torch.tensor(p["x"])
    w1 = torch.tensor(p["w1"], requires_grad=True)
    w2 = torch.tensor(p["w2"], requires_grad=True)
    f = torch.nn.functional

    def step() -> None:
        w1.grad = w2.grad = None
        h = f.max_pool2d(torch.relu(f.conv2d(x, w1, padding=1)), 2)
        torch.relu(f.conv2d(h, w2, padding=1)).mean().backward()

    return step


def _numpy_sgd(p: dict[str, np.ndarray], heads: Any) -> Any:
    """One training step by hand: forward, backward, SGD update of the weights in place."""
    params = {k: v.copy() for k, v in p.items()}

    def step() -> None:
        grads = numpy_step(params)[1:]
        for w, gw in zip(("w1", "w2"), grads):
            params[w] -= np.float32(LR) * gw

    return step


def bench(rec: Record, quick: bool = False, progress: bool = False) -> None:
    """Time distgraph, numpy and PyTorch on the same forward + backward."""
    import distgraph as dg

    batch, channels, size = (4, 8, 16) if quick else (32, 32, 32)
    repeats = 5 if quick else 15
    p = make_problem(batch, channels, size)
    rec.note(
        f"x ({batch}, 3, {size}, {size}) -> conv3x3 {channels} -> relu -> maxpool2 -> "
        f"conv3x3 {channels} -> relu -> mean; float32, gradients of both weights."
    )
    g = build_distgraph(p)
    with blas_threads(1) as how:
        rec.note(how)
        ex = dg.LocalExecutor()
        got = ex.run(g, {"x": p["x"]}, grad="loss")
        loss, dw1, dw2 = numpy_step(p)
        # Same maths: the two implementations agree before either is timed.
        np.testing.assert_allclose(got.values["loss"], loss, rtol=1e-4)
        np.testing.assert_allclose(got.grads["w1"], dw1, rtol=1e-3, atol=1e-6)
        np.testing.assert_allclose(got.grads["w2"], dw2, rtol=1e-3, atol=1e-6)
        log(progress, NAME, "numpy")
        numpy_s = rec.figure("numpy_s", measure(_numpy_sgd(p, None), repeats, 2))
        log(progress, NAME, "distgraph local")
        local_s = rec.figure(
            "distgraph_local_s", measure(sgd_session_step(g, ex, {"x": p["x"]}, LR), repeats, 2)
        )
        _torch_peer(rec, p, repeats, progress, numpy_s)
    rec.target("local_vs_numpy", rec.ratio("local_vs_numpy", local_s, numpy_s))


def _torch_peer(
    rec: Record, p: dict[str, np.ndarray], repeats: int, progress: bool, numpy_s: float
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
        torch_s = rec.figure("torch_s", measure(_torch_step_fn(p), repeats, 2))
    finally:
        torch.set_num_threads(threads)
    rec.ratio("torch_vs_numpy", torch_s, numpy_s)
    rec.ratio("local_vs_torch", rec.figures["distgraph_local_s"], torch_s)
    rec.note(f"PyTorch {torch.__version__} CPU, one thread.")
