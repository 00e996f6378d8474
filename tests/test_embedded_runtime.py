"""Several executors in one process share the embedded Ray runtime safely (issue 11.13).

These tests need Ray *not* running when they start (an executor then starts its own embedded
runtime), so they shut down the suite's shared runtime; later modules start it again.
"""

from __future__ import annotations

import pytest
import ray
from raysupport import ensure_ray

import distgraph as dg
from distgraph import models


@pytest.fixture
def no_ray():
    if ray.is_initialized():
        ray.shutdown()
    yield
    if ray.is_initialized():
        ray.shutdown()


def check_runs(ex: dg.RayExecutor) -> None:
    g, feeds = models.seed_graph()
    res = ex.run(g, feeds, grad="z")
    assert res.values == {"z": 7.0} and res.grads == {"x": 3.0, "w": 2.0, "b": 1.0}


@pytest.mark.parametrize("close_first", ["starter", "joiner"])
def test_closing_one_executor_leaves_the_other_working(no_ray, close_first):
    starter = dg.RayExecutor(num_workers=1)
    try:
        joiner = dg.RayExecutor(num_workers=1)  # finds the runtime the first one started
    except BaseException:
        starter.close()
        raise
    try:
        first, second = (starter, joiner) if close_first == "starter" else (joiner, starter)
        check_runs(first)
        first.close()
        assert ray.is_initialized()  # the other executor still uses it
        check_runs(second)
        second.close()
        assert not ray.is_initialized()  # the last one out shuts the embedded runtime down
    finally:
        starter.close()
        joiner.close()


def test_a_runtime_the_user_started_is_left_running(no_ray):
    ensure_ray()
    with dg.RayExecutor(num_workers=1) as ex:
        check_runs(ex)
    assert ray.is_initialized()


def test_a_closed_executor_refuses_work_and_starts_no_runtime(no_ray):
    # Review: a closed executor failed with a raw IndexError, and once the embedded runtime
    # was down a Trainer on it silently started a new Ray that nobody would shut down.
    g = models.mlp_classifier((2, 4, 2), seed=1)
    data = models.spirals(8, seed=1)
    ex = dg.RayExecutor(num_workers=1)
    ex.close()
    assert not ray.is_initialized()  # the precondition: nothing left running
    with pytest.raises(dg.ConfigError, match="closed"):
        check_runs(ex)
    tr = dg.Trainer(g, loss="loss", optimizer=dg.SGD(lr=0.1), executor=ex, progress=False)
    with pytest.raises(dg.ConfigError, match="closed"):
        tr.fit(data, epochs=1, batch_size=8)
    assert tr.step == 0 and not ray.is_initialized()
