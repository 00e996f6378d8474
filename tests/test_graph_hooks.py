"""Graph's narrow hooks for autodiff and its read-only views (issue 13)."""

from __future__ import annotations

import numpy as np
import pytest

import distgraph as dg
from distgraph.spec import make_node


def _graph() -> tuple[dg.Graph, dg.Node]:
    g = dg.Graph()
    x = g.input("x", shape=(3,))
    w = g.param("w", np.array([1.0, 2.0, 3.0]))
    return g, g.output("y", (x * w).sum())


def test_views_are_read_only_and_not_copies():
    g, _ = _graph()
    assert list(g.node_map) == [n.name for n in g.nodes]
    assert g.param_values["w"] is g.param_values["w"]  # the array itself, no copy
    with pytest.raises(TypeError):
        g.node_map["z"] = g.nodes[0]  # type: ignore[index]
    with pytest.raises(TypeError):
        g.param_values["w"] = np.zeros(3)  # type: ignore[index]
    assert g.params["w"] is not g.param_values["w"]  # params still hands out copies


def test_attach_backward_refuses_a_taken_name_and_a_second_pass():
    g, _ = _graph()
    version, size = g.version, len(g)
    fine = make_node("grad:y", "ones_like", ["y"], {}, (), "float64", "backward", "y")
    clash = make_node("y", "ones_like", ["y"], {}, (), "float64", "backward", "y")
    with pytest.raises(dg.GraphError, match=r"'y'.*taken"):
        g.attach_backward([fine, clash], {}, "y")
    assert len(g) == size and "grad:y" not in g  # the good node was not added either
    assert g.version == version and g.grad_of is None
    full = dg.grad(g, "y")
    with pytest.raises(dg.GraphError, match="already holds the backward pass"):
        full.attach_backward([], {}, "y")


def test_without_backward_is_the_forward_graph():
    g, _ = _graph()
    full = dg.grad(g, "y")
    assert full.grad_of == "y" and len(full) > len(g)
    fwd = full.without_backward()
    assert [n.name for n in fwd.nodes] == [n.name for n in g.nodes]
    assert fwd.grads == {} and fwd.grad_of is None and fwd.outputs == g.outputs


def test_check_grads_leaves_the_graph_unchanged():
    """check_grads used to bump the graph's own params (a new version each time, and a bumped
    value left behind if a run failed); it evaluates bumped copies instead."""
    g, _ = _graph()
    version, before = g.version, g.params
    dg.testing.check_grads(g, {"x": np.array([0.5, -1.0, 2.0])}, of="y")
    assert g.version == version
    assert all(np.array_equal(before[k], v) for k, v in g.params.items())
