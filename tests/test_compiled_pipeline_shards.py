"""Compiled pipelined training with sharded parameter servers (issue 16): micro-batch
schedules (GPipe, 1F1B), replicas of pipelines and ``ps_shards=2`` run as one Ray Compiled
Graph per step, each shard's stage (and sums of squares, with ``clip_norm``) and commit nodes
of it, bit-identical to the same configuration on actor calls and recovering from a lost
shard."""

from __future__ import annotations

import numpy as np
import pytest
from raysupport import ensure_ray
from test_compiled_pipeline import (
    BATCH,
    EPOCHS,
    OPTS,
    STEPS,
    _assert_every_worker_ran_every_step,
    _assert_identical,
    _data,
    _fit,
    _mlp,
)

import distgraph as dg
from distgraph.runtime.ray.compiled_pipeline import PipelineGraph
from distgraph.runtime.ray.shards import ShardedServer
from distgraph.stageplan import StagePlan

SHARDS = 2


pytestmark = pytest.mark.usefixtures("fresh_ray_runtime")


def _assert_shards_used(tr: dg.Trainer, steps: list[int]) -> None:
    """The precondition: the session's server is sharded, every shard owns params and
    applied every step."""
    s = tr.session
    assert isinstance(s.server, ShardedServer) and len(s.server.links) == SHARDS
    status = s.status()
    assert [p["applied"] for p in status["shards"]] == [steps] * SHARDS
    assert all(p["params"] for p in status["shards"])


def _assert_compiled_with_shards(tr: dg.Trainer, executed_steps: list[int]) -> None:
    """The precondition: every step from the second ran as a compiled pipeline holding every
    shard's stage and commit."""
    s = tr.session
    assert executed_steps == list(range(2, len(tr.applied_steps) + 1))
    graph = s.compiled.graph
    assert s.compiled.last_reason == "" and isinstance(graph, PipelineGraph)
    assert not graph.torn_down
    assert [h is link.handle for h, link in zip(graph.servers, s.server.links)] == [True] * SHARDS
    said = s.explain_transport()
    assert "compiled graph of the pipeline" in said, said
    assert f"{SHARDS} parameter-server shards' stage and commit included" in said, said


def _calls_then_compiled(ex, executed_steps, make_opt, check) -> dict[str, tuple]:
    """Train the same model on calls, then compiled; ``check(tr)`` asserts the layout."""
    runs = {}
    try:
        for transport in ("calls", "compiled"):
            ex.transport = transport
            executed_steps.clear()
            tr = _fit(ex, _mlp(), make_opt())
            assert tr.applied_steps == list(range(1, STEPS + 1))
            _assert_shards_used(tr, tr.applied_steps)
            check(tr)
            if transport == "compiled":
                _assert_compiled_with_shards(tr, executed_steps)
            else:
                assert executed_steps == []
            runs[transport] = (tr.params, tr.history.loss, tr.session.status()["clipped"])
            tr.close()
    finally:
        ex.transport = "calls"
    return runs


def _assert_equal_calls_and_local(runs: dict[str, tuple], make_opt) -> None:
    (calls, calls_loss, _), (compiled, compiled_loss, _) = runs["calls"], runs["compiled"]
    _assert_identical(compiled, calls)
    assert compiled_loss == calls_loss
    ref = dg.Trainer(_mlp(), loss="loss", optimizer=make_opt(), progress=False)
    ref.fit(_data(), epochs=EPOCHS, batch_size=BATCH, seed=7)
    for k, v in ref.params.items():
        np.testing.assert_allclose(compiled[k], v, rtol=1e-12, atol=0, err_msg=k)
    np.testing.assert_allclose(compiled_loss, ref.history.loss, rtol=1e-12)


@pytest.fixture(scope="module")
def sharded_pipeline():
    ensure_ray()
    ex = dg.RayExecutor(
        num_workers=2,
        strategy="pipeline",
        microbatches=2,
        ps_shards=SHARDS,
        resources_per_worker={"CPU": 0.5},
    )
    yield ex
    ex.close()


@pytest.mark.parametrize("opt", sorted(OPTS))
@pytest.mark.parametrize("m, schedule", [(2, "gpipe"), (3, "1f1b")])
def test_sharded_compiled_pipeline_equals_calls_and_local(
    sharded_pipeline, pipeline_executions, m, schedule, opt
):
    ex = sharded_pipeline
    ex.microbatches, ex.schedule = m, schedule

    def check(tr: dg.Trainer) -> None:
        plan = tr.session.plan
        assert isinstance(plan, StagePlan) and plan.stages == (0, 1)
        assert plan.microbatches == m and plan.schedule_name == schedule
        _assert_every_worker_ran_every_step(tr, 2, STEPS)

    runs = _calls_then_compiled(ex, pipeline_executions, OPTS[opt], check)
    _assert_equal_calls_and_local(runs, OPTS[opt])


def test_sharded_compiled_pipeline_clips_by_one_global_norm_like_calls(
    sharded_pipeline, pipeline_executions
):
    # Each shard's sums of squares are graph nodes feeding every shard's stage: one norm.
    ex = sharded_pipeline
    ex.microbatches, ex.schedule = 2, "1f1b"

    def make_opt() -> dg.Optimizer:
        return dg.Adam(lr=0.01, clip_norm=0.05)

    def check(tr: dg.Trainer) -> None:
        assert tr.session.status()["clipped"], "the precondition: clipping changed some steps"
        _assert_every_worker_ran_every_step(tr, 2, STEPS)

    runs = _calls_then_compiled(ex, pipeline_executions, make_opt, check)
    assert runs["compiled"][2] == runs["calls"][2]
    _assert_equal_calls_and_local(runs, make_opt)


def test_sharded_replicas_of_pipelines_compile_and_equal_calls(pipeline_executions):
    """2 replicas x 2 stages x 2 shards: each shard combines the replicas' dicts by rows
    (13 / 12, then 11 / 10) inside the graph, as ``ShardedServer.stage`` does on calls."""
    ensure_ray()
    with dg.RayExecutor(
        num_workers=4,
        strategy="pipeline",
        microbatches=2,
        schedule="1f1b",
        replicas=2,
        ps_shards=SHARDS,
        resources_per_worker={"CPU": 0.5},
    ) as ex:

        def check(tr: dg.Trainer) -> None:
            info = tr.session.status()["replicas"]
            assert (info["count"], info["width"]) == (2, 2)
            assert sorted(info["steps"]) == list(range(1, STEPS + 1))
            for entries in info["steps"].values():
                assert [e["workers"] for e in entries] == [[0, 1], [2, 3]]
                assert all(b > a for a, b in (e["rows"] for e in entries))
            _assert_every_worker_ran_every_step(tr, 4, STEPS)

        make_opt = OPTS["adam"]
        runs = _calls_then_compiled(ex, pipeline_executions, make_opt, check)
    _assert_equal_calls_and_local(runs, make_opt)


def _train_killing(executed_steps: list[int], crash_at: int | None, ckpt: dict) -> tuple:
    """Train compiled over 2 stages and 2 shards; with ``crash_at``, shard 1 dies after that
    step, so the live graph's next execution meets a dead shard. Returns (params, losses,
    recoveries, the steps that ran compiled)."""
    crashed: list[int] = []

    def crash(step: int, loss: float) -> None:
        if step == crash_at and not crashed:
            assert tr.session.compiled.graph is not None  # the precondition: it is compiled
            tr.session.server.links[1].handle.crash.remote()
            crashed.append(step)

    with dg.RayExecutor(
        num_workers=2,
        strategy="pipeline",
        microbatches=3,
        schedule="1f1b",
        ps_shards=SHARDS,
        transport="compiled",
        resources_per_worker={"CPU": 0.5},
        **ckpt,
    ) as ex:
        executed_steps.clear()
        tr = dg.Trainer(
            _mlp(), loss="loss", optimizer=dg.Adam(lr=0.01), executor=ex, progress=False
        )
        tr.fit(_data(), epochs=EPOCHS, batch_size=BATCH, seed=7, callback=crash)
        assert crashed == ([] if crash_at is None else [crash_at])
        assert tr.applied_steps == list(range(1, STEPS + 1))
        _assert_shards_used(tr, tr.applied_steps)
        _assert_every_worker_ran_every_step(tr, 2, STEPS)
        s = tr.session
        graph = s.compiled.graph
        assert s.compiled.last_reason == "" and graph is not None and not graph.torn_down
        assert [h is link.handle for h, link in zip(graph.servers, s.server.links)] == [True] * 2
        out = (tr.params, tr.history.loss, list(s.recoveries), list(executed_steps))
        tr.close()
    return out


def test_shard_killed_during_compiled_pipelined_steps_recovers_identically(
    tmp_path, pipeline_executions
):
    ensure_ray()
    want, want_loss, _, ran = _train_killing(pipeline_executions, None, {})
    assert ran == list(range(2, STEPS + 1))
    ckpt = {"checkpoint_dir": str(tmp_path / "ps"), "checkpoint_every": 5}
    # Shard checkpoints at 5 and 10; the kill after step 11 fails step 12's execution:
    # every shard restarts from version 10, 11 is replayed, 12 runs again compiled.
    params, loss, recoveries, ran = _train_killing(pipeline_executions, 11, ckpt)
    assert any("restarted from version 10" in r for r in recoveries), recoveries
    assert any("replaying steps [11]" in r for r in recoveries), recoveries
    assert ran[-1] == STEPS and 12 in ran  # the steps after the recovery ran compiled
    _assert_identical(params, want)
    assert loss == want_loss


def test_a_traced_sharded_compiled_pipelined_step_shows_each_shard(
    sharded_pipeline, pipeline_executions
):
    # The graph returns every shard's commit status; merged as on calls, the trace shows
    # each shard's stage / commit / apply on its own track.
    ex = sharded_pipeline
    ex.microbatches, ex.schedule, ex.transport = 2, "1f1b", "compiled"
    try:
        tr = dg.Trainer(_mlp(), loss="loss", optimizer=dg.SGD(lr=0.05), executor=ex, progress=False)
        feeds = {k: v[:BATCH] for k, v in _data().items()}
        losses = [tr.session.step(i, feeds, trace=i == 3) for i in (1, 2, 3)]
        assert pipeline_executions == [2, 3]  # the precondition: the traced step ran compiled
        tracks = {e.track for e in tr.session.last_trace}
        assert {"parameter server shard 0", "parameter server shard 1"} <= tracks, tracks
        phases = {(e.track, e.phase) for e in tr.session.last_trace}
        assert ("parameter server shard 1", "apply") in phases, phases
        assert all(np.isfinite(losses))
        tr.close()
    finally:
        ex.transport = "calls"
