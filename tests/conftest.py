"""Shared fixtures; graph builders live in ``tests/graphs.py`` (importable as ``graphs``)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

# Test modules import the builders as ``from graphs import ...`` whichever import mode runs them.
sys.path.insert(0, os.path.dirname(__file__))

from graphs import BUILDERS, Built


@pytest.fixture(params=sorted(BUILDERS))
def built_graph(request: pytest.FixtureRequest) -> Built:
    """Each builder of ``graphs.BUILDERS`` in turn: ``(graph, feeds, grad_output)``."""
    return BUILDERS[request.param]()


@pytest.fixture
def seed_graph() -> Built:
    """The seed's z = x * w + b."""
    return BUILDERS["seed"]()


@pytest.fixture(scope="module")
def fresh_ray_runtime() -> Iterator[None]:
    """A module that starts on a fresh shared Ray runtime (``pytestmark =
    pytest.mark.usefixtures("fresh_ray_runtime")``): in the full suite, the modules before
    the compiled-graph ones (thousands of compiled steps, killed actors, a multi-node cluster)
    left the shared runtime unable to serve them, though each module passes alone."""
    import ray

    ray.shutdown()  # raysupport.ensure_ray() starts the next one
    yield


@pytest.fixture
def pipeline_executions(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The step ids each compiled pipeline graph executed, in order (an execution that raised
    is not counted)."""
    from distgraph.runtime.ray.compiled_pipeline import PipelineGraph

    steps: list[int] = []
    real = PipelineGraph.execute

    def execute(self: PipelineGraph, control: tuple, timeout: float) -> object:
        out = real(self, control, timeout)
        steps.append(int(control[0]))
        return out

    monkeypatch.setattr(PipelineGraph, "execute", execute)
    return steps
