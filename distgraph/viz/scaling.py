"""Scaling out, shown: the data-parallel replicas, the parameter-server shards and which rows
each replica took, as text for ``explain`` and as a section of the HTML report.

Pure functions over a training session's ``status()`` (see ``RaySession.status``) and the
params; nothing here talks to Ray.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..dataparallel import shard_params
from ._model import format_bytes

#: How many of the latest steps the report lists row by row (the rule covers the others).
ROW_STEPS = 10
#: How many of the latest asynchronous (replica, step) records the report lists.
ASYNC_RECORDS = 12


def param_bytes(params: Mapping[str, Any]) -> dict[str, int]:
    """Bytes of each param's value, in the params' order."""
    return {k: int(np.asarray(v).nbytes) for k, v in params.items()}


def shard_layout(params: Mapping[str, Any], shards: int) -> list[dict[str, Any]]:
    """Per parameter-server shard: the params it owns (whole params, balanced by bytes, as
    ``RayExecutor(ps_shards=S)`` assigns them) and their bytes."""
    sizes = param_bytes(params)
    return [
        {"shard": s, "params": keys, "bytes": sum(sizes[k] for k in keys)}
        for s, keys in enumerate(shard_params(sizes, shards))
    ]


def explain_shards(params: Mapping[str, Any], shards: int) -> str:
    """``explain``'s lines for ``ps_shards=shards``: which params each shard holds, and bytes."""
    layout = shard_layout(params, shards)
    total = sum(s["bytes"] for s in layout)
    lines = [
        f"parameter-server shards: {shards} (whole params, largest first into the lightest "
        f"shard; {format_bytes(total)} in all); workers push each gradient to the shard "
        "that owns its param and pull only the params they hold"
    ]
    for s in layout:
        share = s["bytes"] / total if total else 0.0
        lines.append(
            f"  shard {s['shard']}: {format_bytes(s['bytes']):>10s} ({share:4.0%})  "
            + ", ".join(s["params"])
        )
    return "\n".join(lines)


def row_rule(count: int, kind: str | None) -> str:
    """How a step's batch is split over ``count`` replicas and how their gradients combine."""
    if count <= 1:
        return "One replica: every step's whole batch runs on it; nothing is split."
    weight = (
        "summed (a loss that is a sum over rows)"
        if kind == "sum"
        else "weighted by its rows / the batch's rows (a loss that is a mean over rows)"
    )
    return (
        f"Each step's batch of n rows is cut into {count} contiguous ranges in replica order, "
        f"sizes differing by at most one (the first n mod {count} replicas take one row more; "
        f"a batch with fewer than {count} rows leaves the last replicas out of that step). The "
        f"server combines the replicas' gradients in replica order, each {weight}, and "
        "applies the result once."
    )


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _steps_text(steps: Sequence[int]) -> str:
    """Applied step ids, compactly: "1 … 24 (24)" when contiguous."""
    steps = list(steps)
    if not steps:
        return "none"
    if steps == list(range(steps[0], steps[0] + len(steps))) and len(steps) > 2:
        return f"{steps[0]} … {steps[-1]} ({len(steps)})"
    if len(steps) <= 6:
        return ", ".join(map(str, steps))
    return f"{len(steps)} steps, {min(steps)} … {max(steps)}"


def _table(table_id: str, head: Sequence[str], rows: Sequence[str]) -> str:
    cells = "".join(f"<th>{_esc(h)}</th>" for h in head)
    return (
        f'<table class="grid" id="{table_id}"><thead><tr>{cells}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _where(entry: Mapping[str, Any]) -> str:
    """A replica's nodes: IPs, and the start of each Ray node id (several nodes may share an
    IP on one machine)."""
    ips = ", ".join(entry.get("ips") or [])
    nodes = ", ".join(str(n)[:8] for n in entry.get("nodes") or [])
    return f"{ips} ({nodes})" if ips and nodes else ips or nodes or "—"


def _replica_rows(
    info: Mapping[str, Any], records: Sequence[Mapping[str, Any]] | None = None
) -> list[str]:
    """One row per replica: its workers and nodes (the latest step it ran), and the steps it
    computed (asynchronous ``records``, when given, count whole steps per replica)."""
    steps: Mapping[Any, Sequence[Mapping[str, Any]]] = info.get("steps") or {}
    latest: dict[int, Mapping[str, Any]] = {}
    computed: dict[int, int] = {}
    for entries in steps.values():
        for e in entries:
            latest[int(e["replica"])] = e
            computed[int(e["replica"])] = computed.get(int(e["replica"]), 0) + 1
    if records is not None:
        computed = {}
        for c in records:
            computed[int(c["replica"])] = computed.get(int(c["replica"]), 0) + 1
    out = []
    width = int(info.get("width") or 1)
    for r in range(int(info.get("count") or 1)):
        e = latest.get(r, {})
        workers = e.get("workers") or list(range(r * width, (r + 1) * width))
        out.append(
            f'<tr data-replica="{r}"><td>replica {r}</td>'
            f"<td>{_esc(', '.join(f'worker {w}' for w in workers))}</td>"
            f"<td>{_esc(_where(e))}</td><td>{computed.get(r, 0)}</td></tr>"
        )
    return out


def _span(rows: Any) -> str:
    if rows is None:
        return "whole batch"
    a, b = int(rows[0]), int(rows[1])
    return f"{a}:{b} ({b - a} rows)"


def _step_rows(info: Mapping[str, Any], last: int) -> tuple[list[str], int]:
    """The latest ``last`` steps' rows per replica, and how many earlier steps are left out."""
    steps = info.get("steps") or {}
    ids = sorted(steps, key=int)
    shown = ids[-last:]
    count = int(info.get("count") or 1)
    out = []
    for step in shown:
        by = {int(e["replica"]): e for e in steps[step]}
        cells = "".join(
            f'<td data-replica="{r}" data-rows="{_esc(list(by[r]["rows"]) if by[r]["rows"] is not None else "")}">'
            f"{_esc(_span(by[r]['rows']))}</td>"
            if r in by
            else f'<td data-replica="{r}" class="pending">sat out</td>'
            for r in range(count)
        )
        out.append(f'<tr data-step="{int(step)}"><td>{int(step)}</td>{cells}</tr>')
    return out, len(ids) - len(shown)


def _shard_rows(status: Mapping[str, Any], params: Mapping[str, Any]) -> tuple[list[str], int, int]:
    """One row per parameter-server shard (one for a lone server); (rows, shards, bytes)."""
    sizes = param_bytes(params)
    shards = status.get("shards") or [
        {
            "params": list(params),
            "applied": status.get("applied") or [],
            "version": status.get("version"),
        }
    ]
    out = []
    total = 0
    for s, part in enumerate(shards):
        keys = list(part.get("params") or [])
        nbytes = sum(sizes.get(k, 0) for k in keys)
        total += nbytes
        applied = list(part.get("applied") or [])
        out.append(
            f'<tr data-shard="{s}" data-params="{_esc(",".join(keys))}" data-bytes="{nbytes}"'
            f' data-applied="{len(applied)}"><td>shard {s}</td><td>{_esc(", ".join(keys))}</td>'
            f"<td>{_esc(format_bytes(nbytes))}</td><td>{_esc(_steps_text(applied))}</td>"
            f"<td>{_esc(part.get('version', '—'))}</td></tr>"
        )
    return out, len(shards), total


def _async_part(info: Mapping[str, Any]) -> str:
    """Asynchronous steps: the staleness bound, histogram and the latest records."""
    hist = info.get("staleness_histogram") or {}
    hist_text = ", ".join(f"{k}: {v}" for k, v in sorted(hist.items(), key=lambda kv: int(kv[0])))
    records = list(info.get("records") or [])[-ASYNC_RECORDS:]
    rows = [
        f'<tr data-step="{int(c["step"])}" data-replica="{int(c["replica"])}">'
        f"<td>{int(c['step'])}</td><td>replica {int(c['replica'])}</td>"
        f"<td>{int(c['version'])}</td><td>{int(c['staleness'])}</td></tr>"
        for c in records
    ]
    return (
        f"<h3>Asynchronous steps <small>staleness bound τ = {_esc(info.get('staleness'))}"
        f"</small></h3>"
        '<p class="muted" id="async-rule">Each step runs whole on the first idle replica, on the '
        "params of the version it pulled, and is applied once as it arrives; a replica starts "
        "step t only when every shard has applied every step ≤ t − τ − 1. A step's staleness "
        "is t − 1 − the version it computed on: the earlier steps its params lacked. "
        "Histogram (staleness: steps): "
        f'<b id="staleness-histogram">{_esc(hist_text or "none")}</b>; largest '
        f"{_esc(info.get('max_staleness'))}.</p>"
        + _table(
            "async-records",
            ["step", "replica", "computed on version", "staleness"],
            rows,
        )
    )


def scaling_section(status: Mapping[str, Any] | None, params: Mapping[str, Any]) -> str:
    """The report's "Scaling out" card from a training session's ``status()``: the replicas
    (workers, nodes, steps computed), the shards (params, bytes, applied steps), which rows
    each replica took in the latest steps with the rule for the others, and under
    ``consistency="async"`` the staleness of the latest steps. Empty without a layout."""
    if not status or not status.get("replicas"):
        return ""
    info = status["replicas"]
    count, width = int(info.get("count") or 1), int(info.get("width") or 1)
    shard_rows, shards, total = _shard_rows(status, params)
    consistency = status.get("consistency", "sync")
    asynchronous = status.get("async") or None
    # Asynchronous steps run whole on one replica each: the records say which (below).
    step_rows, earlier = ([], 0) if asynchronous else _step_rows(info, ROW_STEPS)
    rule = (
        "Asynchronous: each step's whole batch runs on one replica (the first idle one); "
        "its gradient is applied on its own, once, as it arrives."
        if asynchronous
        else row_rule(count, info.get("kind"))
    )
    records = list(asynchronous.get("records") or []) if asynchronous else None
    summary = (
        f"{count} replica{'s' if count != 1 else ''} × {width} worker{'s' if width != 1 else ''}"
        f" each; {shards} parameter-server shard{'s' if shards != 1 else ''} holding "
        f"{format_bytes(total)} of params; consistency {consistency}."
    )
    rows_part = ""
    if step_rows:
        more = (
            f'<p class="muted" id="rows-earlier">… and {earlier} earlier step'
            f"{'s' if earlier != 1 else ''}, split by the same rule.</p>"
            if earlier
            else ""
        )
        rows_part = (
            f"<h3>Rows each replica took <small>the latest {len(step_rows)} steps"
            "</small></h3>"
            + _table(
                "replica-rows",
                ["step", *[f"replica {r}" for r in range(count)]],
                step_rows,
            )
            + more
        )
    async_part = _async_part(asynchronous) if asynchronous else ""
    return f"""
<section class="card" id="scaling">
  <h2>Scaling out</h2>
  <p class="muted" id="scaling-summary">{_esc(summary)}</p>
  <p class="muted" id="rows-rule">{_esc(rule)}</p>
  <div class="panels">
    <div class="panel"><h3>Replicas <small>workers, nodes, steps computed</small></h3>
      {_table("replicas-table", ["replica", "workers", "nodes", "steps"], _replica_rows(info, records))}
    </div>
    <div class="panel"><h3>Parameter-server shards <small>params, bytes, applied steps</small></h3>
      {_table("shards-table", ["shard", "params", "bytes", "applied steps", "version"], shard_rows)}
    </div>
  </div>
  {rows_part}
  {async_part}
</section>"""
