"""Parameter-server shards: which server owns which params (or rows of a param).

Owns :func:`shard_params` (whole params to S servers, balanced by bytes, deterministic) and
the row-piece variant (:class:`ParamPiece`, :func:`split_param`, :func:`shard_param_pieces`,
:func:`take_pieces`, :func:`join_pieces`) for a param larger than a fair share. Kept apart
because it is pure bookkeeping over param sizes: it needs no graph, no cost model and no
gradient arithmetic, and the runtime's shard manager and the scaling report both read it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..cost import itemsize
from ..errors import ConfigError
from .rows import shard_rows


def shard_params(param_bytes: Mapping[str, int], shards: int) -> list[list[str]]:
    """Assign whole params to ``shards`` servers, balanced by bytes.

    Greedy, largest first (ties by name), each into the lightest shard so far (ties: lowest
    shard index): deterministic for the same sizes. Within a shard, names keep the order of
    ``param_bytes``. More shards than params raises :class:`~distgraph.errors.ConfigError`.
    A param larger than a shard's fair share (total / shards) unbalances the result however it
    is placed; :func:`shard_param_pieces` splits such params by rows instead.
    """
    if not isinstance(shards, int) or isinstance(shards, bool) or shards < 1:
        raise ConfigError(f"ps_shards must be an int >= 1, got {shards!r}")
    if shards > len(param_bytes):
        raise ConfigError(
            f"ps_shards={shards} is more than the {len(param_bytes)} params "
            f"({', '.join(param_bytes)}): use at most {len(param_bytes)} shards, or split "
            "large params by rows (shard_param_pieces)"
        )
    bad = {k: v for k, v in param_bytes.items() if not isinstance(v, (int, np.integer)) or v < 0}
    if bad:
        raise ConfigError(f"param sizes must be ints >= 0 (bytes), got {bad}")
    owner = _greedy({k: int(v) for k, v in param_bytes.items()}, shards)
    return [[k for k in param_bytes if owner[k] == s] for s in range(shards)]


def _greedy(sizes: Mapping[Any, int], shards: int) -> dict[Any, int]:
    load = [0] * shards
    owner = {}
    for key in sorted(sizes, key=lambda k: (-sizes[k], _sort_key(k))):
        s = min(range(shards), key=lambda i: (load[i], i))
        owner[key] = s
        load[s] += sizes[key]
    return owner


def _sort_key(key: Any) -> tuple[str, int]:
    if isinstance(key, ParamPiece):
        return (key.name, key.start)
    return (str(key), 0)


@dataclass(frozen=True)
class ParamPiece:
    """Rows ``start:stop`` (along axis 0) of param ``name``, or the whole param when ``whole``."""

    name: str
    start: int
    stop: int
    nbytes: int
    whole: bool = True

    @property
    def rows(self) -> slice:
        """The rows as a slice (``slice(None)`` for a whole param, scalars included)."""
        return slice(None) if self.whole else slice(self.start, self.stop)


def split_param(
    name: str, shape: Sequence[int], item_bytes: int, max_bytes: int
) -> list[ParamPiece]:
    """Split a param into row ranges of at most ``max_bytes`` each (sizes differing by at
    most one row); a param that fits, a scalar or one row stays whole (a row is never cut)."""
    shape = tuple(int(d) for d in shape)
    nbytes = math.prod(shape) * item_bytes
    if nbytes <= max_bytes or len(shape) == 0 or shape[0] <= 1:
        return [ParamPiece(name, 0, shape[0] if shape else 1, nbytes, True)]
    row_bytes = nbytes // shape[0]
    rows_per_piece = max(1, max_bytes // max(row_bytes, 1))
    parts = math.ceil(shape[0] / rows_per_piece)
    return [
        ParamPiece(name, s.start, s.stop, (s.stop - s.start) * row_bytes, False)
        for s in shard_rows(shape[0], parts)
    ]


def shard_param_pieces(
    params: Mapping[str, tuple[Sequence[int], Any]], shards: int
) -> list[list[ParamPiece]]:
    """Like :func:`shard_params`, but a param larger than the fair share (total bytes /
    ``shards``, rounded up) is first split by rows into pieces no larger than it, so shards
    stay balanced and no server holds one huge param. ``params`` maps name to (shape, dtype).
    Each server then applies the optimizer to its rows only: elementwise optimizers (SGD,
    Momentum, Adam) give the same result as on the whole param."""
    if not isinstance(shards, int) or isinstance(shards, bool) or shards < 1:
        raise ConfigError(f"ps_shards must be an int >= 1, got {shards!r}")
    sizes = {
        k: math.prod(int(d) for d in shape) * itemsize(None if dt is None else np.dtype(dt).name)
        for k, (shape, dt) in params.items()
    }
    fair = max(1, math.ceil(sum(sizes.values()) / shards))
    pieces: list[ParamPiece] = []
    for k, (shape, dt) in params.items():
        width = itemsize(None if dt is None else np.dtype(dt).name)
        pieces.extend(split_param(k, shape, width, fair))
    if shards > len(pieces):
        raise ConfigError(
            f"ps_shards={shards} is more than the {len(pieces)} pieces the params split into; "
            f"use at most {len(pieces)} shards"
        )
    owner = _greedy({p: p.nbytes for p in pieces}, shards)
    return [[p for p in pieces if owner[p] == s] for s in range(shards)]


def take_pieces(values: Mapping[str, Any], pieces: Iterable[ParamPiece]) -> dict[ParamPiece, Any]:
    """The arrays of ``pieces`` cut from whole param (or gradient) ``values``."""
    return {p: np.asarray(values[p.name])[p.rows] for p in pieces}


def join_pieces(parts: Mapping[ParamPiece, Any]) -> dict[str, np.ndarray]:
    """Whole params from their pieces (every piece of each param must be present)."""
    by_name: dict[str, list[ParamPiece]] = {}
    for p in parts:
        by_name.setdefault(p.name, []).append(p)
    out = {}
    for name, ps in by_name.items():
        ps.sort(key=lambda p: p.start)
        if len(ps) == 1 and ps[0].whole:
            out[name] = np.asarray(parts[ps[0]])
            continue
        expected = 0
        for p in ps:
            if p.whole or p.start != expected:
                raise ConfigError(f"param {name!r}: pieces do not cover its rows: {ps}")
            expected = p.stop
        out[name] = np.concatenate([np.asarray(parts[p]) for p in ps], axis=0)
    return out
