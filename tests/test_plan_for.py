"""The one path from a request to a plan (issue 13): compile -> partition -> plan."""

from __future__ import annotations

import dataclasses

import pytest
from graphs import SPREAD_COST, mlp

import distgraph as dg
from distgraph.cost import CostModel
from distgraph.partition import partition
from distgraph.plan import build_plan, plan_for
from distgraph.program import compile_program


def _same(a: dg.Plan, b: dg.Plan) -> None:
    assert a.placement == b.placement and a.strategy == b.strategy
    assert [dataclasses.asdict(t) for t in a.tasks] == [dataclasses.asdict(t) for t in b.tasks]
    assert a.cross_edges == b.cross_edges and a.resident == b.resident


@pytest.mark.parametrize("training", [False, True])
def test_plan_for_is_compile_partition_plan(training):
    g, _, out = mlp()
    prog = compile_program(g, grad=out)
    placement = partition(prog, 3, "round_robin", SPREAD_COST)
    want = build_plan(prog, placement, 3, SPREAD_COST, training=training, strategy="round_robin")
    assert len(set(want.placement.values())) > 1  # a plan over several workers
    got = plan_for(
        g, grad=out, num_workers=3, strategy="round_robin", training=training, cost=SPREAD_COST
    )
    _same(got, want)
    again = plan_for(
        prog, num_workers=3, strategy="round_robin", training=training, cost=SPREAD_COST
    )
    assert again.program is prog  # a compiled program is planned as it is
    _same(again, want)


def test_plan_for_batch_size_keeps_the_cost_model_class():
    class Slow(CostModel):
        pass

    g, _, out = mlp()
    plan = plan_for(g, grad=out, num_workers=2, batch_size=64, cost=Slow(flops_per_second=1e6))
    assert type(plan.cost) is Slow
    assert plan.cost.batch_size == 64 and plan.cost.flops_per_second == 1e6


def test_partition_of_a_graph_is_its_programs():
    g, _, out = mlp()
    full = dg.grad(g, out)
    prog = compile_program(full, grad=full.grad_of)
    assert partition(full, 2, "mincut", SPREAD_COST) == partition(prog, 2, "mincut", SPREAD_COST)
