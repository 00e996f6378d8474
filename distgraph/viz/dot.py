"""The graph in Graphviz DOT, for people who have ``dot`` installed (nothing here needs it)."""

from __future__ import annotations

from ..spec import GraphSpec
from ._model import (
    KIND_FILL,
    KIND_STROKE,
    format_bytes,
    format_shape,
    graph_edges,
    node_kind,
    node_levels,
    node_style,
    order_columns,
)


def _quote(text: str) -> str:
    """A DOT double-quoted string."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(spec: GraphSpec, placement: dict[str, int] | None = None, batch_size: int = 1) -> str:
    """DOT text: left-to-right, one rank per level, coloured kinds, cross-worker edges labelled."""
    placement = dict(placement or {})
    levels = node_levels(spec)
    lines = [
        "digraph distgraph {",
        "  rankdir=LR;",
        '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontcolor="white"];',
        '  edge [color="#94a3b8"];',
    ]
    for node in spec.nodes:
        style = node_style(spec, node)
        label = f"{node.name}\n{node.op}\n{format_shape(node)}"
        attrs = [
            f"label={_quote(label)}",
            f"fillcolor={_quote(KIND_FILL[style])}",
            f"color={_quote(KIND_STROKE[style])}",
            f"tooltip={_quote(f'{node_kind(spec, node)}, level {levels[node.name]}')}",
        ]
        if node.name in placement:
            worker = placement[node.name]
            attrs.append(f'xlabel={_quote(f"W{worker}")}, fontcolor="white"')
        lines.append(f"  {_quote(node.name)} [{', '.join(attrs)}];")
    for k, column in enumerate(order_columns(spec, levels)):
        members = "; ".join(_quote(name) for name in column)
        lines.append(f"  {{ rank=same; {members}; }}  // level {k}")
    for edge in graph_edges(spec, placement, batch_size):
        arrow = f"  {_quote(edge.src)} -> {_quote(edge.dst)}"
        if edge.cross:
            label = _quote(format_bytes(edge.nbytes))
            lines.append(f'{arrow} [label={label}, color="#e11d48", style=dashed];')
        else:
            lines.append(f"{arrow};")
    lines.append("}")
    return "\n".join(lines) + "\n"
