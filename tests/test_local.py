"""The reference executor: thread-count independence, traces, pruning and result types."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from graphs import BUILDERS, random_graphs
from hypothesis import HealthCheck, given, settings

import distgraph as dg


def assert_identical(a: dg.Result, b: dg.Result) -> None:
    """Bit-for-bit equal values and gradients, same types and dtypes."""
    assert list(a.values) == list(b.values) and list(a.grads) == list(b.grads)
    for x, y in [
        *zip(a.values.values(), b.values.values()),
        *zip(a.grads.values(), b.grads.values()),
    ]:
        assert type(x) is type(y)
        assert np.asarray(x).dtype == np.asarray(y).dtype
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def test_threads_give_bit_identical_results_on_a_wide_graph():
    g, feeds, out = BUILDERS["wide"]()
    with dg.LocalExecutor(threads=1) as one, dg.LocalExecutor(threads=4) as four:
        ref = one.run(g, feeds, grad=out)
        for _ in range(5):  # thread scheduling differs run to run; results must not
            assert_identical(ref, four.run(g, feeds, grad=out))


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_threads_match_on_every_builder(name):
    g, feeds, out = BUILDERS[name]()
    with dg.LocalExecutor(threads=4) as four:
        assert_identical(dg.LocalExecutor().run(g, feeds, grad=out), four.run(g, feeds, grad=out))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_graphs())
def test_threads_match_on_random_graphs(built):
    g, feeds, out = built
    with dg.LocalExecutor(threads=3) as three:
        assert_identical(dg.LocalExecutor().run(g, feeds, grad=out), three.run(g, feeds, grad=out))


@pytest.mark.parametrize("threads", [1, 4])
def test_trace_has_one_event_per_node(threads):
    g, feeds, out = BUILDERS["wide"]()
    with dg.LocalExecutor(threads=threads) as ex:
        res = ex.run(g, feeds, grad=out, trace=True)
    full = dg.grad(g, out)
    computed = {n.name: n for n in full.nodes if n.op not in ("input", "param", "const")}
    names = [e.name for e in res.trace]
    assert sorted(names) == sorted(computed)  # every computed node exactly once
    level_of = {n: i for i, lv in enumerate(res.levels) for n in lv}
    for e in res.trace:
        assert e.kind == "node" and e.worker == 0
        assert e.phase == computed[e.name].phase
        assert e.phase in ("forward", "backward")
        assert e.level == level_of[e.name]
        assert isinstance(e.start, float) and e.start <= e.end
        assert e.op == computed[e.name].op or e.op.startswith("vjp(")
    phases = {e.phase for e in res.trace}
    assert phases == {"forward", "backward"}
    # Levels run in order: every event of level k ends before any event of level k+1 starts.
    by_level: dict[int, list[dg.TraceEvent]] = {}
    for e in res.trace:
        by_level.setdefault(e.level, []).append(e)
    ks = sorted(by_level)
    for k, k1 in itertools.pairwise(ks):
        assert max(e.end for e in by_level[k]) <= min(e.start for e in by_level[k1])
    assert all(e.phase == "forward" for k in ks[: len(g.levels()) - 1] for e in by_level[k])


def test_trace_is_empty_unless_asked(seed_graph):
    g, feeds, out = seed_graph
    assert dg.LocalExecutor().run(g, feeds, grad=out).trace == []


def test_only_needed_nodes_run():
    g = dg.Graph()
    x = g.input("x")
    unused = g.input("unused")
    g.output("a", x * 2.0)
    g.output("b", dg.exp(unused))
    res = dg.LocalExecutor().run(g, {"x": 1.0}, outputs=["a"], trace=True)
    assert res.values == {"a": 2.0}
    assert [e.op for e in res.trace] == ["mul"]
    # Feeding an input the request does not need is fine; a name the graph lacks is not.
    assert dg.LocalExecutor().run(g, {"x": 1.0, "unused": 0.0}, outputs="a").values == {"a": 2.0}


def test_result_types():
    g = dg.Graph()
    x = g.input("x", shape=(None, 2))
    w = g.param("w", np.array([[1.0], [2.0]]))
    s = g.param("s", 0.5)
    g.output("y", x @ w * s)
    g.output("total", (x @ w).sum() * s)
    res = dg.LocalExecutor().run(g, {"x": [[1, 2], [3, 4]]}, grad="total")
    assert type(res.values["total"]) is float and res.values["total"] == 8.0
    assert isinstance(res.values["y"], np.ndarray) and res.values["y"].flags.writeable
    assert type(res.grads["s"]) is float and res.grads["s"] == 16.0
    np.testing.assert_array_equal(res.grads["w"], [[2.0], [3.0]])
    np.testing.assert_array_equal(res.grads["x"], [[0.5, 1.0], [0.5, 1.0]])
    assert res.placement and set(res.placement.values()) == {0}


def test_running_does_not_change_params_or_feeds():
    g, feeds, out = BUILDERS["mlp"]()
    params = g.params
    x = feeds["x"].copy()
    dg.LocalExecutor(threads=2).run(g, feeds, grad=out)
    assert all(np.array_equal(params[k], g.params[k]) for k in params)
    np.testing.assert_array_equal(feeds["x"], x)


def test_errors_in_threads_name_the_node():
    g = dg.Graph()
    x, y = g.input("x"), g.input("y")
    g.output("ok", dg.tanh(x))
    g.output("bad", g.apply("matmul", x, y, name="bad_matmul"))
    with dg.LocalExecutor(threads=4) as ex, pytest.raises(dg.ExecutionError, match="bad_matmul"):
        ex.run(g, {"x": np.ones((2, 3)), "y": np.ones((4, 2))})
