"""A step's calls on one worker run in plan order, or fail loudly (issue 11.12).

The worker's first call of a step takes the new params and starts the step's values; later
calls read what earlier ones left. These tests drive ``Worker`` in-process (no Ray) and deliver
calls the way a reordering runtime would: a call whose predecessor has not finished must not
compute anything from an incomplete env.
"""

from __future__ import annotations

import numpy as np
import pytest

import distgraph as dg
from distgraph.plan import build_plan
from distgraph.runtime.protocol import CallHeader, pack
from distgraph.runtime.worker import CallOrderError, Worker

PLAN = 1


def ping_pong():
    """d = (x * w + 1) * w with the product and d on worker 0 and the +1 on worker 1."""
    g = dg.Graph()
    x = g.input("x")
    w = g.param("w", 2.0)
    c = g.apply("add", x * w, 1.0, name="c")
    g.output("d", c * w)
    prog = dg.LocalExecutor().program(g, ["d"])
    plan = build_plan(prog, {n: 1 if n == "c" else 0 for n in prog.order}, 2)
    # Worker 0 has two calls per step (before and after worker 1's): what the order is about.
    assert [t.worker for t in plan.tasks] == [0, 1, 0]
    return g, plan


def workers(g, plan):
    out = []
    for i in range(2):
        wk = Worker(i)
        resident = {
            n: g.params[n] if n in g.params else plan.program.constants[n] for n in plan.resident[i]
        }
        wk.install(PLAN, plan.program, [t for t in plan.tasks if t.worker == i], resident)
        out.append(wk)
    return out


def call(wks, task, step, outs, feeds, update=None, check_finite=False):
    """Run one task as the driver would submit it; keeps its outputs in ``outs``."""
    header = CallHeader(
        PLAN,
        step,
        task.id,
        check_finite=check_finite,
        update=update is not None,
        inline={n: feeds[n] for n in task.feeds},
        imports=len(task.imports),
    )
    imported = [outs[src][slot] for src, slot, _ in task.imports]
    got = wks[task.worker].run_task(*pack(header, update, (), imported))
    outs[task.id] = list(got) if isinstance(got, tuple) else [got]
    return got


def run_in_order(wks, plan, step, feeds, update):
    outs = {}
    first = True
    for t in plan.tasks:
        call(wks, t, step, outs, feeds, update if (t.worker == 0 and first) else None)
        first = first and t.worker != 0
    return outs


def test_calls_in_order_compute_with_the_new_params():
    g, plan = ping_pong()
    wks = workers(g, plan)
    outs = run_in_order(wks, plan, 1, {"x": 2.0}, {"w": np.float64(3.0)})
    assert outs[plan.tasks[2].id][0]["d"] == (2.0 * 3.0 + 1.0) * 3.0
    assert wks[0].held_steps() == [] and wks[1].held_steps() == []


def test_a_call_delivered_before_its_predecessor_computes_nothing():
    g, plan = ping_pong()
    t0, _t1, t2 = plan.tasks
    feeds, update = {"x": 2.0}, {"w": np.float64(3.0)}
    # The values worker 0's second call imports, computed by a pair that ran in order.
    outs = run_in_order(workers(g, plan), plan, 1, feeds, update)
    wks = workers(g, plan)
    with pytest.raises(CallOrderError, match=r"worker 0: call 1 of step 1"):
        call(wks, t2, 1, outs, feeds)  # arrives before worker 0's first call of the step
    assert wks[0].held_steps() == []  # it started nothing
    # The first call still runs when it comes; the step then fails at the driver.
    assert call(wks, t0, 1, {}, feeds, update) is not None


def test_calls_after_a_failed_call_report_its_error():
    g, plan = ping_pong()
    t0, _t1, t2 = plan.tasks
    wks = workers(g, plan)
    good = run_in_order(workers(g, plan), plan, 1, {"x": 2.0}, {"w": np.float64(3.0)})
    with pytest.raises(dg.NonFiniteError) as first:
        call(wks, t0, 1, {}, {"x": np.nan}, {"w": np.float64(3.0)}, check_finite=True)
    # Worker 0's second call of the step: its own inputs are fine, its predecessor failed.
    with pytest.raises(dg.NonFiniteError) as later:
        call(wks, t2, 1, good, {"x": np.nan})
    assert later.value is first.value
    assert wks[0].held_steps() == []


def test_a_step_run_again_starts_from_the_new_params():
    g, plan = ping_pong()
    t0 = plan.tasks[0]
    wks = workers(g, plan)
    call(wks, t0, 5, {}, {"x": 2.0}, {"w": np.float64(3.0)})  # an attempt abandoned here
    outs = run_in_order(wks, plan, 5, {"x": 2.0}, {"w": np.float64(4.0)})  # same step id
    assert outs[plan.tasks[2].id][0]["d"] == (2.0 * 4.0 + 1.0) * 4.0
    assert wks[0].held_steps() == []


def test_the_ray_worker_actor_runs_calls_in_submission_order():
    from distgraph.runtime.ray.actors import WorkerActor

    # Ray refuses this setting with max_concurrency > 1: the step calls share one thread.
    assert WorkerActor._default_options["allow_out_of_order_execution"] is False
