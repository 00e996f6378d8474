"""Compiled pipelined training (issue 16): GPipe and 1F1B micro-batch schedules, and replicas
of pipelines, run as one Ray Compiled Graph per step (one node per worker action, the
parameter server's update included), bit-identical to the same schedule on actor calls."""

from __future__ import annotations

import itertools
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import slow_ops  # noqa: F401 - registers the "stall" op in this process too
from raysupport import ensure_ray

import distgraph as dg
from distgraph import models
from distgraph.dataparallel import declare_rowwise
from distgraph.functional import cross_entropy, relu
from distgraph.pipeline import make_schedule, peak_inflight
from distgraph.stageplan import StagePlan

TESTS = str(Path(__file__).resolve().parent)
# 96 rows in batches of 25: 4 steps an epoch, the last of 21 rows, so micro-batches (and
# replica shards) are uneven: 25 rows in 3 micro-batches are 9 / 8 / 8.
BATCH, EPOCHS = 25, 3
STEPS = 4 * EPOCHS


pytestmark = pytest.mark.usefixtures("fresh_ray_runtime")


def _mlp(layers: int = 4) -> dg.Graph:
    return models.mlp_classifier((2,) + (8,) * layers + (3,), seed=3)


def _data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    return {"x": rng.standard_normal((96, 2)), "y": rng.integers(0, 3, size=96)}


@pytest.fixture(scope="module")
def executors():
    ensure_ray()
    exs = {
        p: dg.RayExecutor(
            num_workers=p, strategy="pipeline", microbatches=2, resources_per_worker={"CPU": 0.5}
        )
        for p in (2, 3)
    }
    yield exs
    for ex in exs.values():
        ex.close()


def _fit(ex, g, opt, epochs=EPOCHS, batch=BATCH, trace=False, callback=None) -> dg.Trainer:
    tr = dg.Trainer(g, loss="loss", optimizer=opt, executor=ex, progress=False, trace=trace)
    tr.fit(_data(), epochs=epochs, batch_size=batch, seed=7, callback=callback)
    return tr


def _assert_identical(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert np.array_equal(got[k], want[k]), k


def _assert_every_worker_ran_every_step(tr: dg.Trainer, workers: int, steps: int) -> None:
    peaks = tr.session.microbatch_peaks()
    assert len(peaks) == workers
    for w, per_step in enumerate(peaks):
        assert sorted(per_step) == list(range(1, steps + 1)), w
        assert min(per_step.values()) >= 1, w


OPTS = {"sgd": lambda: dg.SGD(lr=0.05), "adam": lambda: dg.Adam(lr=0.01)}


@pytest.mark.parametrize("opt", sorted(OPTS))
@pytest.mark.parametrize(
    "p, m, schedule",
    [(2, 2, "gpipe"), (2, 4, "1f1b"), (3, 3, "1f1b"), (3, 2, "gpipe"), (3, 4, "gpipe")],
)
def test_compiled_pipeline_equals_calls_and_local(
    executors, pipeline_executions, p, m, schedule, opt
):
    ex = executors[p]
    ex.microbatches, ex.schedule = m, schedule
    ref = dg.Trainer(_mlp(), loss="loss", optimizer=OPTS[opt](), progress=False)
    ref.fit(_data(), epochs=EPOCHS, batch_size=BATCH, seed=7)
    runs = {}
    try:
        for transport in ("calls", "compiled"):
            ex.transport = transport
            pipeline_executions.clear()
            tr = _fit(ex, _mlp(), OPTS[opt]())
            s = tr.session
            plan = s.plan
            # Preconditions: a real pipeline of p stages and m micro-batches; every worker ran
            # actions in every step; under "compiled", every step from the second one ran as
            # the compiled graph (one node per action).
            assert isinstance(plan, StagePlan) and plan.stages == tuple(range(p))
            assert plan.microbatches == m and plan.schedule_name == schedule
            assert tr.applied_steps == list(range(1, STEPS + 1))
            _assert_every_worker_ran_every_step(tr, p, STEPS)
            if transport == "compiled":
                assert pipeline_executions == list(range(2, STEPS + 1))
                graph = s.compiled.graph
                assert s.compiled.last_reason == "" and graph is not None
                assert graph.shape == (m,) and graph.n_actions == 2 * p * m
                assert "compiled graph of the pipeline" in s.explain_transport()
            else:
                assert pipeline_executions == []
            runs[transport] = (tr.params, tr.history.loss)
            tr.close()
    finally:
        ex.transport = "calls"
    (calls, calls_loss), (compiled, compiled_loss) = runs["calls"], runs["compiled"]
    _assert_identical(compiled, calls)
    assert compiled_loss == calls_loss
    for k, v in ref.params.items():
        np.testing.assert_allclose(compiled[k], v, rtol=1e-12, atol=0, err_msg=k)
    np.testing.assert_allclose(compiled_loss, ref.history.loss, rtol=1e-12)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_ray_runs_each_workers_actions_in_schedule_order(executors, pipeline_executions, schedule):
    """Ray binds an actor's nodes in order and runs them so: the trace shows each worker's
    actions in its schedule's order, and 1F1B holds at most p micro-batches (GPipe m)."""
    p, m = 3, 4
    ex = executors[p]
    ex.microbatches, ex.schedule, ex.transport = m, schedule, "compiled"
    try:
        tr = _fit(ex, _mlp(), dg.SGD(lr=0.05), epochs=1, batch=48, trace=True)  # 2 steps
        assert pipeline_executions == [2]  # the traced step ran compiled
        acts = sorted((e for e in tr.last_trace if "action" in e.args), key=lambda e: e.start)
        order = {w: [e.name for e in acts if e.worker == w] for w in range(p)}
        sched = make_schedule(schedule, p, m)
        assert order == {s: [a.label for a in sched[s]] for s in range(p)}
        peaks = [d[2] for d in tr.session.microbatch_peaks()]
        assert peaks == peak_inflight(sched)
        assert peaks == ([m] * p if schedule == "gpipe" else [3, 2, 1])
        tr.close()
    finally:
        ex.transport = "calls"


@pytest.fixture(scope="module")
def four_workers():
    ensure_ray()
    ex = dg.RayExecutor(
        num_workers=4,
        strategy="pipeline",
        microbatches=2,
        replicas=2,
        resources_per_worker={"CPU": 0.5},
    )
    yield ex
    ex.close()


@pytest.mark.parametrize("m, schedule", [(2, "gpipe"), (3, "1f1b")])
def test_replicas_of_pipelines_compile_and_equal_calls(
    four_workers, pipeline_executions, m, schedule
):
    """2 replicas x 2 stages: each replica's rows (13 / 12, then 11 / 10) split into m
    micro-batches; the server combines the replicas by rows inside the graph."""
    ex = four_workers
    ex.microbatches, ex.schedule = m, schedule
    ref = dg.Trainer(_mlp(), loss="loss", optimizer=dg.SGD(lr=0.05), progress=False)
    ref.fit(_data(), epochs=EPOCHS, batch_size=BATCH, seed=7)
    runs = {}
    try:
        for transport in ("calls", "compiled"):
            ex.transport = transport
            pipeline_executions.clear()
            tr = _fit(ex, _mlp(), dg.SGD(lr=0.05))
            s = tr.session
            info = s.status()["replicas"]
            assert (info["count"], info["width"]) == (2, 2)
            assert all(
                [e["workers"] for e in entries] == [[0, 1], [2, 3]]
                for entries in info["steps"].values()
            )
            assert sorted(info["steps"]) == list(range(1, STEPS + 1))
            _assert_every_worker_ran_every_step(tr, 4, STEPS)
            if transport == "compiled":
                assert pipeline_executions == list(range(2, STEPS + 1))
                assert s.compiled.graph is not None and s.compiled.graph.shape == (m, m)
                assert "2 replica(s) x 2 stages" in s.explain_transport()
            runs[transport] = (tr.params, tr.history.loss)
            tr.close()
    finally:
        ex.transport = "calls"
    _assert_identical(runs["compiled"][0], runs["calls"][0])
    assert runs["compiled"][1] == runs["calls"][1]
    for k, v in ref.params.items():
        np.testing.assert_allclose(runs["compiled"][0][k], v, rtol=1e-12, atol=0, err_msg=k)


def test_a_short_batch_runs_on_calls_and_the_graph_stays(executors, pipeline_executions):
    """A batch with fewer rows than micro-batches splits into fewer: that step runs on calls
    and the graph of the usual shape runs the next ones."""
    ex = executors[2]
    ex.microbatches, ex.schedule, ex.transport = 3, "1f1b", "compiled"
    data = {k: v[:10] for k, v in _data().items()}  # 4 + 4 + 2 rows an epoch
    ref = dg.Trainer(_mlp(2), loss="loss", optimizer=dg.SGD(lr=0.1), progress=False)
    ref.fit(data, epochs=2, batch_size=4, seed=3)
    try:
        tr = dg.Trainer(_mlp(2), loss="loss", optimizer=dg.SGD(lr=0.1), executor=ex, progress=False)
        tr.fit(data, epochs=2, batch_size=4, seed=3)
        assert tr.applied_steps == list(range(1, 7))
        assert pipeline_executions == [2, 4, 5]  # 3 and 6 have 2 rows: two micro-batches, on calls
        assert tr.session.compiled.graph.shape == (3,)
        for k, v in ref.params.items():
            np.testing.assert_allclose(tr.params[k], v, rtol=1e-12, atol=0, err_msg=k)
        tr.close()
    finally:
        ex.transport = "calls"


def test_auto_compiles_pipelines_and_says_so(pipeline_executions):
    ensure_ray()
    with dg.RayExecutor(
        num_workers=2,
        strategy="pipeline",
        microbatches=2,
        schedule="1f1b",
        transport="auto",
        resources_per_worker={"CPU": 0.5},
    ) as ex:
        tr = _fit(ex, _mlp(), dg.SGD(lr=0.05))
        # auto probes calls for steps 1-6, then compiled for 7-12 (7 compiles the graph),
        # and after step 12 keeps whichever measured faster.
        assert STEPS == 12 and pipeline_executions == list(range(7, STEPS + 1))
        said = tr.session.explain_transport()
        assert "compiled graph of the pipeline" in said and "'1f1b'" in said, said
        assert "calls" in said and "compiled" in said and "ms/step" in said, said
        assert tr.session.compiled.last_reason == ""
        tr.close()


def test_shards_compile_under_compiled_and_auto(pipeline_executions):
    # Once refused (a ConfigError under "compiled", calls under "auto"); each shard's stage and
    # commit are graph nodes now (tests/test_compiled_pipeline_shards.py checks the results).
    ensure_ray()
    with dg.RayExecutor(
        num_workers=2,
        strategy="pipeline",
        microbatches=2,
        ps_shards=2,
        transport="compiled",
        resources_per_worker={"CPU": 0.5},
    ) as ex:
        # "auto" probes calls for steps 1-6, then compiled for 7-12 (7 compiles the graph).
        for transport, ran in (("compiled", range(2, 13)), ("auto", range(7, 13))):
            ex.transport = transport
            pipeline_executions.clear()
            tr = _fit(ex, _mlp(), dg.SGD(lr=0.05))
            assert tr.applied_steps == list(range(1, 13)) and pipeline_executions == list(ran), (
                transport
            )
            s = tr.session
            assert s.compiled.last_reason == "" and s.compiled.graph is not None
            said = s.compiled.describe()
            assert "2 parameter-server shards' stage and commit included" in said, said
            tr.close()


# A worker lost in the middle of a compiled pipelined step ----------------------------------------
declare_rowwise("stall")  # an identity: micro-batches may split the rows through it


def _stalling_mlp(flag: str) -> dg.Graph:
    """An MLP whose second hidden layer waits while the file ``flag`` exists."""
    rng = np.random.default_rng(3)
    g = dg.Graph()
    h = g.input("x", shape=(None, 2))
    y = g.input("y", shape=(None,), dtype="int64")
    sizes = (2, 8, 8, 8, 3)
    for i, (a, b) in enumerate(itertools.pairwise(sizes), start=1):
        w = g.param(f"W{i}", rng.standard_normal((a, b)) * np.sqrt(2.0 / a))
        h = h @ w + g.param(f"b{i}", np.zeros(b))
        if i < len(sizes) - 1:
            h = relu(h)
        if i == 2:
            h = g.apply("stall", h, flag=flag, name="stuck")
    g.output("logits", h)
    g.output("loss", cross_entropy(g["logits"], y))
    return g


CRASH_AFTER = 5


def _run_killing(flag: str, kill: bool, pipeline_executions: list[int]) -> tuple[dict, list]:
    """Train the stalling MLP compiled; with ``kill``, worker 1 dies while step
    CRASH_AFTER + 1 is stalled inside the graph."""
    with dg.RayExecutor(
        num_workers=2,
        strategy="pipeline",
        microbatches=3,
        schedule="1f1b",
        transport="compiled",
        ops_modules=["slow_ops"],
        worker_runtime_env={"env_vars": {"PYTHONPATH": TESTS}},
        resources_per_worker={"CPU": 0.5},
    ) as ex:
        killed: list[int] = []
        threads: list[threading.Thread] = []

        def killer() -> None:
            time.sleep(2.0)  # the next step is stalled inside the graph by now
            ex.workers[1].crash.remote()  # a normal call: runs beside the graph's loop
            killed.append(1)
            time.sleep(1.0)
            os.remove(flag)

        def callback(step: int, loss: float) -> None:
            if kill and step == CRASH_AFTER:
                Path(flag).touch()  # the next step stalls in 'stuck'
                threads.append(threading.Thread(target=killer))
                threads[-1].start()

        pipeline_executions.clear()
        tr = _fit(ex, _stalling_mlp(flag), dg.Adam(lr=0.01), callback=callback)
        for t in threads:
            t.join()
        assert tr.applied_steps == list(range(1, STEPS + 1))
        if kill:
            # The stalled step failed in the graph, the worker was replaced, the step ran
            # again (on a new graph over the new worker) and the rest ran compiled.
            assert killed == [1] and ex.replacements == [1]
            assert f"step {CRASH_AFTER + 1}: replaced workers [1]" in tr.session.recoveries
            assert tr.session.compiled.graph.workers == ex.workers
        else:
            assert not ex.replacements
        assert pipeline_executions == list(range(2, STEPS + 1))
        assert tr.session.compiled.last_reason == ""
        out = (tr.params, tr.history.loss)
        tr.close()
    return out


def test_a_worker_killed_mid_compiled_step_is_replaced_and_training_matches(
    tmp_path, pipeline_executions
):
    ensure_ray()
    flag = str(tmp_path / "stall")
    whole, whole_loss = _run_killing(flag, False, pipeline_executions)
    params, loss = _run_killing(flag, True, pipeline_executions)
    _assert_identical(params, whole)
    assert loss == whole_loss
    ref = dg.Trainer(_stalling_mlp(""), loss="loss", optimizer=dg.Adam(lr=0.01), progress=False)
    ref.fit(_data(), epochs=EPOCHS, batch_size=BATCH, seed=7)
    for k, v in ref.params.items():
        np.testing.assert_allclose(params[k], v, rtol=1e-12, atol=0, err_msg=k)


def test_a_compiled_pipelined_step_past_its_deadline_names_the_stuck_node(
    tmp_path, pipeline_executions
):
    ensure_ray()
    flag = str(tmp_path / "stall")
    g = _stalling_mlp(flag)
    with dg.RayExecutor(
        num_workers=2,
        strategy="pipeline",
        microbatches=2,
        transport="compiled",
        ops_modules=["slow_ops"],
        worker_runtime_env={"env_vars": {"PYTHONPATH": TESTS}},
        resources_per_worker={"CPU": 0.5},
    ) as ex:
        tr = _fit(ex, g, dg.SGD(lr=0.05), epochs=1)
        assert pipeline_executions == [2, 3, 4]  # the precondition: the steps ran compiled
        worker = tr.session.plan.placement["stuck"]
        Path(flag).touch()  # the next step stalls in 'stuck'
        ex.deadline = 3.0
        try:
            with pytest.raises(dg.WaveTimeoutError) as info:
                tr.fit(_data(), epochs=1, batch_size=BATCH, seed=7)
        finally:
            os.remove(flag)
            ex.deadline = 600.0
        msg = str(info.value)
        assert "'stuck'" in msg and f"running on worker {worker}" in msg, msg
        assert tr.applied_steps == [1, 2, 3, 4]  # the stalled step was never applied
        # The graph was dropped; the next steps run compiled on a new one, same actors.
        pipeline_executions.clear()
        tr.fit(_data(), epochs=1, batch_size=BATCH, seed=7)
        assert tr.applied_steps == list(range(1, 9)) and not ex.replacements
        assert pipeline_executions[-2:] == [7, 8] and tr.session.compiled.last_reason == ""
        tr.close()
