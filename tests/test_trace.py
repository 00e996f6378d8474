"""Chrome trace export: hand-made events, a local run, and a 2-worker Ray training step."""

from __future__ import annotations

import json

import numpy as np
import pytest

import distgraph as dg
from distgraph.result import TraceEvent
from distgraph.trace import to_chrome_trace, track_sort_key, write_chrome_trace


def hand_events() -> list[TraceEvent]:
    t = 1_700_000_000.0  # wall-clock seconds, as executors record them
    return [
        TraceEvent("step", "call", "forward", 0, "driver", t, t + 0.010),
        TraceEvent("mul_1", "node", "forward", 1, "worker 1", t + 0.001, t + 0.0015, "mul", 1),
        TraceEvent("z", "node", "forward", 2, "worker 0", t + 0.002, t + 0.0025, "add", 0),
        TraceEvent("mul_1", "transfer", "forward", 1, "worker 0", t + 0.0016, t + 0.0019, worker=0),
        TraceEvent(
            "vjp:z:0", "node", "backward", 4, "worker 10", t + 0.003, t + 0.004, "vjp", 10,
            args={"origin": "z", "bytes": np.int64(8), "norm": np.float32(0.5), "bad": float("nan")},
        ),
        TraceEvent("apply", "update", "update", 0, "parameter server", t + 0.005, t + 0.006),
    ]  # fmt: skip


def thread_names(trace: dict) -> dict[int, str]:
    return {
        e["tid"]: e["args"]["name"]
        for e in trace["traceEvents"]
        if e["ph"] == "M" and e["name"] == "thread_name"
    }


def test_chrome_trace_shape_and_units():
    trace = to_chrome_trace(hand_events())
    assert trace["displayTimeUnit"] == "ms"
    json.dumps(trace, allow_nan=False)  # strict JSON: no NaN leaks out of args
    names = thread_names(trace)
    assert list(names.values()) == sorted(names.values(), key=track_sort_key)
    assert list(names.values()) == [
        "worker 0",
        "worker 1",
        "worker 10",
        "driver",
        "parameter server",
    ]
    complete = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(complete) == 6
    assert {e["pid"] for e in trace["traceEvents"]} == {1}
    assert min(e["ts"] for e in complete) == 0
    by = {(e["name"], e["args"]["kind"]): e for e in complete}
    assert by[("z", "node")]["ts"] == pytest.approx(
        2000, abs=0.5
    )  # microseconds (epoch floats: ~0.2 us grain)
    assert by[("z", "node")]["dur"] == pytest.approx(500, abs=0.5)
    assert names[by[("z", "node")]["tid"]] == "worker 0"
    assert names[by[("mul_1", "node")]["tid"]] == "worker 1"
    assert names[by[("apply", "update")]["tid"]] == "parameter server"
    args = by[("z", "node")]["args"]
    assert args == {
        "kind": "node",
        "phase": "forward",
        "level": 2,
        "node": "z",
        "op": "add",
        "worker": 0,
    }
    vjp = by[("vjp:z:0", "node")]["args"]
    assert vjp["bytes"] == 8 and vjp["norm"] == 0.5 and vjp["bad"] == "nan"
    assert vjp["origin"] == "z" and vjp["phase"] == "backward"
    ts = [e["ts"] for e in complete]
    assert ts == sorted(ts)


def test_write_chrome_trace_round_trips(tmp_path):
    path = tmp_path / "out.trace.json"
    assert write_chrome_trace(path, hand_events()) is None
    assert json.loads(path.read_text()) == to_chrome_trace(hand_events())


def test_write_chrome_trace_refuses_a_missing_folder_and_creates_none(tmp_path):
    """It used to create every missing parent folder, as the report writer did (issue 12.5)."""
    with pytest.raises(dg.ConfigError, match="does not exist"):
        write_chrome_trace(tmp_path / "deep" / "out.trace.json", hand_events())
    assert not (tmp_path / "deep").exists()


def test_empty_trace_is_valid():
    trace = to_chrome_trace([])
    assert [e for e in trace["traceEvents"] if e["ph"] == "X"] == []
    json.dumps(trace, allow_nan=False)


def linear_graph() -> dg.Graph:
    g = dg.Graph()
    x = g.input("x", shape=(None,))
    y = g.input("y", shape=(None,))
    w = g.param("w", -2.0)
    b = g.param("b", 15.0)
    g.output("loss", dg.mse(x * w + b, y))
    return g


def training_feeds() -> dict[str, np.ndarray]:
    x = np.linspace(-1.0, 1.0, 8)
    return {"x": x, "y": 3 * x + 7}


def check_step_trace(g: dg.Graph, events: list[TraceEvent], workers: int) -> None:
    """Forward and backward node events for every operation node; a track per worker."""
    trace = json.loads(json.dumps(to_chrome_trace(events), allow_nan=False))
    names = thread_names(trace)
    for k in range(workers):
        assert f"worker {k}" in names.values()
    complete = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert complete and all({"ts", "dur", "pid", "tid", "name"} <= set(e) for e in complete)
    nodes = [e for e in complete if e["args"]["kind"] == "node"]
    assert all(names[e["tid"]].startswith("worker ") for e in nodes)
    # Backward nodes are generated per forward node; map each back through the gradient graph.
    origin = {n.name: n.origin for n in dg.grad(g, of="loss").spec.nodes if n.phase == "backward"}
    forward = {e["args"]["node"] for e in nodes if e["args"]["phase"] == "forward"}
    backward = {
        origin.get(e["args"]["node"], e["args"]["node"])
        for e in nodes
        if e["args"]["phase"] == "backward"
    }
    ops = [n.name for n in g.spec.nodes if n.op not in ("input", "param", "const")]
    assert ops
    for name in ops:
        assert name in forward, f"no forward event for {name}"
        assert name in backward, f"no backward event for {name}"


def test_local_training_step_trace():
    g = linear_graph()
    res = dg.LocalExecutor().run(g, training_feeds(), grad="loss", trace=True)
    check_step_trace(g, res.trace, workers=1)


def test_ray_two_worker_training_step_trace(tmp_path):
    from raysupport import ensure_ray

    ensure_ray()
    g = linear_graph()
    with dg.RayExecutor(num_workers=2, strategy="round_robin") as ex:
        res = ex.run(g, training_feeds(), grad="loss", trace=True)
    check_step_trace(g, res.trace, workers=2)
    path = tmp_path / "step.trace.json"
    write_chrome_trace(path, res.trace)
    loaded = json.loads(path.read_text())
    assert {"worker 0", "worker 1"} <= set(thread_names(loaded).values())


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_training_step_trace_has_every_track_and_the_update(backend):
    from raysupport import ensure_ray

    g = linear_graph()
    feeds = training_feeds()
    if backend == "ray":
        ensure_ray()
        ex = dg.RayExecutor(num_workers=2, strategy="round_robin")
    else:
        ex = dg.LocalExecutor()
    with ex:
        tr = dg.Trainer(
            g, loss="loss", optimizer=dg.SGD(lr=0.1), executor=ex, trace=True, progress=False
        )
        tr.fit(feeds, epochs=2, batch_size=8)
        events = tr.last_trace
        tr.close()
    workers = 2 if backend == "ray" else 1
    check_step_trace(g, events, workers=workers)
    tracks = {e.track for e in events}
    assert "parameter server" in tracks
    updates = [e for e in events if e.kind == "update"]
    assert len(updates) == 1 and updates[0].name == "apply step 2"
    if backend == "ray":
        assert {"driver", "worker 0", "worker 1"} <= tracks
        assert any(e.kind == "transfer" for e in events)


def test_track_order_puts_replicas_after_workers_and_shards_after_the_server():
    tracks = [
        "parameter server shard 10",
        "replica 1",
        "driver",
        "parameter server shard 2",
        "worker 1",
        "parameter server",
        "replica 0",
        "worker 0",
    ]
    assert sorted(tracks, key=track_sort_key) == [
        "worker 0",
        "worker 1",
        "replica 0",
        "replica 1",
        "driver",
        "parameter server",
        "parameter server shard 2",
        "parameter server shard 10",
    ]


def test_sharded_training_trace_has_a_track_per_worker_and_per_shard_for_every_step(tmp_path):
    """Issue 14, item 7: replicas=2 x ps_shards=2. Every step's trace has one track per worker
    and one per parameter-server shard, each shard with its stage, commit and apply spans of
    that step (in that order, back to back); the steps' traces together make one Chrome trace."""
    from raysupport import ensure_ray

    ensure_ray()
    g = linear_graph()
    per_step: dict[int, list[TraceEvent]] = {}
    with dg.RayExecutor(num_workers=2, replicas=2, ps_shards=2) as ex:
        tr = dg.Trainer(
            g, loss="loss", optimizer=dg.SGD(lr=0.1), executor=ex, trace=True, progress=False
        )
        tr.fit(
            training_feeds(),
            epochs=3,
            batch_size=4,  # two steps an epoch
            callback=lambda step, loss: per_step.__setitem__(step, list(tr.last_trace)),
        )
        steps = tr.applied_steps
        keys = [s["params"] for s in tr.session.status()["shards"]]
        tr.close()
    # Preconditions: several steps, and both shards own a param.
    assert len(steps) >= 2 and sorted(per_step) == steps
    assert all(keys) and sorted(p for k in keys for p in k) == sorted(g.params)
    shard_tracks = ["parameter server shard 0", "parameter server shard 1"]
    for step, events in per_step.items():
        tracks = {e.track for e in events}
        assert {"worker 0", "worker 1", *shard_tracks} <= tracks, (step, tracks)
        assert "parameter server" not in tracks  # the shards' own tracks replace it
        for s, track in enumerate(shard_tracks):
            mine = sorted((e for e in events if e.track == track), key=lambda e: e.start)
            assert [e.name for e in mine] == [
                f"{p} step {step}" for p in ("stage", "commit", "apply")
            ]
            assert all(e.kind == "update" and e.args["shard"] == s for e in mine)
            assert all(e.args["params"] == keys[s] for e in mine)
            assert mine[0].end == mine[1].start and mine[1].end == mine[2].start
            assert all(e.end >= e.start for e in mine)
    path = tmp_path / "run.trace.json"
    write_chrome_trace(path, [e for step in steps for e in per_step[step]])
    loaded = json.loads(path.read_text())
    names = thread_names(loaded)
    tid = {name: t for t, name in names.items()}
    assert list(names.values()) == sorted(names.values(), key=track_sort_key)
    assert {"worker 0", "worker 1", "replica 0", "replica 1", *shard_tracks} <= set(tid)
    for track in shard_tracks:
        spans = [e for e in loaded["traceEvents"] if e["ph"] == "X" and e["tid"] == tid[track]]
        for phase in ("stage", "commit", "apply"):
            assert sorted(e["args"]["step"] for e in spans if e["args"]["phase"] == phase) == steps
    for w in ("worker 0", "worker 1"):
        ran = [e for e in loaded["traceEvents"] if e["ph"] == "X" and e["tid"] == tid[w]]
        assert {e["args"]["replica"] for e in ran if "replica" in e["args"]} == {int(w[-1])}


@pytest.mark.parametrize("shards", [1, 2], ids=lambda s: f"ps_shards{s}")
def test_async_training_trace_has_every_applied_step_per_replica_and_server(shards):
    """An asynchronous run's trace (consistency="async"): every applied step once, as a span
    on its replica's track with that replica's worker events inside it, and the server's
    apply of it (or each shard's stage / commit / apply)."""
    from raysupport import ensure_ray

    ensure_ray()
    g = linear_graph()
    with dg.RayExecutor(
        num_workers=2,
        replicas=2,
        ps_shards=shards,
        consistency="async",
        staleness=1,
        resources_per_worker={"CPU": 0.5},
    ) as ex:
        tr = dg.Trainer(
            g, loss="loss", optimizer=dg.SGD(lr=0.1), executor=ex, trace=True, progress=False
        )
        tr.fit(training_feeds(), epochs=1, batch_size=2, seed=3)  # four steps
        steps = tr.applied_steps
        events = list(tr.last_trace)
        records = tr.session.status()["async"]["records"]
        tr.close()
    # Preconditions: several steps, computed by both replicas.
    assert len(steps) >= 4
    by_replica = {r["step"]: r["replica"] for r in records}
    assert set(by_replica.values()) == {0, 1}
    spans = [e for e in events if e.phase == "replica"]
    assert sorted(e.args["step"] for e in spans) == sorted(steps)  # each applied step once
    for span in spans:
        step, r = span.args["step"], span.args["replica"]
        assert span.track == f"replica {r}" and r == by_replica[step]
        ran = [e for e in events if e.kind == "node" and e.args.get("replica") == r]
        assert ran and all(e.worker == r for e in ran)  # width 1: replica r is worker r
        inside = [e for e in ran if span.start <= e.start and e.end <= span.end]
        assert inside, (step, r)
    if shards == 1:
        applied = sorted(e.name for e in events if e.track == "parameter server")
        assert applied == sorted(f"apply step {s}" for s in steps)
    else:
        for s in range(shards):
            mine = [e for e in events if e.track == f"parameter server shard {s}"]
            assert sorted(e.name for e in mine if e.name.startswith("apply")) == sorted(
                f"apply step {t}" for t in steps
            )
    assert all(e.end >= e.start for e in events)
    assert to_chrome_trace(events)["traceEvents"]
