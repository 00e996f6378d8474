"""The benchmark suite: every benchmark runs in quick mode and reports the named fields.

Timings are never asserted (the machine is shared); the shape of the report is, and so is the
correctness of the hand-written peers the figures are compared against.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import sys

import numpy as np
import pytest

from distgraph import bench
from distgraph.bench import fine, mlp, scale
from distgraph.bench.__main__ import main as bench_main
from distgraph.bench._harness import Record, ray_runtime
from distgraph.errors import ConfigError

#: The figures each benchmark must report (more are allowed; optional peers are not listed).
REQUIRED_FIGURES = {
    "fine": [
        "numpy_s",
        "dask_threaded_s",
        "ray_tasks_s",
        "distgraph_local_s",
        "distgraph_mincut_s",
        "distgraph_level_s",
        "distgraph_mincut_compiled_s",
        "distgraph_level_compiled_s",
    ],
    "mlp": [
        "numpy_s",
        "ray_ps_s",
        "ray_floor_s",
        "distgraph_local_s",
        "distgraph_ray_s",
        "distgraph_ray_unoptimised_s",
    ],
    "dp": ["numpy_s", "ray_ps_s", "replicas1_s", "replicas2_s"],
    "dp_sim": ["ideal_step_s", "r1_step_s", "r2_step_s", "r4_step_s", "r8_step_s"],
    "straggler": [
        "sync_unslowed_step_s",
        "sync_step_s",
        "async_step_s",
        "async_max_staleness",
        "steps",
    ],
    "wide": ["numpy_1thread_s", "distgraph_local_s", "distgraph_ray_s", "distgraph_ray_compiled_s"],
    "latency": [
        "ray_round_trip_s",
        "ray_round_trip_pipelined_s",
        "distgraph_step_s",
        "distgraph_step_compiled_s",
    ],
    "scale": [
        "build_s",
        "grad_s",
        "levels_s",
        "partition_s",
        "total_s",
        "mincut_cut_edges",
        "mincut_balance",
        "metis_cut_edges",
        "metis_balance",
    ],
    "soak": [
        "steps",
        "rss_first_mb",
        "rss_last_mb",
        "store_first_bytes",
        "store_last_bytes",
        "driver_refs_first",
        "driver_refs_last",
    ],
    "conv": ["numpy_s", "distgraph_local_s"],
    "attention": ["numpy_s", "distgraph_local_s"],
    "pipeline": [
        "sim_ideal_step_s",
        "sim_gpipe_step_s",
        "sim_1f1b_step_s",
        "sim_gpipe_predicted_s",
        "sim_gpipe_bubble_measured",
        "sim_bubble_formula",
        "real_one_worker_step_s",
        "real_pipeline_2x4_step_s",
        "real_two_process_ceiling",
    ],
    "scaleout": ["calibrated_action_overhead_s", "n2_step_s", "n2_ideal_s", "n2_predicted_s"],
}


@pytest.fixture(scope="module")
def ray_session():
    """One Ray runtime for every benchmark in this module (reused if one is already up)."""
    with ray_runtime():
        yield


@pytest.fixture(scope="module")
def quick_results(ray_session):
    """The whole suite in quick mode, run once for the module."""
    return {r["name"]: r for r in bench.run(None, quick=True, progress=False)}


def test_suite_lists_every_benchmark():
    assert set(REQUIRED_FIGURES) == set(bench.NAMES)


@pytest.mark.parametrize("name", bench.NAMES)
def test_quick_run_reports_named_fields(quick_results, name):
    result = quick_results[name]
    assert result["error"] is None, result["error"]
    assert set(result) == {"name", "figures", "ratios", "targets", "notes", "error"}
    assert result["name"] == name
    missing = [f for f in REQUIRED_FIGURES[name] if f not in result["figures"]]
    assert not missing, f"{name} did not report {missing}"
    for label, value in result["figures"].items():
        assert isinstance(value, float) and math.isfinite(value), (label, value)
    for label, value in result["ratios"].items():
        assert isinstance(value, float), (label, value)
    module = __import__(f"distgraph.bench.{name}", fromlist=["TARGETS"])
    assert set(result["targets"]) == set(module.TARGETS)
    for label, t in result["targets"].items():
        assert set(t) == {"value", "target", "met"}, label
        assert isinstance(t["met"], bool)
        if (
            name == "scale"
            and label == "cut_vs_metis"
            and result["figures"]["mincut_parts_used"] < 8
        ) or (
            name == "scaleout"
            and label == "efficiency_16"
            and "n16_step_s" not in result["figures"]
        ):
            assert not t["met"] and "not judged" in result["notes"]
            continue
        assert math.isfinite(t["value"]), f"target {label} was not measured"
        op, bound = module.TARGETS[label]
        assert t["target"] == f"{op} {bound:g}"
        assert t["met"] == (t["value"] <= bound if op == "<=" else t["value"] >= bound)
    assert isinstance(result["notes"], str) and result["notes"]


def test_json_and_table_render_the_results(quick_results):
    results = list(quick_results.values())
    doc = json.loads(bench.to_json(results))
    assert [r["name"] for r in doc["results"]] == list(bench.NAMES)
    for key in ("logical_cores", "memory_gib", "python", "numpy", "ray", "dask"):
        assert key in doc["machine"]
    table = bench.format_table(results)
    for name in bench.NAMES:
        assert f"== {name} ==" in table
    assert "targets met:" in table


def test_unknown_benchmark_is_refused():
    with pytest.raises(ValueError, match="nosuch"):
        bench.run(["nosuch"], quick=True)
    with pytest.raises(SystemExit):
        bench_main(["nosuch"])


def test_every_peer_of_the_suite_is_in_the_bench_extra():
    # PEERS drive the missing-extra error: a peer outside the extra could never be installed by
    # the command the error names. Import names are the distribution names here.
    from importlib.metadata import requires

    extra = [r for r in requires("distgraph") or [] if 'extra == "bench"' in r]
    peers = {
        pkg for n in bench.NAMES for pkg in importlib.import_module(f"distgraph.bench.{n}").PEERS
    }
    assert peers == {"dask", "distributed", "pymetis", "psutil"}
    assert all(any(pkg in r for r in extra) for pkg in peers), (peers, extra)
    assert bench.missing_peers() == {}  # this environment has the extra: the tests above ran


@pytest.mark.parametrize(
    ("name", "absent"), [("fine", "distributed"), ("scale", "pymetis"), ("soak", "psutil")]
)
def test_missing_peer_stops_the_run_with_the_install_command(monkeypatch, capsys, name, absent):
    from distgraph.cli import main as cli_main

    assert importlib.util.find_spec(absent) is not None  # installed: the None below is the cause
    monkeypatch.setitem(sys.modules, absent, None)  # what an uninstalled package looks like
    assert bench.missing_peers([name, "latency"]) == {name: [absent]}
    with pytest.raises(
        ConfigError, match=rf"{name} needs {absent}\b.*pip install 'distgraph\[bench\]'"
    ):
        bench.run([name], quick=True)

    assert cli_main(["bench", name, "--quick", "--json"]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # nothing ran, nothing half-reported
    assert len(err.strip().splitlines()) == 1 and err.startswith(
        "distgraph: error: benchmark peers"
    )
    assert "pip install 'distgraph[bench]'" in err and f"{name} needs {absent}" in err
    assert "or run only" in err and "latency" in err

    with pytest.raises(SystemExit) as stop:
        bench_main([name, "--quick"])
    assert stop.value.code == 2
    assert "pip install 'distgraph[bench]'" in capsys.readouterr().err


def test_failed_benchmark_keeps_its_targets_as_not_met():
    rec = Record("x", goals={"speed": ("<=", 1.0), "gain": (">=", 2.0)})
    rec.target("gain", 2.5)
    out = rec.as_dict()
    assert out["targets"]["gain"] == {"value": 2.5, "target": ">= 2", "met": True}
    assert math.isnan(out["targets"]["speed"]["value"]) and not out["targets"]["speed"]["met"]
    assert rec.ratio("r", 1.0, 0.0) != rec.ratio("r", 1.0, 0.0)  # NaN, not a ZeroDivisionError


def test_numpy_mlp_gradients_match_finite_differences():
    params, x, y = mlp.make_problem([5, 4, 3], batch=6, seed=3)
    params = [p.astype(np.float64) for p in params]
    x, y = x.astype(np.float64), y.astype(np.float64)
    _, grads = mlp.loss_and_grads(params, x, y)
    rng = np.random.default_rng(0)
    for p, g in zip(params, grads, strict=True):
        idx = tuple(rng.integers(0, s) for s in p.shape)
        old = p[idx]
        p[idx] = old + 1e-6
        up, _ = mlp.loss_and_grads(params, x, y)
        p[idx] = old - 1e-6
        down, _ = mlp.loss_and_grads(params, x, y)
        p[idx] = old
        assert g[idx] == pytest.approx((up - down) / 2e-6, rel=1e-4, abs=1e-8)


def test_numpy_mlp_step_lowers_the_loss():
    params, x, y = mlp.make_problem([8, 16, 4], batch=16, seed=1)
    first = mlp.numpy_step(params, x, y, lr=0.1)
    for _ in range(20):
        last = mlp.numpy_step(params, x, y, lr=0.1)
    assert last < first


def test_dask_graph_matches_the_numpy_loop():
    import dask.threaded

    inputs, edges = fine.make_dag(levels=3, width=5, dim=4, seed=2)
    dsk, keys = fine.dask_graph(inputs, edges)
    want = fine.run_numpy(inputs, edges)
    got = dask.threaded.get(dsk, keys)
    assert all(np.allclose(a, b) for a, b in zip(got, want, strict=True))


def test_cut_metric_and_metis_on_two_cliques():
    # Two 4-cliques joined by one edge: the best 2-way cut is that edge.
    clique = [(a, b) for a in range(4) for b in range(a + 1, 4)]
    edges = np.array(clique + [(a + 4, b + 4) for a, b in clique] + [(3, 4)])
    parts = scale.metis_parts(8, edges, 2, imbalance=1.0)
    cut, balance = scale.cut_and_balance(parts, edges, 2)
    assert cut == 1 and balance == 1.0
    cut, balance = scale.cut_and_balance(np.array([0] * 7 + [1]), edges, 2)
    assert cut == 3 and balance == pytest.approx(7 / 4)


def test_scale_structure_has_the_requested_size():
    rows = scale.sized_structure(3_000, seed=1)
    sinks = scale._sinks(rows)
    total = len(rows) + len(sinks)  # the reduction tree adds one node per sink
    assert abs(total - 3_000) < 300
    assert all(p < i for i, (_, parents) in enumerate(rows) for p in parents)


def test_stepprofile_cuts_a_step_trace_into_phases_that_add_up():
    from distgraph.bench.stepprofile import PHASES, phases, table
    from distgraph.result import TraceEvent

    def ev(name, kind, track, start, end, worker=None, phase="forward"):
        return TraceEvent(name, kind, phase, 0, track, start, end, worker=worker)

    events = [
        ev("step 1", "call", "driver", 0.0, 10.0, phase="step"),
        ev("call 0", "call", "worker 0", 1.0, 6.0, worker=0),
        ev("matmul", "node", "worker 0", 1.5, 4.5, worker=0),
        ev("update step 1", "update", "worker 0", 5.0, 6.0, worker=0, phase="update"),
        ev("call 1", "call", "worker 1", 1.0, 2.0, worker=1),
        ev("add", "node", "worker 1", 1.2, 1.8, worker=1),
        ev("apply step 1", "update", "parameter server", 7.0, 9.0, phase="update"),
    ]
    got = phases(events)
    assert list(got) == list(PHASES)
    assert got == {
        "driver submit": 1.0,
        "worker compute": 3.0,  # the busiest worker's nodes
        "worker update": 1.0,
        "worker call, not compute": 1.0,
        "to server": 1.0,
        "server stage + apply": 2.0,
        "back to driver": 1.0,
    }
    assert sum(got.values()) == 10.0
    text = table({"training": got})
    assert "| worker compute | 3000.0 |" in text and "**10000.0**" in text
