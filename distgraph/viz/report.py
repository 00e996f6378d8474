"""One self-contained HTML page about a run: graph + placement, replay, training curves, timeline.

The page needs no network: its CSS and script (``report.css``, ``report.js`` next to this file)
are inlined, the pictures are inline SVG drawn here, and the run's data is a JSON block the
script reads. The replay is computed here from the trace's node events (pure Python, testable):
groups of nodes that ran together, forward levels first, then backward.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..result import TraceEvent
from ..spec import GraphSpec, decode_constant
from ..trace import event_track, jsonable, ordered_tracks
from ._model import format_shape, node_kind, node_levels, node_style
from ._paths import output_path
from .scaling import scaling_section
from .svg import render_svg

_HERE = Path(__file__).resolve().parent
_PHASE_RANK = {"forward": 0, "backward": 1}
#: The timeline draws at most this many events, so a long training trace keeps the page light.
MAX_TIMELINE_EVENTS = 4000
#: Array params up to this many entries get one curve per entry in the training chart.
MAX_PARAM_SERIES = 8
PHASE_COLOURS = {"forward": "#0d9488", "backward": "#d97706"}
KIND_COLOURS = {"transfer": "#64748b", "update": "#7c3aed", "call": "#cbd5e1"}


def format_value(value: Any, max_items: int = 4) -> str:
    """Scalars as numbers (6 significant digits); arrays as dtype, shape and a few entries."""
    if value is None:
        return "—"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.6g}"
    if isinstance(value, dict) and "shape" in value:  # interpret.preview's summary of a big value
        head = ", ".join(format_value(v) for v in value.get("first", [])[:max_items])
        return f"{value.get('dtype', '')}{list(value['shape'])} [{head}, …]"
    arr = np.asarray(value)
    if arr.ndim == 0:
        item = arr.item()
        # Anything but a number (an object array's item) would come back here forever.
        return str(item) if arr.dtype.kind == "O" else format_value(item)
    flat = arr.reshape(-1)
    head = ", ".join(format_value(v.item()) for v in flat[:max_items])
    more = ", …" if flat.size > max_items else ""
    return f"{arr.dtype.name}{list(arr.shape)} [{head}{more}]"


def scalar_number(value: Any) -> float | None:
    """The value as a finite float when it is a scalar, else None."""
    if isinstance(value, (str, bytes)) or value is None:
        return None
    arr = np.asarray(value)
    if arr.ndim != 0 or arr.dtype.kind not in "biuf":
        return None
    f = float(arr)
    return f if math.isfinite(f) else None


@dataclass
class _Task:
    node: str
    phase: str
    level: int
    worker: int | None = None
    start: float | None = None
    end: float | None = None


@dataclass
class ReplayGroup:
    """Nodes that ran together: one (phase, level) wave step."""

    phase: str
    level: int
    nodes: list[str] = field(default_factory=list)
    workers: list[int | None] = field(default_factory=list)
    ms: float | None = None


def _event_target(event: TraceEvent, names: set[str]) -> str | None:
    """The displayed node a node event belongs to (backward events may name a generated node)."""
    if event.name in names:
        return event.name
    origin = event.args.get("origin") if event.args else None
    if isinstance(origin, str) and origin in names:
        return origin
    # Generated backward names embed their forward node ("vjp:mul_1:0", "grad:z"); user names
    # cannot contain ':', so a part that names a displayed node is that node.
    parts = event.name.split(":")
    for part in parts[1:] + parts[:1]:
        if part in names:
            return part
    return None


def build_replay(
    spec: GraphSpec, trace: list[TraceEvent], placement: dict[str, int] | None = None
) -> list[ReplayGroup]:
    """Wave steps of the recorded run: forward levels, then backward, from the node events.

    Each node gets one task in its own phase (synthesized at its topological level when the
    trace has no event for it, e.g. leaves); a backward event for a forward node (a trace of the
    gradient graph shown on the forward picture) adds a second task to that node.
    """
    placement = placement or {}
    names = {n.name for n in spec.nodes}
    levels = node_levels(spec)
    tasks: dict[tuple[str, str], _Task] = {}
    for event in sorted((e for e in trace if e.kind == "node"), key=lambda e: e.start):
        target = _event_target(event, names)
        if target is None or (target, event.phase) in tasks:
            continue  # first occurrence wins: a multi-step trace replays its first step
        tasks[(target, event.phase)] = _Task(
            target, event.phase, event.level, event.worker, event.start, event.end
        )
    for node in spec.nodes:
        if (node.name, node.phase) not in tasks:
            tasks[(node.name, node.phase)] = _Task(node.name, node.phase, levels[node.name])

    grouped: dict[tuple[str, int], list[_Task]] = {}
    for task in tasks.values():
        grouped.setdefault((task.phase, task.level), []).append(task)
    order = {n.name: i for i, n in enumerate(spec.nodes)}
    keys = sorted(grouped, key=lambda k: (_PHASE_RANK.get(k[0], 2), k[0], k[1]))
    # Executors may number backward steps by their forward level (run Ln..L0): follow the clock.
    backward = [k for k in keys if k[0] == "backward"]
    timed = [
        min(t.start for t in grouped[k] if t.start is not None)
        for k in backward
        if any(t.start is not None for t in grouped[k])
    ]
    if len(timed) >= 2 and timed[0] > timed[-1]:
        keys = [k for k in keys if k[0] != "backward"] + backward[::-1]

    groups = []
    for key in keys:
        members = sorted(grouped[key], key=lambda t: order[t.node])
        starts = [t.start for t in members if t.start is not None]
        ends = [t.end for t in members if t.end is not None]
        ms = (max(ends) - min(starts)) * 1e3 if starts and ends else None
        groups.append(
            ReplayGroup(
                phase=key[0],
                level=key[1],
                nodes=[t.node for t in members],
                workers=[
                    t.worker if t.worker is not None else placement.get(t.node) for t in members
                ],
                ms=ms,
            )
        )
    return groups


def _node_values(spec: GraphSpec, values: dict[str, Any]) -> dict[str, Any]:
    """Values to show per node: the given ones, else param and constant values from the spec."""
    known: dict[str, Any] = {}
    for node in spec.nodes:
        if node.name in values:
            known[node.name] = values[node.name]
        elif node.op == "param" and node.name in spec.params:
            known[node.name] = spec.params[node.name].to_numpy()
        elif node.op == "const" and node.name in spec.constants:
            known[node.name] = decode_constant(spec.constants[node.name])
    return known


def _history_series(history: Any) -> tuple[list[float], dict[str, list[float | None]]]:
    """(loss per epoch, {param: values per epoch}) from a dict or a History-like object."""
    if history is None:
        return [], {}
    get = history.get if isinstance(history, dict) else lambda k, d=None: getattr(history, k, d)
    loss = [scalar_number(v) for v in (get("loss", None) or [])]
    epochs = list(get("params", None) or [])
    # Small array params become one series per entry ("W[0]", "W[1]", ...).
    flat: list[dict[str, float | None]] = []
    for p in epochs:
        row: dict[str, float | None] = {}
        for name, value in p.items():
            arr = np.asarray(value)
            if arr.ndim == 0:
                row[str(name)] = scalar_number(arr)
            elif arr.size <= MAX_PARAM_SERIES:
                for i, v in enumerate(arr.reshape(-1)):
                    row[f"{name}[{i}]"] = scalar_number(v)
        flat.append(row)
    names = list(dict.fromkeys(k for row in flat for k in row))
    params = {name: [row.get(name) for row in flat] for name in names}
    return [v if v is not None else math.nan for v in loss], params


def _fmt_tick(v: float) -> str:
    return f"{v:.3g}"


def _line_chart(
    series: Mapping[str, Sequence[float | None]],
    *,
    svg_id: str,
    colours: list[str],
    log: bool = False,
    data_attr: str | None = None,
) -> str:
    """A small inline SVG line chart over epochs, with the numbers on data attributes."""
    w, h, left, right, top, bottom = 560, 260, 58, 16, 14, 34
    pts = [v for vals in series.values() for v in vals if v is not None and math.isfinite(v)]
    if log:
        pts = [v for v in pts if v > 0]
    n = max((len(v) for v in series.values()), default=0)
    attrs = f' id="{svg_id}" class="chart" width="{w}" height="{h}" viewBox="0 0 {w} {h}"'
    attrs += f' data-epochs="{n}" data-x0="{left}" data-x1="{w - right}" data-scale="'
    attrs += ("log" if log else "linear") + '"'
    if data_attr:
        only = next(iter(series.values()), [])
        attrs += f' {data_attr}="{html.escape(json.dumps(jsonable(only)), quote=True)}"'
    if not pts or n == 0:
        return f'<svg xmlns="http://www.w3.org/2000/svg"{attrs}><text x="20" y="40">no data</text></svg>'
    lo, hi = min(pts), max(pts)
    f = (lambda v: math.log10(v)) if log else (lambda v: v)
    flo, fhi = f(lo), f(hi)
    if fhi - flo < 1e-12:
        flo, fhi = flo - 1, fhi + 1
    pad = (fhi - flo) * 0.06
    flo, fhi = flo - pad, fhi + pad

    def sx(i: int) -> float:
        return left + (w - left - right) * (i / max(n - 1, 1))

    def sy(v: float) -> float:
        return top + (h - top - bottom) * (1 - (f(v) - flo) / (fhi - flo))

    out = [f'<svg xmlns="http://www.w3.org/2000/svg"{attrs}>']
    out.append(f'<rect x="{left}" y="{top}" width="{w - left - right}" height="{h - top - bottom}"')
    out.append(' fill="#f8fafc" stroke="#e2e8f0"/>')
    for k in range(5):
        fv = flo + (fhi - flo) * k / 4
        v = 10**fv if log else fv
        y = top + (h - top - bottom) * (1 - k / 4)
        out.append(
            f'<line x1="{left}" x2="{w - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e2e8f0"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="10" fill="#64748b"'
            f' text-anchor="end">{_fmt_tick(v)}</text>'
        )
    for k in range(min(n, 6)):
        i = round((n - 1) * k / max(min(n, 6) - 1, 1))
        out.append(
            f'<text x="{sx(i):.1f}" y="{h - bottom + 16}" font-size="10" fill="#64748b"'
            f' text-anchor="middle">{i + 1}</text>'
        )
    out.append(
        f'<text x="{(left + w - right) / 2:.1f}" y="{h - 4}" font-size="11" fill="#475569"'
        ' text-anchor="middle">epoch</text>'
    )
    for (name, vals), colour in zip(series.items(), colours):
        coords = [
            f"{sx(i):.1f},{sy(v):.1f}"
            for i, v in enumerate(vals)
            if v is not None and math.isfinite(v) and (v > 0 or not log)
        ]
        values = html.escape(json.dumps(jsonable(vals)), quote=True)
        out.append(
            f'<polyline class="series" data-series="{html.escape(name, quote=True)}"'
            f' data-values="{values}" points="{" ".join(coords)}" fill="none"'
            f' stroke="{colour}" stroke-width="2.2" stroke-linejoin="round"/>'
        )
    out.append(
        f'<line class="epoch-marker" x1="{sx(n - 1):.1f}" x2="{sx(n - 1):.1f}" y1="{top}"'
        f' y2="{h - bottom}" stroke="#0f172a" stroke-dasharray="3 3" stroke-width="1"/>'
    )
    out.append("</svg>")
    return "".join(out)


def _timeline_svg(trace: list[TraceEvent]) -> str:
    """One lane per track, one bar per event, milliseconds on the axis."""
    events = sorted(trace, key=lambda e: e.start)[:MAX_TIMELINE_EVENTS]
    if not events:
        return '<p class="muted" id="timeline-empty">No trace was recorded for this run.</p>'
    tracks = ordered_tracks(events)
    t0 = min(e.start for e in events)
    span = max(max(e.end for e in events) - t0, 1e-9)
    label_w, w, lane_h, top = 130, 1040, 26, 8
    h = top + lane_h * len(tracks) + 30
    plot_w = w - label_w - 12

    def sx(t: float) -> float:
        return label_w + plot_w * (t - t0) / span

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" id="timeline" class="timeline" width="{w}"'
        f' height="{h}" viewBox="0 0 {w} {h}" data-tracks="{len(tracks)}"'
        f' data-events="{len(events)}" data-span-ms="{span * 1e3:.3f}">'
    ]
    for i, track in enumerate(tracks):
        y = top + i * lane_h
        out.append(
            f'<g class="lane" data-track="{html.escape(track, quote=True)}">'
            f'<rect x="{label_w}" y="{y}" width="{plot_w}" height="{lane_h - 4}"'
            f' fill="{"#f8fafc" if i % 2 else "#f1f5f9"}"/>'
            f'<text x="{label_w - 8}" y="{y + lane_h / 2 + 2}" font-size="12" fill="#334155"'
            f' text-anchor="end">{html.escape(track)}</text></g>'
        )
    lane = {t: i for i, t in enumerate(tracks)}
    for e in events:
        track = event_track(e)
        y = top + lane[track] * lane_h + 2
        x = sx(e.start)
        bw = max(sx(e.end) - x, 1.0)
        action = e.args.get("action")  # a pipelined step's F3 / B1: drawn over its nodes
        colour = (
            PHASE_COLOURS.get(e.phase, "#94a3b8")
            if e.kind == "node" or action
            else KIND_COLOURS.get(e.kind, "#94a3b8")
        )
        tip = f"{e.name} ({e.kind}, {e.phase}, level {e.level}) {(e.end - e.start) * 1e3:.3f} ms on {track}"
        out.append(
            f'<rect class="event" data-track="{html.escape(track, quote=True)}"'
            f' data-name="{html.escape(e.name, quote=True)}" data-kind="{e.kind}"'
            f' data-phase="{html.escape(e.phase, quote=True)}" x="{x:.2f}" y="{y}"'
            f' width="{bw:.2f}" height="{lane_h - 8}" rx="2" fill="{colour}" fill-opacity="0.85">'
            f"<title>{html.escape(tip)}</title></rect>"
        )
        if action and bw >= 14:
            out.append(
                f'<text class="action" x="{x + bw / 2:.2f}" y="{y + lane_h / 2 + 1}"'
                f' font-size="10" fill="#ffffff" text-anchor="middle">'
                f"{html.escape(str(action))}</text>"
            )
    axis_y = top + lane_h * len(tracks) + 14
    for k in range(6):
        t = span * k / 5
        anchor = "start" if k == 0 else "end" if k == 5 else "middle"
        out.append(
            f'<text x="{label_w + plot_w * k / 5:.1f}" y="{axis_y}" font-size="10" fill="#64748b"'
            f' text-anchor="{anchor}">{t * 1e3:.3g} ms</text>'
        )
    out.append("</svg>")
    return "".join(out)


def _bubble_note(trace: list[TraceEvent]) -> str:
    """Under a pipelined step's timeline: its measured bubble next to the formula."""
    acts = [e for e in trace if "action" in e.args]
    if not acts:
        return ""
    from ..stageplan import bubble_formula, measured_bubble

    p = len({e.worker for e in acts})
    m = 1 + max(int(e.args.get("microbatch", 0)) for e in acts)
    return (
        f'<p class="muted" id="pipeline-bubble">Pipeline: {p} stages x {m} micro-batches; '
        f"measured bubble {measured_bubble(trace):.3f}, formula (p-1)/(m+p-1) = "
        f"{bubble_formula(p, m):.3f}.</p>"
    )


def _embed_json(data: Any) -> str:
    """JSON safe inside a <script> block: '<', '>' and '&' escaped as unicode escapes."""
    text = json.dumps(jsonable(data), ensure_ascii=True, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_report(
    spec: GraphSpec,
    *,
    placement: dict[str, int],
    trace: list[TraceEvent],
    values: dict[str, Any],
    grads: dict[str, Any],
    history: Any = None,
    title: str = "distgraph run",
    batch_size: int = 1,
    status: Mapping[str, Any] | None = None,
) -> str:
    """The report page as an HTML string (see :func:`write_report`)."""
    placement = dict(placement or {})
    groups = build_replay(spec, trace, placement)
    levels = node_levels(spec)
    known = _node_values(spec, values)
    spec_order = {n.name: i for i, n in enumerate(spec.nodes)}
    group_of: dict[str, list[int]] = {}
    for i, group in enumerate(groups):
        for name in group.nodes:
            group_of.setdefault(name, []).append(i)

    def reveal_for(param: str) -> int:
        """Index of the step whose completion produces the gradient of ``param``."""
        source = spec.grads.get(param)
        for name in (source, param):
            for i in group_of.get(name or "", []):
                if groups[i].phase == "backward":
                    return i
        # Forward-only picture: the gradient is complete once every consumer's backward ran.
        consumers = [n.name for n in spec.nodes if param in n.inputs]
        steps = [i for c in consumers for i in group_of.get(c, []) if groups[i].phase == "backward"]
        return max(steps) if steps else len(groups) - 1

    def forward_step(name: str) -> int:
        idx = group_of.get(name, [])
        fwd = [i for i in idx if groups[i].phase != "backward"]
        return (fwd or idx or [len(groups) - 1])[0]

    nodes = [
        {
            "name": n.name,
            "op": n.op,
            "kind": node_kind(spec, n),
            "style": node_style(spec, n),
            "phase": n.phase,
            "level": levels[n.name],
            "worker": placement.get(n.name),
            "shape": format_shape(n),
            "value": format_value(known[n.name]) if n.name in known else None,
            "valueStep": forward_step(n.name),
        }
        for n in spec.nodes
    ]
    value_rows = [
        {
            "name": name,
            "display": format_value(known[name]),
            "number": scalar_number(known[name]),
            "step": forward_step(name),
        }
        for name in sorted(known, key=lambda k: (k not in spec.outputs, spec_order[k]))
    ]
    grad_rows = [
        {
            "name": name,
            "display": format_value(value),
            "number": scalar_number(value),
            "step": reveal_for(name),
        }
        for name, value in grads.items()
    ]
    loss, params = _history_series(history)
    data = {
        "title": title,
        "nodes": nodes,
        "groups": [
            {"phase": g.phase, "level": g.level, "nodes": g.nodes, "workers": g.workers, "ms": g.ms}
            for g in groups
        ],
        "values": value_rows,
        "grads": grad_rows,
        "history": {"loss": loss, "params": params} if history is not None else None,
        "gradOf": spec.grad_of,
    }
    workers = sorted({w for w in placement.values()})
    chips = [
        f"{len(spec.nodes)} nodes",
        f"{len(set(levels.values()))} levels",
        f"{len(workers) or 1} worker{'s' if len(workers) > 1 else ''}",
        f"{len(trace)} trace events",
    ]
    if spec.grad_of:
        chips.append(f"gradient of {spec.grad_of}")
    session = status or {}
    layout = session.get("replicas") or {}
    if int(layout.get("count") or 1) > 1:
        width = int(layout.get("width") or 1)
        chips.append(f"{layout['count']} replicas × {width} worker{'s' if width > 1 else ''}")
    if session.get("shards"):
        chips.append(f"{len(session['shards'])} parameter-server shards")
    scaling = scaling_section(session, {k: spec.params[k].to_numpy() for k in spec.params})
    graph_svg = render_svg(spec, placement=placement or None, batch_size=batch_size)
    training = ""
    if history is not None:
        palette = ["#2563eb", "#db2777", "#ea580c", "#16a34a", "#7c3aed", "#0891b2", "#4b5563"]
        loss_svg = _line_chart(
            {"loss": loss},
            svg_id="loss-curve",
            colours=["#e11d48"],
            log=bool(loss) and min(loss) > 0 and max(loss) / max(min(loss), 1e-300) > 50,
            data_attr="data-loss",
        )
        param_svg = _line_chart(params, svg_id="param-curves", colours=palette * 8)
        legend = "".join(
            f'<span class="key"><i style="background:{palette[i % len(palette)]}"></i>'
            f"{html.escape(name)}</span>"
            for i, name in enumerate(params)
        )
        training = f"""
<section class="card" id="training">
  <h2>Training</h2>
  <div class="epoch-bar">
    <label for="epoch-slider">Epoch</label>
    <input type="range" id="epoch-slider" min="1" max="{max(len(loss), 1)}" value="{max(len(loss), 1)}">
    <span class="stat-inline">Epoch <b id="epoch-value">{len(loss)}</b></span>
    <span class="stat-inline">Loss <b id="epoch-loss">—</b></span>
    <span id="epoch-params"></span>
  </div>
  <div class="charts">
    <figure><figcaption>Loss per epoch</figcaption>{loss_svg}</figure>
    <figure><figcaption>Parameters per epoch <span class="keys">{legend}</span></figcaption>{param_svg}</figure>
  </div>
</section>"""
    css = (_HERE / "report.css").read_text(encoding="utf-8")
    js = (_HERE / "report.js").read_text(encoding="utf-8")
    chip_html = "".join(f"<span class='chip'>{html.escape(c)}</span>" for c in chips)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>
{css}
</style>
</head>
<body>
<header>
  <h1>{html.escape(title)}</h1>
  <div class="chips">{chip_html}</div>
</header>
<main>
<section class="card" id="replay">
  <h2>Replay of the run</h2>
  <p class="muted">Nodes that do not depend on each other run together, one topological level
  per step: the forward wave computes values, the backward wave computes gradients.</p>
  <div class="controls">
    <button id="step" type="button">Step</button>
    <button id="run" type="button">Run</button>
    <button id="reset" type="button">Reset</button>
    <span id="step-label" class="step-label">Step 0 of {len(groups) + 1}</span>
    <span id="phase-label" class="phase-badge">ready</span>
  </div>
  <div class="counters">
    <div class="counter active"><i></i>Active <b id="count-active">0</b></div>
    <div class="counter completed"><i></i>Completed <b id="count-completed">0</b></div>
    <div class="counter waiting"><i></i>Waiting <b id="count-waiting">{len(spec.nodes)}</b></div>
    <div class="counter total">Total nodes <b id="count-total">{len(spec.nodes)}</b></div>
  </div>
  <div class="graph-scroll" id="graph">{graph_svg}</div>
  <div class="panels">
    <div class="panel"><h3>Values <small>forward pass</small></h3>
      <table id="values-table"><tbody></tbody></table></div>
    <div class="panel"><h3>Gradients <small>backward pass{
        f" · ∂{html.escape(spec.grad_of)}/∂·" if spec.grad_of else ""
    }</small></h3>
      <table id="grads-table"><tbody></tbody></table></div>
    <div class="panel"><h3>Execution log</h3><ol id="log"></ol></div>
  </div>
</section>
{training}
{scaling}
<section class="card" id="timeline-card">
  <h2>Timeline</h2>
  <p class="muted">What ran where and when: one lane per worker, the driver and the parameter
  server (with replicas, one per replica too; with shards, one per shard, its stage, commit and
  apply of the step); <span class="swatch fwd"></span>forward, <span class="swatch bwd"></span>backward,
  <span class="swatch xfer"></span>transfer, <span class="swatch upd"></span>update.</p>
  <div class="graph-scroll">{_timeline_svg(trace)}</div>{_bubble_note(trace)}
</section>
</main>
<footer>distgraph · a self-contained report: no network, open it anywhere.</footer>
<script type="application/json" id="report-data">{_embed_json(data)}</script>
<script>
{js}
</script>
</body>
</html>
"""


def write_report(
    path: str | os.PathLike[str],
    spec: GraphSpec,
    *,
    placement: dict[str, int],
    trace: list[TraceEvent],
    values: dict[str, Any],
    grads: dict[str, Any],
    history: Any = None,
    title: str = "distgraph run",
    batch_size: int = 1,
    status: Mapping[str, Any] | None = None,
) -> Path:
    """Write the self-contained HTML report of a run and return its path.

    ``status``: a training session's ``status()`` (``trainer.session.status()``, read before
    closing it); with it the page shows the data-parallel replicas, the parameter-server
    shards and which rows each replica took (see :func:`~distgraph.viz.scaling.scaling_section`).
    The folder must exist: a missing one raises ``ConfigError`` naming it (nothing is created).
    """
    target = output_path(path, "report")
    page = render_report(
        spec,
        placement=placement,
        trace=trace,
        values=values,
        grads=grads,
        history=history,
        title=title,
        batch_size=batch_size,
        status=status,
    )
    target.write_text(page, encoding="utf-8")
    return target
