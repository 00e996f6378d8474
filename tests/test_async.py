"""Asynchronous data-parallel training with bounded staleness (issue 14, items 4 and 5):
``RayExecutor(consistency="async", staleness=tau, replicas=R)``."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from raysupport import ensure_ray

import distgraph as dg
from distgraph import models
from distgraph.errors import ConfigError

# 150 rows in batches of 16: 10 steps an epoch (the last of 6 rows).
ROWS, BATCH = 150, 16


def _trainer(ex: dg.Executor | None) -> dg.Trainer:
    return dg.Trainer(
        models.linear_regression(),
        loss="loss",
        optimizer=dg.SGD(lr=0.05),
        executor=ex,
        progress=False,
    )


def _data() -> dict[str, np.ndarray]:
    return models.linear_data(ROWS, seed=1)


def _async_executor(staleness: int, **options) -> dg.RayExecutor:
    """Two workers as two asynchronous replicas on the shared runtime (half a CPU each)."""
    ensure_ray()
    return dg.RayExecutor(
        num_workers=2,
        replicas=2,
        consistency="async",
        staleness=staleness,
        resources_per_worker={"CPU": 0.5},
        **options,
    )


def _hook_applied(
    session,
    before: Callable[[int], None] | None = None,
    after: Callable[[int], None] | None = None,
) -> Callable:
    """Make ``session.run_async`` call ``before(step)`` ahead of the Trainer's own per-step
    callback and ``after(step)`` behind it, each time a step is applied (a test's way in
    mid-run: crash an actor, stop the run). Returns the original ``run_async``."""
    run = session.run_async

    def hooked(steps, data, on_applied=None, **options):
        def applied(step, loss):
            if before is not None:
                before(step)
            if on_applied is not None:
                on_applied(step, loss)
            if after is not None:
                after(step)

        return run(steps, data, applied, **options)

    session.run_async = hooked
    return run


def _assert_each_step_once(tr: dg.Trainer, steps: int, one_record: bool = True) -> dict:
    """Every step id applied exactly once, each (replica, step) recorded once, and (unless a
    run was stopped, dropping steps in flight that ran again later, maybe on another replica)
    each step computed by exactly one replica."""
    status = tr.session.status()
    applied = tr.applied_steps
    assert sorted(applied) == list(range(1, steps + 1)), applied
    assert len(applied) == len(set(applied))
    assert not status.get("duplicates"), status.get("duplicates")
    records = status["async"]["records"]
    keys = [(r["replica"], r["step"]) for r in records]
    assert len(keys) == len(set(keys))
    if one_record:
        assert sorted(r["step"] for r in records) == list(range(1, steps + 1))
    else:
        assert {r["step"] for r in records} == set(range(1, steps + 1))
    assert tr.step == steps and len(tr.history.step_loss) == steps
    return status


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"consistency": "async", "staleness": 2}, "replicas=R with R >= 2"),
        ({"consistency": "async", "replicas": "auto"}, "replicas=R with R >= 2"),
        ({"consistency": "eventual", "replicas": 2}, "consistency must be one of"),
        ({"consistency": "async", "replicas": 2, "staleness": -1}, "staleness must be"),
        ({"consistency": "sync", "replicas": 2, "staleness": 3}, "consistency='async' only"),
        ({"consistency": "async", "replicas": 2, "_slow_replicas": {1: 0.5}}, "factor >= 1"),
    ],
)
def test_bad_consistency_settings_are_refused_naming_the_option(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        dg.RayExecutor(num_workers=2, **kwargs)


@pytest.mark.parametrize("shards", [1, 2], ids=lambda s: f"ps_shards{s}")
def test_async_with_a_straggler_converges_within_the_staleness_bound(shards):
    epochs = 20
    with _async_executor(2, ps_shards=shards, _slow_replicas={1: 3.0}) as ex:
        tr = _trainer(ex)
        tr.fit(_data(), epochs=epochs, batch_size=BATCH, seed=5)
        status = _assert_each_step_once(tr, epochs * 10)
        params = tr.params
        tr.close()
    info = status["async"]
    assert info["applied_through"] == [epochs * 10] * shards
    hist = info["staleness_histogram"]
    # Preconditions: both replicas computed steps, and some gradient was stale.
    assert {r["replica"] for r in info["records"]} == {0, 1}
    assert max(hist) > 0, hist
    # The bound: no gradient computed on params missing more than tau earlier steps.
    assert info["max_staleness"] <= 2 and max(hist) <= 2, hist
    assert all(r["staleness"] == r["step"] - 1 - r["version"] for r in info["records"])
    # The slowed replica took fewer steps than the fast one.
    by = [sum(1 for r in info["records"] if r["replica"] == k) for k in (0, 1)]
    assert by[0] > by[1], by
    assert abs(float(params["w"]) - 3.0) < 1e-3, params
    assert abs(float(params["b"]) - 7.0) < 1e-3, params


def test_async_tau0_equals_the_sequential_run():
    epochs = 3
    with _async_executor(0) as ex:
        tr = _trainer(ex)
        tr.fit(_data(), epochs=epochs, batch_size=BATCH, seed=5)
        status = _assert_each_step_once(tr, epochs * 10)
        got, losses = tr.params, list(tr.history.step_loss)
        applied = tr.applied_steps
        tr.close()
    info = status["async"]
    assert info["staleness_histogram"] == {0: epochs * 10}
    assert applied == list(range(1, epochs * 10 + 1))  # in order
    # Sequential: the same step -> batch assignment, one whole mini-batch per step.
    ref = _trainer(dg.LocalExecutor())
    ref.fit(_data(), epochs=epochs, batch_size=BATCH, seed=5)
    for k in ref.params:
        assert np.array_equal(np.asarray(got[k]), np.asarray(ref.params[k])), k
    assert losses == ref.history.step_loss


def test_async_status_and_cli(capsys, tmp_path):
    ensure_ray()
    import json
    import re

    from distgraph.cli import main

    argv = [
        "train",
        "linear",
        "--backend",
        "ray",
        "--workers",
        "2",
        "--replicas",
        "2",
        "--consistency",
        "async",
        "--staleness",
        "1",
        "--epochs",
        "2",
        "--json",
        "--report",
        str(tmp_path / "async.html"),
    ]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["async"]["staleness"] == 1
    assert out["async"]["max_staleness"] <= 1
    assert sum(out["async"]["staleness_histogram"].values()) == 2 * 13
    # The report's scaling card: the bound, and the latest steps with the replica that ran
    # each and its staleness (never above the bound).
    page = (tmp_path / "async.html").read_text()
    assert 'id="async-records"' in page and "τ = 1" in page
    rows = re.findall(r'<tr data-step="(\d+)" data-replica="(\d+)">.*?<td>(\d+)</td></tr>', page)
    assert sorted(int(s) for s, _, _ in rows) == list(range(2 * 13 - 11, 2 * 13 + 1))
    assert all(int(st) <= 1 for _, _, st in rows)


def test_async_worker_killed_mid_run_applies_every_step_once():
    epochs = 4
    with _async_executor(2) as ex:
        tr = _trainer(ex)
        session = tr.session
        crashed: list[int] = []

        def crash(step: int) -> None:
            if step == 15 and not crashed:
                # Replica 1's only worker, killed while the run goes on.
                ex.workers[1].crash.remote()
                crashed.append(1)

        _hook_applied(session, before=crash)
        tr.fit(_data(), epochs=epochs, batch_size=BATCH, seed=5)
        assert crashed and ex.replacements == [1]
        assert session.recoveries, "the crash was never noticed"
        status = _assert_each_step_once(tr, epochs * 10)
        tr.close()
    # Both replicas computed steps after the crash (the replaced worker took part again).
    late = {r["replica"] for r in status["async"]["records"] if r["step"] > 20}
    assert late == {0, 1}, late


def test_async_run_stopped_by_an_error_resumes_without_repeating_a_step():
    with _async_executor(3, _slow_replicas={1: 3.0}) as ex:
        tr = _trainer(ex)
        session = tr.session
        seen: list[int] = []

        def stop_on_a_gap(step: int) -> None:
            if sorted(seen) != list(range(1, len(seen) + 1)):
                raise KeyboardInterrupt  # stops the run with a step missing before this

        run = _hook_applied(session, before=seen.append, after=stop_on_a_gap)
        with pytest.raises(KeyboardInterrupt):
            tr.fit(_data(), epochs=1, batch_size=BATCH, seed=5)
        first = list(seen)
        # Precondition: the run stopped mid-epoch, with steps applied out of order
        # (so some applied steps lie beyond the counted prefix).
        assert tr.step < max(first) < 10, (tr.step, first)
        assert tr.step == len(first) - 1 and len(tr.history.step_loss) == tr.step
        session.run_async = run  # the same fit again finishes the epoch
        tr.fit(_data(), epochs=1, batch_size=BATCH, seed=5)
        _assert_each_step_once(tr, 10, one_record=False)
        assert not set(first) & set(seen[len(first) :]), seen  # no applied step ran again
        tr.close()


@pytest.mark.parametrize("checkpoints", [False, True], ids=["from-start", "from-checkpoint"])
def test_async_shard_killed_mid_run_applies_every_step_once_and_converges(tmp_path, checkpoints):
    """Issue 14, item 5: a parameter-server shard lost while asynchronous steps are in flight.
    Every shard restarts from one step (its checkpoint, or the run's start) and the steps
    counted since are replayed; each (replica, step) is still applied exactly once and the
    fit reaches the line's coefficients."""
    epochs = 20
    saving = {"checkpoint_dir": str(tmp_path / "ps"), "checkpoint_every": 5} if checkpoints else {}
    with _async_executor(2, ps_shards=2, **saving) as ex:
        tr = _trainer(ex)
        session = tr.session
        crashed: list[int] = []

        def crash(step: int) -> None:
            if step >= 23 and not crashed:
                # Shard 1 dies while both replicas still have steps in flight.
                session.server.links[1].handle.crash.remote()
                crashed.append(step)

        _hook_applied(session, before=crash)
        tr.fit(_data(), epochs=epochs, batch_size=BATCH, seed=5)
        assert crashed, "the shard was never killed"
        # Precondition: the loss was noticed and the shards restarted, replaying steps.
        assert any("restarted" in r for r in session.recoveries), session.recoveries
        assert any("replaying steps" in r for r in session.recoveries), session.recoveries
        status = _assert_each_step_once(tr, epochs * 10)
        params = tr.params
        tr.close()
    per_shard = [s["applied"] for s in status["shards"]]
    assert all(sorted(a) == list(range(1, epochs * 10 + 1)) for a in per_shard), per_shard
    assert all(len(a) == len(set(a)) for a in per_shard), per_shard
    assert status["async"]["applied_through"] == [epochs * 10] * 2
    assert abs(float(params["w"]) - 3.0) < 1e-3, params
    assert abs(float(params["b"]) - 7.0) < 1e-3, params
