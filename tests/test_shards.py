"""Sharded parameter servers (issue 14, item 3): ``RayExecutor(ps_shards=S)``."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from raysupport import ensure_ray

import distgraph as dg
from distgraph import models
from distgraph.checkpoint import load_checkpoint
from distgraph.cli import main
from distgraph.paramstore import ParameterStore
from distgraph.plan import PARAM_SERVER, plan_for
from distgraph.runtime.paramserver import ParameterServer
from distgraph.runtime.ray.shards import (
    ShardedServer,
    merge_checkpoints,
    route_plan,
    shard_dest,
    split_checkpoint,
)

FIT = {"epochs": 4, "batch_size": 16, "seed": 11}  # 6 steps an epoch, 24 in all


def mlp_setup(clip_norm=None):
    g = models.mlp_classifier((2, 16, 16, 2), seed=4)
    return g, models.spirals(48, seed=3), dg.Adam(lr=0.02, clip_norm=clip_norm)


def local_params(clip_norm=None, **fit):
    g, data, opt = mlp_setup(clip_norm)
    tr = dg.Trainer(g, loss="loss", optimizer=opt, progress=False)
    tr.fit(data, **(fit or FIT))
    return tr.params


def assert_identical(got, want):
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def train(ex, clip_norm=None, on_step=None, **fit):
    g, data, opt = mlp_setup(clip_norm)
    tr = dg.Trainer(g, loss="loss", optimizer=opt, executor=ex, progress=False)
    callback = None if on_step is None else (lambda step, loss: on_step(tr, step))
    tr.fit(data, callback=callback, **(fit or FIT))
    return tr


# --- Without Ray ------------------------------------------------------------------------------


def test_route_plan_sends_each_shard_only_its_gradients():
    g, _, _ = mlp_setup()
    prog = dg.LocalExecutor().training_program(g, "loss", list(g.param_values))
    plan = plan_for(prog, num_workers=2, strategy="round_robin", training=True)
    assert len({t.worker for t in plan.tasks}) == 2  # gradients leave both workers
    owner = {g_: i % 2 for i, g_ in enumerate(prog.grads.values())}
    routed = route_plan(plan, owner)
    sent = {}
    for t in routed.tasks:
        assert all(d != PARAM_SERVER for d, _ in t.outputs)
        for d, names in t.outputs:
            if isinstance(d, str) and d.startswith(PARAM_SERVER):
                sent.update(dict.fromkeys(names, d))
    assert sent == {n: shard_dest(s) for n, s in owner.items()}
    # Imports still point at the outputs for their worker.
    by_id = {t.id: t for t in routed.tasks}
    for t in routed.tasks:
        for src, slot, names in t.imports:
            assert by_id[src].outputs[slot] == (t.worker, names)


def test_split_and_merge_checkpoint_round_trip():
    g, _, opt = mlp_setup()
    store = ParameterStore(g.param_values, opt)
    ckpt = store.to_checkpoint()
    keys = [["W1", "b3"], ["W2", "b1", "b2", "W3"]]
    parts = [split_checkpoint(ckpt, k) for k in keys]
    assert set(parts[0].params) == {"W1", "b3"}
    merged = merge_checkpoints(parts)
    assert (
        merged.params.keys() == ckpt.params.keys()
        and merged.opt_state.keys() == ckpt.opt_state.keys()
    )
    parts[1] = split_checkpoint(dataclasses.replace(ckpt, applied_steps=[1], step=1), keys[1])
    with pytest.raises(dg.WorkerLostError, match="shard 1 has applied steps"):
        merge_checkpoints(parts)


# --- On Ray -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference():
    return local_params()


@pytest.mark.parametrize("shards", [1, 2, 3])
@pytest.mark.parametrize("strategy", ["round_robin", "mincut"])
def test_sharded_training_equals_local(shards, strategy, reference):
    ensure_ray()
    with dg.RayExecutor(2, strategy=strategy, ps_shards=shards) as ex:
        tr = train(ex)
        assert_identical(tr.params, reference)
        status = tr.session.status()
        assert status["applied"] == list(range(1, 25))
        if shards > 1:
            assert isinstance(tr.session.server, ShardedServer)
            per = status["shards"]
            assert len(per) == shards and all(p["applied"] == list(range(1, 25)) for p in per)
            owned = [p for s in per for p in s["params"]]
            assert sorted(owned) == sorted(reference) and len(owned) == len(reference)
            assert all(s["params"] for s in per)  # every shard owns something
        tr.close()


def test_clip_norm_is_combined_across_shards():
    ensure_ray()
    want = local_params(clip_norm=0.5)
    got = []
    for shards in (1, 2, 3):
        with dg.RayExecutor(2, strategy="round_robin", ps_shards=shards) as ex:
            tr = train(ex, clip_norm=0.5)
            clipped = tr.session.status()["clipped"]
            assert clipped, "clip_norm must bite for this test to mean anything"
            if shards > 1:
                assert all(s["clipped"] == clipped for s in tr.session.status()["shards"])
            got.append(tr.params)
            tr.close()
    for params in got:
        assert_identical(params, want)


def test_a_killed_shard_is_recovered_and_training_equals_the_uninterrupted_run(tmp_path, reference):
    ensure_ray()
    crashed = []

    def crash(tr, step):
        if step == 9:  # shard checkpoints at version 5; steps 6..9 are replayed
            tr.session.server.links[1].handle.crash.remote()
            crashed.append(step)

    with dg.RayExecutor(
        2,
        strategy="round_robin",
        ps_shards=2,
        checkpoint_dir=str(tmp_path / "ps"),
        checkpoint_every=5,
    ) as ex:
        tr = train(ex, on_step=crash)
        assert crashed == [9]
        assert any("restarted" in r for r in tr.session.recoveries), tr.session.recoveries
        assert_identical(tr.params, reference)
        status = tr.session.status()
        assert all(s["applied"] == list(range(1, 25)) for s in status["shards"]), status
        for s in range(2):  # one checkpoint per shard, written at the same version
            assert load_checkpoint(tmp_path / "ps" / f"shard-{s}").step == 20
        tr.close()


def test_a_shard_lost_between_two_commits(monkeypatch, reference):
    """Step 9 is committed on shard 0 and its shard 1 dies before its commit: every shard
    restarts from one step (the initial state: no checkpoint_dir) and the counted steps are
    replayed, so step 9 is applied exactly once everywhere."""
    ensure_ray()
    real_commit = ShardedServer.commit
    lost = []

    def commit_one_then_die(self, step_id):
        if step_id == 9 and not lost:
            lost.append(step_id)
            done = self.links[0].handle.commit.remote(step_id)
            self.waves.get([done], "committing on shard 0")
            self.links[1].handle.crash.remote()
        return real_commit(self, step_id)

    monkeypatch.setattr(ShardedServer, "commit", commit_one_then_die)
    # The calls path's commits (a compiled step commits inside its graph: see
    # test_compiled_dp.py's fenced-graph test); auto would compile from step 7.
    with dg.RayExecutor(2, strategy="round_robin", ps_shards=2, transport="calls") as ex:
        tr = train(ex)
        assert lost == [9]
        assert_identical(tr.params, reference)
        status = tr.session.status()
        assert all(s["applied"] == list(range(1, 25)) for s in status["shards"]), status
        tr.close()


def test_an_interrupt_between_two_commits_rolls_the_step_back(monkeypatch, reference):
    """An interrupt after shard 0 committed step 9 but before shard 1 did: the step is
    rolled back on shard 0, so it is applied by no shard; training on gives the same params."""
    ensure_ray()
    real_commit = ShardedServer.commit
    interrupted = []

    def commit_one_then_interrupt(self, step_id):
        if step_id == 9 and not interrupted:
            interrupted.append(step_id)
            self.links[0].handle.commit.remote(step_id)
            raise KeyboardInterrupt
        return real_commit(self, step_id)

    monkeypatch.setattr(ShardedServer, "commit", commit_one_then_interrupt)
    with dg.RayExecutor(2, strategy="round_robin", ps_shards=2, transport="calls") as ex:
        g, data, opt = mlp_setup()
        tr = dg.Trainer(g, loss="loss", optimizer=opt, executor=ex, progress=False)
        with pytest.raises(KeyboardInterrupt):
            tr.fit(data, **FIT)
        assert interrupted == [9] and tr.step == 8
        status = tr.session.status()
        assert [s["applied"] for s in status["shards"]] == [list(range(1, 9))] * 2, status
        tr.fit(data, **{**FIT, "epochs": 3})  # finishes epoch 1 (from step 9), then 2 and 3
        assert_identical(tr.params, reference)
        assert tr.session.status()["applied"] == list(range(1, 25))
        tr.close()


def test_sharded_checkpoint_restores_into_any_number_of_shards(tmp_path, reference):
    ensure_ray()

    class Stop(Exception):
        pass

    def stop_at_10(step, loss):
        if step == 10:
            raise Stop

    with dg.RayExecutor(2, strategy="round_robin", ps_shards=2) as ex:
        g, data, opt = mlp_setup()
        first = dg.Trainer(g, loss="loss", optimizer=opt, executor=ex, progress=False)
        with pytest.raises(Stop):
            first.fit(data, callback=stop_at_10, **FIT)
        first.save(tmp_path / "ck")  # one merged checkpoint
        first.close()
    assert load_checkpoint(tmp_path / "ck").step == 10
    for shards in (1, 3):
        with dg.RayExecutor(2, strategy="round_robin", ps_shards=shards) as ex:
            g, data, opt = mlp_setup()
            resumed = dg.Trainer(g, loss="loss", optimizer=opt, executor=ex, progress=False)
            resumed.load(tmp_path / "ck")
            resumed.fit(data, **{**FIT, "epochs": 3})
            assert resumed.step == 24
            assert_identical(resumed.params, reference)
            resumed.close()


def test_ps_shards_is_validated():
    with pytest.raises(dg.ConfigError, match="ps_shards"):
        dg.RayExecutor(2, ps_shards=0)


def test_cli_train_with_ps_shards_matches_local(capsys):
    ensure_ray()
    code = main(
        ["train", "linear", "--backend", "ray", "--workers", "2", "--ps-shards", "2"]
        + ["--epochs", "20", "--json", "--check-local"]
    )
    got = json.loads(capsys.readouterr().out)
    assert code == 0 and got["ps_shards"] == 2
    assert got["matches_local"] is True and got["max_rel_diff"] == 0


def test_a_shard_rolls_back_only_its_latest_step():
    g, _, opt = mlp_setup()
    params = {k: np.asarray(v) for k, v in g.param_values.items()}
    grads = {p: f"g_{p}" for p in params}
    server = ParameterServer(params, opt, {}, grads, keep_undo=True)
    step = {f"g_{p}": np.ones_like(v) for p, v in params.items()}
    for s in (1, 2):
        server.stage(s, step)
        server.commit(s)
    assert not server.rollback(1)  # not the latest: nothing changes
    assert server.status()["applied"] == [1, 2]
    server.stage(3, step)
    before_3 = server.params()
    server.commit(3)
    assert server.rollback(3)
    assert server.status()["applied"] == [1, 2]
    assert_identical(server.params(), before_3)
    server.stage(3, step)  # the step runs again from the same state
    server.commit(3)
    assert server.status()["applied"] == [1, 2, 3]


@pytest.mark.parametrize("shards,clip_norm", [(2, None), (3, 0.5)])
def test_replicas_push_each_gradient_to_its_shard(shards, clip_norm):
    """Data-parallel replicas x sharded servers: each shard combines the replicas' gradients
    of its params in replica order; the result equals one server's bit for bit, and the
    full-batch local run within rtol 1e-12."""
    ensure_ray()
    runs = []
    for s in (1, shards):
        with dg.RayExecutor(2, strategy="mincut", replicas=2, ps_shards=s) as ex:
            tr = train(ex, clip_norm=clip_norm)
            status = tr.session.status()
            assert status["replicas"]["count"] == 2 and status["applied"] == list(range(1, 25))
            if clip_norm is not None:
                assert status["clipped"], "clip_norm must bite for this test to mean anything"
            runs.append(tr.params)
            tr.close()
    assert_identical(runs[1], runs[0])
    want = local_params(clip_norm=clip_norm)
    for k in want:
        np.testing.assert_allclose(runs[1][k], want[k], rtol=1e-12, atol=1e-14, err_msg=k)
