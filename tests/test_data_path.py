"""Where work runs and which bytes reach the driver (issue 11 item 14, issue 12 item 11)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import ray
from graphs import SPREAD_COST, towers
from raysupport import ensure_ray

import distgraph as dg


@pytest.fixture(scope="module")
def ex2():
    ensure_ray()
    with dg.RayExecutor(num_workers=2, strategy="mincut", cost=SPREAD_COST) as ex:
        yield ex


def test_worker_trace_events_say_where_they_ran(ex2):
    g, feeds, out = towers(n=2)
    res = ex2.run(g, feeds, grad=out, trace=True)
    info = {i["index"]: i for i in ex2.worker_info}
    mine = [e for e in res.trace if e.kind in ("node", "call") and e.worker is not None]
    assert {e.worker for e in mine} == {0, 1}  # both workers ran nodes: a split placement
    for e in mine:
        assert e.args["host"] == info[e.worker]["node_ip"], e
        assert e.args["node_id"] == info[e.worker]["node_id"], e
    np.testing.assert_array_equal(
        res.values["loss"], dg.LocalExecutor().run(g, feeds).values["loss"]
    )


# --- bytes that reach the driver ---------------------------------------------------------------


class DriverResults:
    """The results of every actor call the driver makes while recording.

    Ray stores a task result of up to 100 KiB in the caller's process, and the driver is the
    caller of every worker and server call: whatever those calls return reaches the driver
    process, read or not. ``inlined()`` sums the bytes of those held in the driver's memory
    store (Ray's own account of each object: no ``node_ids`` means it lives in this process).
    """

    def __init__(self) -> None:
        self.refs: list[ray.ObjectRef] = []
        self.recording = False

    def reset(self) -> None:
        self.refs = []
        self.recording = True

    def inlined(self) -> int:
        self.recording = False
        refs = [r for r in self.refs if isinstance(r, ray.ObjectRef)]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=120, fetch_local=False)
        assert len(ready) == len(refs), "a call of the step never finished"
        core = ray._private.worker.global_worker.core_worker
        where = core.get_local_object_locations(refs)
        return sum(v["object_size"] for v in where.values() if not v["node_ids"])


@pytest.fixture
def driver_results(monkeypatch: pytest.MonkeyPatch) -> DriverResults:
    rec = DriverResults()
    real = ray.actor.ActorMethod._remote

    def recording(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = real(self, *args, **kwargs)
        if rec.recording:
            rec.refs.extend(out if isinstance(out, list) else [out])
        return out

    monkeypatch.setattr(ray.actor.ActorMethod, "_remote", recording)
    return rec


def _nbytes(values: dict[str, Any]) -> int:
    return sum(np.asarray(v).nbytes for v in values.values())


#: Bytes a call may bring back besides requested values: a reference, a status, dict framing.
PER_CALL = 512


#: data_path="inline" (the default, fastest for small graphs) lets small values, gradients
#: and params pass through the driver's memory: these tests document it by failing.
DATA_PATHS = [
    "store",
    pytest.param("inline", marks=pytest.mark.xfail(strict=True, reason="values pass the driver")),
]


@pytest.fixture
def data_path(ex2, request):
    ex2.data_path = request.param
    yield request.param
    ex2.data_path = "inline"


@pytest.mark.parametrize("data_path", DATA_PATHS, indirect=True)
@pytest.mark.parametrize("trace", [False, True], ids=["plain", "traced"])
def test_a_run_brings_the_driver_only_what_it_asked_for(ex2, driver_results, data_path, trace):
    g, feeds, out = towers(n=2, width=64, batch=32)  # 16 KiB activations, 32 KiB weights
    ex2.strategy = "round_robin"  # activations and gradients cross workers at every level
    try:
        ex2.run(g, feeds, grad=out)  # installs the plan
        driver_results.reset()
        res = ex2.run(g, feeds, grad=out, trace=trace)
        got = driver_results.inlined()
    finally:
        ex2.strategy = "mincut"
    assert len(set(res.placement.values())) == 2 and ex2.last_calls
    asked = _nbytes(res.values) + _nbytes(res.grads)
    previews = len(res.trace) * 1024 if trace else 0
    print(f"run {data_path} trace={trace}: {got} bytes reached the driver, {asked} asked for")
    assert got <= asked + previews + PER_CALL * (len(ex2.last_calls) + 2), (got, asked)


@pytest.mark.parametrize("data_path", DATA_PATHS, indirect=True)
@pytest.mark.parametrize("strategy", ["round_robin", "mincut"])
@pytest.mark.parametrize("trace", [False, True], ids=["plain", "traced"])
def test_a_training_step_brings_the_driver_only_its_loss(
    ex2, driver_results, data_path, strategy, trace
):
    g, _, _ = towers(n=2, width=64, batch=32)
    rng = np.random.default_rng(3)
    data = {"x": rng.standard_normal((64, 64)), "y": rng.integers(0, 3, size=64)}
    ex2.strategy = strategy
    try:
        tr = dg.Trainer(g, loss="loss", optimizer=dg.SGD(lr=0.1), executor=ex2, progress=False)
        tr.fit(data, epochs=1, batch_size=32)  # plan installed, server started
        assert len(set(tr.session.plan.placement.values())) == 2
        driver_results.reset()
        tr.session.step(tr.step + 1, {k: v[:32] for k, v in data.items()}, trace=trace)
        tr.session.step(tr.step + 2, {k: v[32:] for k, v in data.items()}, trace=trace)
        events = len(tr.session.last_trace) if trace else 0
        calls = len(ex2.last_calls) + 2  # the server's update, and the status read
        got = driver_results.inlined()
        tr.close()
    finally:
        ex2.strategy = "mincut"
    print(f"step {data_path} {strategy} trace={trace}: {got / 2:.0f} bytes/step reached the driver")
    assert got / 2 <= 8 + events * 1024 + PER_CALL * calls, got


def test_store_path_trains_like_local_and_survives_a_worker_crash(ex2):
    g, _, _ = towers(n=2, width=16)
    rng = np.random.default_rng(4)
    data = {"x": rng.standard_normal((64, 16)), "y": rng.integers(0, 3, size=64)}
    ref = dg.Trainer(g, loss="loss", optimizer=dg.Adam(lr=0.05), progress=False)
    ref.fit(data, epochs=3, batch_size=16, seed=2)
    ex2.strategy, ex2.data_path = "round_robin", "store"
    crashed = []

    def crash(step: int, loss: float) -> None:
        if step == 5:  # a worker's values of later steps are owned by the worker: lost with it
            ex2.workers[1].crash.remote()
            crashed.append(1)

    try:
        tr = dg.Trainer(g, loss="loss", optimizer=dg.Adam(lr=0.05), executor=ex2, progress=False)
        tr.fit(data, epochs=3, batch_size=16, seed=2, callback=crash)
        assert crashed and 1 in ex2.replacements
        for k, v in ref.params.items():
            np.testing.assert_array_equal(tr.params[k], v, err_msg=k)
        assert tr.applied_steps == list(range(1, 13))
        tr.close()
    finally:
        ex2.strategy, ex2.data_path = "mincut", "inline"


def test_data_path_is_checked():
    with pytest.raises(dg.ConfigError, match="data_path"):
        dg.RayExecutor(num_workers=1, data_path="driver")
