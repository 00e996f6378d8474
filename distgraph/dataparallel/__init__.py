"""Data parallelism without a runtime: the pure pieces a distributed trainer calls.

A layout runs ``R`` replicas of a training program, each partitioned over ``N / R`` workers,
and each step's batch is split into ``R`` row shards. Everything here is plain Python and numpy
on plain data, tested without Ray:

* :func:`analyze_rows` — may the batch be split at all? It follows the batch axis (the leading
  axis of every input declared with a leading ``None``) through the forward ops and tells
  whether the loss is a mean or a sum of per-row terms (then shard gradients combine exactly),
  or raises a :class:`~distgraph.errors.GraphError` naming the node that couples rows.
* :func:`shard_rows` — the row slices of one batch, sizes differing by at most one.
* :func:`combine` — the exact combination of the shards' gradients, in a fixed order.
* :func:`choose_layout` / :func:`explain_layout` — replicas R (and so the partition width) from
  the cost model, with the estimated step time of every alternative.
* :func:`shard_params` / :func:`shard_param_pieces` — parameter-server shards balanced by bytes.
* :class:`StalenessClock` — bounded-delay bookkeeping (which steps may start, what was recorded
  on which parameter version, the staleness histogram).

How a runtime uses them. Once per training program::

    layout = choose_layout(program, cost, N, batch, ps_shards=S, memory_per_worker=...)
    split = analyze_rows(program)            # when R > 1; raises GraphError naming the node
    keys = shard_params({p: nbytes}, S)      # server s owns keys[s] (or shard_param_pieces)

One synchronous step ``t`` (``consistency="sync"``; every replica runs every step)::

    slices = shard_rows(batch_rows, R)       # replica r takes rows slices[r] (same on a retry)
    grads_r = replica r's gradients on its rows (feeds of split.batch_inputs cut by rows,
              split.shared_inputs whole), pushed per key to the key's server
    server s: combine([grads_0[keys], ...], [rows_0, ...], split.kind) in replica order,
              then apply it once as step t (exactly once per (shard, step))
    replicas pull the params their workers hold; step t+1 starts after every shard applied t

Asynchronous with staleness ``tau`` (``consistency="async"``; each replica takes whole
mini-batch steps, handed out in step-id order)::

    clock = StalenessClock(num_shards=S, first_step=first step id not yet applied)
    replica r, for its next step t: wait until clock.may_start(t, tau);
        v = clock.version; pull params (every shard has applied every step <= v)
        clock.record(r, t, v)                # once per (replica, step)
        compute the gradients of step t's whole mini-batch; push each key to its server
    server s applies each gradient as it arrives (no combine: one replica's mini-batch);
        then the driver calls clock.mark_applied(s, t) (once per (shard, step))
    status() reports clock.status(): applied-through per shard and the staleness histogram

``tau = 0`` makes the async schedule synchronous in order (step t waits for every step
before it), though each step is still one replica's mini-batch.

The package's modules, each owning one job:

* ``rows.py`` — row coupling (:func:`analyze_rows`, :func:`declare_rowwise`) and row shards
  (:func:`shard_rows`);
* ``gradients.py`` — the exact combination (:func:`shard_weights`, :func:`combine`);
* ``layout.py`` — choosing R and explaining the choice, with the cost constants;
* ``shards.py`` — parameter-server shards;
* ``staleness.py`` — the bounded-staleness clock.

Import the names from ``distgraph.dataparallel`` (this module re-exports them).
"""

from __future__ import annotations

from .gradients import combine as combine
from .gradients import shard_weights as shard_weights
from .layout import AUTO_MARGIN as AUTO_MARGIN
from .layout import CALL_ROUND_TRIP as CALL_ROUND_TRIP
from .layout import COMBINE_FLOPS_PER_ELEMENT as COMBINE_FLOPS_PER_ELEMENT
from .layout import Layout as Layout
from .layout import LayoutOption as LayoutOption
from .layout import choose_layout as choose_layout
from .layout import explain_layout as explain_layout
from .layout import stage_placement as stage_placement
from .rows import Reduction as Reduction
from .rows import RowSplit as RowSplit
from .rows import analyze_rows as analyze_rows
from .rows import declare_rowwise as declare_rowwise
from .rows import shard_rows as shard_rows
from .shards import ParamPiece as ParamPiece
from .shards import join_pieces as join_pieces
from .shards import shard_param_pieces as shard_param_pieces
from .shards import shard_params as shard_params
from .shards import split_param as split_param
from .shards import take_pieces as take_pieces
from .staleness import Computed as Computed
from .staleness import DuplicateStepError as DuplicateStepError
from .staleness import StalenessClock as StalenessClock

__all__ = [
    "AUTO_MARGIN",
    "CALL_ROUND_TRIP",
    "COMBINE_FLOPS_PER_ELEMENT",
    "Computed",
    "DuplicateStepError",
    "Layout",
    "LayoutOption",
    "ParamPiece",
    "Reduction",
    "RowSplit",
    "StalenessClock",
    "analyze_rows",
    "choose_layout",
    "combine",
    "declare_rowwise",
    "explain_layout",
    "join_pieces",
    "shard_param_pieces",
    "shard_params",
    "shard_rows",
    "shard_weights",
    "split_param",
    "stage_placement",
    "take_pieces",
]
