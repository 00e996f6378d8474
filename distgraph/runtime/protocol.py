"""The driver↔worker call: one typed header, then the call's values, packed and unpacked here.

A worker call is ``run_task(header, *values)``. The :class:`CallHeader` says which task of
which step it is, how to run it (named flags) and carries the small feeds inline; ``values``
follow in this order:

1. the param update, when ``header.update`` (the worker's new params, or a reference to them);
2. one array per name in ``header.big`` (large feeds, put in the object store once);
3. one value dict per import of the task (``header.imports`` of them), in plan order.

The values stay top-level arguments of the actor call because Ray resolves only top-level
object references: one nested in the header would reach the worker unresolved.

This module does not import Ray: the driver (``runtime/ray/``) packs, ``runtime/worker.py``
unpacks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ExecutionError


@dataclass(frozen=True)
class Rows:
    """A feed given as rows of a training array the worker receives by reference."""

    index: np.ndarray


@dataclass(frozen=True)
class CallHeader:
    """What a worker needs to know about one call besides the values it receives."""

    plan_id: int
    step: int
    task_id: int
    #: Record trace events for the step.
    trace: bool = False
    #: Fail on the first NaN/Inf a node produces.
    check_finite: bool = False
    #: Send values for other workers and the server by reference (``data_path="store"``).
    by_ref: bool = False
    #: The first value after the header is a param update.
    update: bool = False
    #: ``step`` is a training step's id, which stochastic ops (dropout) draw from; otherwise
    #: they are the identity.
    training: bool = False
    #: Small feeds by name (one argument for all of them: each argument costs Ray
    #: bookkeeping); a :class:`Rows` entry takes its rows from the big feed of the same name.
    inline: Mapping[str, Any] = field(default_factory=dict)
    #: Names of the feeds that follow as values of their own, in order.
    big: tuple[str, ...] = ()
    #: How many imported value dicts follow the feeds.
    imports: int = 0


@dataclass(frozen=True)
class Call:
    """A call as the worker reads it: the header and its values, by role."""

    header: CallHeader
    update: Any  # None unless header.update
    feeds: dict[str, Any]  # every feed by name (Rows taken from their arrays)
    imported: list[Any]  # one value dict (or reference to one) per import


def pack(
    header: CallHeader,
    update: Any = None,
    big: Sequence[Any] = (),
    imported: Sequence[Any] = (),
) -> tuple[Any, ...]:
    """The positional arguments of ``run_task`` for one call: the header, then its values."""
    if (update is not None) != header.update:
        raise ExecutionError(
            f"task {header.task_id}: header.update={header.update} but the update given is "
            f"{type(update).__name__}"
        )
    if len(big) != len(header.big) or len(imported) != header.imports:
        raise ExecutionError(
            f"task {header.task_id}: the header names {len(header.big)} big feeds and {header.imports} imports, "
            f"but {len(big)} and {len(imported)} were given"
        )
    head: tuple[Any, ...] = (header, update) if header.update else (header,)
    return (*head, *big, *imported)


def unpack(header: CallHeader, values: Sequence[Any]) -> Call:
    """Read a call's ``values`` (the arguments after the header) by the header's account."""
    first = 1 if header.update else 0
    n_big = len(header.big)
    if len(values) != first + n_big + header.imports:
        raise ExecutionError(
            f"task {header.task_id} of step {header.step} (plan {header.plan_id}) came with "
            f"{len(values)} values but its header announces {first + n_big + header.imports}; "
            "the driver and this worker run different distgraph versions?"
        )
    feeds = {n: v for n, v in header.inline.items() if not isinstance(v, Rows)}
    for name, value in zip(header.big, values[first : first + n_big]):
        rows = header.inline.get(name)
        feeds[name] = np.take(value, rows.index, axis=0) if isinstance(rows, Rows) else value
    return Call(
        header=header,
        update=values[0] if header.update else None,
        feeds=feeds,
        imported=list(values[first + n_big :]),
    )
