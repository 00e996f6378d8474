"""Neural-network ops: convolution, pooling, normalisation, embedding, dropout, attention pieces.

Every op here is one row of the same table as :mod:`distgraph.ops` (``defop(name, forward,
vjp_0, vjp_1, ..., attrs=...)``), plus two facts the core ops do not need:

* ``infer(shapes, dtypes, attrs, node)`` -> ``(shape, dtype)``: the output's shape and dtype from
  the inputs' (``None`` for unknown dimensions and values), raising :class:`ShapeError` or
  :class:`DTypeError` naming the node, the op and the shapes. The generic inference runs the op
  on stand-in values, which cannot work for ops that need 4-D inputs or integer ids.
* ``flops(out_shape, in_shapes, attrs, argnum)``: floating-point operations of the forward
  (``argnum`` None) or of the VJP for input ``argnum``, for the cost model (a convolution's cost
  is not a constant per output element).

Kernels are numpy only. Convolution is im2col: a strided window view
(``sliding_window_view``), one contiguous copy into (N, C*kh*kw, Ho*Wo) columns, and a batch of
BLAS GEMMs (one per image); its input gradient is the transposed product followed by col2im
(one strided add per kernel offset). Pooling loops over the kernel's taps (strided views).
Ties in ``max_pool2d`` share the gradient equally, as the ``max`` op's do. ``einsum`` with two
operands runs as one batched matmul on contiguous operands.

**Dropout and data parallelism.** Element ``i`` of the mask is a function of its flat index in
the array the kernel sees: a row shard of a batch would draw the masks of the batch's first
rows. Sharding rows across replicas needs the shard's row offset added to the index (see
:func:`dropout_mask`).

**Dropout determinism.** ``dropout`` draws its mask from ``(seed, step id, key)`` with a
counter-based hash (splitmix64 of the element's flat index): the same step id draws the same mask
in every process, on every executor, and when a failed step is replayed. The step id reaches the
kernel through :func:`step_scope`, which the training sessions open around a step (local session
and each Ray worker's call of a training step). Outside a training step (``executor.run``,
evaluation) dropout is the identity. ``key`` names the random stream; :func:`dropout` sets it to
the node's name.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .errors import DTypeError, ShapeError
from .ops import Attr, defop

Shape = tuple[Any, ...]

# --- the step a kernel runs in ------------------------------------------------------------------

_STEP: contextvars.ContextVar[int | None] = contextvars.ContextVar("distgraph_step", default=None)


@contextlib.contextmanager
def step_scope(step_id: int | None) -> Iterator[None]:
    """Run the enclosed kernels as part of training step ``step_id`` (None: not training).

    Stochastic ops (``dropout``) draw from the step id; outside any scope they are the identity.
    """
    token = _STEP.set(None if step_id is None else int(step_id))
    try:
        yield
    finally:
        _STEP.reset(token)


def current_step() -> int | None:
    """The training step id kernels run in now (None outside a training step)."""
    return _STEP.get()


# --- shape-rule helpers ----------------------------------------------------------------------


def _fmt(shapes: Sequence[Any]) -> str:
    return " and ".join(
        "(unknown)"
        if s is None
        else "("
        + ", ".join("batch" if d is None else str(d) for d in s)
        + ("," if len(s) == 1 else "")
        + ")"
        for s in shapes
    )


def _shape_error(node: Any, op: str, shapes: Sequence[Any], why: str) -> ShapeError:
    return ShapeError(f"node {node!r} (op {op}): inputs of shapes {_fmt(shapes)}: {why}")


def _float_dtype(node: Any, op: str, dtypes: Sequence[str | None], which: Sequence[int]) -> Any:
    """The result dtype of float inputs ``which`` (None when one is unknown)."""
    picked = [dtypes[i] for i in which]
    for i, d in zip(which, picked):
        if d is not None and np.dtype(d).kind != "f":
            raise DTypeError(
                f"node {node!r} (op {op}): input {i} has dtype {d}; {op} needs floating-point "
                "inputs (cast it with .astype('float32'))"
            )
    if None in picked:
        return None
    return np.result_type(*picked).name


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, (int, np.integer)) else (int(v[0]), int(v[1]))


def _pair_check(low: int) -> Any:
    def check(value: Any, shapes: Sequence[Any]) -> str | None:
        if len(value) != 2:
            return f"must have 2 entries (height, width), got {len(value)}"
        if min(value) < low:
            return f"entries must be >= {low}"
        return None

    return check


def _out_dim(size: Any, k: int, stride: int, pad: int, dil: int) -> Any:
    if size is None:
        return None
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


# --- conv2d ----------------------------------------------------------------------------------


def _windows(xp: np.ndarray, kh: int, kw: int, stride: Any, dilation: Any) -> np.ndarray:
    """(N, C, Ho, Wo, kh, kw) view of a padded NCHW array: every window, no copy."""
    sh, sw = stride
    dh, dw = dilation
    span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    v = sliding_window_view(xp, (span_h, span_w), axis=(2, 3))
    return v[:, :, ::sh, ::sw, ::dh, ::dw]


def _pad(x: np.ndarray, padding: Any) -> np.ndarray:
    ph, pw = padding
    if ph == 0 and pw == 0:
        return x
    return np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))


def _check_conv(x: Any, w: Any, stride: Any, padding: Any, dilation: Any) -> tuple[int, int]:
    """Refuse operands numpy would mis-read, with the shapes in the message."""
    if np.ndim(x) != 4 or np.ndim(w) != 4:
        raise ValueError(
            f"conv2d needs a 4-D NCHW input and a 4-D OIHW weight, got shapes {np.shape(x)} and "
            f"{np.shape(w)}"
        )
    if x.shape[1] != w.shape[1]:
        raise ValueError(
            f"conv2d: the input has {x.shape[1]} channels but the weight expects {w.shape[1]} "
            f"(input {x.shape}, weight {w.shape} as (out, in, kh, kw))"
        )
    ho = _out_dim(x.shape[2], w.shape[2], stride[0], padding[0], dilation[0])
    wo = _out_dim(x.shape[3], w.shape[3], stride[1], padding[1], dilation[1])
    if ho < 1 or wo < 1:
        raise ValueError(
            f"conv2d: a {w.shape[2]}x{w.shape[3]} kernel (dilation {list(dilation)}) does not "
            f"fit the {x.shape[2]}x{x.shape[3]} input with padding {list(padding)}"
        )
    return ho, wo


def _im2col(x: np.ndarray, kh: int, kw: int, stride: Any, padding: Any, dilation: Any) -> Any:
    """(N, C*kh*kw, Ho*Wo) contiguous columns of every window (the one copy of the input)."""
    win = _windows(_pad(x, padding), kh, kw, stride, dilation)
    n, c, ho, wo = win.shape[:4]
    return win.transpose(0, 1, 4, 5, 2, 3).reshape(n, c * kh * kw, ho * wo)


def _conv2d(
    x: Any, w: Any, stride: Any = (1, 1), padding: Any = (0, 0), dilation: Any = (1, 1)
) -> Any:
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    ho, wo = _check_conv(x, w, stride, padding, dilation)
    o, _, kh, kw = w.shape
    cols = _im2col(x, kh, kw, stride, padding, dilation)
    out = np.matmul(w.reshape(o, -1), cols)  # (N, O, Ho*Wo): a batch of GEMMs, no transpose
    return out.reshape(x.shape[0], o, ho, wo)


def _col2im(
    cols: Any, x_shape: Any, kh: int, kw: int, stride: Any, padding: Any, dilation: Any
) -> Any:
    """Adjoint of :func:`_im2col`: add every column entry back where its window read it."""
    n, c, h, w = x_shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    ho = _out_dim(h, kh, sh, ph, dh)
    wo = _out_dim(w, kw, sw, pw, dw)
    grid = cols.reshape(n, c, kh, kw, ho, wo)
    xp = np.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            r, s = i * dh, j * dw
            xp[:, :, r : r + sh * (ho - 1) + 1 : sh, s : s + sw * (wo - 1) + 1 : sw] += grid[
                :, :, i, j
            ]
    return xp[:, :, ph : ph + h, pw : pw + w]


def _conv2d_vjp_x(
    g: Any,
    out: Any,
    x: Any,
    w: Any,
    stride: Any = (1, 1),
    padding: Any = (0, 0),
    dilation: Any = (1, 1),
) -> Any:
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    o, _, kh, kw = w.shape
    g2 = g.reshape(g.shape[0], o, -1)
    dcols = np.matmul(w.reshape(o, -1).T, g2)  # (N, C*kh*kw, Ho*Wo)
    return _col2im(dcols, x.shape, kh, kw, stride, padding, dilation)


def _conv2d_vjp_w(
    g: Any,
    out: Any,
    x: Any,
    w: Any,
    stride: Any = (1, 1),
    padding: Any = (0, 0),
    dilation: Any = (1, 1),
) -> Any:
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    o, _, kh, kw = w.shape
    cols = _im2col(x, kh, kw, stride, padding, dilation)  # recomputed: VJPs keep no state
    # A batch of (O, P) @ (P, K) GEMMs on the transposed view (BLAS reads it in place), then
    # the sum over the batch: cheaper than copying the columns into one (N*P, K) operand.
    per_image = np.matmul(g.reshape(g.shape[0], o, -1), cols.transpose(0, 2, 1))
    return per_image.sum(axis=0).reshape(w.shape)


def _conv2d_infer(shapes: Sequence[Any], dtypes: Sequence[Any], attrs: dict, node: Any) -> Any:
    dtype = _float_dtype(node, "conv2d", dtypes, (0, 1))
    xs, ws = shapes
    if xs is None or ws is None:
        return None, dtype
    if len(xs) != 4 or len(ws) != 4:
        raise _shape_error(
            node, "conv2d", shapes, "conv2d needs a 4-D NCHW input and a 4-D OIHW weight"
        )
    if xs[1] is not None and ws[1] is not None and xs[1] != ws[1]:
        raise _shape_error(
            node,
            "conv2d",
            shapes,
            f"the input has {xs[1]} channels but the weight expects {ws[1]} (weight is "
            "(out channels, in channels, kernel h, kernel w))",
        )
    stride, padding, dilation = (
        _pair(attrs.get(k, d)) for k, d in (("stride", 1), ("padding", 0), ("dilation", 1))
    )
    out: list[int | None] = []
    for axis in (0, 1):
        size, k = xs[2 + axis], ws[2 + axis]
        if k is None:
            out.append(None)
            continue
        d = _out_dim(size, k, stride[axis], padding[axis], dilation[axis])
        if d is not None and d < 1:
            raise _shape_error(
                node,
                "conv2d",
                shapes,
                f"a {ws[2]}x{ws[3]} kernel with dilation {list(dilation)} does not fit the "
                f"{xs[2]}x{xs[3]} input with padding {list(padding)}",
            )
        out.append(d)
    return (xs[0], ws[0], *out), dtype


#: Flop-equivalents of moving one element through memory (a strided copy, a write, a scattered
#: add). Measured on the development machine (2-core VM, float64): BLAS GEMM ~65 GFLOP/s on one
#: core against ~2e9 elements/s for a strided copy, i.e. ~32 flops per element moved. The cost
#: model counts seconds as flops / flops_per_second, so memory-bound parts are charged this way.
MOVE_FLOPS = 32.0


def _conv2d_flops(out: Shape, ins: Sequence[Shape], attrs: dict, argnum: int | None) -> float:
    # Each of the forward and the two VJPs is one GEMM of 2 * N*O*Ho*Wo * C*kh*kw flops, plus
    # memory traffic: the forward and the weight VJP copy the input windows into columns (im2col)
    # and write their result; the input VJP writes columns and adds them back (col2im).
    n, o, ho, wo = out
    _, c, kh, kw = ins[1]
    cols = n * c * kh * kw * ho * wo
    gemm = 2.0 * cols * o
    if argnum == 0:
        moved = 2 * cols + math.prod(ins[0])
    elif argnum == 1:
        moved = cols + n * o * c * kh * kw
    else:
        moved = cols + n * o * ho * wo
    return CONV_SLOWDOWN * (gemm + MOVE_FLOPS * moved)


#: Measured: a convolution's batched GEMMs (one per image, K = C*kh*kw) on freshly copied
#: windows run ~1.8x slower than a square GEMM plus streaming copies would (the probe that
#: ``flops_per_second`` stands for); see tests/test_nnops.py's 2x check.
CONV_SLOWDOWN = 1.8


_CONV_ATTRS = {
    "stride": Attr("shape", default=[1, 1], check=_pair_check(1), doc="[height, width] step"),
    "padding": Attr("shape", default=[0, 0], check=_pair_check(0), doc="zeros on each side"),
    "dilation": Attr("shape", default=[1, 1], check=_pair_check(1), doc="gap between taps"),
}

# --- pooling ---------------------------------------------------------------------------------


def _pool_args(kernel: Any, stride: Any) -> tuple[tuple[int, int], tuple[int, int]]:
    k = _pair(kernel)
    return k, (k if stride is None else _pair(stride))


def _pool_taps(x: Any, op: str, kernel: Any, stride: Any) -> list[tuple[Any, ...]]:
    """For each kernel offset: the index of the (N, C, Ho, Wo) strided view of ``x`` that tap
    reads. Looping over the few taps beats reducing a 6-D window view (numpy's reduction over
    two short strided axes is several times slower)."""
    if np.ndim(x) != 4:
        raise ValueError(f"{op} needs a 4-D NCHW input, got shape {np.shape(x)}")
    (kh, kw), (sh, sw) = _pool_args(kernel, stride)
    h, w = x.shape[2:]
    if h < kh or w < kw:
        raise ValueError(f"{op}: a {kh}x{kw} window does not fit the {h}x{w} input")
    ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
    every = slice(None)
    return [
        (every, every, slice(i, i + sh * (ho - 1) + 1, sh), slice(j, j + sw * (wo - 1) + 1, sw))
        for i in range(kh)
        for j in range(kw)
    ]


def _max_pool2d(x: Any, kernel: Any, stride: Any = None) -> Any:
    taps = _pool_taps(x, "max_pool2d", kernel, stride)
    out = x[taps[0]].copy()
    for key in taps[1:]:
        np.maximum(out, x[key], out=out)
    return out


def _max_pool2d_vjp(g: Any, out: Any, x: Any, kernel: Any, stride: Any = None) -> Any:
    taps = _pool_taps(x, "max_pool2d", kernel, stride)
    hits = [x[key] == out for key in taps]
    # Ties share the window's gradient equally, as the ``max`` op does.
    count = hits[0].astype(g.dtype)
    for hit in hits[1:]:
        count += hit
    share = g / count
    dx = np.zeros(np.shape(x), dtype=np.result_type(g, x))
    for key, hit in zip(taps, hits):
        dx[key] += np.where(hit, share, 0)
    return dx


def _avg_pool2d(x: Any, kernel: Any, stride: Any = None) -> Any:
    taps = _pool_taps(x, "avg_pool2d", kernel, stride)
    total = x[taps[0]].copy()
    for key in taps[1:]:
        total += x[key]
    return total / len(taps)


def _avg_pool2d_vjp(g: Any, out: Any, x: Any, kernel: Any, stride: Any = None) -> Any:
    taps = _pool_taps(x, "avg_pool2d", kernel, stride)
    part = g / len(taps)
    dx = np.zeros(np.shape(x), dtype=np.result_type(g, x))
    for key in taps:
        dx[key] += part
    return dx


def _pool_infer(op: str) -> Any:
    def infer(shapes: Sequence[Any], dtypes: Sequence[Any], attrs: dict, node: Any) -> Any:
        dtype = _float_dtype(node, op, dtypes, (0,))
        (xs,) = shapes
        if xs is None:
            return None, dtype
        if len(xs) != 4:
            raise _shape_error(node, op, shapes, f"{op} needs a 4-D NCHW input")
        k, st = _pool_args(attrs["kernel"], attrs.get("stride"))
        dims = []
        for axis in (0, 1):
            size = xs[2 + axis]
            if size is not None and size < k[axis]:
                raise _shape_error(
                    node, op, shapes, f"a {k[0]}x{k[1]} window does not fit the input"
                )
            dims.append(_out_dim(size, k[axis], st[axis], 0, 1))
        return (xs[0], xs[1], *dims), dtype

    return infer


def _pool_flops(out: Shape, ins: Sequence[Shape], attrs: dict, argnum: int | None) -> float:
    # Memory-bound: every window element is read (and, for the VJP, compared and added back).
    k = _pair(attrs["kernel"])
    reads = math.prod(out) * k[0] * k[1]
    return MOVE_FLOPS * (reads + math.prod(out) if argnum is None else 3 * reads)


_POOL_ATTRS = {
    "kernel": Attr("shape", required=True, check=_pair_check(1), doc="[height, width]"),
    "stride": Attr("shape", default=None, check=_pair_check(1), doc="default: the kernel"),
}

# --- layer_norm ------------------------------------------------------------------------------


def _ln_stats(x: Any, eps: float) -> tuple[Any, Any]:
    """Centred rows and 1/std over the last axis. Row dot products go through einsum, which
    does not materialise ``xc * xc``."""
    xc = x - x.mean(axis=-1, keepdims=True)
    var = np.einsum("...i,...i->...", xc, xc)[..., None] / x.shape[-1]
    return xc, 1.0 / np.sqrt(var + eps)


def _layer_norm(x: Any, weight: Any, bias: Any, eps: float = 1e-5) -> Any:
    xc, rstd = _ln_stats(x, eps)
    # xc is this call's own temporary: normalise it in place (in the result's dtype, which a
    # float64 weight on float32 rows would widen).
    xc = xc.astype(np.result_type(xc, weight, bias), copy=False)
    xc *= rstd
    xc *= weight
    xc += bias
    return xc


def _layer_norm_vjp_x(g: Any, out: Any, x: Any, weight: Any, bias: Any, eps: float = 1e-5) -> Any:
    xc, rstd = _ln_stats(x, eps)
    xc *= rstd  # now x-hat
    gh = g * weight
    d = x.shape[-1]
    # d/dx of (x - mean) / std along the normalised axis, in one pass over the rows.
    mean_gh = gh.mean(axis=-1, keepdims=True)
    mean_ghx = np.einsum("...i,...i->...", gh, xc)[..., None] / d
    gh -= mean_gh
    xc *= mean_ghx
    gh -= xc
    gh *= rstd
    return gh


def _layer_norm_vjp_w(g: Any, out: Any, x: Any, weight: Any, bias: Any, eps: float = 1e-5) -> Any:
    xc, rstd = _ln_stats(x, eps)
    xc *= rstd
    d = x.shape[-1]
    return np.einsum("ni,ni->i", np.reshape(g, (-1, d)), xc.reshape(-1, d))


def _layer_norm_infer(shapes: Sequence[Any], dtypes: Sequence[Any], attrs: dict, node: Any) -> Any:
    dtype = _float_dtype(node, "layer_norm", dtypes, (0, 1, 2))
    xs = shapes[0]
    if xs is None:
        return None, dtype
    if len(xs) == 0:
        raise _shape_error(node, "layer_norm", shapes, "the input needs at least one axis")
    d = xs[-1]
    for which, s in (("weight", shapes[1]), ("bias", shapes[2])):
        if s is not None and (len(s) != 1 or (d is not None and s[0] not in (d, None))):
            raise _shape_error(
                node,
                "layer_norm",
                shapes,
                f"the {which} must have shape ({d},), one entry per element of the last axis",
            )
    return tuple(xs), dtype


# --- embedding -------------------------------------------------------------------------------


def _check_ids(ids: Any, table: Any) -> None:
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise ValueError(f"embedding ids must be integers, got dtype {ids.dtype}")
    rows = np.shape(table)[0]
    if ids.size and (ids.min() < 0 or ids.max() >= rows):
        bad = ids[(ids < 0) | (ids >= rows)]
        raise ValueError(
            f"embedding ids must lie in [0, {rows}) for a table of shape {np.shape(table)}; "
            f"found {bad.flat[0]} ({bad.size} out of range)"
        )


def _embedding(ids: Any, table: Any) -> Any:
    _check_ids(ids, table)
    return np.take(table, ids, axis=0)


def _embedding_vjp_table(g: Any, out: Any, ids: Any, table: Any) -> Any:
    grad = np.zeros(np.shape(table), dtype=np.result_type(g, table))
    # add.at: an id that occurs several times gets the sum of its rows' gradients.
    np.add.at(grad, np.asarray(ids).reshape(-1), g.reshape(-1, *np.shape(table)[1:]))
    return grad


def _embedding_infer(shapes: Sequence[Any], dtypes: Sequence[Any], attrs: dict, node: Any) -> Any:
    if dtypes[0] is not None and np.dtype(dtypes[0]).kind not in "iu":
        raise DTypeError(
            f"node {node!r} (op embedding): ids have dtype {dtypes[0]}; they must be integers "
            "(declare the input with dtype='int64')"
        )
    dtype = _float_dtype(node, "embedding", dtypes, (1,))
    ids, table = shapes
    if table is not None and len(table) < 1:
        raise _shape_error(node, "embedding", shapes, "the table needs at least one axis (rows)")
    if ids is None or table is None:
        return None, dtype
    return (*ids, *table[1:]), dtype


# --- dropout ---------------------------------------------------------------------------------

_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _stream(seed: int, step: int, key: str) -> np.uint64:
    """A 64-bit stream id from (seed, step, key), equal in every process (unlike hash())."""
    digest = hashlib.blake2b(f"{seed}\x00{step}\x00{key}".encode(), digest_size=8).digest()
    return np.uint64(int.from_bytes(digest, "little"))


def dropout_mask(shape: Sequence[int], p: float, seed: int, step: int, key: str) -> np.ndarray:
    """The keep-mask of ``dropout``: element ``i`` (flat, C order) is kept when
    ``splitmix64(stream + i) >= p * 2**64``; a pure function of its arguments and ``i``."""
    z = np.arange(math.prod(shape), dtype=np.uint64)
    z += _stream(seed, step, key)
    with np.errstate(over="ignore"):
        z ^= z >> np.uint64(30)
        z *= _MIX1
        z ^= z >> np.uint64(27)
        z *= _MIX2
        z ^= z >> np.uint64(31)
    # Compare the top 53 bits with p's threshold: exact, and independent of the platform.
    threshold = np.uint64(math.ceil(p * 2.0**53))
    return ((z >> np.uint64(11)) >= threshold).reshape(tuple(shape))


def _dropout_scale(x: Any, p: float, seed: int, key: str) -> Any:
    """The factor dropout multiplies by (None: identity, outside training or with p = 0)."""
    step = _STEP.get()
    if step is None or p == 0:
        return None
    mask = dropout_mask(np.shape(x), p, seed, step, key)
    dtype = x.dtype if x.dtype.kind == "f" else np.float64
    return mask * np.asarray(1.0 / (1.0 - p), dtype=dtype)


def _dropout(x: Any, p: float, key: str, seed: int = 0) -> Any:
    scale = _dropout_scale(x, p, seed, key)
    return x if scale is None else x * scale


def _dropout_vjp(g: Any, out: Any, x: Any, p: float, key: str, seed: int = 0) -> Any:
    # The mask is drawn again (same step, same key): cheaper to move than to keep.
    scale = _dropout_scale(x, p, seed, key)
    return g if scale is None else g * scale


def _same_infer(op: str) -> Any:
    def infer(shapes: Sequence[Any], dtypes: Sequence[Any], attrs: dict, node: Any) -> Any:
        dtype = _float_dtype(node, op, dtypes, (0,))
        return (None if shapes[0] is None else tuple(shapes[0])), dtype

    return infer


# --- gelu (tanh approximation) ---------------------------------------------------------------

_GELU_C = math.sqrt(2.0 / math.pi)


def _gelu(x: Any) -> Any:
    # x * (1 + c x^2), not x + c x**3: numpy's power for a float exponent is ~10x slower than
    # two multiplies on this machine (78 ms vs 7.5 ms for 524k float64), and gelu dominated
    # the char transformer's step.
    return 0.5 * x * (1.0 + np.tanh(_GELU_C * x * (1.0 + 0.044715 * (x * x))))


def _gelu_vjp(g: Any, out: Any, x: Any) -> Any:
    x2 = x * x
    t = np.tanh(_GELU_C * x * (1.0 + 0.044715 * x2))
    dinner = _GELU_C * (1.0 + 3 * 0.044715 * x2)
    return g * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * dinner)


# --- einsum ----------------------------------------------------------------------------------


def _parse_subscripts(subscripts: str) -> tuple[list[str], str] | str:
    """(input terms, output term), or what is wrong with ``subscripts`` (a string)."""
    text = subscripts.replace(" ", "")
    if "->" not in text:
        return "must name its output explicitly ('ij,jk->ik')"
    lhs, out = text.split("->", 1)
    terms = lhs.split(",")
    if "." in text:
        return "uses '...' (not supported: name every axis)"
    if not all(t.isalpha() and t.isascii() for t in terms if t) or not (
        out == "" or (out.isalpha() and out.isascii())
    ):
        return "must use letters a-z / A-Z only"
    for t in [*terms, out]:
        if len(set(t)) != len(t):
            return f"repeats an axis letter within {t!r} (diagonals and traces are not supported)"
    every = "".join(terms)
    missing = set(out) - set(every)
    if missing:
        return f"has output letters {sorted(missing)} that no input has"
    for i, t in enumerate(terms):
        others = set(out).union(*(set(u) for j, u in enumerate(terms) if j != i))
        alone = [c for c in t if c not in others]
        if alone:
            return (
                f"sums letters {alone} of input {i} that appear nowhere else (not supported: "
                "reduce that input with sum first)"
            )
    return terms, out


def _parsed(subscripts: str) -> tuple[list[str], str]:
    """Subscripts the attribute check accepted, parsed (an internal error otherwise)."""
    parsed = _parse_subscripts(subscripts)
    assert not isinstance(parsed, str), parsed
    return parsed


def _einsum_check(value: Any, shapes: Sequence[Any]) -> str | None:
    parsed = _parse_subscripts(value)
    if isinstance(parsed, str):
        return parsed
    terms, _ = parsed
    if len(terms) != len(shapes):
        return f"has {len(terms)} input terms but the node has {len(shapes)} inputs"
    for i, (t, s) in enumerate(zip(terms, shapes)):
        if s is not None and len(t) != len(s):
            return f"gives input {i} {len(t)} axes ({t!r}) but it has shape {_fmt([s])}"
    return None


def _einsum2(terms: list[str], out: str, a: Any, b: Any) -> Any:
    """Two-operand einsum as one batched matmul (numpy's einsum does not use BLAS for batched
    contractions), or numpy's einsum when sizes broadcast."""
    ta, tb = terms
    sizes: dict[str, int] = {}
    for t, x in ((ta, a), (tb, b)):
        for c, n in zip(t, np.shape(x)):
            if sizes.setdefault(c, n) != n:
                return np.einsum(f"{ta},{tb}->{out}", a, b)
    batch = [c for c in out if c in ta and c in tb]
    left = [c for c in out if c in ta and c not in tb]
    right = [c for c in out if c in tb and c not in ta]
    contract = [c for c in ta if c in tb and c not in out]
    a3 = np.transpose(a, [ta.index(c) for c in batch + left + contract])
    b3 = np.transpose(b, [tb.index(c) for c in batch + contract + right])
    nb = [sizes[c] for c in batch]
    m = math.prod(sizes[c] for c in left)
    k = math.prod(sizes[c] for c in contract)
    n = math.prod(sizes[c] for c in right)
    # Contiguous operands: numpy's batched matmul on a transposed view is ~2.5x slower than a
    # copy followed by the matmul (measured at attention sizes).
    r = np.matmul(
        np.ascontiguousarray(a3.reshape(*nb, m, k)), np.ascontiguousarray(b3.reshape(*nb, k, n))
    )
    r = r.reshape(*nb, *(sizes[c] for c in left), *(sizes[c] for c in right))
    order = batch + left + right
    return np.transpose(r, [order.index(c) for c in out])


def _einsum(*xs: Any, subscripts: str) -> Any:
    parsed = _parse_subscripts(subscripts)
    if isinstance(parsed, str):
        raise ValueError(f"einsum subscripts {subscripts!r} {parsed}")
    terms, out = parsed
    if len(xs) == 2:
        return _einsum2(terms, out, *xs)
    return np.einsum(f"{','.join(terms)}->{out}", *xs, optimize=len(xs) > 2)


def _einsum_vjp(i: int, g: Any, out: Any, *xs: Any, subscripts: str) -> Any:
    # d out / d x_i contracts the cotangent with every other operand: swap x_i's term and the
    # output's ("ab,bc->ac": the gradient of input 0 is "ac,bc->ab"). Every letter of x_i
    # appears in the output or another input (the subscripts check refuses the rest).
    terms, out_term = _parsed(subscripts)
    rest = [t for j, t in enumerate(terms) if j != i]
    others = [x for j, x in enumerate(xs) if j != i]
    grad_terms = [out_term, *rest]
    if len(grad_terms) == 2:
        grad = _einsum2(grad_terms, terms[i], g, others[0])
    else:
        grad = np.einsum(f"{','.join(grad_terms)}->{terms[i]}", g, *others)
    # A size-1 axis that broadcast against a larger one: run_vjp sums it back down.
    return grad


def _einsum_infer(shapes: Sequence[Any], dtypes: Sequence[Any], attrs: dict, node: Any) -> Any:
    dtype = _float_dtype(node, "einsum", dtypes, tuple(range(len(dtypes))))
    terms, out = _parsed(attrs["subscripts"])
    sizes: dict[str, Any] = {}
    for t, s in zip(terms, shapes):
        if s is None:
            continue
        for c, n in zip(t, s):
            have = sizes.get(c)
            if n is None or n == 1:
                sizes.setdefault(c, n)
            elif have in (None, 1):
                sizes[c] = n
            elif have != n:
                raise _shape_error(
                    node,
                    "einsum",
                    shapes,
                    f"axis {c!r} of {attrs['subscripts']!r} has sizes {have} and {n}",
                )
    if any(c not in sizes for c in out):
        return None, dtype
    return tuple(sizes[c] for c in out), dtype


def _einsum_flops(out: Shape, ins: Sequence[Shape], attrs: dict, argnum: int | None) -> float:
    # 2 flops per point of the full index space, plus writing the result (the forward's output
    # or input ``argnum``'s gradient) and reading the operands.
    terms, _ = _parsed(attrs["subscripts"])
    sizes: dict[str, int] = {}
    for t, s in zip(terms, ins):
        for c, n in zip(t, s):
            sizes[c] = max(sizes.get(c, 1), n)
    written = math.prod(out) if argnum is None else math.prod(ins[argnum])
    read = sum(math.prod(s) for s in ins)
    return 2.0 * math.prod(sizes.values()) + MOVE_FLOPS * (written + read)


# --- split and stack -------------------------------------------------------------------------


def _split_bounds(size: int, sizes: Sequence[int], index: int) -> tuple[int, int]:
    if sum(sizes) != size:
        raise ValueError(
            f"split sizes {list(sizes)} add up to {sum(sizes)}, but the axis has {size} elements"
        )
    start = sum(sizes[:index])
    return start, start + sizes[index]


def _split(x: Any, sizes: Sequence[int], index: int, axis: int = 0) -> Any:
    ax = axis % np.ndim(x)
    lo, hi = _split_bounds(np.shape(x)[ax], sizes, index)
    key = [slice(None)] * np.ndim(x)
    key[ax] = slice(lo, hi)
    return x[tuple(key)]


def _split_vjp(g: Any, out: Any, x: Any, sizes: Sequence[int], index: int, axis: int = 0) -> Any:
    ax = axis % np.ndim(x)
    lo, hi = _split_bounds(np.shape(x)[ax], sizes, index)
    grad = np.zeros(np.shape(x), dtype=np.result_type(g, x))
    key = [slice(None)] * np.ndim(x)
    key[ax] = slice(lo, hi)
    grad[tuple(key)] = g
    return grad


def _split_index_check(value: Any, shapes: Sequence[Any]) -> str | None:
    return None if value >= 0 else "must be >= 0"


def _split_infer(shapes: Sequence[Any], dtypes: Sequence[Any], attrs: dict, node: Any) -> Any:
    (xs,) = shapes
    sizes, index = attrs["sizes"], attrs["index"]
    if index >= len(sizes):
        raise _shape_error(
            node, "split", shapes, f"index {index} is past the last of {len(sizes)} pieces"
        )
    if xs is None:
        return None, dtypes[0]
    if not xs:
        raise _shape_error(node, "split", shapes, "cannot split a scalar")
    ax = attrs.get("axis", 0) % len(xs)
    if xs[ax] is not None and sum(sizes) != xs[ax]:
        raise _shape_error(
            node,
            "split",
            shapes,
            f"sizes {sizes} add up to {sum(sizes)} but axis {ax} has {xs[ax]} elements",
        )
    out = list(xs)
    out[ax] = sizes[index]
    return tuple(out), dtypes[0]


def _stack(*xs: Any, axis: int = 0) -> Any:
    return np.stack(xs, axis=axis)


def _stack_vjp(i: int, g: Any, out: Any, *xs: Any, axis: int = 0) -> Any:
    return np.take(g, i, axis=axis % np.ndim(g))


def _stack_infer(shapes: Sequence[Any], dtypes: Sequence[Any], attrs: dict, node: Any) -> Any:
    dtype = None if None in dtypes else np.result_type(*dtypes).name
    known = [tuple(s) for s in shapes if s is not None]
    if not known:
        return None, dtype
    rank = len(known[0])
    if any(len(s) != rank for s in known):
        raise _shape_error(node, "stack", shapes, "stacked inputs must have the same rank")
    merged: list[Any] = []
    for dims in zip(*known):
        fixed = {d for d in dims if d is not None}
        if len(fixed) > 1:
            raise _shape_error(node, "stack", shapes, "stacked inputs must have the same shape")
        merged.append(fixed.pop() if fixed else None)
    axis = attrs.get("axis", 0)
    if not -(rank + 1) <= axis <= rank:
        raise _shape_error(node, "stack", shapes, f"axis {axis} is out of range for rank {rank}")
    if len(known) < len(shapes):
        return None, dtype
    ax = axis % (rank + 1)
    return (*merged[:ax], len(shapes), *merged[ax:]), dtype


def _stack_vjp_as_op(
    shapes: Sequence[Any], dtypes: Sequence[Any], out_dtype: Any, attrs: dict
) -> list[tuple[str, dict[str, Any]] | None] | None:
    """Each input's cotangent is one slice of the stacked cotangent: an ``index`` node reading
    only that cotangent (generic VJP nodes would each read every stacked input)."""
    if shapes[0] is None:
        return None
    ax = attrs.get("axis", 0) % (len(shapes[0]) + 1)
    lead = [{"slice": [None, None, None]} for _ in range(ax)]
    return [
        ("index", {"index": [*lead, i]}) if d == out_dtype else None for i, d in enumerate(dtypes)
    ]


# --- causal mask -----------------------------------------------------------------------------


def _causal_keep(shape: Sequence[int]) -> np.ndarray:
    q, k = shape[-2], shape[-1]
    # Query i sees keys 0..i + (k - q): with as many keys as queries, the usual lower triangle.
    return np.tri(q, k, k - q, dtype=bool)


def _causal_mask(x: Any, fill: float = -1e9) -> Any:
    if np.ndim(x) < 2:
        raise ValueError(f"causal_mask needs at least 2 axes (queries, keys), got {np.shape(x)}")
    return np.where(_causal_keep(np.shape(x)), x, np.asarray(fill, dtype=x.dtype))


def _causal_mask_vjp(g: Any, out: Any, x: Any, fill: float = -1e9) -> Any:
    return np.where(_causal_keep(np.shape(x)), g, 0)


def _causal_infer(shapes: Sequence[Any], dtypes: Sequence[Any], attrs: dict, node: Any) -> Any:
    dtype = _float_dtype(node, "causal_mask", dtypes, (0,))
    if shapes[0] is not None and len(shapes[0]) < 2:
        raise _shape_error(node, "causal_mask", shapes, "needs at least 2 axes (queries, keys)")
    return (None if shapes[0] is None else tuple(shapes[0])), dtype


# --- the table -------------------------------------------------------------------------------
# fmt: off

defop("conv2d", _conv2d,
      _conv2d_vjp_x,
      _conv2d_vjp_w,
      attrs=_CONV_ATTRS, infer=_conv2d_infer, flops=_conv2d_flops)
defop("max_pool2d", _max_pool2d,
      _max_pool2d_vjp,
      attrs=_POOL_ATTRS, uses_out=True, infer=_pool_infer("max_pool2d"), flops=_pool_flops)
defop("avg_pool2d", _avg_pool2d,
      _avg_pool2d_vjp,
      attrs=_POOL_ATTRS, infer=_pool_infer("avg_pool2d"), flops=_pool_flops)
defop("layer_norm", _layer_norm,
      _layer_norm_vjp_x,
      _layer_norm_vjp_w,
      lambda g, out, x, weight, bias, eps=1e-5: g,
      attrs={"eps": Attr("float", default=1e-5, low=0.0)},
      infer=_layer_norm_infer, flops_per_element=8)
defop("embedding", _embedding,
      None,
      _embedding_vjp_table,
      infer=_embedding_infer, flops_per_element=0)
defop("dropout", _dropout,
      _dropout_vjp,
      attrs={"p": Attr("float", required=True, low=0.0, high=0.999999),
             "key": Attr("str", required=True, doc="random stream (dg.dropout: the node name)"),
             "seed": Attr("int", default=0)},
      infer=_same_infer("dropout"), flops_per_element=12)
defop("gelu", _gelu,
      _gelu_vjp,
      elementwise=True, flops_per_element=20)
defop("einsum", _einsum,
      vjp_n=_einsum_vjp, arity=None,
      attrs={"subscripts": Attr("str", required=True, check=_einsum_check)},
      infer=_einsum_infer, flops=_einsum_flops)
defop("split", _split,
      _split_vjp,
      attrs={"sizes": Attr("shape", required=True),
             "index": Attr("int", required=True, check=_split_index_check),
             "axis": Attr("axis", default=0)},
      infer=_split_infer, flops_per_element=0)
defop("stack", _stack,
      vjp_n=_stack_vjp, vjp_as_op=_stack_vjp_as_op, arity=None,
      attrs={"axis": Attr("int", default=0)},
      infer=_stack_infer, flops_per_element=0)
defop("causal_mask", _causal_mask,
      _causal_mask_vjp,
      attrs={"fill": Attr("float", default=-1e9)},
      infer=_causal_infer)

# fmt: on

#: The ops this module registers.
NN_OPS = (
    "conv2d", "max_pool2d", "avg_pool2d", "layer_norm", "embedding", "dropout", "gelu",
    "einsum", "split", "stack", "causal_mask",
)  # fmt: skip
