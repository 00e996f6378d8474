"""The runtime's layout rules (issue 13): Ray stays in ``runtime/ray/``, ``run()`` is written once."""

from __future__ import annotations

import ast
from pathlib import Path

import distgraph as dg
from distgraph.runtime import base

RUNTIME = Path(base.__file__).parent


def _imports_ray(path: Path) -> list[int]:
    """Lines of ``path`` that import ``ray`` (at any depth: a lazy import counts too)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        else:
            continue
        if any(n == "ray" or n.startswith("ray.") for n in names):
            lines.append(node.lineno)
    return lines


def test_only_the_ray_package_imports_ray():
    outside = sorted(p for p in RUNTIME.glob("*.py"))
    inside = sorted((RUNTIME / "ray").glob("*.py"))
    assert {p.name for p in outside} >= {"worker.py", "base.py", "local.py"}
    assert any(_imports_ray(p) for p in inside)  # the check can see an import at all
    offenders = {p.name: _imports_ray(p) for p in outside if _imports_ray(p)}
    assert offenders == {}, f"runtime modules outside runtime/ray/ import ray: {offenders}"


def test_run_is_written_once():
    from distgraph.runtime.ray import RayExecutor

    for cls in (dg.LocalExecutor, RayExecutor):
        assert "run" not in vars(cls), f"{cls.__name__} writes its own run()"
        assert "_evaluate" in vars(cls), f"{cls.__name__} does not implement _evaluate"
    assert dg.LocalExecutor.run is base.Executor.run is RayExecutor.run
