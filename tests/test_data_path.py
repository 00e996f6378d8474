"""Where work runs and which bytes reach the driver (issue 11 item 14, issue 12 item 11)."""

from __future__ import annotations

import numpy as np
import pytest
from graphs import SPREAD_COST, towers
from raysupport import ensure_ray

import distgraph as dg


@pytest.fixture(scope="module")
def ex2():
    ensure_ray()
    with dg.RayExecutor(num_workers=2, strategy="mincut", cost=SPREAD_COST) as ex:
        yield ex


def test_worker_trace_events_say_where_they_ran(ex2):
    g, feeds, out = towers(n=2)
    res = ex2.run(g, feeds, grad=out, trace=True)
    info = {i["index"]: i for i in ex2.worker_info}
    mine = [e for e in res.trace if e.kind in ("node", "call") and e.worker is not None]
    assert {e.worker for e in mine} == {0, 1}  # both workers ran nodes: a split placement
    for e in mine:
        assert e.args["host"] == info[e.worker]["node_ip"], e
        assert e.args["node_id"] == info[e.worker]["node_id"], e
    np.testing.assert_array_equal(
        res.values["loss"], dg.LocalExecutor().run(g, feeds).values["loss"]
    )
