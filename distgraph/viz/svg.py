"""The graph as an SVG picture, written by hand: columns by topological level, coloured kinds.

Every element a reader (or a test, or the report's script) cares about carries ``data-*``
attributes: ``g.node[data-node, data-kind, data-phase, data-worker]``, ``g.edge[data-src,
data-dst]`` and ``g.edge.cross[data-bytes]``; so the picture is also machine-readable.
"""

from __future__ import annotations

from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

from ..spec import GraphSpec, NodeSpec
from ._model import (
    KIND_FILL,
    KIND_LABEL,
    KIND_STROKE,
    OP_SYMBOLS,
    format_bytes,
    format_shape,
    graph_edges,
    node_kind,
    node_levels,
    node_style,
    order_columns,
    worker_colour,
)

#: Above this many nodes the boxes shrink and drop their third line; the SVG stays valid.
READABLE_NODES = 200
FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif"
EDGE_COLOUR = "#94a3b8"
CROSS_COLOUR = "#e11d48"


@dataclass(frozen=True)
class _Geometry:
    box_w: int
    box_h: int
    col_gap: int
    row_gap: int
    name_size: int
    small_size: int
    info_line: bool


_NORMAL = _Geometry(132, 58, 92, 22, 14, 11, True)
_COMPACT = _Geometry(92, 34, 60, 10, 10, 8, False)


def _attr(name: str, value: object) -> str:
    return f" {name}={quoteattr(str(value))}"


def _truncate(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


def _op_label(spec: GraphSpec, node: NodeSpec) -> str:
    kind = node_kind(spec, node)
    if node.op in ("input", "param", "const"):
        base = node.op
    else:
        symbol = OP_SYMBOLS.get(node.op)
        base = f"{symbol} {node.op}" if symbol else node.op
    return f"{base} · output" if kind == "output" else base


def _legend(
    x: int, y: int, styles: list[str], workers: list[int], has_cross: bool
) -> tuple[str, int]:
    """Legend row; returns its SVG and its width."""
    parts = [f'<g class="legend"{_attr("transform", f"translate({x},{y})")}>']
    cx = 0
    for style in styles:
        label = KIND_LABEL[style]
        parts.append(
            f'<g class="legend-item"{_attr("data-kind", style)}>'
            f'<rect{_attr("x", cx)} y="0" width="16" height="16" rx="4"'
            f"{_attr('fill', KIND_FILL[style])}{_attr('stroke', KIND_STROKE[style])}/>"
            f'<text{_attr("x", cx + 22)} y="13" font-size="12" fill="#334155">'
            f"{escape(label)}</text></g>"
        )
        cx += 22 + int(len(label) * 6.6) + 22
    for w in workers:
        parts.append(
            f'<g class="legend-worker"{_attr("data-worker", w)}>'
            f'<rect{_attr("x", cx)} y="0" width="30" height="16" rx="8"'
            f"{_attr('fill', worker_colour(w))}/>"
            f'<text{_attr("x", cx + 15)} y="12" font-size="10" font-weight="700" fill="#fff"'
            f' text-anchor="middle">W{w}</text></g>'
        )
        cx += 36
    if workers:
        cx += 16
    if has_cross:
        parts.append(
            f'<path{_attr("d", f"M{cx},8 h30")} stroke="{CROSS_COLOUR}" stroke-width="2"'
            f' stroke-dasharray="5 3" fill="none"/>'
            f'<text{_attr("x", cx + 36)} y="13" font-size="12" fill="#334155">'
            "cross-worker edge (bytes moved)</text>"
        )
        cx += 36 + 200
    parts.append("</g>")
    return "".join(parts), cx


def render_svg(
    spec: GraphSpec,
    *,
    placement: dict[str, int] | None = None,
    batch_size: int = 1,
    title: str | None = None,
) -> str:
    """Draw ``spec`` as a standalone SVG document (columns = levels, badges = workers)."""
    geo = _NORMAL if len(spec.nodes) <= READABLE_NODES else _COMPACT
    levels = node_levels(spec)
    columns = order_columns(spec, levels)
    placement = dict(placement or {})
    edges = graph_edges(spec, placement, batch_size)

    styles = ["variable", "operation", "output"]
    if any(node_style(spec, n) == "backward" for n in spec.nodes):
        styles.append("backward")
    workers = sorted({placement[n.name] for n in spec.nodes if n.name in placement})
    margin = 24
    top = margin
    header = []
    if title:
        header.append(
            f'<text class="title"{_attr("x", margin)}{_attr("y", top + 18)} font-size="20"'
            f' font-weight="700" fill="#0f172a">{escape(title)}</text>'
        )
        top += 34
    legend, legend_w = _legend(margin, top, styles, workers, any(e.cross for e in edges))
    header.append(legend)
    top += 34
    level_label_h = 22
    top += level_label_h

    pitch_y = geo.box_h + geo.row_gap
    pitch_x = geo.box_w + geo.col_gap
    rows = max((len(c) for c in columns), default=0)
    pos: dict[str, tuple[float, float]] = {}
    for k, column in enumerate(columns):
        offset = (rows - len(column)) * pitch_y / 2
        for i, name in enumerate(column):
            pos[name] = (margin + k * pitch_x, top + offset + i * pitch_y)
    width = max(margin * 2 + len(columns) * pitch_x - geo.col_gap, margin * 2 + legend_w, 240)
    height = top + max(rows * pitch_y - geo.row_gap, 0) + margin

    out = [
        '<svg xmlns="http://www.w3.org/2000/svg" class="distgraph-graph"'
        f"{_attr('width', int(width))}{_attr('height', int(height))}"
        f"{_attr('viewBox', f'0 0 {int(width)} {int(height)}')}"
        f"{_attr('font-family', FONT)}{_attr('data-nodes', len(spec.nodes))}"
        f"{_attr('data-levels', len(columns))}>",
        "<defs>"
        f'<marker id="dg-arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7"'
        f' markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z"'
        f' fill="{EDGE_COLOUR}"/></marker>'
        f'<marker id="dg-arrow-cross" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7"'
        f' markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z"'
        f' fill="{CROSS_COLOUR}"/></marker>'
        "</defs>",
        '<rect class="background" width="100%" height="100%" fill="#ffffff"/>',
        *header,
    ]
    for k, column in enumerate(columns):
        if column:
            out.append(
                f'<text class="level-label"{_attr("x", margin + k * pitch_x + geo.box_w / 2)}'
                f'{_attr("y", top - 8)} font-size="11" fill="#64748b"'
                f' text-anchor="middle">level {k}</text>'
            )

    out.append('<g class="edges">')
    for edge in edges:
        (x1, y1), (x2, y2) = pos[edge.src], pos[edge.dst]
        sx, sy = x1 + geo.box_w, y1 + geo.box_h / 2
        tx, ty = x2 - 2, y2 + geo.box_h / 2
        bend = max(30.0, (tx - sx) / 2)
        d = f"M{sx:.1f},{sy:.1f} C{sx + bend:.1f},{sy:.1f} {tx - bend:.1f},{ty:.1f} {tx:.1f},{ty:.1f}"
        attrs = _attr("data-src", edge.src) + _attr("data-dst", edge.dst)
        if not edge.cross:
            out.append(
                f'<g class="edge"{attrs}><path class="wire"{_attr("d", d)} fill="none"'
                f' stroke="{EDGE_COLOUR}" stroke-width="1.6" marker-end="url(#dg-arrow)"/></g>'
            )
            continue
        label = format_bytes(edge.nbytes)
        mx, my = (sx + tx) / 2, (sy + ty) / 2
        lw = len(label) * 6.4 + 10
        out.append(
            f'<g class="edge cross"{attrs}{_attr("data-bytes", edge.nbytes)}'
            f"{_attr('data-src-worker', placement[edge.src])}"
            f"{_attr('data-dst-worker', placement[edge.dst])}>"
            f'<path class="wire"{_attr("d", d)} fill="none" stroke="{CROSS_COLOUR}"'
            ' stroke-width="1.8" stroke-dasharray="6 3" marker-end="url(#dg-arrow-cross)"/>'
            f'<rect class="label-bg"{_attr("x", f"{mx - lw / 2:.1f}")}{_attr("y", f"{my - 9:.1f}")}'
            f'{_attr("width", f"{lw:.1f}")} height="16" rx="4" fill="#fff1f2"'
            f' stroke="{CROSS_COLOUR}" stroke-width="0.8"/>'
            f'<text class="edge-label"{_attr("x", f"{mx:.1f}")}{_attr("y", f"{my + 3:.1f}")}'
            f' font-size="10" fill="#9f1239" text-anchor="middle">{escape(label)}</text></g>'
        )
    out.append("</g>")

    out.append('<g class="nodes">')
    max_chars = int(geo.box_w / (geo.name_size * 0.62))
    for node in spec.nodes:
        x, y = pos[node.name]
        style = node_style(spec, node)
        worker = placement.get(node.name)
        attrs = (
            _attr("data-node", node.name)
            + _attr("data-kind", node_kind(spec, node))
            + _attr("data-style", style)
            + _attr("data-phase", node.phase)
            + _attr("data-op", node.op)
            + _attr("data-level", levels[node.name])
        )
        if worker is not None:
            attrs += _attr("data-worker", worker)
        tip = f"{node.name}: {node.op}, {format_shape(node)}, level {levels[node.name]}"
        if worker is not None:
            tip += f", worker {worker}"
        cx = geo.box_w / 2
        name_y = geo.box_h * (0.36 if geo.info_line else 0.45)
        op_y = geo.box_h * (0.62 if geo.info_line else 0.82)
        out.append(
            f'<g class="node"{attrs}{_attr("transform", f"translate({x:.1f},{y:.1f})")}>'
            f"<title>{escape(tip)}</title>"
            f'<rect class="shape"{_attr("width", geo.box_w)}{_attr("height", geo.box_h)} rx="10"'
            f"{_attr('fill', KIND_FILL[style])}{_attr('stroke', KIND_STROKE[style])}"
            ' stroke-width="1.5"/>'
            f'<text class="name"{_attr("x", cx)}{_attr("y", f"{name_y:.1f}")}'
            f'{_attr("font-size", geo.name_size)} font-weight="700" fill="#ffffff"'
            f' text-anchor="middle">{escape(_truncate(node.name, max_chars))}</text>'
            f'<text class="op"{_attr("x", cx)}{_attr("y", f"{op_y:.1f}")}'
            f'{_attr("font-size", geo.small_size)} fill="#ecfeff" fill-opacity="0.92"'
            f' text-anchor="middle">{escape(_truncate(_op_label(spec, node), max_chars + 4))}</text>'
        )
        if geo.info_line:
            out.append(
                f'<text class="info"{_attr("x", cx)}{_attr("y", f"{geo.box_h * 0.86:.1f}")}'
                f'{_attr("font-size", geo.small_size - 1)} fill="#ffffff" fill-opacity="0.85"'
                f' text-anchor="middle">{escape(format_shape(node))}</text>'
            )
        if worker is not None:
            bw, bh = (30, 16) if geo.info_line else (22, 12)
            out.append(
                f'<g class="worker-badge"{_attr("data-worker", worker)}'
                f"{_attr('transform', f'translate({geo.box_w - bw + 6},{-bh / 2})')}>"
                f"<rect{_attr('width', bw)}{_attr('height', bh)}{_attr('rx', bh / 2)}"
                f'{_attr("fill", worker_colour(worker))} stroke="#ffffff" stroke-width="1.5"/>'
                f"<text{_attr('x', bw / 2)}{_attr('y', bh * 0.74)}"
                f'{_attr("font-size", 10 if geo.info_line else 8)} font-weight="700"'
                f' fill="#ffffff" text-anchor="middle">W{worker}</text></g>'
            )
        out.append("</g>")
    out.append("</g></svg>")
    return "\n".join(out)
