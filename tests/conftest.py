"""Shared fixtures; graph builders live in ``tests/graphs.py`` (importable as ``graphs``)."""

from __future__ import annotations

import os
import sys

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
