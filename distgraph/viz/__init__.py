"""Pictures of graphs and runs: SVG and DOT of a graph, a self-contained HTML report of a run."""

from .dot import to_dot as to_dot
from .report import build_replay as build_replay
from .report import render_report as render_report
from .report import write_report as write_report
from .svg import render_svg as render_svg

__all__ = ["build_replay", "render_report", "render_svg", "to_dot", "write_report"]
