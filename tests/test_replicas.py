"""Data-parallel replicas on Ray (issue 14, items 1, 2, 5, 7): R copies of the training plan,
each over N / R workers, the batch split by rows, gradients combined at the server."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from raysupport import ensure_ray

import distgraph as dg
from distgraph import models
from distgraph.dataparallel import combine
from distgraph.errors import ConfigError, GraphError
from distgraph.runtime.paramserver import ParameterServer

# 150 rows in batches of 16: 10 steps an epoch, the last one of 6 rows (uneven shards).
ROWS, BATCH, EPOCHS = 150, 16, 10  # 100 steps


def _linear():
    return models.linear_regression(), models.linear_data(ROWS, seed=1), dg.SGD(lr=0.05)


def _mlp():
    # SGD: Adam divides each gradient by its running RMS, which magnifies the last-bit
    # differences of gradient components that nearly cancel over the batch (after 100 steps
    # b1 differs by ~1e-11 relative with Adam; the combined gradient itself agrees to rounding).
    g = models.mlp_classifier((2, 8, 8, 2), seed=3)
    return g, models.spirals(ROWS // 2, seed=2), dg.SGD(lr=0.1)


MODELS = {"linear": _linear, "mlp": _mlp}


def _fit(model: str, executor: dg.Executor | None = None, trace: bool = False) -> dg.Trainer:
    g, data, opt = MODELS[model]()
    tr = dg.Trainer(g, loss="loss", optimizer=opt, executor=executor, progress=False, trace=trace)
    tr.fit(data, epochs=EPOCHS, batch_size=BATCH, seed=5)
    return tr


_LOCAL: dict[str, dict[str, np.ndarray]] = {}


def _local(model: str) -> dict[str, np.ndarray]:
    if model not in _LOCAL:
        _LOCAL[model] = _fit(model).params
    return _LOCAL[model]


def _assert_every_replica_computed(tr: dg.Trainer, replicas: int, width: int) -> None:
    """The precondition of the comparisons: every step ran on every replica, each on its own
    rows (together the whole batch) and its own workers."""
    info = tr.session.status()["replicas"]
    assert (info["count"], info["width"]) == (replicas, width)
    steps = info["steps"]
    assert sorted(steps) == list(range(1, EPOCHS * 10 + 1))
    for step, entries in steps.items():
        batch = BATCH if step % 10 else ROWS % BATCH
        assert [e["replica"] for e in entries] == list(range(replicas)), step
        if replicas == 1:
            assert entries[0]["rows"] is None and entries[0]["workers"]
            continue
        spans = [e["rows"] for e in entries]
        assert spans[0][0] == 0 and spans[-1][1] == batch, (step, spans)
        assert all(a[1] == b[0] for a, b in itertools.pairwise(spans)), (step, spans)
        sizes = [b - a for a, b in spans]
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1, (step, sizes)
        for e in entries:
            r = e["replica"]
            assert e["workers"], (step, r)
            assert all(r * width <= w < (r + 1) * width for w in e["workers"]), (step, e)


# --- the server's combination (no Ray) --------------------------------------------------------


def test_server_stage_combines_replica_gradients_once_in_replica_order():
    params = {"w": np.array([1.0, 2.0]), "b": np.array(0.5)}
    grads = {"w": "dw", "b": "db"}
    rng = np.random.default_rng(0)
    shard = [{"dw": rng.standard_normal(2), "db": rng.standard_normal()} for _ in range(3)]
    rows = [6, 5, 5]
    want = combine(shard, rows, "mean")

    direct = ParameterServer(dict(params), dg.SGD(lr=0.1), {}, grads)
    direct.stage(1, {"dw": want["dw"]}, {"db": want["db"]})
    direct.commit(1)
    dp = ParameterServer(dict(params), dg.SGD(lr=0.1), {}, grads)
    # Replica 0 sent its gradients in two dicts, replicas 1 and 2 in one each.
    dicts = [{"dw": shard[0]["dw"]}, {"db": shard[0]["db"]}, shard[1], shard[2]]
    dp.stage(1, *dicts, replicas=[(2, 6), (1, 5), (1, 5)], kind="mean")
    assert dp.store.version == 0  # staged, nothing applied yet
    dp.commit(1)
    for k in params:
        assert np.array_equal(dp.params()[k], direct.params()[k]), k
    assert dp.status()["applied"] == [1]
    with pytest.raises(ConfigError, match="account for 3 gradient dicts, but 4"):
        dp.stage(2, *dicts, replicas=[(1, 6), (1, 5), (1, 5)])


class _Recorder:
    """A stand-in for the server actor's ``stage`` method that records how it was called."""

    def __init__(self):
        self.calls: list[tuple[tuple, dict]] = []

    def options(self, **_options):
        return self

    def remote(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return ["staged", "params for 0", "params for 1"]


def test_replica_stage_takes_the_gradients_nested_so_the_server_fetches_them_itself():
    # Top-level refs would make Ray hold the call at the driver until every worker finished;
    # nested ones let the server take each gradient as it is ready (one hop, not two).
    from types import SimpleNamespace

    from distgraph.plan import PARAM_SERVER
    from distgraph.runtime.ray.server import ServerLink

    options = SimpleNamespace(num_workers=2, deadline=123.0)
    link = ServerLink(None, options, dg.SGD(lr=0.1), {}, lambda _step: None)  # type: ignore[arg-type]
    stage = _Recorder()
    link.handle = SimpleNamespace(stage=stage)
    plan = SimpleNamespace(
        tasks=[
            SimpleNamespace(id=i, outputs=[(PARAM_SERVER, ["dw"])], slot=lambda _dest: 0)
            for i in (0, 1)
        ]
    )
    refs = {0: ["grads of replica 0"], 1: ["grads of replica 1"]}
    split = {"replicas": [(1, 8), (1, 8)], "kind": "mean"}
    staged, routed = link.stage(7, plan, refs, [0, 1], split, 1)  # type: ignore[arg-type]
    args, kwargs = stage.calls[-1]
    assert args == (7,)  # no gradient among the top-level arguments
    assert kwargs["grad_refs"] == ["grads of replica 0", "grads of replica 1"]
    assert kwargs["wait"] == 123.0 and kwargs["routed"] is True
    assert staged == ["staged"] and routed == {0: "params for 0", 1: "params for 1"}
    # One replica (no split): the gradients stay top-level, as every other path sends them.
    link.stage(8, plan, refs, [], None, 1)  # type: ignore[arg-type]
    args, kwargs = stage.calls[-1]
    assert args == (8, "grads of replica 0", "grads of replica 1") and "grad_refs" not in kwargs


@pytest.mark.parametrize("replicas", [3, 0, "two"])
def test_replicas_must_divide_the_workers(replicas):
    with pytest.raises(ConfigError, match="replicas") as e:
        dg.RayExecutor(num_workers=4, replicas=replicas)
    assert "[1, 2, 4]" in str(e.value)


# --- exact gradients: R x strategy x model ----------------------------------------------------


@pytest.fixture(scope="module", params=[1, 2, 3], ids=lambda r: f"R{r}")
def replica_ex(request):
    """R replicas of two workers each."""
    ensure_ray()
    r = request.param
    with dg.RayExecutor(num_workers=2 * r, replicas=r) as ex:
        yield ex


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("strategy", ["mincut", "round_robin", "level"])
def test_replicas_equal_the_full_batch_and_repeat_bit_for_bit(replica_ex, strategy, model):
    replica_ex.strategy = strategy  # read by each new session when it places the program
    r = replica_ex.replicas
    first = _fit(model, replica_ex)
    _assert_every_replica_computed(first, r, 2)
    second = _fit(model, replica_ex)
    want = _local(model)
    assert first.applied_steps == list(range(1, EPOCHS * 10 + 1))
    for k in want:
        np.testing.assert_allclose(first.params[k], want[k], rtol=1e-12, atol=1e-15, err_msg=k)
        assert np.array_equal(first.params[k], second.params[k]), k
    assert first.history.step_loss == second.history.step_loss


def test_auto_keeps_one_replica_for_a_small_mlp_says_why_and_is_bit_for_bit():
    ensure_ray()
    with dg.RayExecutor(num_workers=2, replicas="auto") as ex:
        tr = _fit("mlp", ex)
        layout = tr.session.layout
        # Another replica's calls and combine cost more than halving 16 rows saves.
        assert (layout.count, layout.width) == (1, 2)
        assert "alternatives" in layout.explanation and "R=2 x 1 worker" in layout.explanation
        assert "why: lowest estimated step time" in layout.explanation
        _assert_every_replica_computed(tr, 1, 2)
        g, _, _ = _mlp()
        text = ex.plan(g, grad="loss", training=True, batch_size=BATCH).explain()
        assert text.startswith("layout: 1 replica x 2 workers") and "alternatives" in text
    want = _local("mlp")
    for k in want:
        assert np.array_equal(tr.params[k], want[k]), k


def _big_mlp() -> tuple[dg.Graph, dict[str, np.ndarray]]:
    """The MLP 784-512-512-10 (float64) on two batches of 256 rows."""
    g = models.mlp_classifier((784, 512, 512, 10), seed=0)
    rng = np.random.default_rng(4)
    return g, {"x": rng.standard_normal((512, 784)), "y": rng.integers(0, 10, 512)}


def test_auto_is_the_default_and_trains_a_big_mlp_data_parallel():
    ensure_ray()
    g, data = _big_mlp()
    with dg.RayExecutor(num_workers=2) as ex:
        assert ex.replicas == "auto"
        # run() never splits rows: one plan over both workers, equal to the oracle bit for bit.
        feeds = {k: v[:256] for k, v in data.items()}
        assert ex.plan(g, "loss").num_workers == 2
        got = ex.run(g, feeds, outputs=["loss"])
        want_run = dg.LocalExecutor().run(g, feeds, outputs=["loss"])
        assert np.array_equal(got.values["loss"], want_run.values["loss"])
        tr = dg.Trainer(g, loss="loss", optimizer=dg.SGD(lr=0.01), executor=ex, progress=False)
        tr.fit(data, epochs=1, batch_size=256, shuffle=False)
        info = tr.session.status()["replicas"]
        text = ex.plan(g, grad="loss", training=True, batch_size=256).explain()
    assert (info["count"], info["width"]) == (2, 1)
    assert [e["rows"] for e in info["steps"][1]] == [[0, 128], [128, 256]]
    lines = text.splitlines()
    assert lines[0].startswith("layout: 2 replicas x 1 worker each (data parallel)")
    assert lines[1].startswith("  why: lowest estimated step time") and "25% faster" in lines[1]
    assert any(line.startswith("  * R=2 x 1 worker: ") for line in lines)
    assert any(
        line.startswith("    R=1 x 2 workers: ") and " ms (compute" in line for line in lines
    )
    local = dg.Trainer(g, loss="loss", optimizer=dg.SGD(lr=0.01), progress=False)
    local.fit(data, epochs=1, batch_size=256, shuffle=False)
    for k, v in local.params.items():
        np.testing.assert_allclose(tr.params[k], v, rtol=1e-12, atol=1e-15, err_msg=k)


# --- a loss that couples rows -----------------------------------------------------------------


def _coupled() -> tuple[dg.Graph, dict[str, np.ndarray]]:
    g = dg.Graph()
    x = g.input("x", shape=(None, 3))
    h = x @ g.param("W", np.random.default_rng(0).standard_normal((3, 2)))
    mu = g.apply("mean", h, axis=0, keepdims=True, name="mu")  # a batch statistic
    centered = h - mu
    g.output("loss", (centered * centered).mean())
    return g, {"x": np.random.default_rng(1).standard_normal((32, 3))}


def test_a_loss_coupling_rows_is_refused_for_replicas_naming_the_node():
    ensure_ray()
    g, data = _coupled()
    with dg.RayExecutor(num_workers=2, replicas=2) as ex:
        tr = dg.Trainer(g, loss="loss", optimizer=dg.SGD(lr=0.1), executor=ex, progress=False)
        with pytest.raises(GraphError) as e:
            tr.fit(data, epochs=1, batch_size=8)
        assert "'mu' (op mean, axis 0)" in str(e.value) and "replicas=1" in str(e.value)
        assert tr.applied_steps == []  # nothing was applied


def test_auto_falls_back_to_one_replica_for_a_coupled_loss_and_says_why():
    ensure_ray()
    g, data = _coupled()
    with dg.RayExecutor(num_workers=2, replicas="auto") as ex:
        tr = dg.Trainer(g, loss="loss", optimizer=dg.SGD(lr=0.1), executor=ex, progress=False)
        tr.fit(data, epochs=2, batch_size=8)
        layout = tr.session.layout
        assert layout.count == 1
        assert "does not split by rows" in layout.explanation
        assert "'mu' (op mean, axis 0)" in layout.explanation
        got = tr.params
    ref = dg.Trainer(g, loss="loss", optimizer=dg.SGD(lr=0.1), progress=False)
    ref.fit(data, epochs=2, batch_size=8)
    assert np.array_equal(got["W"], ref.params["W"])


# --- seeing it --------------------------------------------------------------------------------


def test_trace_has_a_track_per_replica_with_its_rows():
    ensure_ray()
    with dg.RayExecutor(num_workers=2, replicas=2) as ex:
        g, data, opt = _mlp()
        tr = dg.Trainer(g, loss="loss", optimizer=opt, executor=ex, progress=False, trace=True)
        tr.fit(data, epochs=1, batch_size=BATCH, seed=5)
        events = tr.last_trace
        status = tr.session.status()["replicas"]
    last = status["last_step"]
    assert last == 10 and status["rows"] == [[0, 3], [3, 6]]  # the epoch's last batch: 6 rows
    tracks = {e.track for e in events}
    assert {"replica 0", "replica 1"} <= tracks
    spans = sorted(e.args["rows"] for e in events if e.track.startswith("replica "))
    assert spans == [[0, 3], [3, 6]]
    computed = {e.args["replica"] for e in events if e.kind == "node"}
    assert computed == {0, 1}


# --- faults -----------------------------------------------------------------------------------


def test_worker_lost_mid_step_recovers_and_equals_the_uninterrupted_run():
    ensure_ray()
    g, data, opt = _mlp()
    # Half a CPU per worker: the module's other executors may still hold six.
    with dg.RayExecutor(
        num_workers=4, replicas=2, strategy="round_robin", resources_per_worker={"CPU": 0.5}
    ) as ex:
        whole = _fit("mlp", ex)
        crashed: list[int] = []

        def crash(tr, step):
            if step == 37:
                # A worker of replica 1, killed before step 38 runs.
                busy = max(t.worker for t in tr.session.plan.tasks)
                assert busy >= 2
                ex.workers[busy].crash.remote()
                crashed.append(busy)

        tr = dg.Trainer(g, loss="loss", optimizer=opt, executor=ex, progress=False)
        tr.fit(
            data,
            epochs=EPOCHS,
            batch_size=BATCH,
            seed=5,
            callback=lambda step, loss: crash(tr, step),
        )
        assert crashed and ex.replacements[-1] == crashed[0]
        assert tr.session.recoveries, "the crash was never noticed"
        _assert_every_replica_computed(tr, 2, 2)
    assert tr.applied_steps == whole.applied_steps
    for k in whole.params:
        assert np.array_equal(tr.params[k], whole.params[k]), k


# --- defaults and the command line ------------------------------------------------------------


def test_the_default_keeps_one_replica_for_the_linear_fit_bit_for_bit():
    ensure_ray()
    with dg.RayExecutor(num_workers=2) as ex:
        assert ex.replicas == "auto"
        tr = _fit("linear", ex)
        assert tr.session.status()["replicas"]["count"] == 1
        assert tr.session.layout.explanation.startswith("layout: 1 replica x 2 workers")
    want = _local("linear")
    for k in want:
        assert np.array_equal(tr.params[k], want[k]), k


def test_cli_train_and_explain_take_replicas(capsys):
    from distgraph.cli import main

    ensure_ray()
    argv = ["train", "linear", "--backend", "ray", "--workers", "2", "--replicas", "2"]
    code = main([*argv, "--epochs", "3", "--json", "--check-local"])
    out = capsys.readouterr().out
    assert code == 0, out
    got = json.loads(out)
    assert got["matches_local"] is True and got["max_rel_diff"] <= 1e-9
    replicas = got["replicas"]
    assert (replicas["count"], replicas["width"], replicas["kind"]) == (2, 1, "mean")
    assert replicas["rows"] == [[0, 4], [4, 8]]  # the last batch of 200 rows by 16: 8 rows
    assert list(replicas["ip_steps"].values()) == [replicas["steps"]] == [3 * 13]
    assert (
        main(["explain", "mlp", "--workers", "2", "--replicas", "auto", "--batch-size", "64"]) == 0
    )
    text = capsys.readouterr().out
    assert text.startswith("layout:") and "why:" in text and "R=1 x 2 workers" in text
    assert "R=2 x 1 worker" in text
    assert main(["train", "linear", "--replicas", "2"]) == 2
    assert "--replicas applies to Ray only" in capsys.readouterr().err
