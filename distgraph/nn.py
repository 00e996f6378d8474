"""Layer helpers: functions that add a layer's named params and nodes to a :class:`Graph`.

Each helper takes the node it reads, the layer's sizes, and a keyword-only ``name`` that is the
layer's **namespace**: its params are ``<name>.<param>`` and its nodes ``<name>`` (the layer's
result) or ``<name>.<part>``, so a name says where it lives (``block0.attn.wq``,
``block0.mlp.fc1.w``). Composite helpers nest their parts' namespaces (``transformer_block(...,
name="block0")`` calls ``multi_head_attention(..., name="block0.attn")``). A helper checks its
arguments before it adds anything -- the namespace is free of nodes and params, sizes are known
and positive, inputs are floating point, a convolution fits its image -- so a refused call
(``GraphError`` or ``ShapeError`` naming the layer) leaves the graph as it was. Nothing is
remembered between calls: the graph stays plain data and the helpers keep no global state.

**Initialisation is a pure function of (seed, param name).** Each param draws from its own
``numpy.random.Generator`` seeded with ``[seed, blake2b(name)]``: the same seed and name give
bit-identical values in any process, whatever was built before, and adding or renaming one
layer leaves every other layer's initial values unchanged. Schemes (biases and shifts start at
zero, layer-norm gains at one):

==========================  ===================================================================
``linear``, ``conv2d``      ``init="he"`` (default): normal, std ``sqrt(2 / fan_in)`` (ReLU/GELU
                            layers); ``init="glorot"``: uniform on ``±sqrt(6 / (fan_in +
                            fan_out))``. A convolution's fan-in is ``in_channels * kh * kw``.
``embedding``               normal, std ``std`` (default 0.02)
``multi_head_attention``    ``wq wk wv wo``: Glorot uniform with fan-in = fan-out = model width
``mlp_block``               ``fc1``: He (it feeds the activation); ``fc2``: Glorot
==========================  ===================================================================

Param dtypes follow the input (a float input's dtype, else float64; an embedding table is
float64) unless ``dtype=`` says otherwise.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import functional as F
from .errors import GraphError, ShapeError
from .graph import Graph, Node

__all__ = [
    "conv2d",
    "embedding",
    "init_rng",
    "layer_norm",
    "linear",
    "mlp_block",
    "multi_head_attention",
    "transformer_block",
]

INITS = ("he", "glorot")
ACTIVATIONS = ("gelu", "relu")


# --- initialisation --------------------------------------------------------------------------


def init_rng(seed: int, name: str) -> np.random.Generator:
    """The generator param ``name`` is initialised from: a function of (seed, name) only."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise GraphError(f"param {name!r}: the init seed must be an int >= 0, got {seed!r}")
    # blake2b, not hash(): Python salts str hashes per process.
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=16).digest()
    words = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]
    return np.random.default_rng([int(seed), *words])


def _he(seed: int, name: str, shape: tuple[int, ...], fan_in: int, dtype: str) -> np.ndarray:
    std = math.sqrt(2.0 / fan_in)
    return (init_rng(seed, name).standard_normal(shape) * std).astype(dtype)


def _glorot(
    seed: int, name: str, shape: tuple[int, ...], fan_in: int, fan_out: int, dtype: str
) -> np.ndarray:
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return init_rng(seed, name).uniform(-limit, limit, shape).astype(dtype)


def _weight(
    init: str, seed: int, name: str, shape: tuple[int, ...], fan_in: int, fan_out: int, dtype: str
) -> np.ndarray:
    if init == "he":
        return _he(seed, name, shape, fan_in, dtype)
    return _glorot(seed, name, shape, fan_in, fan_out, dtype)


# --- checks made before anything is added ----------------------------------------------------


def _claim(g: Graph, name: str, what: str) -> None:
    """Refuse a namespace that already holds a node or param (before the layer adds any)."""
    if not isinstance(name, str) or not name:
        raise GraphError(f"{what}: name must be a non-empty string, got {name!r}")
    taken = [n.name for n in g.nodes if n.name == name or n.name.startswith(name + ".")]
    if name in g and name not in taken:
        taken.insert(0, name)  # an alias left by Graph.output
    if taken:
        shown = ", ".join(repr(t) for t in taken[:3]) + (" ..." if len(taken) > 3 else "")
        raise GraphError(
            f"{what} {name!r}: the graph already has {shown} in that namespace; give each layer "
            "its own name (e.g. 'block0', 'block1')"
        )


def _dim(x: Node, axis: int, what: str, name: str, role: str) -> int:
    """A dimension of ``x`` the layer's param shapes depend on: must be known at build time."""
    shape = x.shape
    if shape is None or len(shape) < (axis + 1 if axis >= 0 else -axis):
        raise ShapeError(
            f"{what} {name!r}: input {x.name!r} has shape {shape}; its {role} must be known "
            "to size the params (declare the input with a shape)"
        )
    d = shape[axis]
    if d is None:
        raise ShapeError(
            f"{what} {name!r}: input {x.name!r} has shape {shape}; its {role} (axis {axis}) is "
            "a batch dimension, but it sizes the params and must be fixed"
        )
    return int(d)


def _rank(x: Node, ranks: Sequence[int], what: str, name: str, layout: str) -> None:
    if x.shape is None or len(x.shape) not in ranks:
        raise ShapeError(
            f"{what} {name!r}: input {x.name!r} has shape {x.shape}; expected {layout}"
        )


def _float_input(x: Node, what: str, name: str) -> None:
    if x.dtype is not None and x.dtype.kind != "f":
        raise GraphError(
            f"{what} {name!r}: input {x.name!r} has dtype {x.dtype}; it needs floating-point "
            "values (cast it with .astype('float32'))"
        )


def _param_dtype(x: Node, dtype: Any) -> str:
    if dtype is not None:
        d = np.dtype(dtype)
        if d.kind != "f":
            raise GraphError(f"param dtype must be floating point, got {d}")
        return d.name
    xd = x.dtype
    return xd.name if xd is not None and xd.kind == "f" else "float64"


def _positive(value: Any, what: str, name: str, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise GraphError(f"{what} {name!r}: {field} must be an int >= 1, got {value!r}")
    return int(value)


def _choice(value: str, allowed: Sequence[str], what: str, name: str, field: str) -> None:
    if value not in allowed:
        raise GraphError(
            f"{what} {name!r}: {field} must be one of {', '.join(allowed)}; got {value!r}"
        )


# --- layers ----------------------------------------------------------------------------------


def linear(
    x: Node,
    out_features: int,
    *,
    name: str,
    seed: int = 0,
    bias: bool = True,
    init: str = "he",
    dtype: Any = None,
) -> Node:
    """``x @ <name>.w + <name>.b`` over the last axis of ``x`` (any leading axes).

    Params: ``<name>.w`` (in_features, out_features) and, with ``bias``, ``<name>.b``
    (out_features,) = 0. Returns the node ``<name>``.
    """
    _claim(x.graph, name, "linear")
    return _linear(x, out_features, name, name, seed=seed, bias=bias, init=init, dtype=dtype)


def _linear(
    x: Node,
    out_features: int,
    prefix: str,
    result: str,
    *,
    seed: int,
    bias: bool,
    init: str,
    dtype: Any,
) -> Node:
    """:func:`linear` with params ``<prefix>.w/.b`` and the result node named ``result``."""
    g = x.graph
    out_features = _positive(out_features, "linear", prefix, "out_features")
    _choice(init, INITS, "linear", prefix, "init")
    fan_in = _dim(x, -1, "linear", prefix, "last axis (in_features)")
    dt = _param_dtype(x, dtype)
    w = g.param(
        f"{prefix}.w",
        _weight(init, seed, f"{prefix}.w", (fan_in, out_features), fan_in, out_features, dt),
    )
    if not bias:
        return g.apply("matmul", x, w, name=result)
    b = g.param(f"{prefix}.b", np.zeros(out_features, dtype=dt))
    return g.apply("add", g.apply("matmul", x, w, name=f"{prefix}.xw"), b, name=result)


def conv2d(
    x: Node,
    out_channels: int,
    kernel: int | Sequence[int],
    *,
    name: str,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    seed: int = 0,
    bias: bool = True,
    init: str = "he",
    dtype: Any = None,
) -> Node:
    """2-D convolution of an NCHW input: ``conv2d(x, <name>.w) + <name>.b``.

    Params: ``<name>.w`` (out_channels, in_channels, kh, kw) and, with ``bias``, ``<name>.b``
    (out_channels, 1, 1) = 0, which broadcasts over the image. Returns the node ``<name>``.
    """
    g = x.graph
    _claim(g, name, "conv2d")
    out_channels = _positive(out_channels, "conv2d", name, "out_channels")
    _choice(init, INITS, "conv2d", name, "init")
    _rank(x, (4,), "conv2d", name, "a 4-D (batch, channels, height, width) input")
    cin = _dim(x, 1, "conv2d", name, "channel axis")
    kh, kw = (kernel, kernel) if isinstance(kernel, (int, np.integer)) else tuple(kernel)
    kh = _positive(kh, "conv2d", name, "kernel height")
    kw = _positive(kw, "conv2d", name, "kernel width")
    _float_input(x, "conv2d", name)
    dt = _param_dtype(x, dtype)
    # The geometry (stride, padding, dilation against the image) is checked by building the
    # convolution alone on a scratch graph first: its error, raised before any param is added.
    scratch = Graph()
    F.conv2d(
        scratch.input(x.name, shape=x.shape, dtype=dt),
        scratch.input(f"{name}.w", shape=(out_channels, cin, kh, kw), dtype=dt),
        stride=stride,
        padding=padding,
        dilation=dilation,
        name=name,
    )
    fan_in, fan_out = cin * kh * kw, out_channels * kh * kw
    w = g.param(
        f"{name}.w",
        _weight(init, seed, f"{name}.w", (out_channels, cin, kh, kw), fan_in, fan_out, dt),
    )
    if not bias:
        return F.conv2d(x, w, stride=stride, padding=padding, dilation=dilation, name=name)
    y = F.conv2d(x, w, stride=stride, padding=padding, dilation=dilation, name=f"{name}.conv")
    b = g.param(f"{name}.b", np.zeros((out_channels, 1, 1), dtype=dt))
    return g.apply("add", y, b, name=name)


def layer_norm(x: Node, *, name: str, eps: float = 1e-5, dtype: Any = None) -> Node:
    """Normalise the last axis to zero mean and unit variance, then ``* <name>.w + <name>.b``.

    Params: ``<name>.w`` = 1 and ``<name>.b`` = 0, both (features,). One fused node ``<name>``.
    """
    g = x.graph
    _claim(g, name, "layer_norm")
    _float_input(x, "layer_norm", name)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise GraphError(f"layer_norm {name!r}: eps must be a number >= 0, got {eps!r}")
    d = _dim(x, -1, "layer_norm", name, "last axis (features)")
    dt = _param_dtype(x, dtype)
    w = g.param(f"{name}.w", np.ones(d, dtype=dt))
    b = g.param(f"{name}.b", np.zeros(d, dtype=dt))
    return g.apply("layer_norm", x, w, b, name=name, eps=float(eps))


def embedding(
    ids: Node,
    num_embeddings: int,
    dim: int,
    *,
    name: str,
    seed: int = 0,
    std: float = 0.02,
    dtype: Any = "float64",
) -> Node:
    """Rows of the table ``<name>.table`` (num_embeddings, dim) picked by integer ``ids``.

    The result has shape ``ids.shape + (dim,)``; ids outside ``[0, num_embeddings)`` are refused
    when the graph runs. Returns the node ``<name>``.
    """
    g = ids.graph
    _claim(g, name, "embedding")
    rows = _positive(num_embeddings, "embedding", name, "num_embeddings")
    dim = _positive(dim, "embedding", name, "dim")
    if ids.dtype is not None and ids.dtype.kind not in "iu":
        raise GraphError(
            f"embedding {name!r}: ids {ids.name!r} have dtype {ids.dtype}; declare them as "
            "integers (g.input(..., dtype='int64'))"
        )
    dt = _param_dtype(ids, dtype)
    table = (init_rng(seed, f"{name}.table").standard_normal((rows, dim)) * std).astype(dt)
    return g.apply("embedding", ids, g.param(f"{name}.table", table), name=name)


def multi_head_attention(
    x: Node,
    heads: int,
    *,
    name: str,
    causal: bool = True,
    seed: int = 0,
    dtype: Any = None,
) -> Node:
    """Multi-head self-attention over ``x`` (batch, time, width); causal by default.

    Params (no biases): ``<name>.wq``, ``<name>.wk``, ``<name>.wv`` of shape (width, heads,
    head_dim) and ``<name>.wo`` (heads, head_dim, width), where head_dim = width / heads. Each is
    a width x width projection matrix stored with its output axis split into heads, so the heads
    come straight out of one einsum (``btd,dhe->bhte``) instead of a reshape and a transpose.
    Then per head ``softmax(mask(q k^T / sqrt(head_dim))) v`` (a query sees keys at or before
    its position when ``causal``) and the output projection sums the heads back to the width.
    Nodes: ``<name>.q .k .v .qk .scores .masked .probs .ctx`` and the result ``<name>``.
    """
    g = x.graph
    _claim(g, name, "multi_head_attention")
    heads = _positive(heads, "multi_head_attention", name, "heads")
    _rank(x, (3,), "multi_head_attention", name, "a 3-D (batch, time, width) input")
    _float_input(x, "multi_head_attention", name)
    width = _dim(x, -1, "multi_head_attention", name, "last axis (width)")
    if width % heads:
        raise ShapeError(
            f"multi_head_attention {name!r}: width {width} of input {x.name!r} does not divide "
            f"into {heads} heads; pick heads that divide it"
        )
    hd = width // heads
    dt = _param_dtype(x, dtype)

    def proj(part: str, shape: tuple[int, ...]) -> Node:
        value = _glorot(seed, f"{name}.{part}", shape, width, width, dt)
        return g.param(f"{name}.{part}", value)

    wq, wk, wv = (proj(p, (width, heads, hd)) for p in ("wq", "wk", "wv"))
    wo = proj("wo", (heads, hd, width))
    q = g.apply("einsum", x, wq, subscripts="btd,dhe->bhte", name=f"{name}.q")
    k = g.apply("einsum", x, wk, subscripts="btd,dhe->bhte", name=f"{name}.k")
    v = g.apply("einsum", x, wv, subscripts="btd,dhe->bhte", name=f"{name}.v")
    raw = g.apply("einsum", q, k, subscripts="bhqe,bhke->bhqk", name=f"{name}.qk")
    scores = g.apply("mul", raw, 1.0 / math.sqrt(hd), name=f"{name}.scores")
    if causal:
        scores = g.apply("causal_mask", scores, fill=-1e9, name=f"{name}.masked")
    probs = g.apply("softmax", scores, axis=-1, name=f"{name}.probs")
    ctx = g.apply("einsum", probs, v, subscripts="bhqk,bhke->bhqe", name=f"{name}.ctx")
    return g.apply("einsum", ctx, wo, subscripts="bhte,hed->btd", name=name)


def mlp_block(
    x: Node,
    hidden: int,
    *,
    name: str,
    activation: str = "gelu",
    seed: int = 0,
    dtype: Any = None,
) -> Node:
    """``fc2(activation(fc1(x)))`` back to the width of ``x``: linears ``<name>.fc1`` (width ->
    hidden, He init) and ``<name>.fc2`` (hidden -> width, Glorot init), activation ``gelu`` or
    ``relu``. Returns the node ``<name>``."""
    g = x.graph
    _claim(g, name, "mlp_block")
    _choice(activation, ACTIVATIONS, "mlp_block", name, "activation")
    hidden = _positive(hidden, "mlp_block", name, "hidden")
    width = _dim(x, -1, "mlp_block", name, "last axis (width)")
    h = linear(x, hidden, name=f"{name}.fc1", seed=seed, init="he", dtype=dtype)
    h = g.apply(activation, h, name=f"{name}.act")
    # fc2's sum is the block's result: params <name>.fc2.w/.b, node <name>.
    return _linear(h, width, f"{name}.fc2", name, seed=seed, bias=True, init="glorot", dtype=dtype)


def transformer_block(
    x: Node,
    heads: int,
    *,
    name: str,
    mlp_ratio: int = 4,
    causal: bool = True,
    activation: str = "gelu",
    eps: float = 1e-5,
    dropout: float = 0.0,
    seed: int = 0,
    dtype: Any = None,
) -> Node:
    """A pre-norm transformer block over ``x`` (batch, time, width):

    ``h = x + drop(attn(ln1(x)))``; ``out = h + drop(mlp(ln2(h)))``, with parts ``<name>.ln1``,
    ``<name>.attn`` (:func:`multi_head_attention`), ``<name>.ln2`` and ``<name>.mlp``
    (:func:`mlp_block`, hidden = mlp_ratio * width). Returns the node ``<name>``.

    ``dropout`` > 0 adds ``dg.dropout`` nodes ``<name>.attn.drop`` and ``<name>.mlp.drop``
    (probability ``dropout``, stream seed ``seed``): active in training steps only, their masks
    drawn from (seed, step id, node name), so every executor and a replayed step draw the same.
    """
    g = x.graph
    _claim(g, name, "transformer_block")
    _rank(x, (3,), "transformer_block", name, "a 3-D (batch, time, width) input")
    _float_input(x, "transformer_block", name)
    width = _dim(x, -1, "transformer_block", name, "last axis (width)")
    heads = _positive(heads, "transformer_block", name, "heads")
    if width % heads:
        raise ShapeError(
            f"transformer_block {name!r}: width {width} of input {x.name!r} does not divide "
            f"into {heads} heads; pick heads that divide it"
        )
    mlp_ratio = _positive(mlp_ratio, "transformer_block", name, "mlp_ratio")
    _choice(activation, ACTIVATIONS, "transformer_block", name, "activation")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise GraphError(
            f"transformer_block {name!r}: dropout must be a probability in [0, 1), got {dropout!r}"
        )
    a = layer_norm(x, name=f"{name}.ln1", eps=eps, dtype=dtype)
    a = multi_head_attention(a, heads, name=f"{name}.attn", causal=causal, seed=seed, dtype=dtype)
    if dropout:
        a = F.dropout(a, dropout, seed=seed, name=f"{name}.attn.drop")
    h = g.apply("add", x, a, name=f"{name}.res1")
    m = layer_norm(h, name=f"{name}.ln2", eps=eps, dtype=dtype)
    m = mlp_block(
        m, mlp_ratio * width, name=f"{name}.mlp", activation=activation, seed=seed, dtype=dtype
    )
    if dropout:
        m = F.dropout(m, dropout, seed=seed, name=f"{name}.mlp.drop")
    return g.apply("add", h, m, name=name)
