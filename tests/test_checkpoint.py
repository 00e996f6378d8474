"""Checkpoints (issue 11, items 1, 2, 7, 8, 9, 10): bound to their run, resumable mid-epoch,
validated before use, never deleting foreign files, crash-safe, any param name."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from raysupport import ensure_ray

import distgraph as dg
from distgraph import models
from distgraph.checkpoint import Checkpoint, load_checkpoint, save_checkpoint

ROOT = str(Path(__file__).resolve().parent.parent)


def mlp_setup():
    g = models.mlp_classifier((2, 16, 16, 2), seed=4)
    return g, models.spirals(48, seed=3), dg.Adam(lr=0.02)


def local_run(epochs: int, seed: int = 11) -> dg.Trainer:
    g, data, opt = mlp_setup()
    tr = dg.Trainer(g, loss="loss", optimizer=opt, progress=False)
    tr.fit(data, epochs=epochs, batch_size=16, seed=seed)
    return tr


def assert_params_identical(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert np.array_equal(got[k], want[k]), k


class Stop(Exception):
    """Raised from a callback: the driver 'dies' after a given step."""


def stop_after(step: int):
    def callback(s: int, loss: float) -> None:
        if s == step:
            raise Stop

    return callback


# --- item 2: resume at the position inside the epoch -------------------------------------------


def test_fit_stopped_mid_epoch_resumes_exactly_after_save_and_load(tmp_path):
    whole = local_run(4)
    per_epoch = len(whole.history.step_loss) // 4
    assert per_epoch > 2  # step 8 is inside an epoch
    g, data, opt = mlp_setup()
    first = dg.Trainer(g, loss="loss", optimizer=opt, progress=False)
    with pytest.raises(Stop):
        first.fit(data, epochs=4, batch_size=16, seed=11, callback=stop_after(per_epoch + 2))
    first.save(tmp_path / "ck")
    g2, _, _ = mlp_setup()
    resumed = dg.Trainer(g2, loss="loss", optimizer=opt, progress=False)
    resumed.load(tmp_path / "ck")
    assert resumed.step == per_epoch + 2 and resumed.epoch == 1
    resumed.fit(data, epochs=3, batch_size=16, seed=11)  # finishes epoch 1, then 2 and 3
    assert resumed.step == whole.step and resumed.epoch == 4
    assert_params_identical(resumed.params, whole.params)
    assert resumed.history.loss == whole.history.loss
    assert resumed.history.step_loss == whole.history.step_loss


def test_fit_interrupted_in_process_finishes_its_epoch():
    whole = local_run(2)
    g, data, opt = mlp_setup()
    tr = dg.Trainer(g, loss="loss", optimizer=opt, progress=False)
    with pytest.raises(Stop):
        tr.fit(data, epochs=2, batch_size=16, seed=11, callback=stop_after(2))
    tr.fit(data, epochs=2, batch_size=16, seed=11)
    assert_params_identical(tr.params, whole.params)
    assert tr.history.loss == whole.history.loss


@pytest.fixture(scope="module")
def ray_ex(tmp_path_factory):
    ensure_ray()
    with dg.RayExecutor(
        num_workers=2,
        strategy="round_robin",
        checkpoint_dir=str(tmp_path_factory.mktemp("ps") / "ckpt"),
        checkpoint_every=5,
    ) as ex:
        yield ex


@pytest.fixture
def fresh_dir(ray_ex, tmp_path):
    """Point the shared executor's checkpoint_dir at an empty directory for one test."""
    ray_ex.checkpoint_dir = str(tmp_path / "ps")
    return ray_ex.checkpoint_dir


def test_server_checkpoint_resumes_mid_epoch_exactly(ray_ex, fresh_dir):
    whole = local_run(4)
    per_epoch = len(whole.history.step_loss) // 4
    g, data, opt = mlp_setup()
    tr = dg.Trainer(g, loss="loss", optimizer=opt, executor=ray_ex, progress=False)
    stop = 13  # the server checkpointed at 5 and 10; step 10 lies inside epoch 1
    assert 10 % per_epoch != 0 and 10 < stop < 15
    with pytest.raises(Stop):
        tr.fit(data, epochs=4, batch_size=16, seed=11, callback=stop_after(stop))
    tr.close()  # the driver goes away; only the server's checkpoint at step 10 remains
    g2, _, _ = mlp_setup()
    resumed = dg.Trainer(g2, loss="loss", optimizer=opt, executor=ray_ex, progress=False)
    resumed.load(fresh_dir)
    assert resumed.step == 10 and resumed.epoch == 10 // per_epoch
    assert resumed.run_id == tr.run_id
    resumed.fit(data, epochs=4 - resumed.epoch, batch_size=16, seed=11)
    assert resumed.step == whole.step and resumed.epoch == 4
    assert_params_identical(resumed.params, whole.params)
    assert resumed.history.loss[: 10 // per_epoch] == whole.history.loss[: 10 // per_epoch]
    assert len(resumed.history.loss) == 4 and len(resumed.history.step_loss) == whole.step
    resumed.close()


def test_server_checkpoint_at_an_epoch_end_keeps_that_epochs_history(ray_ex, fresh_dir):
    whole = local_run(4)
    per_epoch = len(whole.history.step_loss) // 4
    g, data, opt = mlp_setup()
    ray_ex.checkpoint_every = per_epoch  # every checkpoint lands on an epoch's last step
    try:
        tr = dg.Trainer(g, loss="loss", optimizer=opt, executor=ray_ex, progress=False)
        with pytest.raises(Stop):
            tr.fit(data, epochs=4, batch_size=16, seed=11, callback=stop_after(2 * per_epoch + 2))
        tr.close()
    finally:
        ray_ex.checkpoint_every = 5
    g2, _, _ = mlp_setup()
    resumed = dg.Trainer(g2, loss="loss", optimizer=opt, executor=ray_ex, progress=False)
    resumed.load(fresh_dir)
    assert resumed.step == 2 * per_epoch and resumed.epoch == 2
    # The history of the epoch the checkpoint closed arrived after it and was written too.
    assert resumed.history.loss == whole.history.loss[:2]
    assert resumed.history.step_loss == whole.history.step_loss[: 2 * per_epoch]
    resumed.fit(data, epochs=2, batch_size=16, seed=11)
    assert_params_identical(resumed.params, whole.params)
    assert resumed.history.loss == whole.history.loss
    resumed.close()


# --- item 1: a checkpoint belongs to its run ---------------------------------------------------


def test_checkpoint_dir_of_another_run_is_refused_then_resumed_on_purpose(ray_ex, fresh_dir):
    g, data, opt = mlp_setup()
    first = dg.Trainer(g, loss="loss", optimizer=opt, executor=ray_ex, progress=False)
    first.fit(data, epochs=2, batch_size=16, seed=11)
    first.close()

    # A second run in the same directory; its server dies before its first checkpoint. Without
    # the run binding it restarted from the first run's state and ended there silently.
    g2, _, _ = mlp_setup()
    second = dg.Trainer(g2, loss="loss", optimizer=opt, executor=ray_ex, progress=False)
    initial = second.params

    def crash(step, loss):
        if step in (2, 12):  # before each run's first checkpoint after its start
            second.session.ps.crash.remote()

    with pytest.raises(dg.CheckpointError, match=r"another training run.*trainer\.load"):
        second.fit(data, epochs=4, batch_size=16, seed=11, callback=crash)
    assert second.step == 0 and second.applied_steps == []
    assert_params_identical(second.params, initial)
    assert load_checkpoint(fresh_dir).run_id == first.run_id  # nothing was overwritten
    assert load_checkpoint(fresh_dir).step == 10  # the first run's last checkpoint

    # Resuming that run on purpose: load it, then train on (the server may die again).
    second.load(fresh_dir)
    assert second.run_id == first.run_id and second.step == 10  # the server's last checkpoint
    second.fit(data, epochs=4 - second.epoch, batch_size=16, seed=11, callback=crash)
    assert any("restarted" in r for r in second.session.recoveries), second.session.recoveries
    assert_params_identical(second.params, local_run(4).params)
    second.close()


def test_a_new_run_in_an_empty_dir_restarts_from_its_own_state(ray_ex, fresh_dir):
    g, data, opt = mlp_setup()
    tr = dg.Trainer(g, loss="loss", optimizer=opt, executor=ray_ex, progress=False)

    def crash(step, loss):
        if step == 3:
            tr.session.ps.crash.remote()

    tr.fit(data, epochs=2, batch_size=16, seed=11, callback=crash)
    assert_params_identical(tr.params, local_run(2).params)
    assert load_checkpoint(fresh_dir).step == 10  # this run's own checkpoint
    tr.close()


# --- item 7: tampered state is refused, nothing changes ----------------------------------------


def _scalar_graph() -> dg.Graph:
    g = dg.Graph()
    x, y = g.input("x", shape=(None,)), g.input("y", shape=(None,))
    g.output("loss", dg.mse(x * g.param("w", -2.0) + g.param("b", 15.0), y))
    return g


def _linear_data():
    x = np.linspace(-1, 1, 32)
    return {"x": x, "y": 3 * x + 7}


def _trained(optimizer: dg.Optimizer, epochs: int = 2) -> dg.Trainer:
    tr = dg.Trainer(_scalar_graph(), loss="loss", optimizer=optimizer, progress=False)
    tr.fit(_linear_data(), epochs=epochs, batch_size=8, seed=0)
    return tr


def _tamper_params(ck, **values):
    ck.params.update({k: np.asarray(v) for k, v in values.items()})


TAMPERED = {
    "momentum vector for a scalar": (
        dg.Momentum(lr=0.05),
        lambda ck: ck.opt_state["w"].update(velocity=np.zeros(3)),
        r"'w'\.velocity.*shape",
    ),
    "int param": (dg.SGD(lr=0.05), lambda ck: _tamper_params(ck, w=np.int64(3)), r"'w'.*dtype"),
    "bool param": (dg.SGD(lr=0.05), lambda ck: _tamper_params(ck, b=np.True_), r"'b'.*dtype"),
    "nan param": (dg.SGD(lr=0.05), lambda ck: _tamper_params(ck, w=np.nan), r"'w'.*NaN"),
    "param shape": (dg.SGD(lr=0.05), lambda ck: _tamper_params(ck, w=np.ones(2)), r"'w'.*shape"),
    "negative adam t": (
        dg.Adam(lr=0.05),
        lambda ck: ck.opt_state["w"].update(t=np.asarray(-5, np.int64)),
        r"'w'\.t.*negative",
    ),
    "float adam t": (
        dg.Adam(lr=0.05),
        lambda ck: ck.opt_state["b"].update(t=np.asarray(2.5)),
        r"'b'\.t.*dtype",
    ),
    "missing adam m": (
        dg.Adam(lr=0.05),
        lambda ck: ck.opt_state["w"].pop("m"),
        r"'w'.*fields",
    ),
    "inf adam v": (
        dg.Adam(lr=0.05),
        lambda ck: ck.opt_state["w"].update(v=np.asarray(np.inf)),
        r"'w'\.v.*NaN or Inf",
    ),
    # Review: a negative second moment made every later step fail with "gradient holds NaN";
    # a counter near 2**63 raised a raw OverflowError on the next update.
    "negative adam v": (
        dg.Adam(lr=0.05),
        lambda ck: ck.opt_state["w"].update(v=np.asarray(-1.0)),
        r"'w'\.v.*negative",
    ),
    "adam t beyond the steps taken": (
        dg.Adam(lr=0.05),
        lambda ck: ck.opt_state["w"].update(t=np.asarray(2**63 - 1, np.int64)),
        r"'w'\.t.*more than",
    ),
    "negative lr": (
        dg.SGD(lr=0.05),
        lambda ck: ck.optimizer.update(lr=-1.0),
        r"optimizer.*lr",
    ),
    "unknown optimizer": (
        dg.SGD(lr=0.05),
        lambda ck: ck.optimizer.update(kind="lion"),
        r"optimizer.*lion",
    ),
}


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_tampered_checkpoint_is_refused_and_changes_nothing(tmp_path, case):
    optimizer, tamper, needle = TAMPERED[case]
    source = _trained(optimizer)
    ck = source.session.checkpoint()
    tamper(ck)
    save_checkpoint(tmp_path / "ck", ck)

    target = _trained(optimizer, epochs=1)

    def state(t):
        return (t.params, t.step, t.epoch, t.optimizer, getattr(t, "run_id", None))

    before, history = state(target), target.history.to_dict()
    with pytest.raises(dg.CheckpointError, match=needle):
        target.load(tmp_path / "ck")
    assert state(target) == before
    assert target.history.to_dict() == history
    target.fit(_linear_data(), epochs=1, batch_size=8, seed=0)  # still trains as before
    assert_params_identical(target.params, _trained(optimizer, epochs=2).params)


def test_the_checkpoints_optimizer_wins_on_load(tmp_path):
    saved_with = dg.Adam(lr=0.05)
    _trained(saved_with).save(tmp_path / "ck")
    tr = dg.Trainer(_scalar_graph(), loss="loss", optimizer=dg.Adam(lr=0.5), progress=False)
    with pytest.warns(UserWarning, match="replaces"):
        tr.load(tmp_path / "ck")
    assert tr.optimizer == saved_with  # what it reports is what it trains with
    tr.fit(_linear_data(), epochs=2, batch_size=8, seed=0)
    assert_params_identical(tr.params, _trained(saved_with, epochs=4).params)


# --- item 8: never delete what the library did not write ----------------------------------------


def _user_folder(root: Path) -> Path:
    (root / "data").mkdir(parents=True)
    (root / "data" / "train.csv").write_text("x,y\n1,2\n")
    (root / "notes.txt").write_text("my notes")
    return root


def test_save_refuses_a_folder_that_is_not_a_checkpoint(tmp_path):
    folder = _user_folder(tmp_path / "work")
    tr = _trained(dg.SGD(lr=0.05))
    with pytest.raises(dg.CheckpointError, match=r"work.*not a distgraph checkpoint.*data"):
        tr.save(folder)
    assert sorted(os.listdir(folder)) == ["data", "notes.txt"]
    assert (folder / "data" / "train.csv").read_text() == "x,y\n1,2\n"
    with pytest.raises(dg.CheckpointError, match="not a directory"):
        tr.save(folder / "notes.txt")
    assert (folder / "notes.txt").read_text() == "my notes"


def test_files_next_to_a_checkpoint_are_left_alone(tmp_path):
    tr = _trained(dg.SGD(lr=0.05))
    tr.save(tmp_path / "ck")
    (tmp_path / "ck" / "README.txt").write_text("run notes")
    tr.fit(_linear_data(), epochs=1, batch_size=8, seed=0)
    tr.save(tmp_path / "ck")
    assert (tmp_path / "ck" / "README.txt").read_text() == "run notes"
    assert load_checkpoint(tmp_path / "ck").step == tr.step


def test_checkpoint_dir_with_user_files_is_refused(ray_ex, tmp_path):
    folder = _user_folder(tmp_path / "work")
    ray_ex.checkpoint_dir = str(folder)
    g, data, opt = mlp_setup()
    tr = dg.Trainer(g, loss="loss", optimizer=opt, executor=ray_ex, progress=False)
    with pytest.raises(dg.CheckpointError, match="not a distgraph checkpoint"):
        tr.fit(data, epochs=1, batch_size=16, seed=11)
    assert sorted(os.listdir(folder)) == ["data", "notes.txt"]
    assert tr.step == 0
    tr.close()


# --- item 9: a crash during save leaves a complete checkpoint ------------------------------------

SAVER = textwrap.dedent(
    """
    import os, shutil, signal, sys
    import numpy as np
    from distgraph.checkpoint import Checkpoint, save_checkpoint

    path, k, kill_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    calls = 0

    def counted(fn):
        def wrapper(*args, **kwargs):
            global calls
            calls += 1
            if calls == kill_at:  # die just before this file-system operation
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)
        return wrapper

    for module, name in [(os, "replace"), (os, "rename"), (os, "mkdir"), (os, "fsync"),
                         (os, "unlink"), (os, "rmdir"), (shutil, "rmtree"), (np, "savez")]:
        setattr(module, name, counted(getattr(module, name)))
    print("ready", flush=True)
    while True:
        k += 1
        w = np.full(200_000, float(k))
        save_checkpoint(path, Checkpoint({"w": w}, {"w": {"velocity": -w}}, {"kind": "sgd"}, k))
    """
)


def _complete(path: Path) -> int:
    ck = load_checkpoint(path)
    k = ck.step
    assert np.array_equal(ck.params["w"], np.full(200_000, float(k)))
    assert np.array_equal(ck.opt_state["w"]["velocity"], np.full(200_000, -float(k)))
    return k


def test_save_killed_at_random_points_leaves_a_loadable_checkpoint(tmp_path):
    """40 SIGKILLs of a process saving in a loop: half at a random time from outside, half
    from inside just before a random file-system operation of a save (rename, fsync, ...)."""
    path = tmp_path / "ck"
    w = np.zeros(200_000)
    save_checkpoint(path, Checkpoint({"w": w}, {"w": {"velocity": -w}}, {"kind": "sgd"}, 0))
    rng = random.Random(7)
    steps, deadline = set(), time.monotonic() + 300
    for kill in range(40):
        kill_at = rng.randint(1, 40) if kill % 2 else 0
        proc = subprocess.Popen(
            [sys.executable, "-c", SAVER, str(path), str(1000 * (kill + 1)), str(kill_at)],
            stdout=subprocess.PIPE,
            cwd=ROOT,
        )
        try:
            assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
            if kill_at:
                proc.wait(timeout=60)
            else:
                time.sleep(rng.uniform(0.0, 0.3))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert proc.returncode == -signal.SIGKILL
        steps.add(_complete(path))  # the old version or the new one, never a broken one
        assert time.monotonic() < deadline, f"only {kill + 1} kills in the time allowed"
    assert len(steps) > 10  # the savers did write new versions between kills
    save_checkpoint(path, load_checkpoint(path))  # the next save cleans up after the crashes
    entries = sorted(os.listdir(path))
    assert len(entries) == 2 and entries[0] == "checkpoint.json", entries


# --- item 10: any param name round-trips ----------------------------------------------------------


@pytest.mark.parametrize("name", ["file", "allow_pickle", "args", "kwds", "p0", "s1"])
def test_param_names_that_collide_with_savez_keywords_round_trip(tmp_path, name):
    g = dg.Graph()
    x, y = g.input("x", shape=(None,)), g.input("y", shape=(None,))
    g.output("loss", dg.mse(x * g.param(name, 1.5) + g.param("bias", 0.0), y))
    tr = dg.Trainer(g, loss="loss", optimizer=dg.Momentum(lr=0.05), progress=False)
    tr.fit(_linear_data(), epochs=1, batch_size=8, seed=0)
    tr.save(tmp_path / "ck")
    ck = load_checkpoint(tmp_path / "ck")
    assert set(ck.params) == {name, "bias"} and set(ck.opt_state) == {name, "bias"}
    other = dg.Trainer(g, loss="loss", optimizer=dg.Momentum(lr=0.05), progress=False)
    other.load(tmp_path / "ck")
    assert other.params == tr.params
    assert np.array_equal(
        other.session.checkpoint().opt_state[name]["velocity"],
        tr.session.checkpoint().opt_state[name]["velocity"],
    )


def test_fit_interrupted_after_an_epochs_last_step_starts_the_next_epoch():
    # Review: a stop between an epoch's last applied step and the epoch count (a callback's
    # error, or Ctrl-C after the commit) made the next fit shuffle that epoch again.
    whole = local_run(3)
    per_epoch = len(whole.history.step_loss) // 3
    g, data, opt = mlp_setup()
    tr = dg.Trainer(g, loss="loss", optimizer=opt, progress=False)
    with pytest.raises(Stop):
        tr.fit(data, epochs=3, batch_size=16, seed=11, callback=stop_after(per_epoch))
    assert tr.step == per_epoch  # the epoch's last step was applied
    tr.fit(data, epochs=2, batch_size=16, seed=11)
    assert tr.step == whole.step and tr.epoch == 3
    assert_params_identical(tr.params, whole.params)
    assert tr.history.loss == whole.history.loss
