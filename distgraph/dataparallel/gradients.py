"""The exact combination of the replicas' (or micro-batches') shard gradients.

Owns :func:`shard_weights` (each shard's weight from its row count and the loss's reduction)
and :func:`combine` (the weighted sum in a fixed order, accumulated in float64 and rounded
once, with a float32 fast path proven bit-identical to it). Kept apart because the parameter
servers and the pipelined workers call it on every step: its numerics are a guarantee
(same inputs, bit-identical result, whatever order gradients arrived in), tested on its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import ConfigError, ShapeError
from .rows import Reduction


def shard_weights(rows_per_replica: Sequence[int], kind: Reduction) -> list[float]:
    """Each replica's gradient weight: ``rows / total`` for a mean loss, ``1.0`` for a sum."""
    if kind not in ("mean", "sum"):
        raise ConfigError(f"kind must be 'mean' or 'sum', got {kind!r}")
    rows = [int(r) for r in rows_per_replica]
    if not rows or min(rows) < 1:
        raise ConfigError(f"every replica that contributes needs rows >= 1, got {rows}")
    total = sum(rows)
    return [r / total if kind == "mean" else 1.0 for r in rows]


def combine(
    grads_per_replica: Sequence[Mapping[str, Any]],
    rows_per_replica: Sequence[int],
    kind: Reduction,
) -> dict[str, np.ndarray]:
    """The full-batch gradient from the replicas' shard gradients.

    ``sum_r w_r * g_r`` with the weights of :func:`shard_weights`, added in replica order (the
    order of the sequences: the same inputs give bit-identical results, whatever order the
    gradients arrived in). The result is the float64 sum of the weighted terms rounded once to
    the gradients' own dtype (float64 stays float64 throughout; narrower floats are rounded
    once, at the end). Two float32 replicas with equal shards (or a sum loss) are added in
    float32 instead, which gives that same correctly rounded value at a fraction of the cost;
    an element where float32 could round differently (a sum below 2**-125 or beyond float32's
    range) sends that gradient through float64. With one replica of weight one the gradient
    comes back unchanged. The result never aliases a replica's array. Only replicas that took
    rows are passed (see :func:`shard_rows`). Every replica must give the same names and
    shapes; a mismatch raises :class:`~distgraph.errors.ShapeError` naming the param.
    """
    if len(grads_per_replica) != len(rows_per_replica):
        raise ConfigError(
            f"combine: {len(grads_per_replica)} gradient sets but {len(rows_per_replica)} row "
            "counts; pass one row count per replica"
        )
    weights = shard_weights(rows_per_replica, kind)
    names = list(grads_per_replica[0])
    for r, grads in enumerate(grads_per_replica):
        if set(grads) != set(names):
            raise ShapeError(
                f"replica {r} sent gradients for {sorted(grads)}, replica 0 for {sorted(names)}"
            )
    out: dict[str, np.ndarray] = {}
    for name in names:
        terms = [np.asarray(grads[name]) for grads in grads_per_replica]
        first = terms[0]
        dtype = first.dtype
        if dtype.kind != "f":
            raise ShapeError(f"gradient of {name!r} has dtype {dtype}; gradients are floating")
        for r, g in enumerate(terms):
            if g.shape != first.shape:
                raise ShapeError(
                    f"gradient of {name!r} from replica {r} has shape {g.shape}, from replica 0 "
                    f"{first.shape}"
                )
        fast = _pair_f32(terms, weights)
        out[name] = fast if fast is not None else _weighted_f64(terms, weights, dtype)
    return out


def _weighted_f64(terms: Sequence[np.ndarray], weights: Sequence[float], dtype: Any) -> Any:
    """``sum_r w_r * g_r`` accumulated in float64 in replica order, rounded once to
    ``dtype``: a fresh array (never one of ``terms``)."""
    acc: Any = None
    tmp: np.ndarray | None = None
    for g, w in zip(terms, weights):
        if acc is None:
            # float64 terms (a copy: the result never aliases a replica's array).
            acc = np.asarray(  # a 0-d product comes back a scalar: keep an array to add into
                g.astype(np.float64) if w == 1.0 else np.multiply(g, w, dtype=np.float64)
            )
        elif w == 1.0:
            acc = np.add(acc, g, out=acc, dtype=np.float64)
        else:
            # The product is rounded in float64 first, as ``g.astype(float64) * w`` is.
            if tmp is None:
                tmp = np.empty(acc.shape, np.float64)
            np.multiply(g, w, out=tmp, dtype=np.float64)
            acc = np.add(acc, tmp, out=acc)
    return acc if dtype == np.float64 else acc.astype(dtype)


#: ``(bits << 1) - 2`` of a float32 (sign dropped) is below this for 0 < |x| < 2**-125.
_F32_TINY = np.uint32(0x01FFFFFE)


def _pair_f32(terms: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray | None:
    """Two float32 gradients weighted (1/2, 1/2) or (1, 1), added in float32 when that is
    bit-identical to the float64 route of :func:`_weighted_f64`; else None.

    Why it is identical: float64 holds each weighted term exactly, and rounding their float64
    sum to float32 gives the correctly rounded float32 sum (the float64 sum of two float32
    values is exact, or off by less than float32 could ever resolve), which is what float32
    addition returns. Halving that sum is exact unless it falls below 2**-125 (subnormal
    territory), and the float32 sum may overflow where the halved float64 one would not:
    either case returns None."""
    if len(terms) != 2 or any(t.dtype != np.float32 for t in terms):
        return None
    halve = tuple(weights) == (0.5, 0.5)
    if not halve and tuple(weights) != (1.0, 1.0):
        return None
    total = np.asarray(np.add(terms[0], terms[1]))
    if halve and total.size:
        bits = np.left_shift(total.view(np.uint32), np.uint32(1))
        bits -= np.uint32(2)  # zero wraps to the top; a tiny nonzero sum lands below _F32_TINY
        if bits.min() < _F32_TINY:
            return None
        total *= np.float32(0.5)
    if not np.isfinite(total).all():  # overflow, or non-finite inputs: the float64 route
        return None
    return total
