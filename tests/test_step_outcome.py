"""A step's outcome is one fact: applied and counted by the trainer, or never applied (issue 11.3).

A step can fail after its gradients were already on their way to the parameter server: it
passed its deadline, or the driver was interrupted. The server only applies a step the driver
committed after seeing it succeed, so such a step is never applied, and the next fit runs it
again under the same id with the same batch.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import ray
import slow_ops  # noqa: F401 - registers the "stall" op in this process too
from raysupport import ensure_ray

import distgraph as dg
from distgraph.runtime.ray import RaySession
from distgraph.runtime.ray.waves import Waves

TESTS = str(Path(__file__).resolve().parent)


@pytest.fixture(scope="module", autouse=True)
def ray_ready():
    ensure_ray()


def regression(flag: Path) -> dg.Graph:
    """loss = mean((x @ w + b - y)^2), whose forward stalls while the file ``flag`` exists."""
    g = dg.Graph()
    x = g.input("x", shape=(None, 3))
    y = g.input("y", shape=(None,))
    w = g.param("w", np.array([0.5, -1.0, 2.0]))
    b = g.param("b", np.array(0.0))
    pred = g.apply("stall", dg.matmul(x, w) + b, flag=str(flag), name="stuck")
    g.output("loss", dg.mean((pred - y) ** 2))
    return g


def data(n: int = 32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((n, 3))
    return {"x": x, "y": x @ np.array([1.0, 2.0, -3.0]) + 0.25}


def executor(strategy: str, transport: str = "calls") -> dg.RayExecutor:
    return dg.RayExecutor(
        num_workers=2,
        strategy=strategy,
        transport=transport,
        deadline=120.0,  # shortened only for the step meant to stall
        ops_modules=["slow_ops"],
        worker_runtime_env={"env_vars": {"PYTHONPATH": TESTS}},
    )


def reference(flag: Path, **fit) -> dict:
    tr = dg.Trainer(regression(flag), loss="loss", optimizer=dg.Adam(lr=0.05), progress=False)
    tr.fit(data(), **fit)
    return tr.params


def trainer(flag: Path, ex: dg.RayExecutor) -> dg.Trainer:
    return dg.Trainer(
        regression(flag), loss="loss", optimizer=dg.Adam(lr=0.05), executor=ex, progress=False
    )


def assert_identical(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert np.array_equal(got[k], want[k]), (k, got[k], want[k])


def server_after_everything_sent(tr: dg.Trainer) -> dict:
    """The server's status once every call sent before now has run (calls run in order)."""
    return ray.get(tr.session.ps.status.remote(), timeout=120)


def replicas_applied(ex: dg.RayExecutor, tr: dg.Trainer) -> list[list[int]]:
    s = tr.session
    return [ray.get(ex.workers[w].replica.remote(s.plan_id))["applied"] for w in s.replicas]


# mincut keeps this model on one worker, which updates its own replica: the driver commits
# without waiting for the server (pipelined). round_robin spreads it: params come from the
# server and the driver waits for the staged update before committing.
STRATEGIES = [("mincut", True), ("round_robin", False)]

# Two batches an epoch; step 3 is the first of the second epoch.
FIT = {"batch_size": 16, "seed": 3}


@pytest.mark.parametrize("transport", ["calls", "compiled"])
@pytest.mark.parametrize("strategy,pipelined", STRATEGIES)
def test_a_step_past_its_deadline_is_never_applied(tmp_path, strategy, pipelined, transport):
    flag = tmp_path / "stall"
    want = reference(flag, epochs=3, **FIT)
    with executor(strategy, transport) as ex:
        tr = trainer(flag, ex)

        def stall_next(step, loss):
            if step == 2:
                flag.touch()  # step 3 stalls in its forward wave, past the deadline
                ex.deadline = 5.0

        with pytest.raises(dg.WaveTimeoutError, match="stuck") as info:
            tr.fit(data(), epochs=3, callback=stall_next, **FIT)
        assert tr.session.pipelined is pipelined
        assert tr.step == 2
        if transport == "compiled":  # the stalled step ran compiled, and says so
            assert "compiled" in str(info.value) and "running on worker" in str(info.value)
        ex.deadline = 120.0
        flag.unlink()  # the stalled step finishes now: its gradients reach the server
        status = server_after_everything_sent(tr)
        assert status["applied"] == [1, 2], status
        assert all(a == [1, 2] for a in replicas_applied(ex, tr))

        tr.fit(data(), epochs=2, **FIT)  # step 3 again, same batch, same id
        assert tr.applied_steps == list(range(1, 7))
        assert tr.session.status()["duplicates"] == []
        assert_identical(tr.params, want)
        tr.close()


@pytest.mark.parametrize("strategy,pipelined", STRATEGIES)
def test_an_interrupt_before_the_commit_leaves_the_step_unapplied(
    tmp_path, monkeypatch, strategy, pipelined
):
    flag = tmp_path / "never"
    want = reference(flag, epochs=3, **FIT)
    real_finish = Waves.finish
    interrupted = []

    def finish_then_interrupt(self, plan, plan_id, step, refs, extra):
        got = real_finish(self, plan, plan_id, step, refs, extra)
        if step == 3 and not interrupted:  # every part of step 3 was computed and sent
            interrupted.append(step)
            raise KeyboardInterrupt
        return got

    monkeypatch.setattr(Waves, "finish", finish_then_interrupt)
    with executor(strategy) as ex:
        tr = trainer(flag, ex)
        with pytest.raises(KeyboardInterrupt):
            tr.fit(data(), epochs=3, **FIT)
        assert interrupted == [3] and tr.session.pipelined is pipelined
        assert tr.step == 2
        status = server_after_everything_sent(tr)
        assert status["applied"] == [1, 2], status
        assert all(a == [1, 2] for a in replicas_applied(ex, tr))

        tr.fit(data(), epochs=2, **FIT)
        assert tr.applied_steps == list(range(1, 7))
        assert tr.session.status()["duplicates"] == []
        assert_identical(tr.params, want)
        tr.close()


@pytest.mark.parametrize("strategy,pipelined", STRATEGIES)
def test_an_interrupt_after_the_commit_counts_the_step(tmp_path, monkeypatch, strategy, pipelined):
    # One batch an epoch, in order: each epoch is the same step, so only the count matters.
    flag = tmp_path / "never"
    fit = {"batch_size": 32, "shuffle": False}
    want = reference(flag, epochs=5, **fit)
    real_commit = RaySession._commit
    interrupted = []

    def commit_then_interrupt(self, step_id):
        out = real_commit(self, step_id)
        if step_id == 3 and not interrupted:  # the commit is on its way: the server decides
            interrupted.append(step_id)
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(RaySession, "_commit", commit_then_interrupt)
    with executor(strategy) as ex:
        tr = trainer(flag, ex)
        with pytest.raises(KeyboardInterrupt):
            tr.fit(data(), epochs=5, **fit)
        assert interrupted == [3] and tr.session.pipelined is pipelined
        assert tr.step == 3
        assert server_after_everything_sent(tr)["applied"] == [1, 2, 3]
        assert all(a == [1, 2, 3] for a in replicas_applied(ex, tr))

        tr.fit(data(), epochs=2, **fit)
        assert tr.applied_steps == list(range(1, 6))
        assert tr.session.status()["duplicates"] == []
        assert_identical(tr.params, want)
        tr.close()


@pytest.mark.parametrize("strategy,pipelined", STRATEGIES)
def test_a_commit_with_nothing_staged_is_recovered_by_replay(
    tmp_path, monkeypatch, strategy, pipelined
):
    flag = tmp_path / "never"
    want = reference(flag, epochs=3, **FIT)
    real_commit = RaySession._commit
    lost = []

    def lose_then_commit(self, step_id):
        if step_id == 3 and not lost:  # as if step 3's gradients never reached the server
            lost.append(step_id)
            self.ps.abort.remote(step_id)
        return real_commit(self, step_id)

    monkeypatch.setattr(RaySession, "_commit", lose_then_commit)
    with executor(strategy) as ex:
        tr = trainer(flag, ex)
        tr.fit(data(), epochs=3, **FIT)
        assert lost == [3] and tr.session.pipelined is pipelined
        assert any("replaying steps [3]" in r for r in tr.session.recoveries), tr.session.recoveries
        assert tr.applied_steps == list(range(1, 7))
        assert_identical(tr.params, want)
        tr.close()


def test_a_fit_that_gave_up_on_a_lost_worker_is_recovered_by_the_next(tmp_path):
    # No recoveries allowed within a call: the fit stops at step 5 on a dead worker. The next
    # fit recovers before its first step (replacing the worker, replaying whatever was counted
    # and not applied) instead of failing again.
    flag = tmp_path / "never"
    want = reference(flag, epochs=3, **FIT)
    with executor("mincut") as ex:
        ex.max_recoveries = 0
        tr = trainer(flag, ex)

        def crash(step, loss):
            if step == 4:  # the end of the second epoch
                busy = tr.session.plan.tasks[0].worker
                with pytest.raises(ray.exceptions.RayActorError):
                    ray.get(ex.workers[busy].crash.remote())

        with pytest.raises(dg.WorkerLostError):
            tr.fit(data(), epochs=3, callback=crash, **FIT)
        assert tr.step == 4 and tr.epoch == 2
        assert server_after_everything_sent(tr)["applied"] == [1, 2, 3, 4]
        tr.fit(data(), epochs=1, **FIT)
        assert len(ex.replacements) == 1
        assert tr.applied_steps == list(range(1, 7))
        assert_identical(tr.params, want)
        tr.close()


@pytest.mark.parametrize("transport", ["calls", "compiled"])
@pytest.mark.parametrize("strategy,pipelined", STRATEGIES)
def test_a_server_checkpoint_that_failed_is_reported_once(tmp_path, strategy, pipelined, transport):
    # Review: a commit whose checkpoint could not be written (its folder now held a user's
    # file) re-raised that error on every later call of the session, even Trainer.close(),
    # after the folder was fixed.
    flag, ckpt = tmp_path / "never", tmp_path / "ckpt"
    want = reference(flag, epochs=3, **FIT)
    with executor(strategy, transport) as ex:
        # The first checkpoint comes at step 3, inside epoch 2: its failure surfaces in step 4.
        ex.checkpoint_dir, ex.checkpoint_every = str(ckpt), 3
        tr = trainer(flag, ex)

        def foreign_folder(step, loss):
            if step == 2:  # the folder becomes a user's: the server's checkpoint is refused
                server_after_everything_sent(tr)  # nothing is being written into it now
                shutil.rmtree(ckpt)
                ckpt.mkdir()
                (ckpt / "notes.txt").write_text("mine")

        with pytest.raises(dg.CheckpointError, match=r"notes\.txt"):
            tr.fit(data(), epochs=3, callback=foreign_folder, **FIT)
        assert tr.session.pipelined is pipelined
        assert server_after_everything_sent(tr)["applied"] == list(range(1, tr.step + 1))
        (ckpt / "notes.txt").unlink()  # the user fixes the folder
        tr.fit(data(), epochs=3 - tr.epoch, **FIT)
        assert tr.applied_steps == list(range(1, 7))
        assert_identical(tr.params, want)
        tr.close()


def test_a_step_counted_after_an_interrupt_keeps_the_loss_history_aligned(tmp_path, monkeypatch):
    # Review: the step counted after the interrupt had no entry in history.step_loss, so the
    # next fit took the previous step's loss for it when it averaged the epoch's loss.
    flag = tmp_path / "never"
    whole = dg.Trainer(regression(flag), loss="loss", optimizer=dg.Adam(lr=0.05), progress=False)
    whole.fit(data(), epochs=3, **FIT)
    real_commit = RaySession._commit
    interrupted = []

    def commit_then_interrupt(self, step_id):
        out = real_commit(self, step_id)
        if step_id == 3 and not interrupted:  # the first batch of the second epoch
            interrupted.append(step_id)
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(RaySession, "_commit", commit_then_interrupt)
    with executor("round_robin") as ex:
        tr = trainer(flag, ex)
        with pytest.raises(KeyboardInterrupt):
            tr.fit(data(), epochs=3, **FIT)
        assert interrupted == [3] and tr.step == 3  # the precondition: the step counts
        assert len(tr.history.step_loss) == 3 and np.isnan(tr.history.step_loss[2])
        tr.fit(data(), epochs=2, **FIT)  # finishes the second epoch, then the third
        assert_identical(tr.params, whole.params)
        assert tr.history.step_loss[:2] == whole.history.step_loss[:2]
        assert tr.history.step_loss[3:] == whole.history.step_loss[3:]
        # The second epoch's mean leaves out the unknown loss instead of reusing step 2's.
        assert tr.history.loss[1] == whole.history.step_loss[3]
        tr.close()
