"""Micro-batched pipeline training (issue 15, items 2-5): a chain of stages runs a schedule's
actions on Ray, gradients are combined over micro-batches by rows and applied once per step."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from raysupport import ensure_ray

import distgraph as dg
from distgraph import models
from distgraph.cli import main as cli_main
from distgraph.errors import ConfigError, GraphError
from distgraph.pipeline import make_schedule, peak_inflight
from distgraph.plan import plan_for
from distgraph.program import compile_program
from distgraph.stageplan import (
    NotAChainError,
    StagePlan,
    bubble_formula,
    build_stage_plan,
    measured_bubble,
)

STEPS = 100
BATCH = 24


def _mlp(layers: int = 4) -> dg.Graph:
    return models.mlp_classifier((2,) + (8,) * layers + (3,), seed=3)


def _data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    return {"x": rng.standard_normal((96, 2)), "y": rng.integers(0, 3, size=96)}


def _training_plan(g: dg.Graph, workers: int, strategy: str = "pipeline", batch: int = BATCH):
    prog = compile_program(g, ["loss"], "loss", list(g.params))
    return plan_for(prog, num_workers=workers, strategy=strategy, training=True, batch_size=batch)


def _coupled_rows_graph() -> dg.Graph:
    """A loss whose rows are coupled by ``mu``, a mean over the batch axis (batch-norm-like):
    its batch cannot be split into micro-batches or replica shards."""
    g = dg.Graph()
    x = g.input("x", shape=(None, 2))
    w = g.param("w", np.ones((2, 3)))
    h = x @ w
    mu = g.apply("mean", h, axis=0, keepdims=True, name="mu")
    c = h - mu
    g.output("loss", (c * c).mean())
    return g


# --- the plan (no Ray) -------------------------------------------------------------------------


@pytest.mark.parametrize("p", [2, 3, 4])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_stage_plan_submission_order_respects_every_import(p, schedule):
    plan = build_stage_plan(_training_plan(_mlp(), p), 4, schedule, BATCH)
    assert isinstance(plan, StagePlan) and plan.stages == tuple(range(p))
    order = plan.submission_order()
    assert len(order) == 2 * p * 4
    seen: set[tuple[int, int]] = set()
    position = {a: i for acts in plan.schedule() for i, a in enumerate(acts)}
    done_on: dict[int, int] = {}
    for act in order:
        task = plan.task_of(act)
        for src, _slot, _names in task.imports:
            assert (src, act.microbatch) in seen, f"{act} submitted before task {src}"
        assert position[act] == done_on.get(act.stage, 0), f"{act} out of its worker's order"
        done_on[act.stage] = position[act] + 1
        seen.add((task.id, act.microbatch))
    # Every gradient is computed by exactly one stage, and the loss by the last one.
    grads = [n for gs in plan.grads_of for n in gs]
    assert sorted(grads) == sorted(plan.program.grads.values())
    assert plan.outputs_of[-1] == ("loss",)


def test_a_placement_that_is_not_a_chain_is_refused_naming_the_value():
    base = _training_plan(_mlp(), 2, strategy="round_robin")
    with pytest.raises(NotAChainError) as e:
        build_stage_plan(base, 2, "gpipe")
    msg = str(e.value)
    assert "not a chain of pipeline stages" in msg and "reads" in msg
    assert "strategy='pipeline'" in msg
    assert isinstance(e.value, ConfigError)


def test_explain_prints_the_grid_prediction_and_bubble_formula():
    plan = build_stage_plan(_training_plan(_mlp(), 4), 8, "1f1b", 64)
    text = plan.explain()
    assert "pipeline: 4 stages on workers [0, 1, 2, 3], 8 micro-batches, schedule '1f1b'" in text
    assert "F7" in text and "B7" in text
    assert "predicted step:" in text
    assert f"(p-1)/(m+p-1) = {bubble_formula(4, 8):.3f}" in text
    assert "micro-batches held per stage (activations): [4, 3, 2, 1]" in text


def test_cli_explain_shows_the_schedule(capsys):
    code = cli_main(
        ["explain", "mlp", "--workers", "2", "--strategy", "pipeline", "--microbatches", "4"]
        + ["--schedule", "1f1b", "--batch-size", "32"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "schedule '1f1b'" in out and "F3" in out and "predicted step:" in out


# --- on Ray ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def executors():
    ensure_ray()
    # Half a CPU each: 9 workers fit the shared runtime's 8 logical CPUs.
    exs = {
        p: dg.RayExecutor(
            num_workers=p,
            strategy="pipeline",
            microbatches=1,
            resources_per_worker={"CPU": 0.5},
        )
        for p in (2, 3, 4)
    }
    yield exs
    for ex in exs.values():
        ex.close()


@pytest.fixture(scope="module")
def reference():
    """The un-pipelined run: 100 steps on LocalExecutor (the oracle)."""
    g = _mlp()
    tr = dg.Trainer(g, loss="loss", optimizer=dg.Adam(lr=0.01), progress=False)
    tr.fit(_data(), epochs=STEPS * BATCH // 96, batch_size=BATCH, seed=7)
    assert tr.session.applied_steps == list(range(1, STEPS + 1))
    return tr.params, tr.history.loss


def _pipelined_trainer(
    ex: dg.RayExecutor,
    m: int,
    schedule: str,
    graph: dg.Graph | None = None,
    optimizer: dg.Optimizer | None = None,
    **options,
) -> dg.Trainer:
    """A Trainer on ``ex`` set to ``m`` micro-batches under ``schedule`` (the module's
    executors are shared: each test sets the pipeline it needs); SGD(lr=0.05) on the MLP
    unless told otherwise."""
    ex.microbatches, ex.schedule = m, schedule
    return dg.Trainer(
        _mlp() if graph is None else graph,
        loss="loss",
        optimizer=dg.SGD(lr=0.05) if optimizer is None else optimizer,
        executor=ex,
        progress=False,
        **options,
    )


def _train(ex: dg.RayExecutor, m: int, schedule: str, epochs: int = STEPS * BATCH // 96):
    tr = _pipelined_trainer(ex, m, schedule, optimizer=dg.Adam(lr=0.01))
    tr.fit(_data(), epochs=epochs, batch_size=BATCH, seed=7)
    return tr


@pytest.mark.parametrize("p", [2, 3, 4])
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_pipelined_training_equals_the_unpipelined_run(executors, reference, p, m, schedule):
    ref_params, ref_loss = reference
    tr = _train(executors[p], m, schedule)
    try:
        plan = tr.session.plan
        # Preconditions: a real pipeline of p stages and m micro-batches, 100 applied steps.
        assert isinstance(plan, StagePlan) and plan.stages == tuple(range(p))
        assert plan.microbatches == m
        assert tr.session.applied_steps == list(range(1, STEPS + 1))
        for k, v in ref_params.items():
            np.testing.assert_allclose(tr.params[k], v, rtol=1e-12, atol=0, err_msg=k)
        np.testing.assert_allclose(tr.history.loss, ref_loss, rtol=1e-12)
    finally:
        tr.close()


def test_two_pipelined_runs_are_identical(executors):
    runs = []
    for _ in range(2):
        tr = _train(executors[3], 3, "1f1b", epochs=3)
        runs.append((tr.params, tr.history.loss))
        tr.close()
    (a, la), (b, lb) = runs
    assert la == lb
    for k in a:
        assert np.array_equal(a[k], b[k]), k


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_workers_report_the_micro_batches_they_held(executors, schedule):
    p, m = 4, 6
    tr = _pipelined_trainer(executors[p], m, schedule)
    try:
        tr.fit(_data(), epochs=1, batch_size=48, seed=1)  # 2 steps of 6 micro-batches of 8 rows
        peaks = tr.session.microbatch_peaks()
        assert [sorted(d) for d in peaks] == [[1, 2]] * p  # every stage reported both steps
        measured = [max(d.values()) for d in peaks]
        assert measured == peak_inflight(make_schedule(schedule, p, m))
        if schedule == "gpipe":
            assert measured == [m] * p
        else:
            assert max(measured) <= p and measured == [4, 3, 2, 1]
    finally:
        tr.close()


def test_a_loss_coupling_rows_is_refused_naming_the_node(executors):
    g = _coupled_rows_graph()
    ex = executors[2]
    feeds = {"x": np.arange(16.0).reshape(8, 2)}
    tr = _pipelined_trainer(ex, 2, "gpipe", graph=g, optimizer=dg.SGD(lr=0.1))
    try:
        with pytest.raises(GraphError, match="'mu' \\(op mean, axis 0\\)"):
            tr.fit(feeds, epochs=1, batch_size=8)
        assert tr.session.applied_steps == []
    finally:
        tr.close()
    # Precondition: one micro-batch trains it (nothing else is wrong with the graph).
    tr = _pipelined_trainer(ex, 1, "gpipe", graph=g, optimizer=dg.SGD(lr=0.1))
    try:
        tr.fit(feeds, epochs=1, batch_size=8)
        assert tr.session.applied_steps == [1]
    finally:
        tr.close()


def test_trace_labels_each_action_and_measures_the_bubble(executors):
    p, m = 3, 4
    tr = _pipelined_trainer(executors[p], m, "gpipe", trace=True)
    try:
        tr.fit(_data(), epochs=1, batch_size=96, seed=1)
        actions = [e for e in tr.last_trace if "action" in e.args]
        labels = {(e.worker, e.name) for e in actions}
        assert labels == {(w, f"{k}{i}") for w in range(p) for k in "FB" for i in range(m)}
        assert all(e.track == f"worker {e.worker}" for e in actions)
        bubble = measured_bubble(tr.last_trace)
        assert 0.0 <= bubble < 1.0
        # The HTML report's timeline labels each block and gives the bubble next to the formula.
        from distgraph.viz.report import render_report

        g = _mlp()
        page = render_report(
            g.spec, placement={}, trace=tr.last_trace, values={}, grads={}, title="pipeline"
        )
        # Every block is drawn (named by its action); wide enough ones carry their label.
        assert all(f'data-name="{k}{i}"' in page for k in "FB" for i in range(m))
        assert '<text class="action"' in page
        assert f"formula (p-1)/(m+p-1) = {bubble_formula(p, m):.3f}" in page
    finally:
        tr.close()


def test_bad_pipeline_options_are_refused():
    with pytest.raises(ConfigError, match="microbatches must be an int >= 1"):
        dg.RayExecutor(num_workers=2, microbatches=0)
    with pytest.raises(ConfigError, match="unknown pipeline schedule 'zigzag'"):
        dg.RayExecutor(num_workers=2, microbatches=2, schedule="zigzag")


def test_a_custom_elementwise_op_keeps_rows_independent():
    """simops declares sim_layer row-wise: its chain's batch may be split (a custom op not
    declared still counts as coupling, see test_dataparallel)."""
    from distgraph.dataparallel import analyze_rows
    from distgraph.simops import sim_chain

    g = sim_chain(3, 1.0, 2.0)
    prog = compile_program(g, ["loss"], "loss", list(g.params))
    split = analyze_rows(prog)
    assert split.kind == "mean" and split.batch_inputs == ("x",)


def test_a_worker_lost_mid_pipeline_is_replaced_and_training_matches(reference):
    """Recovery is the session's: the replaced worker gets the plan and the server's params,
    and the step runs again; the result equals the uninterrupted (local) run."""
    ensure_ray()
    ref_params, _ = reference
    crashed = []
    with dg.RayExecutor(
        num_workers=2,
        strategy="pipeline",
        microbatches=3,
        schedule="1f1b",
        resources_per_worker={"CPU": 0.5},
    ) as ex:

        def crash(step: int, loss: float) -> None:
            if step == 40:
                ex.workers[1].crash.remote()  # os._exit in the actor, before step 41 runs
                crashed.append(1)

        tr = dg.Trainer(
            _mlp(), loss="loss", optimizer=dg.Adam(lr=0.01), executor=ex, progress=False
        )
        tr.fit(_data(), epochs=STEPS * BATCH // 96, batch_size=BATCH, seed=7, callback=crash)
        assert crashed == [1] and ex.replacements == [1]
        assert tr.session.applied_steps == list(range(1, STEPS + 1))
        for k, v in ref_params.items():
            np.testing.assert_allclose(tr.params[k], v, rtol=1e-12, atol=0, err_msg=k)
        tr.close()


def test_report_formats_the_preview_of_a_large_value():
    """A Ray run's trace carries interpret.preview summaries (dicts) of large values; the
    report formatted them by recursing forever (RecursionError in `distgraph train --report`)."""
    from distgraph.interpret import preview
    from distgraph.viz.report import format_value

    summary = preview(np.ones((40, 40)))
    assert isinstance(summary, dict)  # precondition: a summary, not the values
    assert format_value(summary) == "float64[40, 40] [1, 1, 1, 1, …]"


def test_a_batch_with_fewer_rows_than_micro_batches_runs_fewer(executors):
    """The last batch of an epoch (2 rows) with m = 3: two micro-batches of one row, still
    equal to the local run."""
    g = _mlp(2)
    data = {k: v[:10] for k, v in _data().items()}
    ref = dg.Trainer(g, loss="loss", optimizer=dg.SGD(lr=0.1), progress=False)
    ref.fit(data, epochs=2, batch_size=4, seed=3)
    tr = _pipelined_trainer(executors[2], 3, "1f1b", graph=g, optimizer=dg.SGD(lr=0.1))
    try:
        tr.fit(data, epochs=2, batch_size=4, seed=3)
        assert tr.session.applied_steps == list(range(1, 7))  # 4 + 4 + 2 rows, twice
        for k, v in ref.params.items():
            np.testing.assert_allclose(tr.params[k], v, rtol=1e-12, atol=0, err_msg=k)
    finally:
        tr.close()


# --- composed with data-parallel replicas and sharded servers ----------------------------------

# 96 rows in batches of 25: 4 steps an epoch (the last of 21 rows), so replica shards and
# micro-batches are uneven (e.g. 13 / 12 rows, then 7 / 6 and 6 / 6).
COMPOSED_BATCH, COMPOSED_EPOCHS = 25, 25  # 100 steps


def _composed_fit(ex: dg.RayExecutor | None) -> dg.Trainer:
    # SGD: the replicas' gradients are combined at the server in another order than the full
    # batch's sums; Adam would magnify those last-bit differences (see test_replicas).
    tr = dg.Trainer(_mlp(), loss="loss", optimizer=dg.SGD(lr=0.05), executor=ex, progress=False)
    tr.fit(_data(), epochs=COMPOSED_EPOCHS, batch_size=COMPOSED_BATCH, seed=7)
    return tr


@pytest.fixture(scope="module")
def _four_workers_shared():
    ensure_ray()
    ex = dg.RayExecutor(
        num_workers=4, strategy="pipeline", microbatches=2, resources_per_worker={"CPU": 0.5}
    )
    yield ex
    ex.close()


@pytest.fixture
def four_workers(_four_workers_shared):
    """The module's 4-worker pipelined executor, its replicas and server shards back to one
    after each test (the tests set what they compose)."""
    ex = _four_workers_shared
    yield ex
    ex.replicas, ex.ps_shards = 1, 1


@pytest.fixture(scope="module")
def composed_reference():
    """The full-batch run on LocalExecutor."""
    tr = _composed_fit(None)
    assert tr.session.applied_steps == list(range(1, 101))
    return tr.params, tr.history.loss


def _assert_every_replica_stage_ran(tr: dg.Trainer, replicas: int, stages: int) -> None:
    """The precondition: every step ran on every replica (its own rows, together the whole
    batch) and every stage of every replica ran micro-batches in every step."""
    steps = list(range(1, COMPOSED_EPOCHS * 4 + 1))
    info = tr.session.status()["replicas"]
    assert (info["count"], info["width"]) == (replicas, stages)
    assert sorted(info["steps"]) == steps
    for step, entries in info["steps"].items():
        assert [e["replica"] for e in entries] == list(range(replicas)), step
        for e in entries:
            r = e["replica"]
            assert e["workers"] == [r * stages + s for s in range(stages)], (step, e)
        if replicas > 1:
            spans = [e["rows"] for e in entries]
            batch = COMPOSED_BATCH if step % 4 else 96 % COMPOSED_BATCH
            assert spans[0][0] == 0 and spans[-1][1] == batch, (step, spans)
            sizes = [b - a for a, b in spans]
            assert max(sizes) - min(sizes) <= 1, (step, sizes)
    peaks = tr.session.microbatch_peaks()
    assert len(peaks) == replicas * stages  # one per worker, replica by replica
    for w, per_step in enumerate(peaks):
        assert sorted(per_step) == steps, w
        assert min(per_step.values()) >= 1, w


@pytest.mark.parametrize(
    "replicas, microbatches, shards, schedule",
    [(2, 2, 1, "gpipe"), (2, 2, 1, "1f1b"), (2, 3, 2, "1f1b"), (1, 3, 2, "gpipe")],
)
def test_replicas_of_pipelines_equal_the_full_batch_run(
    four_workers, composed_reference, replicas, microbatches, shards, schedule
):
    """R replicas x p stages x m micro-batches (x S server shards): each replica a pipeline
    over its own workers, its rows split into micro-batches; the result is the full batch's."""
    ex = four_workers
    stages = 4 // replicas
    ex.replicas, ex.ps_shards = replicas, shards
    ex.microbatches, ex.schedule = microbatches, schedule
    ref_params, ref_loss = composed_reference
    tr = _composed_fit(ex)
    try:
        plan = tr.session.plan
        assert isinstance(plan, StagePlan) and plan.stages == tuple(range(stages))
        assert plan.num_workers == replicas * stages and plan.microbatches == microbatches
        assert tr.session.applied_steps == list(range(1, 101))
        _assert_every_replica_stage_ran(tr, replicas, stages)
        if shards > 1:
            status = tr.session.status()
            assert len(status["shards"]) == shards
            assert all(s["applied"] == list(range(1, 101)) for s in status["shards"])
            assert all(s["params"] for s in status["shards"])  # each shard owns params
        for k, v in ref_params.items():
            np.testing.assert_allclose(tr.params[k], v, rtol=1e-12, atol=0, err_msg=k)
        np.testing.assert_allclose(tr.history.loss, ref_loss, rtol=1e-12)
    finally:
        tr.close()


def test_two_runs_of_replicated_pipelines_are_identical(four_workers):
    ex = four_workers
    ex.replicas, ex.ps_shards, ex.microbatches, ex.schedule = 2, 2, 2, "1f1b"
    runs = []
    for _ in range(2):
        tr = _composed_fit(ex)
        assert tr.session.layout.count == 2 and tr.session.stage_plan.num_stages == 2
        runs.append((tr.params, tr.history.loss))
        tr.close()
    (a, la), (b, lb) = runs
    assert la == lb
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def test_replicated_pipelines_refuse_a_loss_coupling_rows_naming_the_node(four_workers):
    g = _coupled_rows_graph()
    ex = four_workers
    ex.replicas, ex.microbatches = 2, 2
    tr = dg.Trainer(g, loss="loss", optimizer=dg.SGD(lr=0.1), executor=ex, progress=False)
    try:
        with pytest.raises(GraphError, match="'mu' \\(op mean, axis 0\\)"):
            tr.fit({"x": np.arange(16.0).reshape(8, 2)}, epochs=1, batch_size=8)
        assert tr.session.applied_steps == []
    finally:
        tr.close()


# --- one call per worker per step, values handed from worker to worker (no Ray) ---------------


def _in_process(p: int, m: int, schedule: str):
    """A StagePlan installed on ``p`` in-process workers, one step's feeds split into ``m``
    micro-batches, and each worker's call of that step (as the driver builds them)."""
    from distgraph.interpret import prepare_feeds
    from distgraph.plan import DRIVER, PARAM_SERVER
    from distgraph.runtime.protocol import CallHeader
    from distgraph.runtime.ray.pipelined import step_calls
    from distgraph.runtime.ray.replicas import split_rows
    from distgraph.runtime.worker import Worker

    g = _mlp()
    plan = build_stage_plan(_training_plan(g, p), m, schedule, BATCH)
    prog = plan.program
    workers = [Worker(i) for i in range(p)]
    for i, w in enumerate(workers):
        resident = {
            n: g.param_values[n] if n in g.param_values else prog.constants[n]
            for n in plan.resident[i]
        }
        w.install(1, prog, [t for t in plan.tasks if t.worker == i], resident)
    feeds = prepare_feeds(prog, {k: v[:BATCH] for k, v in _data().items()})
    slices, parts = split_rows(feeds, ("x", "y"), m)

    def ends(s: int):
        out = [(PARAM_SERVER, list(plan.grads_of[s]))] if plan.grads_of[s] else []
        return out + ([(DRIVER, list(plan.outputs_of[s]))] if plan.outputs_of[s] else [])

    calls = step_calls(
        plan,
        plan,
        CallHeader(1, 1, -1),
        1,
        [(parts, [s.stop - s.start for s in slices])],
        ends,
        "mean",
        60.0,
        workers,
        {},
    )
    return g, plan, workers, feeds, calls


def _run_threads(workers, calls, only=None):
    import threading

    results: dict[int, object] = {}

    def run(w, call, args):
        try:
            results[w] = workers[w].run_actions(call, *args)
        except BaseException as e:  # handed to the test
            results[w] = e

    threads = [
        threading.Thread(target=run, args=(w, call, args), daemon=True)
        for w, call, args in calls.values()
        if only is None or w in only
    ]
    for t in threads:
        t.start()
    return threads, results


def _join(threads) -> None:
    """Wait for the workers' threads (a minute each at most) and check none is left running."""
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_each_worker_runs_its_whole_action_list_in_one_call(schedule):
    """Issue 15 B: a pipelined step is one call per worker holding its schedule's actions;
    values for another stage go straight to that worker (its mailbox), so no call waits for
    another on the driver. The combined gradients equal the full batch's."""
    from distgraph.plan import PARAM_SERVER

    p, m = 3, 4
    g, plan, workers, feeds, calls = _in_process(p, m, schedule)
    # Preconditions: one call per worker, each holding all 2m of its actions, and none takes
    # a value another worker computes (only the driver's feeds).
    assert sorted(w for w, _, _ in calls.values()) == list(range(p))
    for w, call, args in calls.values():
        assert [a.label for a, _ in call.actions] == [
            a.label for a in make_schedule(schedule, p, m)[w]
        ]
        assert all(isinstance(v, np.ndarray) for v in args)
    threads, results = _run_threads(workers, calls)
    _join(threads)
    errors = [r for r in results.values() if isinstance(r, BaseException)]
    assert not errors, errors
    grads: dict[str, np.ndarray] = {}
    for w, call, _args in calls.values():
        out = results[w]
        out = out if isinstance(out, tuple) else (out,)
        ends = [d for d, _ in call.actions[-1][0].outputs if not isinstance(d, int)]
        for dest, values in zip(ends, out):
            if dest == PARAM_SERVER:
                grads.update(values)
    ref = dg.LocalExecutor().run(g, {k: v for k, v in feeds.items()}, outputs=["loss"], grad="loss")
    for param, node in plan.program.grads.items():
        np.testing.assert_allclose(grads[node], ref.grads[param], rtol=1e-12, err_msg=param)
    # Every worker held what the schedule says (its mailbox took the other stages' values).
    assert [workers[w].microbatch_peaks(1)[1] for w in range(p)] == peak_inflight(
        make_schedule(schedule, p, m)
    )


def test_a_cancelled_attempt_releases_a_worker_waiting_for_values():
    """A worker whose upstream never sends (lost mid-step) is released when the driver
    cancels the attempt, and fails naming the step; a new attempt of the same step then
    runs on fresh mail."""
    from distgraph.errors import ExecutionError

    p, m = 2, 2
    _g, _plan, workers, _feeds, calls = _in_process(p, m, "gpipe")
    threads, results = _run_threads(workers, calls, only={1})  # stage 0 never runs
    workers[1].cancel_actions(1, 1)
    threads[0].join(60)
    assert not threads[0].is_alive()
    assert isinstance(results[1], ExecutionError)
    assert "step 1 was abandoned by the driver" in str(results[1])
    # The retry (attempt 2) of the same step runs whole.
    retry = {k: (w, dataclasses.replace(c, attempt=2), a) for k, (w, c, a) in calls.items()}
    threads, results = _run_threads(workers, retry)
    for t in threads:
        t.join(60)
    assert not any(isinstance(r, BaseException) for r in results.values()), results
    assert sorted(results) == [0, 1]
